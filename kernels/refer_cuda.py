"""GPU schedules of the RefER matching/warp kernels and of the ClustBlock clustering kernel.

The computes are the CPU kernels' own TE (:func:`.refer_kernels.refer_compute`,
:func:`.cluster_kernels.cluster_compute`), built under :func:`.tir_build.device_math` ``("cuda")``
so that every fenced product is ``__fmul_rn`` and every explicit fused multiply-add ``fmaf``: the
float32 operations and their rounding are those of the CPU kernels, and the integer grid values,
the arg-max (first index on ties) and the flow are the same integers. nvcc must compile them
without ``--use_fast_math`` (IEEE ``sqrtf`` and division, no flush to zero); the graph build
(``engine.compiler.cuda_build``) and :func:`build_cuda_kernel` do.

Schedule: one thread per output element of every block (its leading spatial loops fused, split
into blocks of up to 256 threads bound to ``blockIdx.x`` / ``threadIdx.x``); reductions run serially
inside the thread in the CPU kernels' order. Two blocks are never materialised:

* the matcher's cost volume: each cost ``q . r`` is computed in a register inside the arg-max's
  loop over reference blocks (``compute_at`` into ``lane_best``);
* the clustering's affinity matrix M: each M[i, j] is computed in a register inside the arg-max
  over j of row i (one thread per patch).

``bind=False`` gives the same schedule with the thread loops left serial: a loop nest that LLVM
builds, so tests run the scheduled kernels on the CPU (see tests/test_kernels_refer_cuda.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import tvm

from .cluster_kernels import cluster_compute
from .refer_kernels import POOL, RefERShape, refer_compute
from .tir_build import device_math

__all__ = [
    "CUDA_STAGES",
    "THREADS",
    "build_cuda_kernel",
    "cluster_primfunc_cuda",
    "cuda_compute",
    "no_fast_math",
    "refer_primfunc_cuda",
    "schedule_cluster_cuda",
    "schedule_refer_cuda",
]

THREADS = 256  # threads per CUDA block
#: the RefER stages with a GPU schedule (all of refer_compute's)
CUDA_STAGES = (
    "normalize_pool",
    "quantize",
    "match",
    "pooled_flow",
    "upsample_flow",
    "backward_warp",
    "shared_flow",
    "pipeline",
)
_DATA_PAR = 0  # tvm.tirx.IterVar.DataPar


def _bind_spatial(sch: tvm.s_tir.Schedule, block, bind: bool) -> None:
    """Fuse ``block``'s leading spatial loops into one, split it into blocks of THREADS and bind
    them (``bind``) to ``blockIdx.x`` / ``threadIdx.x``; its reduction loops stay inside the thread."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    spatial = 0
    for it in iters:
        if int(it.iter_type) != _DATA_PAR:
            break
        spatial += 1
    spatial = max(1, min(spatial, len(loops)))
    extent = 1
    for loop in loops[:spatial]:
        extent *= int(sch.get(loop).extent)
    fused = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
    threads = min(THREADS, extent)
    outer, inner = sch.split(fused, [None, threads])
    if bind:
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")


def _bind_root_blocks(sch: tvm.s_tir.Schedule, bind: bool, nested: tuple[str, ...] = ()) -> None:
    """:func:`_bind_spatial` on every block but the ``nested`` ones (moved inside another block's loops)."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint not in nested:
            _bind_spatial(sch, block, bind)


def _has_block(sch: tvm.s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own ScheduleError types
        return False
    return True


def _into_argmax(sch: tvm.s_tir.Schedule, producer: str, argmax: str) -> None:
    """Compute each value of ``producer`` in a register inside the innermost loop of the arg-max
    block that reads it, so the values are never stored."""
    block = sch.get_sblock(producer)
    sch.compute_at(block, sch.get_loops(sch.get_sblock(argmax))[-1], preserve_unit_loops=True)
    sch.set_scope(block, 0, "local")


def schedule_refer_cuda(func: tvm.tirx.PrimFunc, bind: bool = True) -> tvm.s_tir.Schedule:
    """Thread-per-output GPU schedule of any :func:`~.refer_kernels.refer_compute` stage; the
    matcher's costs live in registers inside its arg-max loop (see the module docstring)."""
    sch = tvm.s_tir.Schedule(func)
    if _has_block(sch, "cost"):
        _into_argmax(sch, "cost", "lane_best")
    _bind_root_blocks(sch, bind, nested=("cost",))
    return sch


def schedule_cluster_cuda(func: tvm.tirx.PrimFunc, bind: bool = True) -> tvm.s_tir.Schedule:
    """Thread-per-output GPU schedule of :func:`~.cluster_kernels.cluster_compute`: one thread per
    patch computes its row of M element by element inside the arg-max over j."""
    sch = tvm.s_tir.Schedule(func)
    _into_argmax(sch, "M", "ref")
    _bind_root_blocks(sch, bind, nested=("M",))
    return sch


def cuda_compute(stage: str, shape: RefERShape, **kw) -> tuple[tvm.tirx.PrimFunc, int]:
    """:func:`~.refer_kernels.refer_compute` with CUDA's forms of the fenced product and the FMA."""
    if stage not in CUDA_STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    with device_math("cuda"):
        return refer_compute(stage, shape, **kw)


def refer_primfunc_cuda(
    stage: str, batch: int, channels: int, height: int, width: int, *, pool: int = POOL, **kw
) -> tvm.tirx.PrimFunc:
    """The GPU-scheduled PrimFunc of one RefER stage (``"pipeline"``, ``"shared_flow"``,
    ``"backward_warp"``, ...) for ``R.call_tir``; ``kw`` as :func:`~.refer_kernels.refer_compute`."""
    func, _ = cuda_compute(stage, RefERShape(batch, channels, height, width, pool), **kw)
    return schedule_refer_cuda(func).mod["main"].with_attr("tirx.is_scheduled", True)


def cluster_primfunc_cuda(num_patches: int, num_classes: int) -> tvm.tirx.PrimFunc:
    """The GPU-scheduled ``main(V, ref, cos)`` of the clustering kernel, for a CUDA library."""
    with device_math("cuda"):
        func = cluster_compute(num_patches, num_classes)
    return schedule_cluster_cuda(func).mod["main"].with_attr("tirx.is_scheduled", True)


@contextlib.contextmanager
def no_fast_math() -> Iterator[None]:
    """TVM's nvcc hook without ``--use_fast_math`` (``TVM_CUDA_NVCC_NO_FAST_MATH``) while active."""
    key = "TVM_CUDA_NVCC_NO_FAST_MATH"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def build_cuda_kernel(funcs: dict[str, tvm.tirx.PrimFunc], arch: str = "sm_80"):
    """Compile GPU-scheduled PrimFuncs (name -> PrimFunc) into one CUDA executable for ``arch``
    with nvcc, IEEE math (:func:`no_fast_math`); :func:`.cuda_toolchain.build_info` gives its
    source and binary."""
    from . import cuda_toolchain

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with no_fast_math():
        return cuda_toolchain.build_cuda(mod, arch)
