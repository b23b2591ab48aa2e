"""Model presets keyed by name (plain dicts, BasicSR style) and builders."""

from __future__ import annotations

from typing import Any

from .backbone import SRBackbone
from .carn import CARN
from .clustblock import ClustBlock
from .elan import ELANLight
from .quant_cadyq import CANDIDATES, convert_to_cadyq
from .quant_cadyq import SCHEME as CADYQ
from .quantizers import SR_QUANTIZERS
from .refqsr import RefQSR
from .srresnet import SRResNet

ARCHS: dict[str, dict[str, Any]] = {
    "srresnet": {"cls": SRResNet, "n_blocks": 16, "n_feats": 64, "scale": 4, "n_refer": 2},
    "carn": {"cls": CARN, "n_blocks": 9, "n_feats": 64, "scale": 4, "n_refer": 1},
    "elan_light": {
        "cls": ELANLight,
        "n_blocks": 24,
        "n_feats": 60,
        "scale": 4,
        "n_refer": 2,
        "window_sizes": (4, 8, 16),
    },
}


def arch_names() -> list[str]:
    return sorted(ARCHS)


def arch_config(arch: str) -> dict[str, Any]:
    try:
        return dict(ARCHS[arch])
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(arch_names())}") from None


def size_keys(arch: str) -> list[str]:
    """The preset entries a model file may override (network sizes and scale; not the class)."""
    return [k for k in arch_config(arch) if k not in ("cls", "n_refer")]


def build_sr(
    arch: str,
    scheme: str | None = None,
    act_bits: tuple[int, ...] = (),
    candidates: tuple[int, ...] = CANDIDATES,
    **overrides: Any,
) -> SRBackbone:
    """Full-precision (scheme None), fixed-precision quantized (pams, ddtb) or CADyQ (``cadyq``:
    every block conv becomes a CadyqConv2d choosing among ``candidates`` per patch, on top of any
    fixed ``act_bits``) SR network. ``overrides`` change preset sizes (n_blocks, n_feats), e.g. for
    small test models."""
    if scheme is not None and scheme not in SR_QUANTIZERS:
        raise ValueError(f"unknown quantizer {scheme!r}; choose from {', '.join(SR_QUANTIZERS)}")
    cfg = {**arch_config(arch), **overrides}
    cls = cfg.pop("cls")
    cfg.pop("n_refer")
    net = cls(scheme=scheme, act_bits=act_bits, **cfg)
    if scheme == CADYQ:
        convert_to_cadyq(net.blocks, candidates)
    return net


def build_refqsr(
    arch: str,
    scheme: str,
    b_high: int,
    b_low: int,
    clustblock: ClustBlock | None = None,
    tau: float = 0.5,
    **overrides: Any,
) -> RefQSR:
    """RefQSR on a ``scheme`` backbone. With ``cadyq`` this is δ-RefQSR: references (and the query
    path's first block and RefER convs) at δ with weights at ``b_high``, queries at b_low."""
    n_refer = overrides.pop("n_refer", arch_config(arch)["n_refer"])
    tail = overrides.pop("tail", "refer")
    matching = overrides.pop("matching", "paper")
    backbone = build_sr(arch, scheme, (b_high, b_low), **overrides)
    return RefQSR(backbone, b_high, b_low, n_refer, clustblock, tau, tail, matching)
