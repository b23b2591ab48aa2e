"""TIR compute, schedule and build of the AVX2 integer 2-D convolution (stride 1, "same" padding).

Variants (all share the packed layouts of :mod:`refqsr_engine.kernels.layouts`; all exact for
the operand ranges they are built for, which are checked):

``"int8"``     u8 x s8 via ``vpmaddubsw`` -> ``vpmaddwd``(ones) -> ``vpaddd``: 4 multiply-port
               uops per 64 MACs. Exact when no ``vpmaddubsw`` pair sum saturates: 7-bit
               activations (0..127, the default, fbgemm's "reduce_range") or 7-bit weights (-64..63).
``"int8pair"`` the two ``vpmaddubsw`` of a channel group summed in int16 (``vpaddw``) before one
               ``vpmaddwd``: 3 multiply-port uops per 64 MACs, ~1.4x "int8". Exact when two pair
               sums fit int16: u7 x s7 (default), u8 x s6 or u6 x s8.
``"int16"``    operands widened to s16 in memory, ``vpmaddwd`` + ``vpaddd`` per 16 MACs: exact
               for the full u8 x s8 range, ~10-25% slower than "int8" here.
``"lowbit"``   small ranges (default u4 x s4, up to s6 weights): ``vpmaddubsw`` results summed in
               int16 for as many steps as the ranges allow (``layouts.lowbit_chunk_steps``), one
               ``vpmaddwd`` per chunk: ~1.7x "int8".
``"vnni"``     not AVX2: one ``vpdpbusd ymm`` per 32 MACs, exact for full u8 x s8; only for CPUs
               with AVX-VNNI / AVX512-VNNI (e.g. Intel Sapphire Rapids).
``"vnni512"``  AVX-512 BW + VNNI: one ``vpdpbusd zmm`` per 64 MACs, 16 output channels per register
               (output ``[N][O/16][H][W][16]``, weight tiles ``[16][4]``); exact for full u8 x s8.
``"lowbit512"`` the "lowbit" scheme in zmm: ``vpmaddubsw zmm`` + ``vpaddw zmm`` int16 chunks,
               one ``vpmaddwd zmm`` per chunk; same int16 bound as "lowbit".

Schedule: output tile of ``px`` adjacent pixels x ``og`` groups of 8 output channels
(8 ymm accumulators: 1 x 8 for 64 output channels, see :func:`choose_tile`; the 512-bit variants
use groups of 16 channels and up to 24 zmm accumulators), parallel over
(batch, output-channel block, row), the reduction (input-channel group, kh, kw, 4-channel half)
outside the register tile, the 8x4 dot tensorized with the intrinsics of
:mod:`refqsr_engine.kernels.x86_intrin`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import layouts
from .host_cpu import host_mcpu  # noqa: F401 - re-exported for the kernel builders
from .x86_intrin import (
    PAIRSUM_8,
    PAIRSUM_8_GLOBAL,
    PAIRSUM_16,
    PAIRSUM_16_GLOBAL,
    INT8_DOT_8x4,
    INT8_DOT_8x8_PAIR,
    INT16_DOT_8x2,
    LOWBIT512_DOT_16x4_I16,
    LOWBIT_DOT_8x4_I16,
    VNNI512_DOT_16x4,
    VNNI_DOT_8x4,
    register_avx2_intrinsics,
)

VARIANTS = ("int8", "int8pair", "int16", "lowbit", "vnni", "vnni512", "lowbit512")
#: variants whose code needs AVX-512 (F, BW, VNNI) on top of AVX2
AVX512_VARIANTS = ("vnni512", "lowbit512")
_LOWBIT = ("lowbit", "lowbit512")
_ACT_DTYPE = {
    "int8": "uint8",
    "int8pair": "uint8",
    "lowbit": "uint8",
    "int16": "int16",
    "vnni": "uint8",
    "vnni512": "uint8",
    "lowbit512": "uint8",
}
_W_DTYPE = {
    "int8": "int8",
    "int8pair": "int8",
    "lowbit": "int8",
    "int16": "int16",
    "vnni": "int8",
    "vnni512": "int8",
    "lowbit512": "int8",
}
#: input channels per multiply group (layouts.GROUP covers the AVX2 variants)
GROUP = {**layouts.GROUP, "vnni512": 4, "lowbit512": 4}


def lanes_of(variant: str) -> int:
    """Output channels per accumulator register: 8 (ymm int32) or 16 (zmm int32)."""
    return 16 if variant in AVX512_VARIANTS else 8


def default_target(mcpu: str = "core-avx2", num_cores: int | None = None) -> tvm.target.Target:
    """LLVM AVX2 target (``mcpu`` "core-avx2" or "znver3", ...); ``num_cores`` defaults to the CPU count."""
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores or os.cpu_count() or 1)})


def _as_target(target, variant: str = "int8") -> tvm.target.Target:
    if target is None:
        return default_target(host_mcpu() if variant in AVX512_VARIANTS else "core-avx2")
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    if not isinstance(target, tvm.target.Target):
        raise TypeError(
            "target must be a tvm.target.Target or a dict such as {'kind': 'llvm', 'mcpu': 'core-avx2', 'num-cores': 2}"
        )
    from tvm.target import codegen

    if target.kind.name != "llvm" or not codegen.target_has_features("avx2", target):
        raise ValueError(f"the kernels need an LLVM target with AVX2 (e.g. mcpu core-avx2 or znver3), got {target}")
    if variant == "vnni" and not (
        codegen.target_has_features("avxvnni", target)
        or (codegen.target_has_features("avx512vnni", target) and codegen.target_has_features("avx512vl", target))
    ):
        raise ValueError(f"variant 'vnni' needs a target with AVX-VNNI or AVX512-VNNI+VL, got {target}")
    if variant in AVX512_VARIANTS and not target_has_avx512_vnni(target):
        raise ValueError(f"variant {variant!r} needs a target with AVX-512 F+BW+VNNI, got {target}")
    return target


def target_has_avx512_vnni(target) -> bool:
    """Whether an LLVM target may use the 512-bit kernels (AVX-512 F + BW + VNNI)."""
    from tvm.target import codegen

    if isinstance(target, dict):
        target = tvm.target.Target(target)
    return target.kind.name == "llvm" and all(
        codegen.target_has_features(f, target) for f in ("avx512f", "avx512bw", "avx512vnni")
    )


@dataclass(frozen=True)
class Conv2dShape:
    """A stride-1, "same"-padded conv problem and its packed buffer shapes."""

    batch: int
    in_ch: int
    out_ch: int
    height: int
    width: int
    kernel: int = 3
    stride: int = 1
    #: zero padding on each side; None: "same" (kernel // 2)
    padding: int | None = None

    def __post_init__(self):
        for name in ("batch", "in_ch", "out_ch", "height", "width", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1, got {self.kernel}")
        if self.pad < 0 or self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"padding {self.padding} leaves no output for a {self.height}x{self.width} input")

    @property
    def c8(self) -> int:
        return layouts.ceil8(self.in_ch) // 8

    @property
    def o8(self) -> int:
        return layouts.ceil8(self.out_ch) // 8

    def ob(self, lanes: int = 8) -> int:
        """Output-channel blocks of ``lanes`` channels (one accumulator register each)."""
        return -(-self.out_ch // lanes)

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else int(self.padding)

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.pad - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.pad - self.kernel) // self.stride + 1

    def act_shape(self) -> tuple[int, ...]:
        return (self.batch, self.c8, self.height + 2 * self.pad, self.width + 2 * self.pad, 8)

    def weight_shape(self, group: int = 4, lanes: int = 8) -> tuple[int, ...]:
        return (self.ob(lanes), self.c8, self.kernel, self.kernel, 8 // group, lanes, group)

    def out_shape(self, lanes: int = 8) -> tuple[int, ...]:
        return (self.batch, self.ob(lanes), self.out_height, self.out_width, lanes)

    @property
    def ops(self) -> int:
        """2 x MACs of the unpadded problem (the GOP/s numerator)."""
        return 2 * self.batch * self.out_ch * self.in_ch * self.kernel**2 * self.out_height * self.out_width


# ----------------------------------------------------------------------------------------------
# compute


def conv2d_compute(shape: Conv2dShape, variant: str = "int8", chunk_groups: int | None = None) -> tvm.tirx.PrimFunc:
    """Schedulable PrimFunc ``main(A, W, conv)`` of the packed conv (see :func:`conv2d_stages`)."""
    A = te.placeholder(shape.act_shape(), _ACT_DTYPE[variant], name="A")
    Wt = te.placeholder(shape.weight_shape(GROUP[variant], lanes_of(variant)), _W_DTYPE[variant], name="W")
    return te.create_prim_func([A, Wt, conv2d_stages(A, Wt, shape, variant, chunk_groups)])


def conv2d_stages(
    A: te.Tensor, Wt: te.Tensor, shape: Conv2dShape, variant: str = "int8", chunk_groups: int | None = None, bias=None
) -> te.Tensor:
    """The packed conv of packed activations ``A`` and weights ``Wt`` as two TE stages.

    Block "partial" sums ``chunk_groups`` input-channel groups (of 8) of the window: int32 for
    "int8"/"int16", int16 for "lowbit" (the lane (oi, pr) of its ``[8][2]`` tile is
    ``vpmaddubsw``'s output lane 2*oi + pr). Block "conv" adds the chunks up in int32.
    The 512-bit variants have 16 output lanes (``oi`` < 16) instead of 8. ``bias(n, og, h, w, oi)``
    (int32, not for the low-bit variants) is added to the sums with the first chunk (inside the
    "conv" block, so consumers of "conv" need no other producer; te drops tensor-valued inits).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    s = shape
    g = GROUP[variant]
    L = lanes_of(variant)
    K = s.kernel
    icb = int(chunk_groups or s.c8)
    if s.c8 % icb:
        raise ValueError(f"chunk_groups={icb} must divide the {s.c8} input-channel groups")
    ncb = s.c8 // icb
    st = s.stride
    ici = te.reduce_axis((0, icb), "ici")
    kh = te.reduce_axis((0, K), "kh")
    kw = te.reduce_axis((0, K), "kw")
    hf = te.reduce_axis((0, 8 // g), "hf")
    cb = te.reduce_axis((0, ncb), "cb")
    if variant not in _LOWBIT:
        ii = te.reduce_axis((0, g), "ii")
        partial = te.compute(
            (s.batch, s.ob(L), s.out_height, s.out_width, ncb, L),
            lambda n, og, h, w, c, oi: te.sum(
                A[n, c * icb + ici, h * st + kh, w * st + kw, hf * g + ii].astype("int32")
                * Wt[og, c * icb + ici, kh, kw, hf, oi, ii].astype("int32"),
                axis=[ici, kh, kw, hf, ii],
            ),
            name="partial",
        )

        def total(n, og, h, w, oi):
            chunk = partial[n, og, h, w, cb, oi]
            if bias is not None:
                chunk = chunk + tvm.tirx.Select(cb == 0, bias(n, og, h, w, oi), 0)
            return te.sum(chunk, axis=[cb])

        return te.compute(s.out_shape(L), total, name="conv")
    if bias is not None:
        raise ValueError("the low-bit variants take no bias term")

    q = te.reduce_axis((0, 2), "q")
    partial = te.compute(
        (s.batch, s.ob(L), s.out_height, s.out_width, ncb, L, 2),
        lambda n, og, h, w, c, oi, pr: te.sum(
            A[n, c * icb + ici, h * st + kh, w * st + kw, hf * 4 + pr * 2 + q].astype("int16")
            * Wt[og, c * icb + ici, kh, kw, hf, oi, pr * 2 + q].astype("int16"),
            axis=[ici, kh, kw, hf, q],
        ),
        name="partial",
    )
    pr = te.reduce_axis((0, 2), "pr")
    return te.compute(
        s.out_shape(L),
        lambda n, og, h, w, oi: te.sum(partial[n, og, h, w, cb, oi, pr].astype("int32"), axis=[cb, pr]),
        name="conv",
    )


# ----------------------------------------------------------------------------------------------
# schedule


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def choose_tile(shape: Conv2dShape, accumulators: int = 8, prefer: str = "channels", lanes: int = 8) -> tuple[int, int]:
    """Register tile (pixels, output-channel groups): the largest product <= ``accumulators``
    with pixels | width and groups | O/8; ties go to more channel groups (``prefer="channels"``)
    or to 2 pixels (``"pixels"``, the probe's 2 x 4).

    For the u8 kernels 1 pixel x 8 groups beat or tied 2 x 4 on a 2-core Sapphire Rapids VM (48x48 and
    96x96): one broadcast per step, every weight tile used straight from memory by
    ``vpmaddubsw``, fewer spills (LLVM reassociates the 2 x 4 sums and spills), and no constraint
    on the width. The "int16" kernel, whose weights are twice as large, prefers 2 x 4.
    ``lanes``: output channels per group (16 for the zmm kernels).
    """
    if prefer not in ("channels", "pixels"):
        raise ValueError(f"prefer must be 'channels' or 'pixels', got {prefer!r}")
    best = None
    for px in _divisors(shape.out_width, accumulators):
        for og in _divisors(shape.ob(lanes), accumulators):
            if px * og > accumulators:
                continue
            key = (px * og, og) if prefer == "channels" else (px * og, px == 2, og)
            if best is None or key > best[0]:
                best = (key, (px, og))
    return best[1]


@dataclass(frozen=True)
class ScheduleConfig:
    """Knobs of :func:`schedule_conv2d` (defaults measured with the AVX2 build on a 2-core Sapphire Rapids
    VM, see the bench)."""

    px: int | None = None  # pixels per register tile (None: choose_tile)
    og: int | None = None  # 8-channel output groups per register tile
    #: at most this many input-channel groups per "partial" chunk (rounded down to a divisor of
    #: C/8; None: all of them, for lowbit the most whose sums fit int16)
    chunk_groups: int | None = None
    #: chunk loop outside the pixel loop: the weights of one chunk stay in L1 and the int32 sums
    #: of a row are accumulated in the output buffer; False keeps them in registers across chunks
    chunk_outer: bool = False
    #: reduction loops fully unrolled in TIR: subset of ("kw", "hf")
    unroll: tuple[str, ...] = ()
    #: tie-break of :func:`choose_tile` when px/og are not given
    tile_prefer: str = "channels"
    #: register-tile budget of :func:`choose_tile` (16 ymm / 32 zmm registers)
    accumulators: int = 8


#: Defaults per variant (tile from :func:`choose_tile`). On a 2-core Sapphire Rapids VM the int8 kernel
#: runs at the vpmaddubsw + vpmaddwd port limit measured with a register-only C loop; the loop
#: orders tried (chunk inner/outer, chunk sizes, TIR unrolling of kw/hf) were within noise, so
#: the simplest stays; for lowbit the chunk-outer order (weights of one chunk L1-resident, fewer
#: spills) was as fast or faster.
DEFAULT_CONFIGS = {
    "int8": ScheduleConfig(),
    "int16": ScheduleConfig(tile_prefer="pixels"),
    "lowbit": ScheduleConfig(chunk_outer=True),
    "vnni": ScheduleConfig(),
    "int8pair": ScheduleConfig(),
    # 32 zmm registers: up to 24 accumulators (e.g. 6 px x 4 x 16 channels) + 4 weight tiles
    "vnni512": ScheduleConfig(accumulators=24),
    "lowbit512": ScheduleConfig(chunk_outer=True, accumulators=24),
}


def tile_of(shape: Conv2dShape, variant: str, config: ScheduleConfig | None = None) -> tuple[int, int]:
    """(pixels, output-channel groups) of the register tile ``variant`` is scheduled with."""
    cfg = config or DEFAULT_CONFIGS[variant]
    px, og = choose_tile(shape, cfg.accumulators, cfg.tile_prefer, lanes_of(variant))
    return cfg.px or px, cfg.og or og


_DOT_INTRIN = {
    "int16": INT16_DOT_8x2,
    "vnni": VNNI_DOT_8x4,
    "lowbit": LOWBIT_DOT_8x4_I16,
    "vnni512": VNNI512_DOT_16x4,
    "lowbit512": LOWBIT512_DOT_16x4_I16,
}


def schedule_conv2d(
    func: tvm.tirx.PrimFunc, shape: Conv2dShape, variant: str = "int8", config: ScheduleConfig | None = None
) -> tvm.s_tir.Schedule:
    """Tile, parallelize and tensorize :func:`conv2d_compute`'s PrimFunc."""
    register_avx2_intrinsics()
    cfg = config or DEFAULT_CONFIGS[variant]
    px, og = tile_of(shape, variant, cfg)
    lanes = lanes_of(variant)
    if shape.out_width % px or shape.ob(lanes) % og:
        raise ValueError(
            f"tile {px} px x {og} groups must divide width {shape.out_width} and O/{lanes} {shape.ob(lanes)}"
        )
    lowbit = variant in _LOWBIT
    g = GROUP[variant]
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    partial = sch.get_sblock("partial")
    icb = shape.c8 // int(sch.get(partial).iter_vars[4].dom.extent)

    loops = sch.get_loops(conv)
    n, o, h, w, oi, cb = loops[:6]
    pr = loops[6] if lowbit else None
    o_out, o_in = sch.split(o, [None, og])
    w_out, w_in = sch.split(w, [None, px])
    tile = [w_in, o_in, oi] + ([pr] if lowbit else [])
    if cfg.chunk_outer:
        sch.reorder(n, o_out, h, cb, w_out, *tile)
        sch.compute_at(partial, w_out)
        store = None
    else:
        sch.reorder(n, o_out, h, w_out, cb, *tile)
        store = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(store, w_out)
        sch.compute_at(partial, cb)
    sch.set_scope(partial, 0, "local")
    sch.parallel(sch.fuse(n, o_out, h))

    # loops compute_at made for "partial", in its block-var order; unit-extent ones are dropped
    K = shape.kernel
    wanted = [("o", og), ("w", px), ("oi", lanes)] + ([("pr", 2)] if lowbit else [])
    wanted += [("ici", icb), ("kh", K), ("kw", K), ("hf", 8 // g), ("ii", 2 if lowbit else g)]
    wanted = [(name, ext) for name, ext in wanted if ext > 1]
    inner = sch.get_loops(partial)[-len(wanted) :]
    if [int(sch.get(lp).extent) for lp in inner] != [ext for _, ext in wanted]:
        raise RuntimeError("unexpected loop nest for the partial block")
    L = dict(zip((name for name, _ in wanted), inner))
    pair = variant == "int8pair"  # the intrinsic covers both 4-channel halves (hf)
    red = [L[k] for k in ("ici", "kh", "kw") + (() if pair else ("hf",)) if k in L]
    if not red:  # 1x1 kernel, one channel group, int8pair: keep a reduction loop outside
        red = [L["hf"]]
        pair = False
    sch.reorder(*red, *[L[k] for k in ("w", "o", "oi", "pr") + (("hf",) if pair else ()) + ("ii",) if k in L])
    partial_init = sch.decompose_reduction(partial, red[0])
    if pair:
        sch.tensorize(L["oi"], INT8_DOT_8x8_PAIR)
    else:
        sch.tensorize(L["oi"], _DOT_INTRIN.get(variant, INT8_DOT_8x4))
    for name in ("w", "o") + tuple(cfg.unroll):
        if name in L and not (pair and name == "hf"):
            sch.unroll(L[name])

    if lowbit:
        init = sch.decompose_reduction(conv, cb)
        flush = (PAIRSUM_16_GLOBAL, PAIRSUM_16) if lanes == 16 else (PAIRSUM_8_GLOBAL, PAIRSUM_8)
        sch.tensorize(oi, flush[0] if cfg.chunk_outer else flush[1])
    else:
        sch.vectorize(oi)  # int32x8 adds; must precede decompose_reduction
        init = sch.decompose_reduction(conv, cb)
    sch.unroll(w_in)
    sch.unroll(o_in)
    for blk in (partial_init, init, store):
        if blk is not None:
            sch.vectorize(sch.get_loops(blk)[-1])
    return sch


# ----------------------------------------------------------------------------------------------
# build


def lowbit_chunk_groups(shape: Conv2dShape, act_max: int, w_min: int, w_max: int) -> int:
    """Input-channel groups (of 8) whose ``vpmaddubsw`` results fit one int16 accumulation."""
    steps = layouts.lowbit_chunk_steps(act_max, w_min, w_max)
    per_group = shape.kernel**2 * 2  # vpmaddubsw per 8 input channels and output tile lane
    fits = [d for d in _divisors(shape.c8, shape.c8) if d * per_group <= steps]
    if not fits:
        raise ValueError(
            f"activations 0..{act_max} x weights {w_min}..{w_max}: only {steps} vpmaddubsw results fit "
            f"int16, fewer than the {per_group} of one 8-channel group; use the 'int8' variant"
        )
    return max(fits)


def pack_weights(w, variant: str) -> np.ndarray:
    """OIHW integer weights in ``variant``'s layout ``[O/L][I8][kh][kw][8 // G][L][G]`` (L lanes)."""
    lanes, group = lanes_of(variant), GROUP[variant]
    w = np.asarray(w)
    if lanes == 8:
        return layouts.pack_weights(w, group, _W_DTYPE[variant])
    o = w.shape[0]
    ob = -(-o // lanes)
    padded = np.zeros((ob * lanes,) + w.shape[1:], dtype=np.int64)
    padded[:o] = w
    p8 = layouts.pack_weights(padded, group, _W_DTYPE[variant])  # [O8][I8][kh][kw][H][8][G]
    per = lanes // 8
    p = p8.reshape((ob, per) + p8.shape[1:])  # [O/L][L/8][I8][kh][kw][H][8][G]
    p = p.transpose(0, 2, 3, 4, 5, 1, 6, 7)
    return np.ascontiguousarray(p.reshape(ob, *p8.shape[1:5], lanes, group))


def unpack_output(y, out_channels: int | None = None) -> np.ndarray:
    """``[N][O/L][H][W][L]`` int32 (any lane count L) -> NCHW (channel padding dropped)."""
    y = np.asarray(y.numpy() if hasattr(y, "numpy") else y)
    n, ob, h, w, lanes = y.shape
    out = y.transpose(0, 1, 4, 2, 3).reshape(n, ob * lanes, h, w)
    return np.ascontiguousarray(out[:, : out_channels if out_channels is not None else ob * lanes])


class Conv2dInt8Kernel:
    """A compiled packed conv: ``kernel(a_packed, w_packed[, out]) -> out_packed``.

    Arguments may be numpy arrays (copied in; the result comes back as numpy) or ``tvm.runtime``
    tensors (no copies; ``out`` is written in place and returned). ``mod`` is the TVM runtime
    module, ``func`` its packed function ``main(A, W, conv)``.
    """

    def __init__(
        self,
        executable,
        shape: Conv2dShape,
        variant: str,
        target,
        act_max: int,
        w_min: int,
        w_max: int,
        tile: tuple[int, int],
        chunk_groups: int | None,
    ):
        self.executable = executable
        self.mod = executable.mod
        self.func = self.mod["main"]
        self.shape = shape
        self.variant = variant
        self.target = target
        self.act_max, self.w_min, self.w_max = act_max, w_min, w_max
        self.tile = tile
        self.chunk_groups = chunk_groups
        self.group = GROUP[variant]
        self.lanes = lanes_of(variant)
        self.act_dtype = _ACT_DTYPE[variant]
        self.weight_dtype = _W_DTYPE[variant]

    # packing helpers bound to this kernel's layout
    def pack_activations(self, x, zero_point: int = 0) -> np.ndarray:
        return layouts.pack_activations(x, zero_point, self.shape.kernel, self.act_dtype)

    def pack_weights(self, w) -> np.ndarray:
        return pack_weights(w, self.variant)

    def unpack_output(self, y) -> np.ndarray:
        return unpack_output(y, self.shape.out_ch)

    def check_ranges(self, a_packed, w_packed) -> None:
        """Raise ``ValueError`` if operands leave the ranges this kernel is exact for."""
        a_max, lo, hi = layouts.data_ranges(np.asarray(a_packed), np.asarray(w_packed))
        if a_max > self.act_max or lo < self.w_min or hi > self.w_max:
            raise ValueError(
                f"{self.variant} kernel built for activations <= {self.act_max}, weights in "
                f"[{self.w_min}, {self.w_max}]; got activations <= {a_max}, weights in [{lo}, {hi}]"
            )

    def __call__(self, a, w, out=None, check: bool = True):
        s = self.shape
        as_numpy = isinstance(a, np.ndarray)
        if as_numpy:
            if tuple(a.shape) != s.act_shape() or tuple(np.shape(w)) != s.weight_shape(self.group, self.lanes):
                raise ValueError(
                    f"expected packed shapes {s.act_shape()} and {s.weight_shape(self.group, self.lanes)}, "
                    f"got {tuple(a.shape)} and {tuple(np.shape(w))}"
                )
            if check:
                self.check_ranges(a, w)
            dev = tvm.cpu()
            a = tvm.runtime.tensor(np.ascontiguousarray(a, dtype=self.act_dtype), dev)
            w = tvm.runtime.tensor(np.ascontiguousarray(w, dtype=self.weight_dtype), dev)
        elif isinstance(w, np.ndarray):
            w = tvm.runtime.tensor(np.ascontiguousarray(w, dtype=self.weight_dtype), tvm.cpu())
        if out is None:
            out = tvm.runtime.empty(s.out_shape(self.lanes), "int32", tvm.cpu())
        self.func(a, w, out)
        return out.numpy() if as_numpy else out

    def conv_nchw(self, x, w, zero_point: int = 0) -> np.ndarray:
        """Convenience: NCHW u8 activations, OIHW weights -> NCHW int32 sums ``sum (x - zp) * w``."""
        y = self.unpack_output(self(self.pack_activations(x, zero_point), self.pack_weights(w)))
        if zero_point:
            y = y - layouts.zero_point_correction(w, zero_point)[None, :, None, None].astype(np.int32)
        return y

    def time(self, number: int = 3, repeat: int = 5, seed: int = 0) -> list[float]:
        """Seconds per call (``repeat`` samples, each the mean of ``number`` calls), on random operands."""
        s, dev = self.shape, tvm.cpu()
        rng = np.random.default_rng(seed)
        a = tvm.runtime.tensor(rng.integers(0, self.act_max + 1, s.act_shape()).astype(self.act_dtype), dev)
        w = tvm.runtime.tensor(
            rng.integers(self.w_min, self.w_max + 1, s.weight_shape(self.group, self.lanes)).astype(self.weight_dtype),
            dev,
        )
        out = tvm.runtime.empty(s.out_shape(self.lanes), "int32", dev)
        return list(self.mod.time_evaluator("main", dev, number=number, repeat=repeat)(a, w, out).results)

    def asm(self) -> str:
        return self.mod.inspect_source("asm")

    def llvm_ir(self) -> str:
        return self.mod.inspect_source("ll")

    def __repr__(self):
        s = self.shape
        return (
            f"Conv2dInt8Kernel({self.variant}, N={s.batch}, {s.in_ch}->{s.out_ch}, {s.height}x{s.width}, "
            f"k={s.kernel}, tile={self.tile[0]}px x {self.tile[1] * self.lanes}ch)"
        )


_DEFAULT_RANGES = {
    # 7-bit activations x full s8 weights: the reduce_range choice (see layouts.int8_is_exact)
    "int8": (127, -128, 127),
    "int16": (255, -128, 127),
    # u4 activations x s4 weights
    "lowbit": (15, -8, 7),
    "vnni": (255, -128, 127),
    "vnni512": (255, -128, 127),
    "lowbit512": (15, -8, 7),
    # u7 activations x s7 weights: two pair sums fit int16
    "int8pair": (127, -64, 63),
}


def build_conv2d_int8(
    batch: int,
    in_ch: int,
    out_ch: int,
    height: int,
    width: int,
    kernel: int = 3,
    target=None,
    *,
    variant: str = "int8",
    act_max: int | None = None,
    w_min: int | None = None,
    w_max: int | None = None,
    config: ScheduleConfig | None = None,
) -> Conv2dInt8Kernel:
    """Compile the packed AVX2 integer conv for one shape; see the module docstring for variants.

    ``variant``: "int8" (default; u7 x s8, or pass ``act_max=255, w_min=-64, w_max=63`` for
    u8 x s7), "int8pair" (u7 x s7 default, ~1.4x faster), "int16" (full u8 x s8), "lowbit"
    (u4 x s4 default), "vnni" (needs e.g. ``mcpu="sapphirerapids"`` and a VNNI CPU), "vnni512" /
    "lowbit512" (AVX-512 BW + VNNI targets, e.g. the host's mcpu).
    ``act_max``/``w_min``/``w_max`` are the operand ranges the kernel must be exact for: checked
    here against the variant, checked at call time for numpy inputs, and for "lowbit" they size
    the int16 accumulation chunks. ``target``: ``tvm.target.Target`` or dict, default
    ``default_target()`` (llvm, mcpu core-avx2, num-cores = CPU count).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    d_act, d_lo, d_hi = _DEFAULT_RANGES[variant]
    act_max = d_act if act_max is None else int(act_max)
    w_min = d_lo if w_min is None else int(w_min)
    w_max = d_hi if w_max is None else int(w_max)
    if not (0 <= act_max <= 255 and -128 <= w_min <= w_max <= 127):
        raise ValueError(f"ranges must lie within u8 x s8, got 0..{act_max} x {w_min}..{w_max}")
    shape = Conv2dShape(batch, in_ch, out_ch, height, width, kernel)
    cfg = config or DEFAULT_CONFIGS[variant]
    if variant == "int8":
        layouts.check_int8_ranges(act_max, w_min, w_max)
    elif variant == "int8pair":
        layouts.check_int8pair_ranges(act_max, w_min, w_max)
    chunk = min(cfg.chunk_groups or shape.c8, shape.c8)
    if variant in _LOWBIT:
        chunk = min(chunk, lowbit_chunk_groups(shape, act_max, w_min, w_max))
    while shape.c8 % chunk:  # the largest divisor of C/8 not above the request
        chunk -= 1
    tgt = _as_target(target, variant)
    func = conv2d_compute(shape, variant, chunk)
    sch = schedule_conv2d(func, shape, variant, cfg)
    tile = tile_of(shape, variant, cfg)
    exe = tvm.compile(sch.mod, target=tgt)
    return Conv2dInt8Kernel(exe, shape, variant, tgt, act_max, w_min, w_max, tile, chunk)


def build_conv2d_lowbit(
    batch: int,
    in_ch: int,
    out_ch: int,
    height: int,
    width: int,
    kernel: int = 3,
    target=None,
    *,
    act_max: int = 15,
    w_min: int = -8,
    w_max: int = 7,
    config: ScheduleConfig | None = None,
) -> Conv2dInt8Kernel:
    """:func:`build_conv2d_int8` with ``variant="lowbit"`` (default u4 activations x s4 weights)."""
    return build_conv2d_int8(
        batch,
        in_ch,
        out_ch,
        height,
        width,
        kernel,
        target,
        variant="lowbit",
        act_max=act_max,
        w_min=w_min,
        w_max=w_max,
        config=config,
    )
