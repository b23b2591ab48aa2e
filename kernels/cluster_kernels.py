"""ClustBlock clustering as a TIR kernel (paper eqs. (2)-(3); PyTorch twin: models/clustblock.py).

From the class logits ``V`` (N patches x C classes, float32) one PrimFunc computes

* ``A  = softmax_rows(V)``            (eq. (2); max-subtracted, ``exp(v - max) / sum``)
* ``A' = softmax_rows(V^T)``           (stored ``[C, N]``: ``A'[c, j]`` = softmax over patches j)
* ``ref[i] = argmax_j (A . A')[i, j]`` (eq. (3); first index on ties) -- the arg-max is fused with
  the product: each parallel task computes one row of M in a stack buffer, never the N x N matrix
* ``cos[i] = cosine(V_i, V_ref[i])``   (as ``F.cosine_similarity``: each row over its norm, eps 1e-8)

The exponentials are :func:`~.tir_build.exp_f32` (IEEE operations and explicit FMAs, within
1 ulp of exp), not the math library's ``expf``: the GPU schedule
(:func:`~.refer_cuda.cluster_primfunc_cuda`) then computes the same bits as this CPU kernel.

The O(N) bookkeeping that follows (every arg-max target is a reference; a query whose similarity
is below ``tau`` becomes an isolated reference) is ``models.clustblock.assign_references``, applied
by the caller to the kernel's outputs.

    k = build_cluster_kernel(num_patches=600, num_classes=47)
    ref, cos = k(v)                       # int32 [N], float32 [N]

``k.prim_func`` is ``main(V, ref, cos)`` for ``R.call_tir`` (outputs ``[N] int32``, ``[N] float32``).
:func:`build_affinity_kernel` materialises M (for tests and inspection only).
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from .tir_build import TirKernel, build_kernel, exp_f32

__all__ = [
    "build_affinity_kernel",
    "build_cluster_kernel",
    "cluster_primfunc",
    "cluster_compute",
    "schedule_cluster",
]

COS_EPS = 1e-8
_LANES = 8


def _argmax_reducer():
    """(index, value) arg-max, associative and commutative: the larger value wins, equal values
    go to the smaller index (so the result is the FIRST maximal index whatever the order)."""

    def fcombine(x, y):
        take_y = tirx.Or(y[1] > x[1], tirx.And(y[1] == x[1], y[0] < x[0]))
        return tirx.Select(take_y, y[0], x[0]), tirx.Select(take_y, y[1], x[1])

    def fidentity(t0, t1):
        return tirx.const(2**31 - 1, t0), tvm.te.min_value(t1)

    return te.comm_reducer(fcombine, fidentity, name="argmax")


def _softmax_parts(V, n: int, c: int):
    k = te.reduce_axis((0, c), "k")
    rmax = te.compute((n,), lambda i: te.max(V[i, k], axis=k), name="row_max")
    k2 = te.reduce_axis((0, c), "k2")
    rsum = te.compute((n,), lambda i: te.sum(exp_f32(V[i, k2] - rmax[i]), axis=k2), name="row_sum")
    A = te.compute((n, c), lambda i, j: exp_f32(V[i, j] - rmax[i]) / rsum[i], name="A")
    p = te.reduce_axis((0, n), "p")
    cmax = te.compute((c,), lambda j: te.max(V[p, j], axis=p), name="col_max")
    p2 = te.reduce_axis((0, n), "p2")
    csum = te.compute((c,), lambda j: te.sum(exp_f32(V[p2, j] - cmax[j]), axis=p2), name="col_sum")
    return A, cmax, csum


def cluster_compute(num_patches: int, num_classes: int, *, affinity_only: bool = False) -> tvm.tirx.PrimFunc:
    """Unscheduled PrimFunc ``main(V, ref, cos)`` (or ``main(V, M)`` with ``affinity_only``)."""
    n, c = int(num_patches), int(num_classes)
    if n < 1 or c < 1:
        raise ValueError(f"need at least one patch and one class, got {n} x {c}")
    npad = -(-n // _LANES) * _LANES
    V = te.placeholder((n, c), "float32", name="V")
    A, cmax, csum = _softmax_parts(V, n, c)
    # A'[c, j], zero-padded to a multiple of the vector width (the padded columns are masked out)
    At = te.compute(
        (c, npad),
        lambda ci, j: tirx.if_then_else(j < n, exp_f32(V[tirx.min(j, n - 1), ci] - cmax[ci]) / csum[ci], 0.0),
        name="At",
    )
    kc = te.reduce_axis((0, c), "kc")
    M = te.compute((n, npad), lambda i, j: te.sum(A[i, kc] * At[kc, j], axis=kc), name="M")
    if affinity_only:
        Mout = te.compute((n, n), lambda i, j: M[i, j], name="M_out")
        return te.create_prim_func([V, Mout])
    j = te.reduce_axis((0, npad), "j")
    argmax = _argmax_reducer()
    ref, _best = te.compute(
        (n,),
        lambda i: argmax((j, tirx.Select(j < n, M[i, j], tvm.te.min_value("float32"))), axis=j),
        name="ref",
    )
    ks = te.reduce_axis((0, c), "ks")
    sumsq = te.compute((n,), lambda i: te.sum(V[i, ks] * V[i, ks], axis=ks), name="sumsq")
    nrm = te.compute((n,), lambda i: te.max(te.sqrt(sumsq[i]), COS_EPS), name="norm")
    kd = te.reduce_axis((0, c), "kd")
    cos = te.compute(
        (n,),
        lambda i: te.sum((V[i, kd] / nrm[i]) * (V[ref[i], kd] / nrm[ref[i]]), axis=kd),
        name="cos",
    )
    return te.create_prim_func([V, ref, cos])


def schedule_cluster(func: tvm.tirx.PrimFunc, *, affinity_only: bool = False) -> tvm.s_tir.Schedule:
    """Parallel over patches (rows of M), the M row vectorised over j, the arg-max fused with it."""
    sch = tvm.s_tir.Schedule(func)
    # softmax over the rows of V: parallel rows
    for name in ("row_max", "row_sum"):
        blk = sch.get_sblock(name)
        sch.parallel(sch.get_loops(blk)[0])
    blk = sch.get_sblock("A")
    sch.parallel(sch.get_loops(blk)[0])
    # A' rows: vectorised over patches
    blk = sch.get_sblock("At")
    cl, jl = sch.get_loops(blk)
    jo, ji = sch.split(jl, [None, _LANES])
    sch.parallel(cl)
    sch.vectorize(ji)

    m = sch.get_sblock("M")
    if affinity_only:
        i, jl, kc = sch.get_loops(m)
        jo, ji = sch.split(jl, [None, _LANES])
        sch.reorder(i, kc, jo, ji)
        sch.parallel(i)
        sch.vectorize(ji)
        sch.decompose_reduction(m, kc)
        out = sch.get_sblock("M_out")
        sch.parallel(sch.get_loops(out)[0])
        return sch

    ref = sch.get_sblock("ref")
    i_loop = sch.get_loops(ref)[0]
    sch.compute_at(m, i_loop, preserve_unit_loops=True)
    sch.set_scope(m, 0, "local")
    sch.parallel(i_loop)
    jl, kc = sch.get_loops(m)[-2:]
    jo, ji = sch.split(jl, [None, _LANES])
    sch.reorder(kc, jo, ji)
    sch.vectorize(ji)
    sch.decompose_reduction(m, kc)
    for name in ("sumsq", "norm", "cos"):
        blk = sch.get_sblock(name)
        sch.parallel(sch.get_loops(blk)[0])
    return sch


def cluster_primfunc(num_patches: int, num_classes: int) -> tvm.tirx.PrimFunc:
    """The scheduled ``main(V, ref, cos)`` of :func:`build_cluster_kernel`, for ``R.call_tir``."""
    return schedule_cluster(cluster_compute(num_patches, num_classes)).mod["main"].with_attr("tirx.is_scheduled", True)


def build_cluster_kernel(num_patches: int, num_classes: int = 47, target=None) -> TirKernel:
    """Compile ``main(V[N, C] f32) -> (ref[N] int32, cos[N] f32)`` (see the module docstring)."""
    func = cluster_compute(num_patches, num_classes)
    sch = schedule_cluster(func)
    return build_kernel("clust_assign", sch, 1, target, {"num_patches": num_patches, "num_classes": num_classes})


def build_affinity_kernel(num_patches: int, num_classes: int = 47, target=None) -> TirKernel:
    """Compile ``main(V[N, C] f32) -> M[N, N] f32``, M = softmax_rows(V) . softmax_rows(V^T)."""
    func = cluster_compute(num_patches, num_classes, affinity_only=True)
    sch = schedule_cluster(func, affinity_only=True)
    return build_kernel("clust_affinity", sch, 1, target, {"num_patches": num_patches, "num_classes": num_classes})
