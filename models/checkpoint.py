"""One file format for every trained model: a torch file with the config to rebuild the module,
its weights (floats stored as fp16 to keep bundled models small) and a model card."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RefQSRError
from ..files import publish
from .backbone import SRBackbone
from .cabm import CabmTable, attach_cabm
from .clustblock import ClustBlock
from .quant_cadyq import SCHEME as CADYQ
from .quant_cadyq import dynamic_convs
from .refqsr import RefQSR
from .registry import build_refqsr, build_sr, size_keys

FORMAT = "refqsr-engine/model-1"


def _cadyq_config(model: nn.Module) -> dict[str, Any]:
    """CADyQ's candidate widths and, for CABM, the lookup table (absent for other schemes)."""
    convs = dynamic_convs(model)
    if not convs:
        return {}
    cfg: dict[str, Any] = {"candidates": list(convs[0].candidates)}
    table = getattr(model, "cabm", None)
    if table is not None:
        cfg["cabm"] = table.as_config()
    return cfg


def model_config(model: nn.Module) -> dict[str, Any]:
    """What is needed to rebuild ``model`` before loading its weights."""
    if isinstance(model, RefQSR):
        net = model.backbone
        clust = model.clustblock.num_classes if model.clustblock is not None else None
        return {
            "kind": "refqsr",
            "arch": net.arch,
            "scheme": net.scheme,
            "b_high": model.b_high,
            "b_low": model.b_low,
            "tau": model.tau,
            "clust_classes": clust,
            "n_refer": model.n_refer,
            "tail": model.tail,
            "matching": model.matching,
            **net.sizes(),
            **_cadyq_config(model),
        }
    if isinstance(model, SRBackbone):
        return {
            "kind": "sr",
            "arch": model.arch,
            "scheme": model.scheme,
            "act_bits": model.act_bits(),
            **model.sizes(),
            **_cadyq_config(model),
        }
    if isinstance(model, ClustBlock):
        return {"kind": "clustblock", "classes": model.num_classes}
    raise TypeError(f"cannot save a {type(model).__name__}")


def build_from_config(cfg: dict[str, Any]) -> nn.Module:
    kind = cfg["kind"]
    sizes = {k: cfg[k] for k in size_keys(cfg["arch"]) if k in cfg} if "arch" in cfg else {}
    if "candidates" in cfg:  # CADyQ
        sizes["candidates"] = tuple(cfg["candidates"])
    if kind == "clustblock":
        return ClustBlock(cfg["classes"])
    model: nn.Module
    if kind == "sr":
        model = build_sr(cfg["arch"], cfg["scheme"], tuple(cfg["act_bits"]), **sizes)
    elif kind == "refqsr":
        clust = ClustBlock(cfg["clust_classes"]) if cfg.get("clust_classes") else None
        for key in ("n_refer", "tail", "matching"):  # absent from files written before they existed
            if key in cfg:
                sizes[key] = cfg[key]
        model = build_refqsr(cfg["arch"], cfg["scheme"], cfg["b_high"], cfg["b_low"], clust, cfg["tau"], **sizes)
    else:
        raise RefQSRError(f"unknown model kind {kind!r}")
    if cfg.get("cabm"):  # a CABM model: its lookup table
        attach_cabm(model, CabmTable.from_config(cfg["cabm"]))
    return model


def save_model(path: str | Path, model: nn.Module, card: dict[str, Any] | None = None, half: bool = True) -> None:
    """Write ``model`` (fp16 floats by default), its rebuild config and ``card`` atomically."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    # The card goes through JSON so it holds plain types only (weights_only loading accepts no others).
    plain_card = json.loads(json.dumps(card or {}, default=str))
    payload = {"format": FORMAT, "config": model_config(model), "state_dict": state, "card": plain_card}
    atomic_torch_save(payload, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a
    truncated file, and an existing file is replaced only by a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bits_label(cfg: dict[str, Any]) -> str:
    """The bits a saved model runs at, as users write them: "8-4" (RefQSR), "8", "32" (full
    precision), "δ" (CADyQ/CABM), "δ-3" (their RefQSR)."""
    dynamic = cfg.get("scheme") == CADYQ
    if cfg["kind"] == "refqsr":
        return f"{'δ' if dynamic else cfg['b_high']}-{cfg['b_low']}"
    if dynamic:
        return "δ"
    bits = cfg.get("act_bits") or []
    return str(bits[0]) if cfg.get("scheme") and bits else "32"


def _read_payload(path: Path) -> dict[str, Any]:
    """A model file's contents, loaded weights-only (a pickle that would run code is refused)."""
    if not path.is_file():
        raise RefQSRError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise RefQSRError(f"{path} is not a readable model file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RefQSRError(f"{path} is not a refqsr-engine model (expected format {FORMAT})")
    return payload


def read_config(path: str | Path) -> dict[str, Any]:
    """The rebuild config of a model file without building the model."""
    return dict(_read_payload(Path(path))["config"])


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (eval mode, float32) and return it with its card."""
    path = Path(path)
    payload = _read_payload(path)
    model = build_from_config(payload["config"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RefQSRError(f"{path}: weights do not match the model config ({str(err).splitlines()[0]})") from None
    return model.eval(), dict(payload.get("card", {}))
