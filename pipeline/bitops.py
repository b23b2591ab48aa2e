"""BitOPs and FQR accounting (paper Sec. IV-A-3, following CADyQ's conventions).

BitOPs = sum over the quantized feature-extraction convs of 2 * MACs * (b_w / 32) * (b_a / 32),
counted per patch (overlapping pixels are counted in every patch that computes them). For RefQSR
the RefER refinement convs (at b_high) and the RefER cost volume (both operands at b_low; with
shared matching one 8-bit cost volume per query instead of one per RefER) are counted too;
ClustBlock is reported on its own line, as the paper's Table III does. Not counted: the
full-precision head, body-end conv, upsampler and tail (no method quantizes them), L2
normalisation, pooling, arg-max, flow upsampling and warping (no weight multiplies, O(HWC) each).
FQR = mean activation bit width over the quantized convs, weighted by their MACs (all SRResNet
and CARN block convs have equal MACs, so within a patch this is the plain mean over layers).

δ settings (CADyQ/CABM, "δ" or "δ-3"): activation bits differ per patch and layer, so their
BitOPs/FQR are counted from the bits a run actually chose (``PatchBits`` per patch, e.g. from
:func:`patch_bits_of_run`), passed to ``count_bitops(..., patch_bits=...)``.

Grids: 'paper' is CADyQ's (patch origins every P - overlap LR px, floor((L - P) / step) + 1 patches
per axis, the last row/column stretched to the image edge), 'engine' is the runtime's fixed-size
grid (every patch P x P, the last one shifted back to the edge), 'full' is the whole image at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .bits import COSINE_BITS, DELTA_WEIGHT_BITS, FULL_PRECISION, POOL, BitSpec, check_bits, medium_bits, pooled_size
from .tiling import make_grid

GRIDS = ("paper", "engine", "full")
CLUST_LAYERS = ((3, 64, 3, 3), (64, 64, 3, 1), (64, 32, 3, 1))  # (in, out, kernel, stride), Table I
CLUST_BITS = 8


DELTA_NAMES = ("delta", "δ")


@dataclass(frozen=True)
class Precision:
    """'32' (full precision), '8' (fixed), '8-4' (RefQSR b_high-b_low), 'delta' / 'δ' (CADyQ/CABM:
    activation bits chosen per patch and layer, weights at b_high = 8) or 'delta-3' / 'δ-3'
    (δ-RefQSR: references at δ, queries at b_low)."""

    b_high: int
    b_low: int | None = None
    dynamic: bool = False

    @classmethod
    def parse(cls, text: str) -> Precision:
        text = str(text).strip()
        name = next((n for n in DELTA_NAMES if text.lower().startswith(n)), None)
        if name is not None:
            rest = text[len(name) :]
            if not rest:
                return cls(DELTA_WEIGHT_BITS, None, True)
            try:
                low = int(rest[1:]) if rest.startswith("-") else None
            except ValueError:
                low = None
            if low is None or low not in range(2, DELTA_WEIGHT_BITS + 1):
                raise ValueError(
                    f"bad δ bit setting {text!r}: use delta (δ) or delta-b_low with 2 <= b_low <= 8, e.g. delta-3"
                )
            return cls(DELTA_WEIGHT_BITS, low, True)
        parts = text.split("-")
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
        high = "δ" if self.dynamic else str(self.b_high)
        return f"{high}-{self.b_low}" if self.is_refqsr else high


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
        return [
            Box(y, x, h, w)
            for y, h in _paper_axis(height, patch, overlap)
            for x, w in _paper_axis(width, patch, overlap)
        ]
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

    def scaled(self, weight: float) -> Tally:
        return Tally(*(weight * v for v in self.__dict__.values()))

    def __add__(self, other: Tally) -> Tally:
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


@dataclass(frozen=True)
class PatchBits:
    """The bits one patch actually ran at. ``blocks[k][j]``: conv j of block k (the order of the
    architecture's ``block_conv_macs``) for the blocks the patch's path ran as blocks;
    ``refers[r][j]``: RefER r's refinement conv j (query patches of RefQSR); ``match_bits``: the
    width of the RefER cost volume's operands (b_low; 8 with shared matching), needed when
    ``refers`` is not empty; ``shared_match``: one cost volume for all RefERs (RefQSR's shared
    matching) instead of one per RefER."""

    blocks: tuple[tuple[BitSpec, ...], ...]
    refers: tuple[tuple[BitSpec, ...], ...] = ()
    match_bits: int | None = None
    shared_match: bool = False


@dataclass(frozen=True)
class NetworkCost:
    """What BitOPs accounting needs of a network, as plain numbers (a model file or an artifact's
    manifest supplies them): ``n_blocks`` blocks of quantized convs whose MACs per output pixel are
    ``block_macs_per_px``, ``n_refer`` RefERs on the query path (two 3x3 ``feats`` -> ``feats``
    refinement convs each), ``tail`` ("refer", or "highbit": Table V's w/o-RefER query path) and
    ``shared_match`` (one 8-bit cost volume per query instead of one per RefER)."""

    arch: str
    n_blocks: int
    feats: int
    n_refer: int
    block_macs_per_px: tuple[int, ...]
    tail: str = "refer"
    shared_match: bool = False

    @property
    def refer_conv_macs_per_px(self) -> int:
        return self.feats * self.feats * 9

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "block_macs_per_px": list(self.block_macs_per_px)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkCost:
        return cls(**{**d, "block_macs_per_px": tuple(int(m) for m in d["block_macs_per_px"])})


class ArchCost:
    """Per-patch BitOPs of one network (:class:`NetworkCost`)."""

    def __init__(self, net: NetworkCost) -> None:
        self.n_blocks, self.feats, self.n_refer = net.n_blocks, net.feats, net.n_refer
        self.tail = net.tail
        self.shared_match = net.shared_match
        self.block_macs_per_px = net.block_macs_per_px
        self.refer_conv_macs_per_px = net.refer_conv_macs_per_px

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
        volume = positions_q * positions_r * self.feats
        for _ in range(self.n_refer):
            t.add_conv(self.refer_conv_macs_per_px * box.pixels, high, "refer_convs")
            t.add_conv(self.refer_conv_macs_per_px * box.pixels, high, "refer_convs")
            if not self.shared_match:
                t.cost_volume += conv_bitops(volume, BitSpec.uniform(p.b_low))  # type: ignore[arg-type]
        if self.shared_match:
            t.cost_volume += conv_bitops(volume, BitSpec.uniform(COSINE_BITS))
        return t

    def chosen(self, box: Box, bits: PatchBits, ref_box: Box | None = None) -> Tally:
        """Cost of a patch from the bits it actually ran at (δ settings); ``ref_box``: the
        reference's box for a query's cost volume (default: the patch's own)."""
        if len(bits.blocks) + len(bits.refers) != self.n_blocks:
            raise ValueError(
                f"{len(bits.blocks)} blocks + {len(bits.refers)} RefERs for a {self.n_blocks}-block network"
            )
        t = Tally()
        for block in bits.blocks:
            if len(block) != len(self.block_macs_per_px):
                raise ValueError(
                    f"a block has {len(self.block_macs_per_px)} quantized convs, got bits for {len(block)}"
                )
            for macs, b in zip(self.block_macs_per_px, block):
                t.add_conv(macs * box.pixels, b, "resblocks")
        if bits.refers:
            if bits.match_bits is None:
                raise ValueError("RefER bits need match_bits (b_low) for the cost volume")
            ref_box = ref_box or box
            positions_q = pooled_size(box.h, POOL) * pooled_size(box.w, POOL)
            positions_r = pooled_size(ref_box.h, POOL) * pooled_size(ref_box.w, POOL)
            for refer in bits.refers:
                for b in refer:
                    t.add_conv(self.refer_conv_macs_per_px * box.pixels, b, "refer_convs")
            volumes = 1 if bits.shared_match else len(bits.refers)
            t.cost_volume += volumes * conv_bitops(
                positions_q * positions_r * self.feats, BitSpec.uniform(bits.match_bits)
            )
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
    net: NetworkCost,
    lr_size: tuple[int, int],
    bits: str | Precision,
    patch: int | None = 96,
    overlap: int = 6,
    grid: str = "paper",
    is_reference: Sequence[bool] | None = None,
    reference_of: Sequence[int] | None = None,
    ref_fraction: float | None = None,
    patch_bits: Sequence[PatchBits] | None = None,
) -> BitOpsReport:
    """BitOPs/FQR of one LR image (height, width).

    RefQSR needs the assignment: ``is_reference`` per patch (with ``reference_of`` giving each
    query's reference index; without it a query's reference is taken to be its own size), or
    ``ref_fraction``, the expected share of reference patches (every patch is then costed as
    ref_fraction * reference + (1 - ref_fraction) * query).

    δ settings need ``patch_bits``, the bits each patch of the grid actually ran at (RefQSR: with
    ``is_reference`` / ``reference_of`` as above); any setting may be given them."""
    p = bits if isinstance(bits, Precision) else Precision.parse(bits)
    h, w = lr_size
    if grid == "full" or patch is None:
        grid, patch = "full", None
    boxes = grid_boxes(h, w, patch or 0, overlap, grid)
    cost = ArchCost(net)
    total = Tally()
    n_refs: float = len(boxes)
    if patch_bits is not None:
        if len(patch_bits) != len(boxes):
            raise ValueError(f"patch_bits has {len(patch_bits)} entries for {len(boxes)} patches")
        refs = reference_of if reference_of is not None else range(len(boxes))
        for box, pb, ref_idx in zip(boxes, patch_bits, refs):
            total = total + cost.chosen(box, pb, boxes[ref_idx])
            if p.is_refqsr:
                total = total + cost.clustblock(box)
        if p.is_refqsr:
            flags = is_reference if is_reference is not None else [not pb.refers for pb in patch_bits]
            n_refs = float(sum(bool(r) for r in flags))
    elif p.dynamic:
        raise ValueError(
            f"{p.label} bits are chosen per patch and layer: pass patch_bits (see models.bitops.patch_bits_of_run)"
        )
    elif not p.is_refqsr:
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
    return BitOpsReport(net.arch, p.label, grid, (h, w), patch, overlap, len(boxes), n_refs, total)


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


def decode_columns(columns: dict[str, Any], bits: np.ndarray) -> list[PatchBits]:
    """The :class:`PatchBits` of each patch of one δ call of a compiled graph, from the bits the
    graph returned (``bits`` [N, L]: column j is what one CADyQ conv chose per patch) and the
    graph's column map (written at compile time by ``models.bitops.column_map``): for every block
    the graph ran as blocks and every RefER, one entry per quantized conv, either the column index
    or the fixed ``[act, weight]`` bits it ran at; ``weight`` the δ weight width; ``match_bits``
    and ``shared_match`` as in :class:`PatchBits`."""
    bits = np.asarray(bits)
    n_cols = 1 + max(
        (c for part in ("blocks", "refers") for g in columns[part] for c in g if isinstance(c, int)), default=-1
    )
    if bits.ndim != 2 or bits.shape[1] != n_cols:
        raise ValueError(f"expected bits of shape [N, {n_cols}], got {list(bits.shape)}")
    w = int(columns["weight"])

    def spec(entry: int | list[int], i: int) -> BitSpec:
        return BitSpec(int(bits[i, entry]), w) if isinstance(entry, int) else BitSpec(int(entry[0]), int(entry[1]))

    return [
        PatchBits(
            tuple(tuple(spec(e, i) for e in block) for block in columns["blocks"]),
            tuple(tuple(spec(e, i) for e in refer) for refer in columns["refers"]),
            columns["match_bits"],
            bool(columns["shared_match"]),
        )
        for i in range(bits.shape[0])
    ]
