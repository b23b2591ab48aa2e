"""The CPU schedule of float convs (engine/compiler/cpu_schedule.py) against torch conv2d.

Every schedule variant is built through the engine's own Relax pipeline: the row-vector conv with
16 (AVX-512) and 8 (AVX2, or a row that is no multiple of 16) lanes, its weight pre-packed at compile
time or (weight not a constant) packed per call, with a fused bias / residual epilogue, and the
channel-vector fallback for strided convs and rows without a whole vector.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from compile_helpers import fuse_ops
from refqsr_engine.engine.compiler.build import cpu_pipeline
from refqsr_engine.engine.compiler.cpu_schedule import ConvTile, conv_tile, cpu_schedule_pass, vector_lanes
from refqsr_engine.engine.compiler.options import CompileOptions, host_mcpu
from refqsr_engine.kernels.layouts import pack_conv_weights_oc, unpack_conv_weights_oc
from tvm import relax
from tvm.target import codegen

AVX2 = {"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2}
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}
HOST_HAS_AVX512 = bool(codegen.target_has_features("avx512f", tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()})))
TARGETS = [
    pytest.param(AVX2, id="avx2"),
    pytest.param(AVX512, id="avx512", marks=pytest.mark.skipif(not HOST_HAS_AVX512, reason="this CPU has no AVX-512")),
]


def _conv_module(x_shape, w, b, pad, stride=1, residual=False, weight_input=False):
    """main(x[, w]) = conv2d(x, w) + b [+ x] with w, b constants (or w an input)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    params = [x]
    if weight_input:
        wv = relax.Var("w", relax.TensorType(w.shape, "float32"))
        params.append(wv)
    else:
        wv = relax.const(w)
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, wv, strides=stride, padding=pad))
            y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            if residual:
                y = bb.emit(relax.op.add(y, x))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run_case(target, n, cin, cout, k, size, stride=1, residual=False, weight_input=False):
    rng = np.random.default_rng(cin * 100 + cout + k)
    x = rng.standard_normal((n, cin, size, size)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, k, k)) / k / np.sqrt(cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    pad = k // 2
    tgt = tvm.target.Target(target)
    mod = _conv_module(x.shape, w, b, pad, stride, residual, weight_input)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
    args = [tvm.runtime.tensor(x)] + ([tvm.runtime.tensor(w)] if weight_input else [])
    got = vm["main"](*args).numpy()
    with torch.no_grad():
        want = torch.nn.functional.conv2d(
            torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride, padding=pad
        )
        if residual:
            want = want + torch.from_numpy(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(dict(n=2, cin=3, cout=64, k=9, size=32), id="head-3to64-9x9"),
        pytest.param(dict(n=1, cin=64, cout=3, k=9, size=32), id="tail-64to3-9x9"),
        pytest.param(dict(n=2, cin=64, cout=64, k=3, size=16, residual=True), id="body-3x3-residual"),
        pytest.param(dict(n=1, cin=16, cout=256, k=3, size=24), id="upsampler-3x3-row24"),
        pytest.param(dict(n=1, cin=8, cout=16, k=3, size=15), id="row15-channel-fallback"),
        pytest.param(dict(n=1, cin=8, cout=16, k=3, size=32, stride=2), id="stride2-channel-fallback"),
        pytest.param(dict(n=1, cin=8, cout=16, k=3, size=32, weight_input=True), id="weight-input-packed-per-call"),
    ],
)
def test_scheduled_float_conv_matches_torch(target, case):
    _run_case(target, **case)


def _scheduled(target, cin, cout, k, size):
    w = np.ones((cout, cin, k, k), np.float32)
    mod = _conv_module((1, cin, size, size), w, np.zeros(cout, np.float32), k // 2)
    tgt = tvm.target.Target(target)
    with tgt:
        seq = [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            cpu_schedule_pass(2, vector_lanes(tgt)),
        ]
        return tvm.transform.Sequential(seq)(mod)


def test_constant_weight_is_prepacked_epilogue_fused_padding_decomposed():
    mod = _scheduled(AVX2, 16, 32, 3, 16)
    call = mod["main"].body.blocks[0].bindings[0].value
    weight = call.args[1].fields[1]
    tile = conv_tile(32, 16, 8)
    assert tuple(int(d) for d in weight.ty.shape) == (32 // tile.oc, 16, 3, 3, tile.oc)
    np.testing.assert_array_equal(unpack_conv_weights_oc(weight.value.numpy()), np.ones((32, 16, 3, 3), np.float32))
    prim = mod[call.args[0].name_hint]
    script = prim.script()
    assert 'sblock("T_add")' not in script  # the bias add happens in the conv's store
    assert "pad_temp_pad_const" in script  # padding: zero fill + branch-free interior copy
    assert sum(isinstance(f, relax.Function) for f in mod.functions.values()) == 1


def test_conv_tile_fits_the_register_file():
    for lanes, regs in ((16, 32), (8, 16)):
        for n_oc, n_ow in ((64, 96), (256, 192), (3, 384), (64, 24), (256, 48)):
            t = conv_tile(n_oc, n_ow, lanes)
            assert t is not None and n_oc % t.oc == 0 and n_ow % t.pixels == 0
            assert t.oc * t.vecs + min(t.oc, t.vecs) + 1 <= regs
    assert conv_tile(64, 96, 16).lanes == 16 and conv_tile(64, 24, 16) == ConvTile(8, 3, 8)
    assert conv_tile(64, 15, 16) is None and conv_tile(64, 15, 8) is None


def test_vector_lanes_follow_the_target():
    assert vector_lanes(tvm.target.Target(AVX2)) == 8
    assert vector_lanes(tvm.target.Target(AVX512)) == 16


def test_weight_pack_roundtrip():
    w = np.arange(24 * 5 * 3 * 3, dtype=np.float32).reshape(24, 5, 3, 3)
    p = pack_conv_weights_oc(w, 8)
    assert p.shape == (3, 5, 3, 3, 8) and p[1, 2, 0, 1, 3] == w[11, 2, 0, 1]
    np.testing.assert_array_equal(unpack_conv_weights_oc(p), w)
    with pytest.raises(ValueError):
        pack_conv_weights_oc(w, 7)


def test_default_mcpu_is_the_host_and_the_baseline_stays():
    host = host_mcpu()
    assert CompileOptions().target_dict()["mcpu"] == host
    assert codegen.target_has_features("avx2", tvm.target.Target({"kind": "llvm", "mcpu": host}))
    assert CompileOptions(mcpu="core-avx2").target_dict()["mcpu"] == "core-avx2"


def _scheduled_primfuncs(mod: tvm.IRModule, tgt: tvm.target.Target) -> list:
    """The PrimFuncs of ``mod`` after the pipeline's legalize + fuse steps and our CPU schedule."""
    with tgt:
        fused = fuse_ops(mod)
        scheduled = cpu_schedule_pass(2, 8)(fused)
    return [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]


def test_elementwise_chains_become_one_pass_and_match_torch():
    """bias add + PReLU and a per-sample clip, as the quantized graphs fuse them: after scheduling
    one block writes the output (no full-size intermediates) and the values are torch's."""
    shape = (2, 8, 6, 16)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    lo = relax.Var("lo", relax.TensorType((2, 1, 1, 1), "float32"))
    rng = np.random.default_rng(3)
    bias = rng.standard_normal(8).astype(np.float32)
    with bb.function("main", [x, lo]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.const(bias.reshape(1, -1, 1, 1))))
            y = bb.emit(relax.op.nn.prelu(y, relax.const(np.array([0.25], np.float32)), axis=1))
            y = bb.emit(relax.op.minimum(relax.op.maximum(y, lo), relax.op.negative(lo)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    tgt = tvm.target.Target(AVX2)
    prims = _scheduled_primfuncs(mod, tgt)
    assert len(prims) == 1  # the three ops are one fused kernel ...
    sch = tvm.s_tir.Schedule(prims[0])
    assert len(sch.get_child_blocks(sch.get_sblock("root"))) == 1  # ... and one pass over the data
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
    xv = rng.standard_normal(shape).astype(np.float32)
    lov = np.array([-0.5, -1.5], np.float32).reshape(2, 1, 1, 1)
    got = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(lov)).numpy()
    t = torch.nn.functional.prelu(torch.from_numpy(xv) + torch.from_numpy(bias).view(1, -1, 1, 1), torch.tensor([0.25]))
    want = torch.minimum(torch.maximum(t, torch.from_numpy(lov)), -torch.from_numpy(lov)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_spatial_mean_is_vectorized_and_matches_torch():
    """DDTB's gate input, the per-channel mean over H x W: rfactored into vector partial sums."""
    shape = (2, 8, 12, 32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.mean(x, axis=[2, 3])))
        bb.emit_func_output(out)
    mod = bb.get()
    tgt = tvm.target.Target(AVX2)
    text = "\n".join(f.script() for f in _scheduled_primfuncs(mod, tgt))
    assert "_rf" in text and "T.vectorized" in text
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
    xv = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(got, torch.from_numpy(xv).mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [
        ((6, 64, 20), (6, 20, 64)),  # ELAN's q.q^T (window 8, 20 channels)
        ((6, 64, 64), (6, 64, 20)),  # A.V: a 20-wide output row
        ((2, 3, 16, 12), (2, 3, 12, 16)),
    ],
)  # two batch axes
def test_window_attention_matmul_softmax_is_tiled_and_matches_torch(shapes):
    """ELAN's attention: the matmul gets a register tile with vectors along its output row, the
    softmax its exp once (polynomial, vectorized) and vector max/sum over the last axis."""
    a_shape, b_shape = shapes
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.softmax(relax.op.matmul(a, b), axis=-1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    tgt = tvm.target.Target(AVX2)
    text = "\n".join(f.script() for f in _scheduled_primfuncs_cpu_legalize(mod, tgt))
    assert "matmul_local" in text
    if b_shape[-1] % 8 == 0:  # rows of whole vectors: max and sum accumulate in vectors
        assert "T_softmax_maxelem_rf" in text and "T_softmax_expsum_rf" in text
    assert text.count("T.reinterpret") == 1  # fast exp, computed once (not per consumer)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
    rng = np.random.default_rng(5)
    av, bv = rng.standard_normal(a_shape).astype(np.float32), rng.standard_normal(b_shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(av), tvm.runtime.tensor(bv)).numpy()
    want = (torch.from_numpy(av) @ torch.from_numpy(bv)).softmax(-1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _scheduled_primfuncs_cpu_legalize(mod: tvm.IRModule, tgt: tvm.target.Target) -> list:
    """As :func:`_scheduled_primfuncs`, with the pipeline's own legalization (fast softmax)."""
    from refqsr_engine.engine.compiler.build import CPU_LEGALIZE

    with tgt:
        fused = tvm.transform.Sequential(
            [
                relax.transform.LegalizeOps(customize_legalize_map=CPU_LEGALIZE),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)
        scheduled = cpu_schedule_pass(2, 8)(fused)
    return [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
