"""A deliberate schedule for every PrimFunc the Relax legalizer produced (LLVM CPU targets).

Legalized TIR is a plain loop nest: one thread, no vectors. Our own kernels (integer convs,
RefER, clustering) arrive scheduled and marked ``tirx.is_scheduled``; everything else -- the
full-precision convs (head, body, upsampler, tail) with the bias / residual adds FuseOps put
after them, PReLU, the DDTB gate -- gets a schedule here:

* float ``conv2d_nchw`` (stride 1 along the row): the vector runs over ``lanes`` consecutive
  output pixels of one row (``lanes`` = 16 fp32 on AVX-512 targets, 8 on AVX2), so loads of the
  padded input and stores of the NCHW output are contiguous. A register tile of ``oc`` output
  channels x ``vecs`` vectors of accumulators (:func:`conv_tile`, sized to the register file)
  sits inside the (ic, kh, kw) reduction; per reduction step it loads ``vecs`` input vectors and
  broadcasts ``oc`` weights. The weights are read as ``[O/oc][I][kh][kw][oc]``, so a step's
  broadcasts are adjacent: when the weight is a Relax constant at every call site the PrimFunc's
  parameter takes that layout and :func:`cpu_schedule_pass` hands it the constant already packed
  (:func:`refqsr_engine.kernels.layouts.pack_conv_weights_oc`), else it is packed once per call.
  The fused epilogue (bias add, residual add) is computed on the accumulators before the store.
  Work is split over (batch, output row) across the cores. The zero-padded input is written
  per row as a vector zero fill plus a vector copy of the interior (no per-element branch);
* other float convs (strided rows, rows without a whole vector): the older tile with the vector
  over 8 / 16 output channels, the weight packed per call;
* (batch) matmul, ELAN's window attention: a register tile of ``ti`` rows x a vector run of
  the output row (contiguous in the right operand and the output) inside the reduction, the
  batch and row tiles in parallel (:func:`_schedule_matmul`);
* everything else: the leading spatial loops fused and parallel, the innermost spatial loop
  vectorized when it is the last loop of an injective block; reductions over trailing axes that
  run along memory (H x W means, softmax's max and sum over the last axis) accumulate in vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax, tirx

from ...kernels.layouts import pack_conv_weights_oc

_LANES = 8  # fp32 x 8 = one ymm register: the vector of the generic (non-conv) schedule

#: packed weight of a PrimFunc: (index of the weight parameter, output channels per tile)
PackInfo = tuple[int, int]


def vector_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the widest vector register ``target`` has: 16 with AVX-512F, else 8."""
    from tvm.target import codegen

    return 16 if codegen.target_has_features("avx512f", target) else 8


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])


def _iter_kinds(sch: tvm.s_tir.Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class ConvTile:
    """Register tile of the row-vector conv: ``oc`` channels x ``vecs`` vectors of ``lanes`` pixels."""

    oc: int
    vecs: int
    lanes: int

    @property
    def pixels(self) -> int:
        return self.vecs * self.lanes


def conv_tile(n_oc: int, n_ow: int, lanes: int) -> ConvTile | None:
    """The register tile for ``n_oc`` output channels and rows of ``n_ow`` pixels, or None when a
    row holds no whole number of vectors.

    ``lanes`` is the widest vector (16 on AVX-512: 32 zmm registers, 8 on AVX2: 16 ymm); rows that
    are not a multiple of 16 use 8-lane vectors (AVX-512VL still gives 32 of them). The tile keeps
    its accumulators, one operand per step of the shorter side and the broadcast in registers; among
    the tiles that fit it takes the most accumulators, then the fewest loads per FMA.
    """
    regs = 32 if lanes == 16 else 16
    if n_ow % lanes and lanes == 16:
        lanes = 8
    if n_ow % lanes:
        return None
    best, best_key = None, None
    for oc in (d for d in range(1, min(n_oc, 16) + 1) if n_oc % d == 0):
        for vecs in (d for d in range(1, min(n_ow // lanes, 8) + 1) if (n_ow // lanes) % d == 0):
            acc = oc * vecs
            if acc + min(oc, vecs) + 1 > regs:
                continue
            key = (acc, -(oc + 2 * vecs) / acc)  # an unaligned input vector load splits a cache line
            if best_key is None or key > best_key:
                best, best_key = ConvTile(oc, vecs, lanes), key
    return best


def _row_stride_one(sch: tvm.s_tir.Schedule, block) -> bool:
    """Whether the conv reads its input at ``x[..., ow + kw]`` (stride 1, dilation 1 along rows)."""
    stmt = sch.get(block)
    ivars = [iv.var for iv in stmt.iter_vars]
    row = stmt.reads[0].region[-1]
    ana = tvm.sym.Analyzer()
    return ana.can_prove_equal(row.extent, 1) and ana.can_prove_equal(row.min, ivars[3] + ivars[6])


def _weight_param(func: tirx.PrimFunc, sch: tvm.s_tir.Schedule, block) -> int | None:
    """Index of the PrimFunc parameter the conv reads its weight from (``w[oc, ic, kh, kw]``)."""
    stmt = sch.get(block)
    if len(stmt.reads) < 2:
        return None
    weight = stmt.reads[1].source
    for i, param in enumerate(func.params):
        if param.same_as(weight):
            return i
    return None


def _inline_epilogue(sch: tvm.s_tir.Schedule, writeback) -> None:
    """Fold the elementwise blocks after the conv (bias, residual adds) into its store."""
    while True:
        consumers = sch.get_consumers(writeback)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except tvm.s_tir.ScheduleError:
            return


def _inline_intermediates(sch: tvm.s_tir.Schedule, root) -> None:
    """Inline every elementwise block of a conv-free PrimFunc into its consumers.

    FuseOps fuses e.g. bias add + PReLU, or a quantizer's per-sample clip with its bound
    arithmetic, into one PrimFunc, but the legalized blocks still each write a full-size
    intermediate: three passes over an 8x64x96x96 tensor where one does. Blocks that write a
    function output, reductions and blocks with several consumers stay."""
    progress = True
    while progress:
        progress = False
        for block in sch.get_child_blocks(root):
            if any(k != 0 for k in _iter_kinds(sch, block)):
                continue  # a reduction: not inlined
            if len(sch.get_consumers(block)) > 1:
                continue  # read twice (softmax's exp: by the sum and the division): computed once
            try:
                sch.compute_inline(block)
            except tvm.s_tir.ScheduleError:
                continue
            progress = True
            break


def _vectorize_tail(sch: tvm.s_tir.Schedule, block, lanes: int) -> None:
    """Unroll a tile's loops and vectorize its innermost (pixel) loop by ``lanes``."""
    loops = sch.get_loops(block)
    inner = loops[-1]
    if int(sch.get(inner).extent) > lanes:
        outer, inner = sch.split(inner, [None, lanes])
        sch.unroll(outer)
    sch.vectorize(inner)


def _vectorize_row(sch: tvm.s_tir.Schedule, loop, lanes: int) -> None:
    extent = int(sch.get(loop).extent)
    for width in (lanes, _LANES):
        if extent % width == 0:
            sch.vectorize(sch.split(loop, [None, width])[1] if extent > width else loop)
            return


def _schedule_pad(sch: tvm.s_tir.Schedule, conv, lanes: int) -> None:
    """The conv's zero-padded input, parallel over (batch, channel): per row, a vector fill of
    zeros and a vector copy of the interior (decompose_padding), instead of a per-element branch."""
    pads = [p for p in sch.get_producers(conv) if sch.get(p).name_hint.startswith("pad_temp")]
    if len(pads) != 1 or len(sch.get_loops(pads[0])) != 4:
        return
    pad = pads[0]
    try:
        fill = sch.decompose_padding(pad, sch.get_loops(pad)[3])
    except tvm.s_tir.ScheduleError:
        # no padding at all (1x1 convs): the "pad" is a plain copy; the conv reads its input directly
        sch.compute_inline(pad)
        return
    n, c, _, _ = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, c))
    for block in (fill, pad):
        _vectorize_row(sch, sch.get_loops(block)[-1], lanes)


def _schedule_conv_rows(
    sch: tvm.s_tir.Schedule, block, tile: ConvTile, w_param: int | None, const_params: frozenset[int]
) -> PackInfo | None:
    """The row-vector conv (see the module docstring); returns the packed weight, if any."""
    _schedule_pad(sch, block, tile.lanes)
    n, oc, oh, ow, ic, kh, kw = sch.get_loops(block)
    weight = sch.get(block).reads[1].source
    oco, oci = sch.split(oc, [None, tile.oc])
    owo, owi = sch.split(ow, [None, tile.pixels])
    sch.reorder(n, oh, oco, owo, ic, kh, kw, oci, owi)
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, owo)
    _inline_epilogue(sch, writeback)
    sch.parallel(sch.fuse(n, oh))
    sch.unroll(oci)
    owv, lane = sch.split(owi, [None, tile.lanes])
    sch.unroll(owv)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, ic)
    for b in (init, writeback):
        for loop in sch.get_loops(b)[3:-1]:
            sch.unroll(loop)
        _vectorize_tail(sch, b, tile.lanes)
    return _pack_weight(sch, block, weight, tile.oc, w_param, const_params)


def _pack_weight(
    sch: tvm.s_tir.Schedule, block, weight, oc_tile: int, w_param: int | None, const_params: frozenset[int]
) -> PackInfo | None:
    """Read the conv weight as ``[O/oc][I][kh][kw][oc]``: the parameter itself when every caller
    passes a constant (packed at compile time; returns (parameter index, oc)), else a copy per call."""

    def pack(o, i, h, w):
        return (o // oc_tile, i, h, w, o % oc_tile)

    index = next(i for i, r in enumerate(sch.get(block).reads) if r.source.same_as(weight))
    if w_param is not None and w_param in const_params:
        sch.transform_layout(block, ("read", index), pack)
        return w_param, oc_tile
    wbuf = sch.cache_read(block, index, "global")
    sch.transform_layout(wbuf, ("write", 0), pack)
    sch.parallel(sch.get_loops(wbuf)[0])
    return None


def _schedule_conv_channels(sch: tvm.s_tir.Schedule, block, lanes: int) -> bool:
    """conv2d_nchw with the vector over ``lanes`` output channels and a tile of pixels of a row
    (any stride; rows that hold no whole vector), or over pixels for < ``lanes`` channels."""
    _schedule_pad(sch, block, lanes)
    n, oc, oh, ow, ic, kh, kw = sch.get_loops(block)
    n_oc, n_ow = int(sch.get(oc).extent), int(sch.get(ow).extent)
    regs = 32 if lanes == 16 else 16
    if n_oc % lanes == 0:
        vec = 2 if n_oc % (2 * lanes) == 0 else 1
        oc_tile, ow_tile = vec * lanes, _largest_divisor(n_ow, (regs - 4) // vec)
        wbuf = sch.cache_read(block, 1, "global")
        sch.transform_layout(wbuf, ("write", 0), lambda o, i, h, w: (o // lanes, i, h, w, o % lanes))
        oco, oci = sch.split(oc, [None, oc_tile])
        owo, owi = sch.split(ow, [None, ow_tile])
        sch.reorder(n, oco, oh, owo, ic, kh, kw, owi, oci)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, owo)
        sch.parallel(sch.fuse(n, oco, oh))
        sch.unroll(owi)
        ocv_o, ocv_i = sch.split(oci, [None, lanes])
        sch.unroll(ocv_o)
        sch.vectorize(ocv_i)
        sch.decompose_reduction(block, ic)
        sch.parallel(sch.get_loops(wbuf)[0])
        return True
    if n_ow % _LANES:
        return False
    vec = 3 if n_ow % (3 * _LANES) == 0 else 1
    oc_tile = _largest_divisor(n_oc, 4)
    oco, oci = sch.split(oc, [None, oc_tile])
    owo, owi = sch.split(ow, [None, vec * _LANES])
    sch.reorder(n, oco, oh, owo, ic, kh, kw, oci, owi)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, owo)
    sch.parallel(sch.fuse(n, oco, oh))
    sch.unroll(oci)
    owv_o, owv_i = sch.split(owi, [None, _LANES])
    sch.unroll(owv_o)
    sch.vectorize(owv_i)
    sch.decompose_reduction(block, ic)
    return True


def _schedule_conv(
    func: tirx.PrimFunc, sch: tvm.s_tir.Schedule, block, lanes: int, const_params: frozenset[int]
) -> tuple[bool, PackInfo | None]:
    """Schedule one float conv2d_nchw block; returns (scheduled, packed weight)."""
    loops = sch.get_loops(block)
    if len(loops) != 7 or str(sch.get(block).reads[0].source.dtype) != "float32":
        return False, None
    n_oc, n_ow = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    tile = conv_tile(n_oc, n_ow, lanes)
    if tile is not None and _row_stride_one(sch, block):
        return True, _schedule_conv_rows(sch, block, tile, _weight_param(func, sch, block), const_params)
    return _schedule_conv_channels(sch, block, lanes), None


def _schedule_matmul(sch: tvm.s_tir.Schedule, block, lanes: int) -> bool:
    """``out[b.., i, j] += a[b.., i, k] * w[b.., k, j]``: per (batch, tile of ``ti`` rows, run of
    ``tj`` columns) the accumulators stay in registers over the whole reduction; each step
    broadcasts ``ti`` values of ``a`` and loads ``tj / lanes`` vectors of ``w``. False when the
    nest is not a plain (batch) matmul with its output row contiguous in ``w``."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if len(loops) < 3 or len(kinds) != len(loops) or kinds[-1] != 2 or any(k != 0 for k in kinds[:-1]):
        return False
    stmt = sch.get(block)
    if len(stmt.reads) != 2:
        return False
    j_var = stmt.iter_vars[-2].var
    ana = tvm.sym.Analyzer()
    if not (
        ana.can_prove_equal(stmt.reads[1].region[-1].min, j_var)
        and ana.can_prove_equal(stmt.writes[0].region[-1].min, j_var)
    ):
        return False  # the output row is not contiguous in the right operand: leave it generic
    *batch, i, j, k = loops
    n_i, n_j = int(sch.get(i).extent), int(sch.get(j).extent)
    regs = 32 if lanes == 16 else 16
    vl = next((v for v in (lanes, 8) if n_j % v == 0), None)
    if vl is None and n_j > 4 * _LANES:
        return False
    tj = vl * _largest_divisor(n_j // vl, 4) if vl else n_j  # a short odd row is one (split) vector
    vec_regs = -(-tj // lanes)
    ti = _largest_divisor(n_i, max(1, min(8, (regs - 2) // vec_regs - 1)))
    io, ii = sch.split(i, [None, ti])
    jo, ji = sch.split(j, [None, tj])
    sch.reorder(*batch, io, jo, k, ii, ji)
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, jo)
    _inline_epilogue(sch, writeback)
    sch.parallel(sch.fuse(*batch, io))
    sch.unroll(ii)
    init = sch.decompose_reduction(block, k)
    for b in (block, init, writeback):
        inner = sch.get_loops(b)[-1]
        if vl and int(sch.get(inner).extent) > vl:
            outer, inner = sch.split(inner, [None, vl])
            sch.unroll(outer)
        sch.vectorize(inner)
        if b is not block:
            for loop in sch.get_loops(b)[len(batch) + 2 : -1]:
                sch.unroll(loop)
    return True


def _contiguous_reduction(sch: tvm.s_tir.Schedule, block, spatial: int) -> bool:
    """Whether the block's one reduction axis is the last index of everything it reads (softmax's
    max and sum over the last axis): its vector partial sums then load along memory."""
    stmt = sch.get(block)
    if len(stmt.iter_vars) != spatial + 1:
        return False
    r_var = stmt.iter_vars[-1].var
    ana = tvm.sym.Analyzer()

    def uses(region) -> bool:
        return any(v.same_as(r_var) for rng in region for v in tirx.analysis.undefined_vars(rng.min))

    # reads without the reduced axis (softmax's row max) are broadcast per row: no constraint
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source) and uses(r.region)]
    return bool(reads) and all(ana.can_prove_equal(r.region[-1].min, r_var) for r in reads)


def _vector_reduction(sch: tvm.s_tir.Schedule, block, spatial: int) -> bool:
    """A sum/max over trailing reduction loops (DDTB's channel means over H x W): the innermost
    reduction loop split by ``_LANES`` and rfactored, so ``_LANES`` partial results accumulate
    as one vector; the spatial loops in parallel. False when the nest does not fit (left as is)."""
    inner = sch.get_loops(block)[-1]
    extent = int(sch.get(inner).extent)
    if extent % _LANES or extent < 2 * _LANES:
        return False
    try:
        _, lane = sch.split(inner, [None, _LANES])
        rf = sch.rfactor(lane, factor_axis=spatial)
        rf_loops = sch.get_loops(rf)
        sch.parallel(sch.fuse(*rf_loops[:spatial]) if spatial > 1 else rf_loops[0])
        sch.vectorize(sch.get_loops(rf)[-1])
        final = sch.get_loops(block)
        sch.parallel(sch.fuse(*final[:spatial]) if spatial > 1 else final[0])
    except tvm.s_tir.ScheduleError:
        return False
    return True


def _schedule_generic(sch: tvm.s_tir.Schedule, block, num_cores: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    kinds = _iter_kinds(sch, block)
    if len(kinds) != len(loops):  # loops and block vars do not line up (fused/odd nests): parallel only
        sch.parallel(loops[0])
        return
    spatial = 0
    while spatial < len(loops) and kinds[spatial] == 0:
        spatial += 1
    if spatial == 0:
        return
    # reductions over trailing spatial axes (>= 2 of them: H x W): their innermost loop runs along
    # memory; a single reduced axis (channels of [N, C, H, W]) would become a strided gather
    if (len(loops) - spatial >= 2 or _contiguous_reduction(sch, block, spatial)) and _vector_reduction(
        sch, block, spatial
    ):
        return
    # fuse leading spatial loops until there is enough parallel work, keep the last for vectors
    lead = 1
    work = int(sch.get(loops[0]).extent)
    while lead < spatial - 1 and work < 4 * num_cores:
        work *= int(sch.get(loops[lead]).extent)
        lead += 1
    outer = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    sch.parallel(outer)
    if spatial == len(loops) and spatial > lead:  # injective: vectorize the innermost loop
        inner = loops[-1]
        extent = int(sch.get(inner).extent)
        if extent > _LANES and extent % _LANES == 0:
            _, inner = sch.split(inner, [None, _LANES])
            sch.vectorize(inner)
        elif extent <= 4 * _LANES:
            sch.vectorize(inner)


def schedule_func_packed(
    func: tirx.PrimFunc, num_cores: int, lanes: int = _LANES, const_params: frozenset[int] = frozenset()
) -> tuple[tirx.PrimFunc, PackInfo | None]:
    """Schedule ``func``; parameters in ``const_params`` are constants the caller can re-lay out.
    Returns the scheduled function and, when a conv weight parameter now takes the packed layout
    ``[O/oc][I][kh][kw][oc]``, (its index, oc)."""
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    packed = None
    names = [sch.get(b).name_hint for b in blocks]
    if root is not None and not any(n.startswith("conv2d_nchw") for n in names):
        _inline_intermediates(sch, root)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    # convs first: they take their padding and epilogue blocks along
    for name in sorted(names, key=lambda n: not n.startswith("conv2d_nchw")):
        try:
            block = sch.get_sblock(name)
        except (tvm.s_tir.ScheduleError, ValueError):
            continue  # inlined into a conv's store by an earlier step
        try:
            if name.startswith("conv2d_nchw"):  # a second conv of one PrimFunc keeps its weight layout
                done, pack = _schedule_conv(func, sch, block, lanes, const_params if packed is None else frozenset())
                packed = packed or pack
                if done:
                    continue
            if _is_parallel(sch, block):
                continue  # scheduled with its conv (the padding)
            if name.startswith("matmul") and _schedule_matmul(sch, block, lanes):
                continue
            _schedule_generic(sch, block, num_cores)
        except tvm.s_tir.ScheduleError:
            continue  # a nest this simple scheduler does not understand stays serial (still correct)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), packed


def _is_parallel(sch: tvm.s_tir.Schedule, block) -> bool:
    return any(int(sch.get(loop).kind) == int(tirx.ForKind.PARALLEL) for loop in sch.get_loops(block))


def _has_root(sch: tvm.s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _relax_uses(mod: tvm.IRModule) -> tuple[list[relax.Call], dict[str, int]]:
    """Every ``call_tir`` in the Relax functions, and how often each GlobalVar is referenced at all."""
    calls: list[relax.Call] = []
    refs: dict[str, int] = {}

    def visit(e) -> None:
        if isinstance(e, relax.Call) and e.op.same_as(_CALL_TIR):
            calls.append(e)
        elif isinstance(e, tvm.ir.GlobalVar):
            refs[e.name_hint] = refs.get(e.name_hint, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return calls, refs


def _constant_params(mod: tvm.IRModule) -> dict[str, frozenset[int]]:
    """Per PrimFunc (by name): the parameters that get a Relax constant at every call site. A
    PrimFunc referenced other than as a ``call_tir`` callee gets none (its signature must stay)."""
    calls, refs = _relax_uses(mod)
    seen: dict[str, set[int]] = {}
    count: dict[str, int] = {}
    for call in calls:
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else None
        name = call.args[0].name_hint
        const = {i for i, a in enumerate(args or []) if isinstance(a, tvm.ir.expr.Constant)}
        seen[name] = seen[name] & const if name in seen else const
        count[name] = count.get(name, 0) + 1
    return {k: frozenset(v) for k, v in seen.items() if refs.get(k, 0) == count[k]}


@relax.expr_functor.mutator
class _PackConstants(relax.PyExprMutator):
    """Point every call of a packed PrimFunc at its new GlobalVar (whose type carries the new
    signature) and give it its weight constant in the packed layout."""

    def __init__(self, mod: tvm.IRModule, packs: dict[str, tuple[tvm.ir.GlobalVar, PackInfo]], pack: Callable) -> None:
        super().__init__(mod)
        self.packs, self.pack, self.memo = packs, pack, {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and call.args[0].name_hint in self.packs):
            return call
        gv, (index, oc) = self.packs[call.args[0].name_hint]
        args = list(call.args[1].fields)
        key = (args[index], oc)
        if key not in self.memo:  # a weight shared by several calls is packed (and stored) once
            self.memo[key] = relax.const(self.pack(args[index].value.numpy(), oc))
        args[index] = self.memo[key]
        return relax.Call(call.op, [gv, relax.Tuple(args)], call.attrs, call.ty_args, call.span)


def _with_packed_weights(mod: tvm.IRModule, packs: dict[str, PackInfo]) -> tvm.IRModule:
    """``mod`` with the packed PrimFuncs under fresh GlobalVars (typed with the new signature) and
    their callers' weight constants packed."""
    base = tvm.IRModule(
        {gv: f for gv, f in mod.functions.items() if gv.name_hint not in packs},
        attrs=mod.attrs,
        global_infos=mod.global_infos,
    )
    bb = relax.BlockBuilder(base)
    fresh = {name: (bb.add_func(mod[name], name), info) for name, info in packs.items()}
    out = bb.get()
    mutator = _PackConstants(out, fresh, pack_conv_weights_oc)
    for gv, func in list(out.functions.items()):
        if isinstance(func, relax.Function):
            out[gv] = mutator.visit_expr(func)
    return out


def cpu_schedule_pass(num_cores: int, lanes: int = _LANES) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that is not yet scheduled, with float conv vectors of
    ``lanes`` fp32 (:func:`vector_lanes`), and pre-pack the constant conv weights they read."""

    @tvm.transform.module_pass(opt_level=0, name="RefQSRCpuSchedule")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        consts = _constant_params(mod)
        updates, packs = {}, {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                symbol = func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs else gv.name_hint
                scheduled, packed = schedule_func_packed(
                    func.with_attr("global_symbol", "main"), num_cores, lanes, consts.get(gv.name_hint, frozenset())
                )
                updates[gv] = scheduled.with_attr("global_symbol", symbol)
                if packed is not None:
                    packs[gv.name_hint] = packed
        for gv, func in updates.items():
            mod[gv] = func
        return _with_packed_weights(mod, packs) if packs else mod

    return _pass
