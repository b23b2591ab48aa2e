"""Shared build helpers for the TIR kernels (ClustBlock, RefER): target, compile, numpy wrapper.

Every kernel is one ``PrimFunc`` in destination-passing style -- its parameters are the input
buffers followed by the output buffers, all with static shapes -- so a Relax module can call it
with ``R.call_tir(gv, inputs, out_sinfo=[R.Tensor(shape, dtype), ...])``. A :class:`TirKernel`
keeps the scheduled ``prim_func`` (for that) next to the compiled executable (for tests and
benchmarks, run on numpy arrays or ``tvm.runtime`` tensors).

The target helper is :func:`refqsr_engine.kernels.conv2d_int8.default_target` (LLVM, ``mcpu``
core-avx2, ``num-cores``); these kernels only need LLVM, AVX2 only where a builder says so.

Floating-point contraction: TVM's LLVM lowering turns ``a * b + c`` into ``llvm.fmuladd`` (an FMA
on AVX2) and the backend fuses separate ``fmul``/``fadd`` too. Where a kernel must reproduce
PyTorch's rounding bit for bit (sums of squares, bilinear taps), the product is wrapped in
:func:`no_contract` (``llvm.arithmetic.fence``), which forbids that fusion at no run-time cost.

The same TE computes also build for CUDA: inside :func:`device_math` ``("cuda")`` a fenced product
is ``__fmul_rn(a, b)`` (nvcc never contracts it) and :func:`fma` is ``fmaf`` (TIR's ``fma`` has no
CUDA lowering), so a kernel rounds exactly as on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

__all__ = [
    "ArgSpec",
    "TirKernel",
    "as_target",
    "build_kernel",
    "default_target",
    "device_math",
    "divisor_at_most",
    "exp_f32",
    "fma",
    "no_contract",
    "target_has_avx2",
]


def default_target(mcpu: str = "core-avx2", num_cores: int | None = None) -> tvm.target.Target:
    """:func:`refqsr_engine.kernels.conv2d_int8.default_target` (imported on first use: that module
    registers the AVX2 tensor intrinsics, which costs seconds of TVMScript parsing)."""
    from .conv2d_int8 import default_target as conv_default_target

    return conv_default_target(mcpu, num_cores)


def as_target(target=None, num_cores: int | None = None) -> tvm.target.Target:
    """``None`` -> :func:`default_target` (core-avx2, ``num_cores`` or the CPU count); a dict or a
    ``tvm.target.Target`` of kind llvm is taken as is (strings are refused, as by TVM 0.27)."""
    if target is None:
        return default_target("core-avx2", num_cores or os.cpu_count() or 1)
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    if not isinstance(target, tvm.target.Target):
        raise TypeError(
            "target must be None, a dict such as {'kind': 'llvm', 'mcpu': 'core-avx2', "
            "'num-cores': 2} or a tvm.target.Target"
        )
    if target.kind.name != "llvm":
        raise ValueError(f"these kernels are built for LLVM CPU targets, got {target}")
    return target


def target_has_avx2(target: tvm.target.Target) -> bool:
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx2", target))


_MATH = {"device": "llvm"}  # which lowering no_contract / fma emit (see device_math)


@contextlib.contextmanager
def device_math(device: str) -> Iterator[None]:
    """While active, :func:`no_contract` and :func:`fma` emit ``device``'s form ("llvm" or "cuda")."""
    if device not in ("llvm", "cuda"):
        raise ValueError(f"device must be 'llvm' or 'cuda', got {device!r}")
    before = _MATH["device"]
    _MATH["device"] = device
    try:
        yield
    finally:
        _MATH["device"] = before


def no_contract(expr):
    """``expr`` behind an ``llvm.arithmetic.fence``: LLVM may not fuse it into an FMA with the
    operation that consumes it (so ``no_contract(a * b) + c`` rounds the product, as PyTorch does).
    Under ``device_math("cuda")`` a product ``a * b`` becomes ``__fmul_rn(a, b)``, the CUDA
    multiply that nvcc never fuses."""
    dtype = str(getattr(expr, "dtype", None) or expr.ty)
    if _MATH["device"] == "cuda":
        if not isinstance(expr, tirx.Mul) or dtype != "float32":
            raise ValueError("on CUDA only float32 products can be fenced")
        return tirx.call_pure_extern(dtype, "__fmul_rn", expr.a, expr.b)
    return tirx.call_llvm_pure_intrin(dtype, "llvm.arithmetic.fence", expr)


def fma(a, b, c):
    """``a * b + c`` rounded once: TIR's ``fma`` (LLVM), or ``fmaf`` under ``device_math("cuda")``."""
    if _MATH["device"] == "cuda":
        return tirx.call_pure_extern("float32", "fmaf", a, b, c)
    return tirx.op.fma(a, b, c)


#: exp_f32: ln 2 in two parts (C1 exact in 9 bits, so n * C1 is exact for |n| < 2**15) and the
#: minimax polynomial of Cephes' expf on [-ln2/2, ln2/2]
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MIN, _EXP_MAX = -87.0, 88.0


def exp_f32(x):
    """``exp(x)`` in float32 from IEEE additions, fenced products and explicit FMAs only (Cephes'
    ``expf``: x = n ln2 + r, a degree-7 polynomial in r, times 2^n), so it rounds the same on
    every target where :func:`fma` is one rounding -- unlike the math libraries' ``expf``, which
    differ between the CPU and the GPU in the last bits. Within 2 ulp of exp; 0 below -87
    (where exp is subnormal), x capped at 88."""
    f32 = "float32"

    def c(v):
        return tirx.const(v, f32)

    xc = tirx.min(tirx.max(x, c(_EXP_MIN)), c(_EXP_MAX))
    n = tirx.floor(fma(xc, c(1.4426950408889634), c(0.5)))
    r = fma(n, c(-_LN2_HI), xc)
    r = fma(n, c(-_LN2_LO), r)
    p = c(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = fma(p, r, c(coef))
    y = fma(p, no_contract(r * r), r) + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32")))
    return tirx.Select(x < c(_EXP_MIN), c(0.0), no_contract(y * two_n))


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    for d in range(min(int(n), int(limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class ArgSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def _param_specs(func: tvm.tirx.PrimFunc) -> list[ArgSpec]:
    specs = []
    for p in func.params:
        buf = func.buffer_map[p] if hasattr(func, "buffer_map") else p  # TVM 0.27: params are buffers
        specs.append(ArgSpec(str(buf.name), tuple(int(s) for s in buf.shape), str(buf.dtype)))
    return specs


class TirKernel:
    """A compiled destination-passing PrimFunc.

    ``kernel(*inputs)`` with numpy arrays returns numpy output(s) (one array, or a tuple when the
    function has several outputs); with ``tvm.runtime`` tensors (and optional ``out=``) it runs
    without copies and returns the tensors. ``prim_func`` is the scheduled PrimFunc for
    ``R.call_tir``; ``out_sinfo`` lists the ``(shape, dtype)`` of its outputs.
    """

    def __init__(
        self,
        name: str,
        prim_func: tvm.tirx.PrimFunc,
        executable,
        num_inputs: int,
        target: tvm.target.Target,
        info: dict | None = None,
    ):
        self.name = name
        self.prim_func = prim_func
        self.executable = executable
        self.mod = executable.mod
        self.func = self.mod["main"]
        self.target = target
        specs = _param_specs(prim_func)
        self.inputs: list[ArgSpec] = specs[:num_inputs]
        self.outputs: list[ArgSpec] = specs[num_inputs:]
        self.info = dict(info or {})

    @property
    def out_sinfo(self) -> list[tuple[tuple[int, ...], str]]:
        return [(s.shape, s.dtype) for s in self.outputs]

    def empty_outputs(self, dev=None) -> list:
        dev = dev or tvm.cpu()
        return [tvm.runtime.empty(s.shape, s.dtype, dev) for s in self.outputs]

    def _to_tensor(self, x, spec: ArgSpec, dev):
        if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
            arr = np.asarray(x)
            if arr.size == int(np.prod(spec.shape)) and arr.shape != spec.shape:
                if arr.ndim <= 1:  # scalars / flat vectors for (1,)-shaped parameters
                    arr = arr.reshape(spec.shape)
            if arr.shape != spec.shape:
                raise ValueError(f"{self.name}: argument {spec.name!r} must have shape {spec.shape}, got {arr.shape}")
            return tvm.runtime.tensor(np.ascontiguousarray(arr, dtype=spec.dtype), dev), True
        if hasattr(x, "numpy") and not isinstance(x, tvm.runtime.Tensor):  # torch tensor
            return self._to_tensor(x.detach().cpu().numpy(), spec, dev)
        return x, False

    def __call__(self, *inputs, out: Sequence | None = None):
        if len(inputs) != len(self.inputs):
            names = ", ".join(s.name for s in self.inputs)
            raise TypeError(f"{self.name} takes {len(self.inputs)} inputs ({names}), got {len(inputs)}")
        dev = tvm.cpu()
        args, as_numpy = [], False
        for x, spec in zip(inputs, self.inputs):
            t, converted = self._to_tensor(x, spec, dev)
            as_numpy |= converted
            args.append(t)
        outs = list(out) if out is not None else self.empty_outputs(dev)
        if len(outs) != len(self.outputs):
            raise TypeError(f"{self.name} has {len(self.outputs)} outputs, got {len(outs)} in out=")
        self.func(*args, *outs)
        res = [o.numpy() for o in outs] if as_numpy else outs
        return res[0] if len(res) == 1 else tuple(res)

    def time(self, *inputs, number: int = 3, repeat: int = 5) -> list[float]:
        """Seconds per call (``repeat`` samples, each the mean of ``number`` calls) on these inputs."""
        dev = tvm.cpu()
        args = [self._to_tensor(x, s, dev)[0] for x, s in zip(inputs, self.inputs)]
        outs = self.empty_outputs(dev)
        self.func(*args, *outs)  # warm-up
        samples = []
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(number):
                self.func(*args, *outs)
            samples.append((time.perf_counter() - t) / number)
        return samples

    def asm(self) -> str:
        return self.mod.inspect_source("asm")

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.inputs)
        outs = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.outputs)
        return f"TirKernel({self.name}: {ins} -> {outs})"


def build_kernel(name: str, sch_or_func, num_inputs: int, target=None, info: dict | None = None) -> TirKernel:
    """Compile a scheduled PrimFunc (a ``tvm.s_tir.Schedule`` or a ``PrimFunc``) for an LLVM target."""
    tgt = as_target(target)
    if isinstance(sch_or_func, tvm.s_tir.Schedule):
        func = sch_or_func.mod["main"]
    else:
        func = sch_or_func
    func = func.with_attr("global_symbol", "main")
    exe = tvm.compile(tvm.IRModule({"main": func}), target=tgt)
    return TirKernel(name, func.with_attr("global_symbol", name), exe, num_inputs, tgt, info)
