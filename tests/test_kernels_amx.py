"""The Intel AMX kernels: the int8 fused quantized conv ("amx", bit-exact against a float64 torch
conv of the same integers, worst-case operands included), the split-bf16 float convs (against a
float64 torch conv: fp32-grade error) and the Relax pass that puts a graph's float convs on them
(against ONNX-free torch). Kernel tests are skipped on CPUs without AMX or where Linux does not
grant the tile state; the pure-Python parts (packing, target choice, runtime guard) run anywhere."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from refqsr_engine.errors import RefQSRError
from refqsr_engine.kernels import amx
from refqsr_engine.kernels.conv2d_int8 import Conv2dShape
from refqsr_engine.kernels.conv_amx_bf16 import (
    bf16_value,
    conv_bf16_compute,
    conv_bf16_fold_compute,
    pack_bf16_weights,
    pack_fold_weights,
    split_bf16,
)
from refqsr_engine.kernels.qconv_amx import amx_fits, pack_amx_weights
from refqsr_engine.kernels.qconv_fused import QConvSpec, choose_variant, pack_qconv_weights, qconv_primfunc
from tvm import relax

sys.path.insert(0, str(Path(__file__).parent))
from test_cpu_schedule import _conv_module  # noqa: E402
from test_kernels_qconv import case_problem  # noqa: E402

AMX_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
needs_amx = pytest.mark.skipif(
    not (amx.host_has_amx() and amx.enable_amx()), reason="CPU without AMX, or Linux did not grant the tile state"
)

# N, C, O, H, W, K, stride, pad, bits, signed container, weight range (the CASES layout of
# test_kernels_qconv, at widths the AMX conv covers)
AMX_CASES = [
    (2, 64, 64, 8, 32, 3, 1, 1, 8, False, (-255, 0)),  # DDTB asymmetric 8-bit weights: shifted into s8
    (2, 64, 64, 8, 32, 3, 1, 1, 8, False, (-200, 55)),
    (2, 64, 64, 8, 32, 3, 1, 1, 8, True, (-127, 127)),  # PAMS 8-bit
    (2, 64, 64, 8, 32, 3, 1, 1, 4, False, (-31, 32)),  # DDTB 4-bit activations, 6-bit weights
    (1, 128, 96, 5, 64, 3, 1, 1, 8, False, (-128, 127)),  # two K blocks, three output tile pairs
    (2, 64, 32, 6, 32, 1, 1, 0, 8, False, (-128, 127)),  # 1x1
]


def _run(func, args, out_shape):
    exe = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(AMX_TARGET))
    dev = tvm.cpu()
    y = tvm.runtime.empty(out_shape, "float32", dev)
    exe["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], y)
    return y.numpy()


@needs_amx
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: f"{c[1]}->{c[2]}k{c[5]}b{c[8]}w{c[10][0]}..{c[10][1]}")
def test_amx_qconv_matches_float64_conv(case):
    spec, x, s, z, w, ws, want = case_problem(case)
    assert amx_fits(spec.shape)
    variant = choose_variant(
        spec.act_max, spec.w_min, spec.w_max, True, spec.shape.kernel, spec.shape.c8, avx512=True, amx=True
    )
    assert variant == "amx"
    packed, sums = pack_qconv_weights(w, variant, spec.weight_shift)
    got = _run(qconv_primfunc(spec, variant), (x, s, z, packed, sums, ws), want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_amx
def test_amx_qconv_worst_case_sums_do_not_overflow():
    """Every activation at the grid's top and every weight at the bottom of a 256-value range
    beyond s8 (the largest |sum| the int32 bound admits for 576 taps): exact."""
    shape = Conv2dShape(1, 64, 32, 4, 32, 3)
    spec = QConvSpec(shape, 8, False, -255, 0)
    w = np.full((32, 64, 3, 3), -255)
    w[0, 0, 0, 0] = 0
    s = np.array([1.0], np.float32)
    z = np.array([0.0], np.float32)
    x = np.full((1, 64, 4, 32), 255.0, np.float32)  # u = 255 everywhere (padding: the zero point 0)
    ws = np.ones(32, np.float32)
    packed, sums = pack_qconv_weights(w, "amx", spec.weight_shift)
    got = _run(qconv_primfunc(spec, "amx"), (x, s, z, packed, sums, ws), (1, 32, 4, 32))
    want = F.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64), padding=1).numpy()
    assert np.abs(want).max() > 2**25  # a sum that float32 cannot hold exactly, int32 can
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float32).astype(np.float64))


def _float_problem(n, c, o, h, w, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, c, h, w)).astype(np.float32)
    wt = (rng.normal(0, 1, (o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    b = rng.normal(0, 1, o).astype(np.float32)
    return x, wt, b


def _float64_conv(x, w, b, residual=None):
    y = F.conv2d(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(w, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        padding=w.shape[-1] // 2,
    )
    if residual is not None:
        y = y + torch.tensor(residual, dtype=torch.float64)
    return y.numpy()


def _fp32_error(x, w, b) -> float:
    """max |PyTorch fp32 conv - float64 conv| / max |conv|: the accuracy a float engine is held to."""
    want = _float64_conv(x, w, b)
    got = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=w.shape[-1] // 2).numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


@needs_amx
@pytest.mark.parametrize("residual", [False, True], ids=["bias", "bias+residual"])
def test_bf16x3_conv_is_fp32_grade(residual):
    x, w, b = _float_problem(2, 64, 64, 6, 32, 3)
    r = np.random.default_rng(1).normal(0, 1, x.shape).astype(np.float32) if residual else None
    wh, wl = pack_bf16_weights(w)
    args = (x, wh, wl, b) + ((r,) if residual else ())
    got = _run(conv_bf16_compute(2, 64, 64, 6, 32, residual=residual), args, (2, 64, 6, 32))
    want = _float64_conv(x, w, b, r)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < max(20 * _fp32_error(x, w, b), 2e-5), err
    # plain bf16 products: about 2^-9 relative, 100x worse -- why the default splits
    got1 = _run(conv_bf16_compute(2, 64, 64, 6, 32, residual=residual, terms=1), args, (2, 64, 6, 32))
    err1 = np.abs(got1 - want).max() / np.abs(want).max()
    assert 20 * err < err1 < 1e-2


@needs_amx
def test_folded_bf16x3_tail_conv_is_fp32_grade():
    x, w, b = _float_problem(1, 64, 3, 5, 48, 9, seed=2)  # SRResNet's 9x9, 64 -> 3 tail
    wh, wl = pack_fold_weights(w)
    got = _run(conv_bf16_fold_compute(1, 64, 3, 5, 48, 9), (x, wh, wl, b), (1, 3, 5, 48))
    want = _float64_conv(x, w, b)
    assert np.abs(got - want).max() / np.abs(want).max() < max(20 * _fp32_error(x, w, b), 2e-5)


@needs_amx
def test_float_conv_pass_moves_covered_convs_and_matches_torch():
    from refqsr_engine.engine.compiler.build import cpu_pipeline
    from refqsr_engine.engine.compiler.float_conv_amx import rewrite_float_convs

    tgt = tvm.target.Target(AMX_TARGET)
    for (c, o, k, size), moved in (
        ((64, 64, 3, 32), 1),
        ((64, 3, 9, 32), 1),
        ((3, 64, 9, 32), 0),
        ((64, 64, 3, 24), 0),
    ):
        x, w, b = _float_problem(1, c, o, size, size, k, seed=c + o + k)
        mod = _conv_module(x.shape, w, b, k // 2)
        mod, n = rewrite_float_convs(mod)
        assert n == moved, (c, o, k, size)
        vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        want = _float64_conv(x, w, b)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-5


def test_split_bf16_keeps_sixteen_bits():
    x = np.random.default_rng(0).normal(0, 1, 10000).astype(np.float32)
    hi, lo = split_bf16(x)
    assert np.abs(bf16_value(hi) - x).max() <= np.abs(x).max() * 2.0**-8
    assert np.abs(bf16_value(hi) + bf16_value(lo) - x).max() <= np.abs(x).max() * 2.0**-16


def test_amx_weight_packs_put_a_tile_row_per_output():
    w = np.random.default_rng(0).integers(-128, 128, (64, 128, 3, 3))
    p = pack_amx_weights(w)  # [K*K][C/64][O][64]
    assert p.shape == (9, 2, 64, 64)
    assert p[4, 1, 7, 5] == w[7, 64 + 5, 1, 1]
    f = np.random.default_rng(1).normal(0, 1, (3, 64, 9, 9)).astype(np.float32)
    hi, _ = pack_fold_weights(f)  # [K][C/32][32][32]: row o*K + kw
    assert hi.shape == (9, 2, 32, 32)
    assert bf16_value(hi[2, 1, 1 * 9 + 4, 3]) == bf16_value(split_bf16(f[1, 32 + 3, 2, 4])[0])
    assert not bf16_value(hi[:, :, 27:]).any()


def test_amx_is_chosen_only_where_it_fits_and_is_exact():
    assert choose_variant(255, -200, 55, True, 3, 8, avx512=True, amx=True) == "amx"
    assert choose_variant(255, -200, 55, True, 3, 8, avx512=True, amx=False) == "vnni512"
    assert choose_variant(255, -255, 255, True, 3, 8, avx512=True, amx=True) == "int16"  # no s8 shift
    assert amx_fits(Conv2dShape(16, 64, 64, 96, 96, 3))
    assert not amx_fits(Conv2dShape(16, 60, 60, 48, 48, 3))  # ELAN-light's 60 channels
    assert not amx_fits(Conv2dShape(16, 64, 64, 24, 24, 3))  # rows of 24 pixels
    assert not amx_fits(Conv2dShape(1, 64, 64, 96, 96, 3, stride=2))


def test_runtime_refuses_an_amx_artifact_where_amx_is_not_granted(monkeypatch):
    from refqsr_engine.engine.runtime import _enable_amx_for
    from refqsr_engine.kernels import host_cpu

    monkeypatch.setattr(host_cpu, "enable_amx", lambda: False)
    with pytest.raises(RefQSRError, match="AMX"):
        _enable_amx_for({"target": AMX_TARGET, "amx": True})
    _enable_amx_for({"target": {"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2}, "amx": False})  # nothing asked


def test_host_mcpu_names_an_amx_cpu_from_its_flags(monkeypatch):
    from refqsr_engine.kernels import host_cpu
    from tvm.target import codegen

    monkeypatch.setattr(host_cpu, "host_cpu_flags", lambda: host_cpu.SAPPHIRE_RAPIDS_FLAGS | {"avx2"})
    monkeypatch.setattr(host_cpu, "enable_amx", lambda: True)
    assert amx.target_has_amx({"kind": "llvm", "mcpu": host_cpu.host_mcpu()})
    monkeypatch.setattr(host_cpu, "enable_amx", lambda: False)  # flags, but no tile state for this process
    assert host_cpu.host_mcpu() in (str(codegen.llvm_get_system_cpu()), "core-avx2")
    monkeypatch.setattr(host_cpu, "host_cpu_flags", lambda: frozenset())
    assert host_cpu.host_mcpu() in (str(codegen.llvm_get_system_cpu()), "core-avx2")


def test_float_math_option_is_checked_and_keys_the_cache():
    from refqsr_engine.engine.compiler.compile_model import _GraphBuilder
    from refqsr_engine.engine.compiler.options import CompileOptions, artifact_cache_parts

    with pytest.raises(RefQSRError, match="float-math"):
        CompileOptions(float_math="fp16")
    with pytest.raises(RefQSRError, match="AMX"):  # plain bf16 exists only as AMX tiles
        _GraphBuilder(CompileOptions(mcpu="core-avx2", float_math="bf16"))
    assert CompileOptions(float_math="bf16").float_terms == 1 and CompileOptions().float_terms == 3
    fp32, bf16 = (artifact_cache_parts(CompileOptions(mcpu="core-avx2", float_math=m)) for m in ("fp32", "bf16"))
    assert fp32 != bf16
