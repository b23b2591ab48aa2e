"""fp16 storage of the activations the CUDA graph's kernels pass each other
(:mod:`refqsr_engine.engine.compiler.half_storage`): which tensors, what the fused graph then
writes, and the math against numpy with the stored tensor rounded to fp16."""

from __future__ import annotations

import numpy as np
import pytest
from compile_helpers import fuse_ops

tvm = pytest.importorskip("tvm")
from refqsr_engine.engine.compiler import cuda_build as cb  # noqa: E402
from refqsr_engine.engine.compiler.half_storage import half_candidates, store_half  # noqa: E402
from tvm import relax, te  # noqa: E402

SHAPE = (2, 8, 6, 6)


def _graph(opaque_reader: bool = False):
    """(module, the var a): ``a = relu(2 x + 1)`` read by a mean over H, W (DDTB's bound
    statistic) and by a residual add; the mean ``m`` (a per-sample-and-channel statistic, not a
    feature map) read twice; ``b = a + x`` read once; with ``opaque_reader`` an opaque kernel
    also reads ``a``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.multiply(x, relax.const(2.0)), relax.const(1.0))))
            m = bb.emit(relax.op.mean(a, axis=[2, 3], keepdims=True))
            b = bb.emit(relax.op.add(a, x))
            outs = [bb.emit_output(relax.op.multiply(relax.op.add(b, m), m))]
            if opaque_reader:
                prim = te.create_prim_func(
                    [p := te.placeholder(SHAPE), te.compute(SHAPE, lambda *i: p(*i) * 3.0)]
                ).with_attr("op_pattern", 8)
                outs.append(bb.emit_output(relax.call_tir(bb.add_func(prim, "opaque"), [a], relax.TensorType(SHAPE))))
        bb.emit_func_output(relax.Tuple(outs) if opaque_reader else outs[0])
    return bb.get(), a


def _stored(mod) -> list[tuple[str, str]]:
    """(kernel, dtype, shape) of every tensor a kernel of the fused graph writes."""
    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                out.append((v.args[0].name_hint, str(v.ty.dtype), tuple(int(d) for d in v.ty.shape)))
    return out


def test_shared_activation_stored_in_fp16_matches_numpy():
    mod, a_var = _graph()
    assert half_candidates(mod) == {a_var}  # a: not m (no feature map), b (one reader) nor the output
    half, count = store_half(mod)
    assert count == 1
    fused = fuse_ops(half)
    stored = _stored(fused)
    # the producer writes a in fp16, the residual add's widening cast fused into it and the mean
    # summing the fp16 copy in fp32: of the full-size tensors only the output is written in fp32
    full = [(d, name) for name, d, shape in stored if shape == SHAPE]
    assert sorted(d for d, _ in full) == ["float16", "float32"], stored
    assert not any(name.startswith("cast") for _, name in full), stored
    before = [d for _, d, shape in _stored(fuse_ops(mod)) if shape == SHAPE]
    assert before == ["float32", "float32"]

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    exe = tvm.compile(half, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    a = np.maximum(2 * x + 1, 0)
    a16 = a.astype(np.float16).astype(np.float32)
    m16 = a16.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got, (a16 + x + m16) * m16, rtol=1e-6, atol=1e-6)
    # the rounding is real: fp32 storage would give another result
    m = a.mean(axis=(2, 3), keepdims=True)
    assert np.abs(got - (a + x + m) * m).max() > 1e-5


def test_tensor_an_opaque_kernel_reads_stays_fp32():
    """A widening cast cannot fuse into an opaque kernel (the RefER warps): it would be a kernel
    of its own writing the fp32 tensor again, so such a tensor keeps fp32 storage."""
    mod, _ = _graph(opaque_reader=True)
    assert half_candidates(mod) == set()
    assert store_half(mod) == (mod, 0)


def test_no_half_storage_leaves_the_rewrite_fp32():
    """``half_storage=False`` is the rewrite as before: no fp16 copy of any activation."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 12, 12), "float32"))
    w = np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w), padding=[1] * 4)))
            z = bb.emit(relax.op.nn.conv2d(y, relax.const(w), padding=[1] * 4))
            out = bb.emit_output(relax.op.add(z, y))
        bb.emit_func_output(out)
    table = [{"act_bits": 32, "module": "a"}, {"act_bits": 32, "module": "b"}]
    _, with_half = cb.rewrite_qdq_convs_cuda(bb.get(), table, twin=True)
    mod, without = cb.rewrite_qdq_convs_cuda(bb.get(), table, twin=True, half_storage=False)
    assert (with_half.half_tensors, without.half_tensors) == (1, 0)  # y: the second conv's pack and the add
    casts = [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.astype"
    ]
    assert all(c.attrs.dtype != "float16" for c in casts)
