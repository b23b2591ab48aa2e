"""BitOPs and FQR accounting (paper Sec. IV-A-3, following CADyQ's conventions).

BitOPs = sum over the quantized feature-extraction convs of 2 * MACs * (b_w / 32) * (b_a / 32),
counted per patch (overlapping pixels are counted in every patch that computes them). For RefQSR
the RefER refinement convs (at b_high) and the RefER cost volume (both operands at b_low) are
counted too; ClustBlock is reported on its own line, as the paper's Table III does. Not counted:
the full-precision head, body-end conv, upsampler and tail (no method quantizes them), L2
normalisation, pooling, arg-max, flow upsampling and warping (no weight multiplies, O(HWC) each).
FQR = mean activation bit width over the quantized convs, weighted by their MACs (all SRResNet
and CARN block convs have equal MACs, so within a patch this is the plain mean over layers).

Grids: 'paper' is CADyQ's (patch origins every P - overlap LR px, floor((L - P) / step) + 1 patches
per axis, the last row/column stretched to the image edge), 'engine' is the runtime's fixed-size
grid (every patch P x P, the last one shifted back to the edge), 'full' is the whole image at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..engine.tiling import make_grid
from .matching import POOL, pooled_size
from .qconv import BitSpec
from .quant_base import FULL_PRECISION, check_bits
from .refqsr import medium_bits
from .registry import arch_config

GRIDS = ("paper", "engine", "full")
CLUST_LAYERS = ((3, 64, 3, 3), (64, 64, 3, 1), (64, 32, 3, 1))  # (in, out, kernel, stride), Table I
CLUST_BITS = 8


@dataclass(frozen=True)
class Precision:
    """'32' (full precision), '8' (fixed), or '8-4' (RefQSR b_high-b_low)."""

    b_high: int
    b_low: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Precision":
        parts = str(text).split("-")
        try:
            bits = [check_bits(int(p)) for p in parts]
        except ValueError as err:
            raise ValueError(f"bad bit setting {text!r}: use e.g. 32, 8, 4 or 8-4 ({err})") from None
        if len(bits) == 1:
            return cls(bits[0])
        if len(bits) != 2 or FULL_PRECISION in bits or bits[1] > bits[0]:
            raise ValueError(f"bad RefQSR bit setting {text!r}: use b_high-b_low with 2 <= b_low <= b_high <= 8")
        return cls(bits[0], bits[1])

    @property
    def is_refqsr(self) -> bool:
        return self.b_low is not None

    @property
    def label(self) -> str:
        return f"{self.b_high}-{self.b_low}" if self.is_refqsr else str(self.b_high)


@dataclass(frozen=True)
class Box:
    """A patch in LR pixels: origin and size."""

    y: int
    x: int
    h: int
    w: int

    @property
    def pixels(self) -> int:
        return self.h * self.w


def _paper_axis(length: int, patch: int, overlap: int) -> list[tuple[int, int]]:
    if length <= patch:
        return [(0, length)]
    step = patch - overlap
    count = (length - patch) // step + 1
    spans = [(k * step, patch) for k in range(count)]
    last_origin = spans[-1][0]
    spans[-1] = (last_origin, length - last_origin)  # stretched to the edge
    return spans


def grid_boxes(height: int, width: int, patch: int, overlap: int, grid: str) -> list[Box]:
    """Patches (row-major) of an LR image under one of GRIDS."""
    if grid == "full":
        return [Box(0, 0, height, width)]
    if grid == "paper":
        return [Box(y, x, h, w) for y, h in _paper_axis(height, patch, overlap) for x, w in _paper_axis(width, patch, overlap)]
    if grid == "engine":
        g = make_grid(height, width, patch, overlap)
        return [Box(y, x, patch, patch) for y, x in g.origins()]  # the engine computes padded pixels too
    raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")


def conv_bitops(macs: float, bits: BitSpec) -> float:
    return 2.0 * macs * (bits.weight / 32) * (bits.act / 32)


@dataclass
class Tally:
    """BitOPs by component plus the MAC-weighted activation-bit sum that FQR is made of."""

    resblocks: float = 0.0
    refer_convs: float = 0.0
    cost_volume: float = 0.0
    clustblock: float = 0.0
    act_bit_macs: float = 0.0
    macs: float = 0.0

    def add_conv(self, macs: float, bits: BitSpec, part: str) -> None:
        setattr(self, part, getattr(self, part) + conv_bitops(macs, bits))
        self.act_bit_macs += macs * bits.act
        self.macs += macs

    def scaled(self, weight: float) -> "Tally":
        return Tally(*(weight * v for v in self.__dict__.values()))

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))

    @property
    def network(self) -> float:
        """Quantized feature extraction (ResBlocks + RefER), the paper's BitOPs column."""
        return self.resblocks + self.refer_convs + self.cost_volume

    @property
    def fqr(self) -> float:
        return self.act_bit_macs / self.macs if self.macs else 0.0


def clustblock_macs(h: int, w: int, num_classes: int = 47) -> float:
    macs = 0.0
    for cin, cout, k, stride in CLUST_LAYERS:
        h, w = (h - k) // stride + 1, (w - k) // stride + 1
        macs += h * w * cin * cout * k * k
    return macs + CLUST_LAYERS[-1][1] * num_classes


class ArchCost:
    """Per-patch BitOPs of one architecture: n_blocks blocks of quantized convs (their MACs per
    pixel from the architecture's ``block_conv_macs``), n_refer RefERs on the query path."""

    def __init__(self, arch: str, **sizes: int | str) -> None:
        """``sizes`` override the preset (n_blocks, n_feats, n_refer), for non-default networks."""
        cfg = {**arch_config(arch), **sizes}
        self.n_blocks, self.feats, self.n_refer = cfg["n_blocks"], cfg["n_feats"], cfg["n_refer"]
        self.tail = cfg.get("tail", "refer")  # "highbit": Table V's w/o-RefER query path
        self.block_macs_per_px = cfg["cls"].block_conv_macs(self.feats)
        self.refer_conv_macs_per_px = self.feats * self.feats * 9  # RefER's two 3x3 refinement convs

    def _block(self, t: Tally, pixels: int, bits: BitSpec) -> None:
        for macs in self.block_macs_per_px:
            t.add_conv(macs * pixels, bits, "resblocks")

    def uniform(self, box: Box, bits: BitSpec) -> Tally:
        t = Tally()
        for _ in range(self.n_blocks):
            self._block(t, box.pixels, bits)
        return t

    def query(self, box: Box, ref_box: Box, p: Precision) -> Tally:
        high = BitSpec.uniform(p.b_high)
        low = BitSpec(p.b_low, medium_bits(p.b_high, p.b_low))  # type: ignore[arg-type]
        t = Tally()
        first_refer = self.n_blocks - self.n_refer
        for block in range(first_refer):
            self._block(t, box.pixels, high if block == 0 else low)
        if self.tail == "highbit":  # the replaced blocks stay blocks, at b_high
            for _ in range(self.n_refer):
                self._block(t, box.pixels, high)
            return t
        positions_q = pooled_size(box.h, POOL) * pooled_size(box.w, POOL)
        positions_r = pooled_size(ref_box.h, POOL) * pooled_size(ref_box.w, POOL)
        for _ in range(self.n_refer):
            t.add_conv(self.refer_conv_macs_per_px * box.pixels, high, "refer_convs")
            t.add_conv(self.refer_conv_macs_per_px * box.pixels, high, "refer_convs")
            t.cost_volume += conv_bitops(positions_q * positions_r * self.feats, BitSpec.uniform(p.b_low))  # type: ignore[arg-type]
        return t

    def clustblock(self, box: Box) -> Tally:
        return Tally(clustblock=conv_bitops(clustblock_macs(box.h, box.w), BitSpec.uniform(CLUST_BITS)))


@dataclass
class BitOpsReport:
    arch: str
    precision: str
    grid: str
    lr_size: tuple[int, int]
    patch: int | None
    overlap: int
    num_patches: int
    num_references: float
    total: Tally = field(default_factory=Tally)

    @property
    def gbitops(self) -> float:
        return self.total.network / 1e9

    def as_dict(self) -> dict:
        t = self.total
        return {
            "arch": self.arch,
            "bits": self.precision,
            "grid": self.grid,
            "lr_size": list(self.lr_size),
            "patch": self.patch,
            "overlap": self.overlap,
            "patches": self.num_patches,
            "references": self.num_references,
            "bitops_g": round(self.gbitops, 4),
            "fqr": round(t.fqr, 4),
            "resblocks_g": round(t.resblocks / 1e9, 4),
            "refer_convs_g": round(t.refer_convs / 1e9, 4),
            "cost_volume_g": round(t.cost_volume / 1e9, 4),
            "clustblock_g": round(t.clustblock / 1e9, 4),
        }


def count_bitops(
    arch: str,
    lr_size: tuple[int, int],
    bits: str | Precision,
    patch: int | None = 96,
    overlap: int = 6,
    grid: str = "paper",
    is_reference: Sequence[bool] | None = None,
    reference_of: Sequence[int] | None = None,
    ref_fraction: float | None = None,
    **sizes: int,
) -> BitOpsReport:
    """BitOPs/FQR of one LR image (height, width).

    RefQSR needs the assignment: ``is_reference`` per patch (with ``reference_of`` giving each
    query's reference index; without it a query's reference is taken to be its own size), or
    ``ref_fraction``, the expected share of reference patches (every patch is then costed as
    ref_fraction * reference + (1 - ref_fraction) * query)."""
    p = bits if isinstance(bits, Precision) else Precision.parse(bits)
    h, w = lr_size
    if grid == "full" or patch is None:
        grid, patch = "full", None
    boxes = grid_boxes(h, w, patch or 0, overlap, grid)
    cost = ArchCost(arch, **sizes)
    total = Tally()
    n_refs: float = len(boxes)
    if not p.is_refqsr:
        for box in boxes:
            total = total + cost.uniform(box, BitSpec.uniform(p.b_high))
    else:
        if grid == "full":
            raise ValueError("RefQSR works on patches: choose the paper or engine grid")
        high = BitSpec.uniform(p.b_high)
        if is_reference is not None:
            if len(is_reference) != len(boxes):
                raise ValueError(f"is_reference has {len(is_reference)} entries for {len(boxes)} patches")
            refs = reference_of if reference_of is not None else range(len(boxes))
            for i, (box, ref, ref_idx) in enumerate(zip(boxes, is_reference, refs)):
                part = cost.uniform(box, high) if ref else cost.query(box, boxes[ref_idx if ref_idx != i else i], p)
                total = total + part + cost.clustblock(box)
            n_refs = float(sum(bool(r) for r in is_reference))
        elif ref_fraction is not None:
            if not 0.0 <= ref_fraction <= 1.0:
                raise ValueError("ref_fraction must be in [0, 1]")
            for box in boxes:
                mixed = cost.uniform(box, high).scaled(ref_fraction) + cost.query(box, box, p).scaled(1 - ref_fraction)
                total = total + mixed + cost.clustblock(box)
            n_refs = ref_fraction * len(boxes)
        else:
            raise ValueError("RefQSR BitOPs need the patch assignment: is_reference per patch or ref_fraction")
    return BitOpsReport(arch, p.label, grid, (h, w), patch, overlap, len(boxes), n_refs, total)


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' (width x height) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad size {text!r}: use WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 1 or h < 1:
        raise ValueError(f"bad size {text!r}: width and height must be positive")
    return h, w


def hr_to_lr(hr_size: tuple[int, int], scale: int) -> tuple[int, int]:
    """LR size of an HR size (HR dims that are not multiples of the scale are cropped, as in training)."""
    return hr_size[0] // scale, hr_size[1] // scale


__all__ = ["BitOpsReport", "Precision", "count_bitops", "grid_boxes", "parse_size", "hr_to_lr", "GRIDS"]
