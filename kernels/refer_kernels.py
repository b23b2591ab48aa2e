"""RefER matching and warping as TIR kernels (paper eqs. (4)-(7); PyTorch twins: models/matching.py,
models/refer.py ``RefER.flow(hard=True)`` and ``backward_warp``).

For one batch of query features ``Fq`` and gathered reference features ``Fr`` ([N, C, H, W] float32,
H and W multiples of the pooling size ``pool``, by default :data:`POOL` = 3, the value of
``models.matching.POOL``; h = H/pool, w = W/pool, hw = h*w):

a) ``normalize_pool``  per-pixel L2 normalisation over channels, 3x3 average pooling, stride 3 ->
   [N, C, h, w]. Bit-identical to ``F.normalize`` + ``F.avg_pool2d``: sum of squares in channel
   order with the products fenced against FMA contraction (see ``tir_build.no_contract``),
   ``x / max(sqrt(.), 1e-12)``, window sum in (dy, dx) order divided by 9.
b) ``quantize``        integer grid values ``round(clamp(x / scale + zp, qmin, qmax)) - zp`` (round
   half to even), exactly ``models.quant_base.fake_quantize(x) / scale`` -- note the clamp and the
   zero point come BEFORE the rounding there, so this is what the kernel does too. ``scale`` and
   ``zero_point`` are runtime inputs of shape (1,) float32; ``qmin``/``qmax`` are compile-time.
   Storage int16 by default (q - zp spans up to 255 for an unsigned 8-bit grid; ``vpmaddwd`` reads
   int16); int8/int32 on request.
c) ``match``           for each query cell i the FIRST reference cell j maximising
   ``sum_c q[c, i] * r[c, j]`` (int32 accumulation). The cost volume is never materialised: q and
   r are packed to int16 channel pairs; a parallel task takes 16 query cells, and for each block of
   64 reference cells (kept in L1 across the 16) reduces a register tile of 1 query x 64 reference
   costs over the channel pairs with ``vpmaddwd`` (AVX2 tensor intrinsic ``INT16_DOT_8x2`` of
   :mod:`.x86_intrin`), then folds the tile into a lane-wise running arg-max (vector compare/select);
   the 8 lanes are reduced at the end, ties to the smaller index. Output [N, hw] int32, as
   ``matching.argmax_positions``. A portable ``variant="generic"`` (plain int32 vector code) is
   there for non-AVX2 targets.
d) ``pooled_flow``     (dx, dy) between cell centres (3k + 1): [N, 2, h, w] float32 = 3 * (j - i).
e) ``upsample_flow``   bilinear, ``F.interpolate(mode='bilinear', align_corners=False)`` -> [N, 2, H, W].
f) ``backward_warp``   bilinear sampling of Fr at p + flow(p), coordinates clamped to the border,
   the exact formula of ``matching.backward_warp`` (products fenced, so the rounding is PyTorch's).

Builders (static shapes; each returns a :class:`~.tir_build.TirKernel`, its ``prim_func`` in
destination-passing style for ``R.call_tir``)::

    build_normalize_pool(N, C, H, W)                     (F) -> P[N, C, h, w]
    build_quantize(N, C, h, w, qmin, qmax, dtype)        (P, scale[1], zp[1]) -> Qi[N, C, h, w]
    build_match(N, C, h, w, dtype)                       (Qi, Ri) -> idx[N, h*w] int32
    build_pooled_flow(N, h, w)                           (idx) -> flow[N, 2, h, w]
    build_upsample_flow(N, h, w, H, W)                   (flow) -> flow_up[N, 2, H, W]
    build_backward_warp(N, C, H, W)                      (feat, flow_up) -> warped[N, C, H, W]
    build_refer_pipeline(N, C, H, W, qmin, qmax)         (Fq, Fr, scale[1], zp[1]) -> (warped, flow_up)
    build_shared_flow(N, C, H, W, cosine_grid=G)         (Fq, Fr) -> flow_up[N, 2, H, W]

Every builder takes ``pool`` (keyword). The caller passes the model's constants (the compiler:
``models.matching.POOL`` and, for the shared matching, ``models.matching.COSINE_GRID``); this
module imports nothing from the models.

The pipeline is one PrimFunc: (b) is fused into the packing of (c) (pooled values quantized on
the fly into the int16 layouts of the matcher); (c) + (d) write the pooled flow; (e) is computed
twice, once as the flow output (a light loop nest) and once row by row inside the parallel rows of
(f), whose per-pixel sampling coordinates/weights are computed once per row and reused by every
channel.

All of it is bit-identical to the PyTorch twin (tests/test_kernels_refer.py): the float32 operation
order of each PyTorch step is reproduced, products are fenced where PyTorch rounds them (see
``tir_build.no_contract``) and fused multiply-adds are written out where PyTorch's kernels use
them (``F.interpolate``, see :func:`torch_upsample_order`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from .tir_build import TirKernel, as_target, build_kernel, divisor_at_most, fma, no_contract, target_has_avx2

__all__ = [
    "POOL",
    "RefERShape",
    "backward_warp_primfunc",
    "build_backward_warp",
    "build_shared_flow",
    "shared_flow_primfunc",
    "build_match",
    "build_normalize_pool",
    "build_pooled_flow",
    "build_quantize",
    "build_refer_pipeline",
    "build_upsample_flow",
    "refer_compute",
    "refer_pipeline_primfunc",
    "schedule_refer",
    "torch_upsample_order",
]

POOL = 3  # default pooling size; equal to models.matching.POOL (checked by tests/test_kernels_refer.py)
NORM_EPS = 1e-12
_LANES = 8  # reference cells per vpmaddwd tile (8 x int32 lanes)
_QUERY_ROWS = 16  # query cells per parallel task of the matcher (they share each L1 block of references)
_MAX_CHANNELS = 16384  # |cost| <= C * 256^2 stays above the padding sentinel 32767 * -32768
_INT32_MAX = 2**31 - 1
_QDTYPES = ("int8", "int16", "int32")
_TORCH_SEPARABLE_ABOVE = 3969  # see torch_upsample_order


@dataclass(frozen=True)
class RefERShape:
    """Static problem size: features [batch, channels, height, width], pooled by ``pool``."""

    batch: int
    channels: int
    height: int
    width: int
    pool: int = POOL

    def __post_init__(self):
        for name in ("batch", "channels", "height", "width", "pool"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height % self.pool or self.width % self.pool:
            raise ValueError(f"height and width must be multiples of {self.pool}, got {self.height}x{self.width}")
        if self.channels > _MAX_CHANNELS:
            raise ValueError(
                f"at most {_MAX_CHANNELS} channels (int32 costs of 8-bit grid values), got {self.channels}"
            )
        if self.height < 2 or self.width < 2:
            raise ValueError("the warp needs features of at least 2x2 pixels")

    @property
    def h(self) -> int:
        return self.height // self.pool

    @property
    def w(self) -> int:
        return self.width // self.pool

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def jblocks(self) -> int:
        """Reference-cell blocks of 8 (the last one padded, see ``_match_te``)."""
        return -(-self.hw // _LANES)

    @property
    def cpairs(self) -> int:
        """Channel pairs (an odd channel count is zero-padded)."""
        return -(-self.channels // 2)

    @property
    def feat_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def pooled_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.h, self.w)


def _check_grid(qmin: int, qmax: int, dtype: str) -> None:
    """q - zp (zp in [qmin, qmax]) lies in [qmin - qmax, qmax - qmin]: it must fit the storage type
    and int16 (the matcher's operands)."""
    if dtype not in _QDTYPES:
        raise ValueError(f"dtype must be one of {_QDTYPES}, got {dtype!r}")
    if not (-256 <= int(qmin) < int(qmax) <= 256):
        raise ValueError(f"need -256 <= qmin < qmax <= 256 (a grid of at most 8 bits + sign), got [{qmin}, {qmax}]")
    if dtype == "int8" and int(qmax) - int(qmin) > 127:
        raise ValueError(f"grid [{qmin}, {qmax}] minus its zero point does not fit int8; use int16")


# ----------------------------------------------------------------------------------------------
# compute (TE)


def _channel_norm_te(X, name: str):
    """``max(||X[n, :, y, x]||_2, 1e-12)`` as ``F.normalize`` computes it: squares fenced against
    FMA contraction, summed in channel order. Blocks ``{name}_sumsq`` and ``{name}``."""
    n_, c_, h_, w_ = (int(d) for d in X.shape)
    kc = te.reduce_axis((0, c_), f"{name}_kc")
    sumsq = te.compute(
        (n_, h_, w_),
        lambda n, y, x: te.sum(no_contract(X[n, kc, y, x] * X[n, kc, y, x]), axis=kc),
        name=f"{name}_sumsq",
    )
    return te.compute(
        (n_, h_, w_),
        lambda n, y, x: te.max(te.sqrt(sumsq[n, y, x]), tirx.const(NORM_EPS, "float32")),
        name=name,
    )


def _normalize_pool_te(F, s: RefERShape, prefix: str):
    norm = _channel_norm_te(F, f"{prefix}norm")
    p = s.pool
    dy = te.reduce_axis((0, p), f"{prefix}dy")
    dx = te.reduce_axis((0, p), f"{prefix}dx")
    psum = te.compute(
        s.pooled_shape,
        lambda n, c, i, j: te.sum(F[n, c, i * p + dy, j * p + dx] / norm[n, i * p + dy, j * p + dx], axis=[dy, dx]),
        name=f"{prefix}poolsum",
    )
    pooled = te.compute(
        s.pooled_shape,
        lambda n, c, i, j: psum[n, c, i, j] / tirx.const(float(p * p), "float32"),
        name=f"{prefix}pooled",
    )
    return pooled


def _unit_cells_te(F, s: RefERShape, prefix: str):
    """Shared matching's cells: normalize-pool, then each pooled cell divided by its own L2 norm
    (``F.normalize(pooled, dim=1)``: products fenced, channel order, ``max(sqrt(.), 1e-12)``).
    Returns (pooled, cell norm); the unit value ``pooled / norm`` is computed where it is read."""
    pooled = _normalize_pool_te(F, s, prefix)
    return pooled, _channel_norm_te(pooled, f"{prefix}cnorm")


def _check_cosine_grid(cosine_grid) -> int:
    """The shared matching's grid half-width G (cells on ``round(clamp(G * u, -G, G))``): at most 8
    bits + sign, as the matcher's int16 operands and int32 costs assume."""
    if cosine_grid is None:
        raise ValueError("the shared_flow stage needs cosine_grid (models.matching.COSINE_GRID)")
    if not 1 <= int(cosine_grid) <= 256:
        raise ValueError(f"cosine_grid must be in 1..256, got {cosine_grid}")
    return int(cosine_grid)


def _cosine_grid_expr(unit, grid: int):
    """``matching.cosine_cells``' grid value: round(clamp(G * u, -G, G)) as int16, G = ``grid``."""
    t = no_contract(unit * tirx.const(float(grid), "float32"))
    lim = float(grid)
    t = te.min(te.max(t, tirx.const(-lim, "float32")), tirx.const(lim, "float32"))
    return te.round(t).astype("int16")


def _quant_expr(x, scale, zp, qmin: int, qmax: int, dtype: str):
    """fake_quantize(x) / scale on the integer grid: round(clamp(x / s + z, qmin, qmax)) - z."""
    t = x / scale[0] + zp[0]
    t = te.min(te.max(t, tirx.const(float(qmin), "float32")), tirx.const(float(qmax), "float32"))
    return (te.round(t) - zp[0]).astype(dtype)


def _argmax_reducer():
    """(index, value): larger value wins, equal values go to the smaller index (first arg-max)."""

    def fcombine(x, y):
        take_y = tirx.Or(y[1] > x[1], tirx.And(y[1] == x[1], y[0] < x[0]))
        return tirx.Select(take_y, y[0], x[0]), tirx.Select(take_y, y[1], x[1])

    def fidentity(t0, t1):
        return tirx.const(_INT32_MAX, t0), tvm.te.min_value(t1)

    return te.comm_reducer(fcombine, fidentity, name="argmax")


def _match_te(s: RefERShape, q_elem, r_elem):
    """Packed operands + fused cost/arg-max. ``q_elem(n, c, y, x)`` / ``r_elem`` give int16 grid values.

    Layouts: queries ``[N][hw][CP][2]`` (one int32 load = the channel pair a ``vpmaddwd`` needs,
    broadcast), references ``[N][JB][CP][8][2]`` (one 32-byte row = 8 reference cells x 2 channels).
    Odd channel counts are zero-padded. When hw is not a multiple of 8, one extra "sentinel" channel
    pair gives the padded reference cells a cost of 32767 * -32768, below any real cost (|cost| <=
    C * 256^2), so the arg-max needs no mask."""
    n_, c_, hw, w = s.batch, s.channels, s.hw, s.w
    jb_ = s.jblocks
    pad_j = hw % _LANES != 0
    cp_ = s.cpairs + (1 if pad_j else 0)
    real_cp = s.cpairs
    zero16 = tirx.const(0, "int16")

    def q_pack_f(n, i, cp, k):
        c = cp * 2 + k
        val = tirx.if_then_else(c < c_, q_elem(n, tirx.min(c, c_ - 1), i // w, i % w), zero16)
        if pad_j:
            val = tirx.Select(cp < real_cp, val, tirx.Select(k == 0, tirx.const(32767, "int16"), zero16))
        return val

    def r_pack_f(n, jb, cp, jj, k):
        c = cp * 2 + k
        j = jb * _LANES + jj
        if not pad_j:
            return tirx.if_then_else(c < c_, r_elem(n, tirx.min(c, c_ - 1), j // w, j % w), zero16)
        jc = tirx.min(j, hw - 1)
        val = tirx.if_then_else(tirx.And(c < c_, j < hw), r_elem(n, tirx.min(c, c_ - 1), jc // w, jc % w), zero16)
        sentinel = tirx.Select(tirx.And(j >= hw, k == 0), tirx.const(-32768, "int16"), zero16)
        return tirx.Select(cp < real_cp, val, sentinel)

    q_pack = te.compute((n_, hw, cp_, 2), q_pack_f, name="q_pack")
    r_pack = te.compute((n_, jb_, cp_, _LANES, 2), r_pack_f, name="r_pack")
    rcp = te.reduce_axis((0, cp_), "rcp")
    rk = te.reduce_axis((0, 2), "rk")
    cost = te.compute(
        (n_, hw, jb_, _LANES),
        lambda n, i, jb, jj: te.sum(
            q_pack[n, i, rcp, rk].astype("int32") * r_pack[n, jb, rcp, jj, rk].astype("int32"), axis=[rcp, rk]
        ),
        name="cost",
    )
    argmax = _argmax_reducer()
    rjb = te.reduce_axis((0, jb_), "rjb")

    def lane_f(n, i, jj):
        return argmax((rjb * _LANES + jj, cost[n, i, rjb, jj]), axis=rjb)

    lane_idx, lane_val = te.compute((n_, hw, _LANES), lane_f, name="lane_best")
    rjj = te.reduce_axis((0, _LANES), "rjj")
    best_idx, _best_val = te.compute(
        (n_, hw), lambda n, i: argmax((lane_idx[n, i, rjj], lane_val[n, i, rjj]), axis=rjj), name="best"
    )
    return best_idx


def _pooled_flow_te(s: RefERShape, idx):
    p, w = s.pool, s.w

    def f(n, d, y, x):
        j = idx[n, y * w + x]
        disp = tirx.Select(d == 0, j % w - x, j // w - y)
        return (disp * p).astype("float32")

    return te.compute((s.batch, 2, s.h, s.w), f, name="pooled_flow")


def _linear_tables(out_size: int, in_size: int, axis: str):
    """Per output index along one axis: source indices i0, i1 and weights l0, l1 of
    ``F.interpolate(bilinear, align_corners=False)``, as PyTorch's ``compute_source_index_and_lambda``
    (float32 ratio in/out, source clamped at 0, i1 = i0 + 1 except at the last input)."""
    ratio = float(np.float32(in_size) / np.float32(out_size))
    f32 = "float32"

    def src(o):
        # PyTorch's kernel evaluates ratio * (o + 0.5) - 0.5 as one fused multiply-add (its lambdas
        # match the fused value bit for bit, measured), so the kernel does exactly that
        s_ = fma(tirx.const(ratio, f32), o.astype(f32) + tirx.const(0.5, f32), tirx.const(-0.5, f32))
        return te.max(s_, tirx.const(0.0, f32))

    i0 = te.compute((out_size,), lambda o: te.min(te.floor(src(o)).astype("int32"), in_size - 1), name=f"up_{axis}0")
    l1 = te.compute(
        (out_size,),
        lambda o: te.min(te.max(src(o) - i0[o].astype(f32), tirx.const(0.0, f32)), tirx.const(1.0, f32)),
        name=f"up_{axis}l1",
    )
    return i0, l1


def torch_upsample_order(height: int, width: int) -> str:
    """Which of its two float32 evaluation orders PyTorch's CPU ``F.interpolate(bilinear)`` uses for
    a 2-channel flow of this output size (measured on torch 2.13; both orders are exact bilinear
    interpolation up to float32 rounding, so this only decides bit-exactness):
    ``"fused"`` (output planes of at most 3969 pixels) or ``"separable"`` (larger)."""
    return "separable" if height * width > _TORCH_SEPARABLE_ABOVE else "fused"


def _upsample_te(s: RefERShape, flow_p, tables=None, name: str = "flow_up", order: str = "auto"):
    H, W, h, w = s.height, s.width, s.h, s.w
    (y0, ly1), (x0, lx1) = tables or (_linear_tables(H, h, "y"), _linear_tables(W, w, "x"))
    one = tirx.const(1.0, "float32")
    if order == "auto":
        order = torch_upsample_order(H, W)
    if order not in ("fused", "separable"):
        raise ValueError(f"order must be 'auto', 'fused' or 'separable', got {order!r}")

    def f(n, d, Y, X):
        ya, xa = y0[Y], x0[X]
        yb = tirx.Select(ya < h - 1, ya + 1, ya)
        xb = tirx.Select(xa < w - 1, xa + 1, xa)
        wx1, wy1 = lx1[X], ly1[Y]
        wx0, wy0 = one - wx1, one - wy1
        v = flow_p
        if order == "separable":
            # rows first (v0 * l0 + v1 * l1 as fma(v0, l0, v1 * l1)), then the two rows the same way
            top = fma(v[n, d, ya, xa], wx0, no_contract(v[n, d, ya, xb] * wx1))
            bot = fma(v[n, d, yb, xa], wx0, no_contract(v[n, d, yb, xb] * wx1))
            return fma(top, wy0, no_contract(bot * wy1))
        # "fused": the four tap weights wy * wx rounded, then v01 * w01, and v00, v10, v11 added by
        # fused multiply-adds
        acc = no_contract(v[n, d, ya, xb] * no_contract(wy0 * wx1))
        acc = fma(v[n, d, ya, xa], no_contract(wy0 * wx0), acc)
        acc = fma(v[n, d, yb, xa], no_contract(wy1 * wx0), acc)
        return fma(v[n, d, yb, xb], no_contract(wy1 * wx1), acc)

    return te.compute((s.batch, 2, H, W), f, name=name)


def _warp_te(s: RefERShape, feat, flow):
    """backward_warp. Per pixel (shared by all channels): the top-left tap (x0, y0) and the two
    weights; since x0 <= W-2 and y0 <= H-2 the other taps are always x0 + 1 and y0 + 1."""
    n_, c_, H, W = s.feat_shape
    f32 = "float32"
    zero = tirx.const(0.0, f32)

    def coord(n, Y, X, d):
        size = W if d == 0 else H
        p = (X if d == 0 else Y).astype(f32) + flow[n, d, Y, X]
        return te.min(te.max(p, zero), tirx.const(float(size - 1), f32))

    def lo(n, Y, X, d):
        size = W if d == 0 else H
        return te.min(te.floor(coord(n, Y, X, d)), tirx.const(float(size - 2), f32))

    x0 = te.compute((n_, H, W), lambda n, Y, X: lo(n, Y, X, 0).astype("int32"), name="warp_x0")
    y0 = te.compute((n_, H, W), lambda n, Y, X: lo(n, Y, X, 1).astype("int32"), name="warp_y0")
    wx = te.compute((n_, H, W), lambda n, Y, X: coord(n, Y, X, 0) - lo(n, Y, X, 0), name="warp_wx")
    wy = te.compute((n_, H, W), lambda n, Y, X: coord(n, Y, X, 1) - lo(n, Y, X, 1), name="warp_wy")

    def tap(n, c, ya, xa, dy, dx):
        return feat[n, c, ya + dy, xa + dx]

    def out_f(n, c, Y, X):
        xa, ya = x0[n, Y, X], y0[n, Y, X]
        ax, ay = wx[n, Y, X], wy[n, Y, X]
        one = tirx.const(1.0, f32)
        top = no_contract(tap(n, c, ya, xa, 0, 0) * (one - ax)) + no_contract(tap(n, c, ya, xa, 0, 1) * ax)
        bot = no_contract(tap(n, c, ya, xa, 1, 0) * (one - ax)) + no_contract(tap(n, c, ya, xa, 1, 1) * ax)
        return no_contract(top * (one - ay)) + no_contract(bot * ay)

    return te.compute(s.feat_shape, out_f, name="warp")


def refer_compute(
    stage: str,
    shape: RefERShape,
    *,
    qmin: int = -7,
    qmax: int = 7,
    dtype: str = "int16",
    return_index: bool = False,
    cosine_grid: int | None = None,
) -> tuple[tvm.tirx.PrimFunc, int]:
    """Unscheduled PrimFunc of one stage (or ``"pipeline"``) and its number of inputs.
    ``cosine_grid`` (required by ``"shared_flow"``) is the grid half-width of the unit cells."""
    s = shape
    if stage == "normalize_pool":
        F = te.placeholder(s.feat_shape, "float32", name="feat")
        return te.create_prim_func([F, _normalize_pool_te(F, s, "")]), 1
    if stage == "quantize":
        _check_grid(qmin, qmax, dtype)
        P = te.placeholder(s.pooled_shape, "float32", name="pooled")
        scale = te.placeholder((1,), "float32", name="scale")
        zp = te.placeholder((1,), "float32", name="zero_point")
        Q = te.compute(s.pooled_shape, lambda *i: _quant_expr(P[i], scale, zp, qmin, qmax, dtype), name="quantize")
        return te.create_prim_func([P, scale, zp, Q]), 3
    if stage == "match":
        _check_grid(qmin, qmax, dtype)
        Q = te.placeholder(s.pooled_shape, dtype, name="q")
        R = te.placeholder(s.pooled_shape, dtype, name="r")
        idx = _match_te(s, lambda *i: Q[i].astype("int16"), lambda *i: R[i].astype("int16"))
        return te.create_prim_func([Q, R, idx]), 2
    if stage == "pooled_flow":
        idx = te.placeholder((s.batch, s.hw), "int32", name="idx")
        return te.create_prim_func([idx, _pooled_flow_te(s, idx)]), 1
    if stage == "upsample_flow":
        fp = te.placeholder((s.batch, 2, s.h, s.w), "float32", name="flow")
        return te.create_prim_func([fp, _upsample_te(s, fp)]), 1
    if stage == "backward_warp":
        feat = te.placeholder(s.feat_shape, "float32", name="feat")
        flow = te.placeholder((s.batch, 2, s.height, s.width), "float32", name="flow")
        return te.create_prim_func([feat, flow, _warp_te(s, feat, flow)]), 2
    if stage == "shared_flow":
        grid = _check_cosine_grid(cosine_grid)
        Fq = te.placeholder(s.feat_shape, "float32", name="fq")
        Fr = te.placeholder(s.feat_shape, "float32", name="fr")
        Pq, Nq = _unit_cells_te(Fq, s, "q_")
        Pr, Nr = _unit_cells_te(Fr, s, "r_")
        idx = _match_te(
            s,
            lambda n, c, i, j: _cosine_grid_expr(Pq[n, c, i, j] / Nq[n, i, j], grid),
            lambda n, c, i, j: _cosine_grid_expr(Pr[n, c, i, j] / Nr[n, i, j], grid),
        )
        flow = _upsample_te(s, _pooled_flow_te(s, idx))
        outs = [flow]
        if return_index:
            outs.append(te.compute((s.batch, s.hw), lambda n, i: idx[n, i], name="match_index"))
        return te.create_prim_func([Fq, Fr, *outs]), 2
    if stage == "pipeline":
        _check_grid(qmin, qmax, "int16")
        Fq = te.placeholder(s.feat_shape, "float32", name="fq")
        Fr = te.placeholder(s.feat_shape, "float32", name="fr")
        scale = te.placeholder((1,), "float32", name="scale")
        zp = te.placeholder((1,), "float32", name="zero_point")
        Pq = _normalize_pool_te(Fq, s, "q_")
        Pr = _normalize_pool_te(Fr, s, "r_")
        idx = _match_te(
            s,
            lambda *i: _quant_expr(Pq[i], scale, zp, qmin, qmax, "int16"),
            lambda *i: _quant_expr(Pr[i], scale, zp, qmin, qmax, "int16"),
        )
        flow_p = _pooled_flow_te(s, idx)
        tables = (_linear_tables(s.height, s.h, "y"), _linear_tables(s.width, s.w, "x"))
        flow = _upsample_te(s, flow_p, tables)  # the flow output
        flow_row = _upsample_te(s, flow_p, tables, name="flow_row")  # the same, row by row inside the warp
        warped = _warp_te(s, Fr, flow_row)
        outs = [warped, flow]
        if return_index:
            outs.append(te.compute((s.batch, s.hw), lambda n, i: idx[n, i], name="match_index"))
        return te.create_prim_func([Fq, Fr, scale, zp, *outs]), 4
    raise ValueError(f"unknown stage {stage!r}")


# ----------------------------------------------------------------------------------------------
# schedule


def _vec_inner(sch, loop, extent: int, lanes: int = _LANES):
    """Split ``loop`` so that its inner part (a divisor of ``extent``, <= 2*lanes) is vectorised."""
    v = _LANES if extent % _LANES == 0 else divisor_at_most(extent, 2 * lanes)
    if v <= 1:
        return None
    if v == extent:
        sch.vectorize(loop)
        return loop
    _, inner = sch.split(loop, [None, v])
    sch.vectorize(inner)
    return inner


def _schedule_channel_norm(sch, name: str, width: int):
    """:func:`_channel_norm_te`'s blocks: parallel rows, channels outside the vectorised columns."""
    blk = sch.get_sblock(f"{name}_sumsq")
    n, y, x, kc = sch.get_loops(blk)
    sch.reorder(n, y, kc, x)
    sch.parallel(sch.fuse(n, y))
    _vec_inner(sch, x, width)
    sch.decompose_reduction(blk, kc)
    blk = sch.get_sblock(name)
    n, y, x = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, y))
    _vec_inner(sch, x, width)


def _schedule_normalize_pool(sch, s: RefERShape, prefix: str, inline_pooled: bool):
    _schedule_channel_norm(sch, f"{prefix}norm", s.width)

    blk = sch.get_sblock(f"{prefix}poolsum")
    n, c, i, j, dy, dx = sch.get_loops(blk)
    sch.reorder(n, c, i, dy, dx, j)
    sch.parallel(sch.fuse(n, c))
    _vec_inner(sch, j, s.w)
    sch.decompose_reduction(blk, dy)

    blk = sch.get_sblock(f"{prefix}pooled")
    if inline_pooled:
        sch.compute_inline(blk)
    else:
        n, c, i, j = sch.get_loops(blk)
        sch.parallel(sch.fuse(n, c))
        _vec_inner(sch, j, s.w)


def _schedule_match(sch, s: RefERShape, variant: str):
    for name in ("q_pack", "r_pack"):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        sch.parallel(sch.fuse(loops[0], loops[1]))
        sch.unroll(loops[-1])

    lane = sch.get_sblock("lane_best")
    cost = sch.get_sblock("cost")
    best = sch.get_sblock("best")
    n, i, jj, jb = sch.get_loops(lane)
    # register tile: 1 query cell x `tile` blocks of 8 reference cells (8 int32 accumulators);
    # `rows` query cells reuse each block of packed references while it is in L1
    tile = divisor_at_most(s.jblocks, 8)
    rows = divisor_at_most(s.hw, _QUERY_ROWS)
    io, ii = sch.split(i, [None, rows])
    jbo, jbi = sch.split(jb, [None, tile])
    sch.reorder(n, io, jbo, ii, jbi, jj)
    task = sch.fuse(n, io)
    sch.compute_at(cost, ii, preserve_unit_loops=True)
    sch.set_scope(cost, 0, "local")
    sch.reverse_compute_at(best, task)
    sch.set_scope(lane, 0, "local")
    sch.set_scope(lane, 1, "local")
    sch.parallel(task)
    sch.vectorize(jj)

    c_jbi, c_jj, c_cp, c_k = sch.get_loops(cost)[-4:]
    if variant == "avx2":
        sch.reorder(c_cp, c_jbi, c_jj, c_k)
        sch.decompose_reduction(cost, c_cp)
        from .x86_intrin import INT16_DOT_8x2, register_avx2_intrinsics  # seconds of TVMScript parsing

        register_avx2_intrinsics()
        sch.tensorize(c_jj, INT16_DOT_8x2)
        sch.unroll(c_jbi)
    else:
        sch.reorder(c_cp, c_k, c_jbi, c_jj)
        sch.vectorize(c_jj)
        sch.decompose_reduction(cost, c_cp)
        sch.unroll(c_jbi)
    init = sch.get_sblock("cost_init")
    sch.vectorize(sch.get_loops(init)[-1])
    lane_init = sch.decompose_reduction(lane, jbo)
    sch.vectorize(sch.get_loops(lane_init)[-1])


def _schedule_pooled_flow(sch, s: RefERShape):
    blk = sch.get_sblock("pooled_flow")
    n, d, y, x = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, d))


def _schedule_upsample(sch, s: RefERShape):
    blk = sch.get_sblock("flow_up")
    n, d, Y, X = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, d, Y))
    _vec_inner(sch, X, s.width)


_COEF_BLOCKS = ("warp_x0", "warp_y0", "warp_wx", "warp_wy")


def _schedule_warp(sch, s: RefERShape, flow_row: bool = False):
    """Parallel rows (n, Y); per row the sampling offsets/weights of its W pixels (and, in the
    pipeline, the upsampled flow of that row), then every channel reuses them."""
    warp = sch.get_sblock("warp")
    n, c, Y, X = sch.get_loops(warp)
    sch.reorder(n, Y, c, X)
    row = sch.fuse(n, Y)
    sch.parallel(row)
    for name in tuple(reversed(_COEF_BLOCKS)) + (("flow_row",) if flow_row else ()):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, row)
        sch.set_scope(blk, 0, "local")
        _vec_inner(sch, sch.get_loops(blk)[-1], s.width)
    _vec_inner(sch, X, s.width)


def schedule_refer(func: tvm.tirx.PrimFunc, shape: RefERShape, stage: str, variant: str = "avx2") -> tvm.s_tir.Schedule:
    """Parallel over (batch, rows) / (batch, channels) / (batch, query cell), vectorised inner loops."""
    sch = tvm.s_tir.Schedule(func)
    s = shape
    if stage == "normalize_pool":
        _schedule_normalize_pool(sch, s, "", inline_pooled=False)
    elif stage == "quantize":
        blk = sch.get_sblock("quantize")
        n, c, i, j = sch.get_loops(blk)
        sch.parallel(sch.fuse(n, c))
        _vec_inner(sch, j, s.w)
    elif stage == "match":
        _schedule_match(sch, s, variant)
    elif stage == "pooled_flow":
        _schedule_pooled_flow(sch, s)
    elif stage == "upsample_flow":
        _schedule_upsample(sch, s)
    elif stage == "backward_warp":
        _schedule_warp(sch, s)
    elif stage == "shared_flow":
        for prefix in ("q_", "r_"):  # the pooled cells are read twice (norm, value): kept
            _schedule_normalize_pool(sch, s, prefix, inline_pooled=False)
            _schedule_channel_norm(sch, f"{prefix}cnorm", s.w)
        _schedule_match(sch, s, variant)
        _schedule_pooled_flow(sch, s)
        _schedule_upsample(sch, s)
    elif stage == "pipeline":
        _schedule_normalize_pool(sch, s, "q_", inline_pooled=True)
        _schedule_normalize_pool(sch, s, "r_", inline_pooled=True)
        _schedule_match(sch, s, variant)
        _schedule_pooled_flow(sch, s)
        _schedule_upsample(sch, s)
        _schedule_warp(sch, s, flow_row=True)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return sch


# ----------------------------------------------------------------------------------------------
# build


def _variant(variant: str | None, target) -> str:
    if variant is None:
        return "avx2" if target_has_avx2(target) else "generic"
    if variant not in ("avx2", "generic"):
        raise ValueError(f"variant must be 'avx2' or 'generic', got {variant!r}")
    if variant == "avx2" and not target_has_avx2(target):
        raise ValueError(f"variant 'avx2' needs an AVX2 target, got {target}")
    return variant


def _schedule(stage: str, shape: RefERShape, tgt, variant: str | None, **kw):
    """(schedule, number of inputs, variant) of one stage for target ``tgt``."""
    var = _variant(variant, tgt)
    func, n_in = refer_compute(stage, shape, **kw)
    return schedule_refer(func, shape, stage, var), n_in, var


def _build(stage: str, shape: RefERShape, target, variant: str | None = None, **kw) -> TirKernel:
    tgt = as_target(target)
    sch, n_in, var = _schedule(stage, shape, tgt, variant, **kw)
    info = {"shape": shape, "stage": stage, "variant": var, **kw}
    return build_kernel(f"refer_{stage}", sch, n_in, tgt, info)


def refer_pipeline_primfunc(
    batch: int, channels: int, height: int, width: int, qmin: int, qmax: int, target=None, *, pool: int = POOL
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of :func:`build_refer_pipeline` (for ``R.call_tir`` in a graph):
    ``main(fq, fr, scale[1], zero_point[1], warped, flow)``."""
    return _scheduled("pipeline", RefERShape(batch, channels, height, width, pool), target, qmin=qmin, qmax=qmax)


def shared_flow_primfunc(
    batch: int, channels: int, height: int, width: int, target=None, *, cosine_grid: int, pool: int = POOL
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of :func:`build_shared_flow` (for ``R.call_tir``): ``main(fq, fr, flow)``."""
    return _scheduled("shared_flow", RefERShape(batch, channels, height, width, pool), target, cosine_grid=cosine_grid)


def backward_warp_primfunc(
    batch: int, channels: int, height: int, width: int, target=None, *, pool: int = POOL
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of :func:`build_backward_warp` (for ``R.call_tir``): ``main(feat, flow, warped)``."""
    return _scheduled("backward_warp", RefERShape(batch, channels, height, width, pool), target)


def _scheduled(stage: str, shape: RefERShape, target, **kw) -> tvm.tirx.PrimFunc:
    sch, _, _ = _schedule(stage, shape, as_target(target), None, **kw)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def build_shared_flow(
    batch: int,
    channels: int,
    height: int,
    width: int,
    target=None,
    variant: str | None = None,
    return_index: bool = False,
    *,
    cosine_grid: int,
    pool: int = POOL,
) -> TirKernel:
    """``(fq, fr) -> flow[N, 2, H, W]``: RefQSR's shared matching, ``matching.shared_flow(fq, fr)``
    (unit cells on the fixed grid ``round(clamp(G * u, -G, G))``, G = ``cosine_grid``, i.e.
    ``matching.COSINE_GRID``; first arg-max of their integer dot products, cell flow upsampled).
    ``return_index`` adds the arg-max reference cell of every query cell [N, h*w]."""
    return _build(
        "shared_flow",
        RefERShape(batch, channels, height, width, pool),
        target,
        variant,
        return_index=return_index,
        cosine_grid=cosine_grid,
    )


def build_normalize_pool(
    batch: int, channels: int, height: int, width: int, target=None, *, pool: int = POOL
) -> TirKernel:
    """``(feat[N, C, H, W]) -> pooled[N, C, H/pool, W/pool]``: L2-normalise over channels, pool x pool
    average pool."""
    return _build("normalize_pool", RefERShape(batch, channels, height, width, pool), target)


def build_quantize(
    batch: int,
    channels: int,
    h: int,
    w: int,
    qmin: int,
    qmax: int,
    dtype: str = "int16",
    target=None,
    *,
    pool: int = POOL,
) -> TirKernel:
    """``(pooled[N, C, h, w], scale[1], zero_point[1]) -> q[N, C, h, w]`` integer grid values."""
    return _build(
        "quantize", RefERShape(batch, channels, h * pool, w * pool, pool), target, qmin=qmin, qmax=qmax, dtype=dtype
    )


def build_match(
    batch: int,
    channels: int,
    h: int,
    w: int,
    dtype: str = "int16",
    target=None,
    variant: str | None = None,
    *,
    pool: int = POOL,
) -> TirKernel:
    """``(q[N, C, h, w], r[N, C, h, w]) -> idx[N, h*w] int32``: first arg-max of the integer cost
    volume per query cell. Values are cast to int16 (grid values of at most 8 bits + sign; int32
    inputs outside int16 are not supported)."""
    return _build("match", RefERShape(batch, channels, h * pool, w * pool, pool), target, variant, dtype=dtype)


def build_pooled_flow(batch: int, h: int, w: int, target=None, *, pool: int = POOL) -> TirKernel:
    """``(idx[N, h*w]) -> flow[N, 2, h, w]`` (dx, dy) in full-resolution pixels."""
    return _build("pooled_flow", RefERShape(batch, 1, h * pool, w * pool, pool), target)


def build_upsample_flow(
    batch: int, h: int, w: int, height: int, width: int, target=None, *, pool: int = POOL
) -> TirKernel:
    """``(flow[N, 2, h, w]) -> flow_up[N, 2, H, W]``, bilinear, align_corners=False."""
    shape = RefERShape(batch, 1, height, width, pool)
    if (shape.h, shape.w) != (h, w):
        raise ValueError(f"{height}x{width} pooled by {pool} is {shape.h}x{shape.w}, not {h}x{w}")
    return _build("upsample_flow", shape, target)


def build_backward_warp(
    batch: int, channels: int, height: int, width: int, target=None, *, pool: int = POOL
) -> TirKernel:
    """``(feat[N, C, H, W], flow[N, 2, H, W]) -> warped[N, C, H, W]``."""
    return _build("backward_warp", RefERShape(batch, channels, height, width, pool), target)


def build_refer_pipeline(
    batch: int,
    channels: int,
    height: int,
    width: int,
    qmin: int = -7,
    qmax: int = 7,
    target=None,
    variant: str | None = None,
    return_index: bool = False,
    *,
    pool: int = POOL,
) -> TirKernel:
    """``(fq, fr, scale[1], zero_point[1]) -> (warped[N, C, H, W], flow[N, 2, H, W])``: the whole
    hard-matching path of RefER, ``backward_warp(fr, RefER.flow(fq, fr, hard=True))``, with the
    match quantizer's grid ``[qmin, qmax]`` (PAMS b bits: -(2^(b-1)-1), 2^(b-1)-1) fixed at build
    time and its scale / zero point passed at run time. ``return_index`` adds a third output, the
    arg-max reference cell of every query cell ``[N, h*w]`` int32 (as ``argmax_positions``)."""
    return _build(
        "pipeline",
        RefERShape(batch, channels, height, width, pool),
        target,
        variant,
        qmin=qmin,
        qmax=qmax,
        return_index=return_index,
    )
