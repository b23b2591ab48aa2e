"""A deliberate schedule for every PrimFunc the Relax legalizer produced (LLVM CPU targets).

Legalized TIR is a plain loop nest: one thread, no vectors. Our own kernels (integer convs,
RefER, clustering) arrive scheduled and marked ``tirx.is_scheduled``; everything else -- the
full-precision convs (head, upsampler, tail), PReLU/residual adds fused by FuseOps, the DDTB gate --
gets a schedule here:

* float ``conv2d_nchw``: output channels tiled by 8 and rows by ``ow`` vector lanes, the
  (ic, kh, kw) reduction outside a register tile of accumulators, padded input computed per
  output row, parallel over (batch, channel tile, row);
* everything else: the leading spatial loops fused and parallel, the innermost spatial loop
  vectorized when it is the last loop of an injective block.
"""
from __future__ import annotations

import tvm
from tvm import tirx

_LANES = 8  # fp32 x 8 = one ymm register


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])


def _iter_kinds(sch: tvm.s_tir.Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _schedule_conv(sch: tvm.s_tir.Schedule, block) -> bool:
    """conv2d_nchw ([n, oc, oh, ow] spatial, [ic, kh, kw] reduction) with a register tile of at
    most 12 ymm accumulators, the reduction outside it.

    With >= 8 output channels the vector runs over 8 (or 16) output channels and the tile over up
    to 12 (6) pixels of a row: per reduction step one or two weight vectors (weights re-packed as
    [O/8][I][kh][kw][8] once per call, so the vector load is contiguous) and one broadcast input per
    pixel. With fewer channels (the 64 -> 3 tail) the vector runs over 8 pixels of a row instead.
    """
    loops = sch.get_loops(block)
    if len(loops) != 7:
        return False
    n, oc, oh, ow, ic, kh, kw = loops
    n_oc, n_ow = int(sch.get(oc).extent), int(sch.get(ow).extent)
    if n_oc % _LANES == 0:
        vec = 2 if n_oc % (2 * _LANES) == 0 else 1
        oc_tile, ow_tile = vec * _LANES, _largest_divisor(n_ow, 12 // vec)
        # weights re-packed so that 8 output channels are contiguous
        wbuf = sch.cache_read(block, 1, "global")
        sch.transform_layout(wbuf, ("write", 0), lambda o, i, h, w: (o // _LANES, i, h, w, o % _LANES))
        oco, oci = sch.split(oc, [None, oc_tile])
        owo, owi = sch.split(ow, [None, ow_tile])
        sch.reorder(n, oco, oh, owo, ic, kh, kw, owi, oci)
        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, owo)
        sch.parallel(sch.fuse(n, oco, oh))
        sch.unroll(owi)
        ocv_o, ocv_i = sch.split(oci, [None, _LANES])
        sch.unroll(ocv_o)
        sch.vectorize(ocv_i)
        sch.decompose_reduction(block, ic)
        wl = sch.get_loops(wbuf)
        sch.parallel(wl[0])
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


def schedule_func(func: tirx.PrimFunc, num_cores: int) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        name = sch.get(block).name_hint
        try:
            if name.startswith("conv2d_nchw") and _schedule_conv(sch, block):
                continue
            _schedule_generic(sch, block, num_cores)
        except tvm.s_tir.ScheduleError:
            continue  # a nest this simple scheduler does not understand stays serial (still correct)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_root(sch: tvm.s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def cpu_schedule_pass(num_cores: int) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that is not yet scheduled."""

    @tvm.transform.module_pass(opt_level=0, name="RefQSRCpuSchedule")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                symbol = func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs else gv.name_hint
                scheduled = schedule_func(func.with_attr("global_symbol", "main"), num_cores)
                updates[gv] = scheduled.with_attr("global_symbol", symbol)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
