"""`python -m gpucheck prepare`: on this machine (no GPU needed), everything the GPU host needs.

1. The default model and DDTB-4 compiled for ``--arch`` (CUDA artifacts, without ONNX copies).
2. Standalone integer conv kernels (dp4a u8/s8, int8 mma u8/s8, int4 mma u4/s4) built for ``--arch``, with
   worst-case operands, their expected outputs (the numpy/PyTorch reference) and the map from the
   kernels' packed output layout to NCHW, so the host checks them bit for bit without TVM; and the
   GPU schedules of the RefER kernels and the clustering kernel (``device_kernels/``) with inputs
   and the CPU kernels' outputs, which must come back bit for bit; and the f16mma kernels'
   stores that read concatenated parts in place and write pixel-shuffled operands
   (``float_kernels/``), checked within fp32 summation order against numpy.
3. TVM's runtime libraries (``libtvm_runtime``, its CUDA module, the CUDA runtime they link) and
   the cp312 ``apache-tvm-ffi`` wheel.
4. Packed into one xz archive; the working tree plus the archive must fit the carry limit. When
   they do not, DDTB-4 is left out (``left_out`` in the description) and the default model alone
   is checked; a bundle that does not fit even so is refused.
5. Static checks: the integer instructions each graph's device code uses, no local-memory spills
   in the standalone kernels' PTX, and a runtime-only load of the bundle in a fresh process with a
   libcuda stub (no TVM package, no PyTorch imported).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from refqsr_engine.engine.models_store import DEFAULT_ALIAS

from .bundle import BUNDLE, CARRY_LIMIT, DESCRIPTION, CheckError

REPO = Path(__file__).resolve().parents[1]
# the engine's default model and the int4 tensor-core DDTB-4 (the bundle names them for run);
# the ones after the first are left out, last first, when the carry limit does not hold them
MODELS = {"default": DEFAULT_ALIAS, "ddtb4": "srresnet_ddtb4"}
PATCH, BATCH = 96, 16
CUDART = "libcudart.so.13"
# the instructions that say which units a graph's convs run on
PTX_OPS = {
    "dp4a": r"\bdp4a\.",
    "mma_s4": r"mma\.sync\.aligned\.\w+\.row\.col\.s32\.[us]4\.s4",
    "mma_s8": r"mma\.sync\.aligned\.\w+\.row\.col\.s32\.[us]8\.s8",
    "mma_f16": r"mma\.sync\.aligned\.\w+\.row\.col\.f32\.f16\.f16",
    "fma_f32": r"\bfma\.rn\.f32\b",
    "local_memory": r"\b(ld|st)\.local\b",
}


def tree_bytes() -> int:
    """Bytes of what is carried with the tree: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compile_models(into: Path, arch: str, say) -> dict[str, Any]:
    from refqsr_engine.engine.compiler.compile_model import compile_model
    from refqsr_engine.engine.compiler.options import CompileOptions

    reports = {}
    for key, model in MODELS.items():
        say(f"compiling {model} for cuda {arch}")
        opts = CompileOptions(model=model, target="cuda", arch=arch, patch=PATCH, batch=BATCH)
        report = compile_model(opts, into / key, keep_onnx=False)
        reports[key] = {"model": model, "seconds": report["seconds"]["total"], "graphs": report["graphs"]}
    return reports


def instruction_counts(code: str, patterns: dict[str, str]) -> dict[str, int]:
    return {name: len(re.findall(rx, code)) for name, rx in patterns.items()}


def device_code_checks(artifacts: Path) -> dict[str, Any]:
    """Per artifact and graph, the integer instructions its device code uses, as the compiler
    counted them (``device_code`` of the manifest): every RefQSR/DDTB graph must run integer convs."""
    out: dict[str, Any] = {}
    for art in sorted(p for p in artifacts.iterdir() if p.is_dir()):
        manifest = json.loads((art / "manifest.json").read_text())
        counts = manifest.get("device_code") or {}
        if not counts or not all(sum(c.values()) > 0 for c in counts.values()):
            raise CheckError(f"{art.name}: a graph has no integer instruction in its device code ({counts})")
        out[art.name] = counts
    return out


def build_kernels(into: Path, arch: str, say) -> list[dict[str, Any]]:
    """The integer conv kernels the graphs use, standalone, with worst-case operands: every
    activation at its extreme in sample 0 and on the border, half the filters at the most
    negative weight; the expected output from a float64 PyTorch conv (exact below 2**53)."""
    import torch
    from refqsr_engine.kernels import conv2d_cuda as cc
    from refqsr_engine.kernels import cuda_toolchain

    into.mkdir(parents=True)
    shape = cc.Conv2dCudaShape(2, 64, 64, 24, 24)
    rows = []
    variants = [(v, signed) for v in ("dp4a", "s8mma", "s4mma") for signed in (False, True)]
    for variant, signed in variants:
        name = f"{variant}_{'s' if signed else 'u'}"
        say(f"building kernel {name} for {arch}")
        kernel = cc.build_conv2d_cuda(shape, variant, arch, signed)
        bits = 4 if variant == "s4mma" else 8
        a_lo, a_hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        w_lo, w_hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        rng = np.random.default_rng(7)
        x = rng.integers(a_lo, a_hi + 1, (shape.batch, shape.in_ch, shape.height, shape.width))
        w = rng.integers(w_lo, w_hi + 1, (shape.out_ch, shape.in_ch, shape.kernel, shape.kernel))
        pad = a_lo if signed else a_hi
        x[0] = pad
        w[: shape.out_ch // 2] = w_lo
        a, wp = kernel.pack_activations(x, pad), kernel.pack_weights(w)
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=pad).astype(np.float64)
        expected = torch.nn.functional.conv2d(torch.from_numpy(xp), torch.from_numpy(w.astype(np.float64)))
        out_shape = shape.out_shape(variant)
        order = cc.unpack_output(np.arange(int(np.prod(out_shape)), dtype=np.int64).reshape(out_shape), variant)
        lib = into / f"{name}.so"
        kernel.executable.export_library(str(lib))
        np.savez(
            into / f"{name}.npz",
            a=a,
            w=wp,
            expected=expected.numpy().astype(np.int64),
            order=order.astype(np.int64),
            out_shape=np.array(out_shape),
        )
        ptx = instruction_counts(kernel.device_code, PTX_OPS)
        if ptx["local_memory"]:
            raise CheckError(f"kernel {name}: {ptx['local_memory']} local-memory instructions (register spills)")
        sass = cuda_toolchain.sass_counts(cuda_toolchain.build_info(kernel.executable).binary)
        if sass and any(c["LDL"] or c["STL"] for c in sass.values()):
            raise CheckError(f"kernel {name}: local-memory instructions in its SASS ({sass})")
        rows.append({"name": name, "lib": lib.name, "variant": variant, "signed": signed, "ptx": ptx, "sass": sass})
    return rows


#: the f16mma kernels' standalone problems: a 1x1 conv reading three fp16 parts in place, and an
#: upsampler conv storing its output pixel-shuffled into the next conv's padded operand
FLOAT_CASES = {  # name -> (shape, the kernel's store options)
    "f16mma_parts": ({"batch": 2, "in_ch": 192, "out_ch": 64, "height": 8, "width": 8, "kernel": 1, "parts": 3}, {}),
    "f16mma_shuffle": ({"batch": 2, "in_ch": 64, "out_ch": 64, "height": 8, "width": 8}, {"shuffle_pad": 1}),
    # the store that also writes per-tile channel sums (DDTB's gate means)
    "f16mma_sums": ({"batch": 2, "in_ch": 64, "out_ch": 64, "height": 8, "width": 16}, {"tile_sums": True}),
}


def build_float_kernels(into: Path, arch: str, say, kind: str = "cuda") -> list[dict[str, Any]]:
    """The f16mma kernels with the "f16_relu" store (:data:`FLOAT_CASES`), their operands and the
    expected fp16 outputs from a numpy fp16-in, fp32-sum conv (PyTorch's pixel_shuffle and the
    fp16 pack for the shuffled store, its border zero; float64 sums of the outputs per block tile
    for the tile-sums store). ``calls.json`` says what to call with
    what. ``kind`` "llvm" builds the kernels' LLVM twins instead (tests/test_gpucheck.py)."""
    import torch
    from refqsr_engine.kernels import conv2d_cuda as cc
    from refqsr_engine.kernels import cuda_toolchain

    into.mkdir(parents=True)
    rng = np.random.default_rng(13)
    arrays, calls, funcs = {}, [], {}
    for name, (dims, options) in FLOAT_CASES.items():
        pad, sums = options.get("shuffle_pad"), options.get("tile_sums", False)
        s = cc.Conv2dCudaShape(**dims)
        x = rng.standard_normal((s.batch, s.in_ch, s.height, s.width)).astype(np.float16).astype(np.float32)
        w = (rng.standard_normal((s.out_ch, s.in_ch, s.kernel, s.kernel)) / np.sqrt(s.in_ch * s.taps)).astype(
            np.float32
        )
        b = rng.uniform(-0.3, 0.3, s.out_ch).astype(np.float32)
        x16, w16 = x.astype(np.float64), w.astype(np.float16).astype(np.float64)
        xp = np.pad(x16, ((0, 0), (0, 0), (s.pad, s.pad), (s.pad, s.pad)))
        conv = sum(
            np.einsum("nchw,oc->nohw", xp[:, :, i : i + s.height, j : j + s.width], w16[:, :, i, j])
            for i in range(s.kernel)
            for j in range(s.kernel)
        )
        y = np.maximum(conv + b[None, :, None, None], 0).astype(np.float16)  # NCHW
        if s.parts > 1:  # fp16 NHWC parts of the concatenated input, read in place
            inputs = {
                f"{name}_a{p}": np.ascontiguousarray(np.split(x, s.parts, 1)[p].transpose(0, 2, 3, 1)).astype(
                    np.float16
                )
                for p in range(s.parts)
            }
        else:
            inputs = {f"{name}_a": cc.pack_activations_f16(x, s.kernel)}
        if pad is None:
            order = np.arange(s.out_ch)
            want = np.ascontiguousarray(y.transpose(0, 2, 3, 1))
        else:
            order = cc.shuffle_channel_order(s.out_ch)
            shuffled = torch.nn.functional.pixel_shuffle(torch.from_numpy(y.astype(np.float32)), 2).numpy()
            want = cc.pack_activations_f16(shuffled, 3).view(np.float16)
        arrays.update(inputs)
        arrays[f"{name}_w"], arrays[f"{name}_b"] = cc.pack_weights_f16(w[order]), b[order]
        arrays[f"{name}_want"] = want
        out_dtype = "float16" if pad is None else "uint32"
        out_shape = s.out_shape("f16mma") if pad is None else cc.shuffle_out_shape(s, pad)
        call = {
            "function": name,
            "inputs": [*inputs, f"{name}_w", f"{name}_b"],
            "output": f"{name}_want",
            "out_shape": list(out_shape),
            "out_dtype": out_dtype,
        }
        if sums:  # float64 sums of the expected fp16 outputs over each block tile's pixels
            tiles = want.astype(np.float64).reshape(-1, cc.mma_config(s, "f16mma").bm, s.out_ch)
            arrays[f"{name}_sums_want"], arrays[f"{name}_sums_scale"] = tiles.sum(axis=1), np.abs(tiles).sum(axis=1)
            call["sums"] = f"{name}_sums"
        calls.append(call)
        build = cc.conv2d_f16mma_primfunc if kind == "cuda" else cc.conv2d_f16_compute
        funcs[name] = build(s, epilogue="f16_relu", **options).with_attr("global_symbol", name)
    np.savez(into / "float_kernels.npz", **arrays)
    (into / "calls.json").write_text(json.dumps(calls, indent=1))
    say(f"building the f16mma kernels for {arch if kind == 'cuda' else kind}")
    import tvm

    if kind != "cuda":
        from refqsr_engine.kernels.tir_build import as_target

        tvm.compile(tvm.IRModule(funcs), target=as_target(None)).export_library(str(into / "float_kernels.so"))
        return [{"function": name} for name in funcs]
    exe = cuda_toolchain.build_cuda(tvm.IRModule(funcs), arch)
    exe.export_library(str(into / "float_kernels.so"))
    ptx = cuda_toolchain.device_code(exe, sass=False)
    counts = instruction_counts(ptx, PTX_OPS)
    missing = [f for f in funcs if not re.search(rf"\.entry\s+{f}_kernel\w*\(", ptx)]
    if missing or counts["local_memory"] or counts["mma_f16"] < len(funcs):
        raise CheckError(f"f16mma kernels: missing {missing}, PTX counts {counts}")
    return [{"function": name} for name in funcs] + [{"ptx": counts}]


#: the RefER and clustering kernels' standalone problem: odd channel count, 11 x 13 pooled cells
#: (not a multiple of the 8-cell tile); 600 patches in the 1024 bucket (padded rows, as the runtime)
REFER_SHAPE, CLUSTER = (2, 15, 33, 39), (600, 1024, 47)
REFER_GRID = (-7, 7, 0.02, 0.0)  # qmin, qmax, scale, zero point of the paper matching's quantizer


def _device_funcs(kind: str, kw: dict[str, dict[str, Any]], cluster: tuple[int, int]) -> dict[str, Any]:
    """The GPU-scheduled PrimFuncs (``kind`` "cuda"), or the same schedules with serial thread
    loops and the CPU's float forms ("llvm": for a run of the check's code on the CPU)."""
    from refqsr_engine.kernels import refer_cuda as rc
    from refqsr_engine.kernels import refer_kernels as rk
    from refqsr_engine.kernels.cluster_kernels import cluster_compute

    n, c, h, w = REFER_SHAPE
    if kind == "cuda":
        funcs = {name: rc.refer_primfunc_cuda(stage, n, c, h, w, **a) for name, (stage, a) in kw.items()}
        funcs[f"cluster_{cluster[0]}"] = rc.cluster_primfunc_cuda(*cluster)
        return funcs
    shape = rk.RefERShape(n, c, h, w)
    funcs = {
        name: rc.schedule_refer_cuda(rk.refer_compute(stage, shape, **a)[0], bind=False).mod["main"]
        for name, (stage, a) in kw.items()
    }
    funcs[f"cluster_{cluster[0]}"] = rc.schedule_cluster_cuda(cluster_compute(*cluster), bind=False).mod["main"]
    return {k: f.with_attr("global_symbol", k) for k, f in funcs.items()}


def build_device_kernels(into: Path, arch: str, say, kind: str = "cuda") -> list[dict[str, Any]]:
    """The GPU schedules of the RefER kernels (paper pipeline, shared flow, warp) and of the
    clustering kernel in one CUDA library, their inputs, and the outputs of the CPU kernels as the
    expected values (checked here against the PyTorch twins: flows, arg-max cells and warps bit for
    bit, the clustering's reference assignment equal). ``calls.json`` says what to call with what.
    ``kind`` "llvm" builds the schedules for this CPU instead (tests/test_gpucheck.py)."""
    import torch
    from refqsr_engine.engine.runtime import PAD_LOGIT
    from refqsr_engine.kernels import cuda_toolchain
    from refqsr_engine.kernels import refer_cuda as rc
    from refqsr_engine.kernels import refer_kernels as rk
    from refqsr_engine.kernels.cluster_kernels import build_cluster_kernel
    from refqsr_engine.models import matching as mt
    from refqsr_engine.models.clustblock import affinity
    from refqsr_engine.models.quant_base import fake_quantize

    into.mkdir(parents=True)
    n, c, h, w = REFER_SHAPE
    qmin, qmax, scale, zp = REFER_GRID
    real, bucket, classes = CLUSTER
    g = torch.Generator().manual_seed(11)
    fr = torch.randn(n, c, h, w, generator=g)
    fq = torch.roll(fr, shifts=(3, -6), dims=(2, 3)) + 0.5 * torch.randn(n, c, h, w, generator=g)
    logits = np.full((bucket, classes), PAD_LOGIT, np.float32)
    logits[:real] = np.random.default_rng(12).standard_normal((real, classes)).astype(np.float32) * 3
    arrays = {"fq": fq.numpy(), "fr": fr.numpy(), "scale": np.float32([scale]), "zp": np.float32([zp])}
    arrays["logits"] = logits

    say("building the RefER and clustering kernels (CPU) for the expected values")
    warped, flow, idx = rk.build_refer_pipeline(n, c, h, w, qmin, qmax, return_index=True)(
        fq.numpy(), fr.numpy(), [scale], [zp]
    )
    s_flow, s_idx = rk.build_shared_flow(n, c, h, w, return_index=True, cosine_grid=mt.COSINE_GRID)(
        fq.numpy(), fr.numpy()
    )
    s_warped = rk.build_backward_warp(n, c, h, w)(fr.numpy(), s_flow)
    ref, cos = build_cluster_kernel(bucket, classes)(logits)
    st, zt = torch.tensor(scale), torch.tensor(zp)
    q, r = (torch.round(fake_quantize(mt.normalize_and_pool(x), st, zt, qmin, qmax) / st) for x in (fq, fr))
    want_flow = mt.upsample_flow(mt.pooled_flow(q, r, (h, w), hard=True), (h, w))
    agree = {
        "pipeline": np.array_equal(flow, want_flow.numpy())
        and np.array_equal(idx, mt.argmax_positions(q, r).numpy())
        and np.array_equal(warped, mt.backward_warp(fr, want_flow).numpy()),
        "shared_flow": np.array_equal(s_flow, mt.shared_flow(fq, fr).numpy()),
        "warp": np.array_equal(s_warped, mt.backward_warp(fr, torch.from_numpy(s_flow)).numpy()),
        "cluster": np.array_equal(ref[:real], affinity(torch.from_numpy(logits[:real])).numpy().argmax(axis=1)),
    }
    if not all(agree.values()):
        raise CheckError(f"the CPU kernels disagree with the PyTorch twins: {agree}")
    arrays.update(warped=warped, flow=flow, idx=idx, s_flow=s_flow, s_idx=s_idx, s_warped=s_warped, ref=ref, cos=cos)
    calls = [
        {"function": "refer_pipeline", "inputs": ["fq", "fr", "scale", "zp"], "outputs": ["warped", "flow", "idx"]},
        {"function": "refer_shared_flow", "inputs": ["fq", "fr"], "outputs": ["s_flow", "s_idx"]},
        {"function": "refer_warp", "inputs": ["fr", "s_flow"], "outputs": ["s_warped"]},
        {"function": f"cluster_{bucket}", "inputs": ["logits"], "outputs": ["ref", "cos"]},
    ]
    say(f"building the RefER and clustering kernels for {arch if kind == 'cuda' else kind}")
    kw = {
        "refer_pipeline": ("pipeline", {"qmin": qmin, "qmax": qmax, "return_index": True}),
        "refer_shared_flow": ("shared_flow", {"cosine_grid": mt.COSINE_GRID, "return_index": True}),
        "refer_warp": ("backward_warp", {}),
    }
    funcs = _device_funcs(kind, kw, (bucket, classes))
    np.savez(into / "device_kernels.npz", **arrays)
    (into / "calls.json").write_text(json.dumps(calls, indent=1))
    if kind != "cuda":
        import tvm
        from refqsr_engine.kernels.tir_build import as_target

        tvm.compile(tvm.IRModule(funcs), target=as_target(None)).export_library(str(into / "device_kernels.so"))
        return [{"function": call["function"]} for call in calls]
    exe = rc.build_cuda_kernel(funcs, arch)
    exe.export_library(str(into / "device_kernels.so"))
    with rc.no_fast_math():
        ptx = cuda_toolchain.device_code(exe, sass=False)
    entries = re.findall(r"\.entry\s+(\w+)\(", ptx)
    missing = [f for f in funcs if f"{f}_kernel" not in entries]
    if missing or ".approx" in ptx:
        raise CheckError(f"device kernels: missing {missing} or approximate math in the PTX")
    counts = instruction_counts(ptx, PTX_OPS)
    return [
        {"function": call["function"], "kernels": sum(e.startswith(call["function"] + "_kernel") for e in entries)}
        for call in calls
    ] + [{"ptx": counts}]


def runtime_files(lib: Path, wheels: Path) -> dict[str, str]:
    """TVM's runtime libraries, the CUDA runtime they link and the cp312 tvm_ffi wheel."""
    import tvm_ffi

    lib.mkdir(parents=True)
    wheels.mkdir(parents=True)
    spec_lib = Path(next(iter(__import__("importlib").util.find_spec("tvm").submodule_search_locations))) / "lib"
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy(spec_lib / name, lib / name)
    cudart = next((p for p in _cudart_candidates() if p.is_file()), None)
    if cudart is None:
        raise CheckError(f"no {CUDART} found (install the CUDA 13 toolkit or the nvidia-cuda-runtime wheel)")
    shutil.copy(cudart.resolve(), lib / CUDART)
    version = metadata.version("apache-tvm-ffi")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), f"apache-tvm-ffi=={version}"]
    cmd += ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not list(wheels.glob("*.whl")):
        raise CheckError(f"cannot download the cp312 apache-tvm-ffi {version} wheel: {proc.stderr.strip()[-200:]}")
    return {"apache-tvm": metadata.version("apache-tvm"), "apache-tvm-ffi": version, "tvm_ffi": tvm_ffi.__version__}


def _cudart_candidates() -> list[Path]:
    found = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        found.append(Path(nvcc).resolve().parents[1] / "lib64" / CUDART)
    found += [Path("/usr/local/cuda/lib64") / CUDART, Path("/usr/lib/x86_64-linux-gnu") / CUDART]
    return found


STATIC_LOAD = r"""
import json, sys
sys.modules["tvm"] = None  # the TVM package must not be needed
sys.modules["torch"] = None
sys.path.insert(0, sys.argv[1])
from refqsr_engine.engine import tvm_runtime
from refqsr_engine.engine.artifact import load_artifact
from refqsr_engine.errors import RefQSRError
tvm_runtime.load_runtime(cuda=True)
ffi = tvm_runtime.load_runtime()
assert ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
loaded = {p: sorted(load_artifact(p).manifest["files"]) for p in sys.argv[2:]}
try:
    tvm_runtime.device("cuda")
    device = "found"
except RefQSRError as err:
    device = str(err)
heavy = sorted(m for m in sys.modules if m.startswith(("torch", "tvm.")) and sys.modules[m] is not None)
print(json.dumps({"artifacts": loaded, "device": device, "modules": heavy}))
"""


def static_load_check(unpacked: Path, work: Path) -> dict[str, Any]:
    """Load the bundle's runtime and artifacts in a fresh process that cannot import TVM or PyTorch,
    against a libcuda stub (this machine has no driver): libraries resolve, artifacts verify."""
    from refqsr_engine.kernels import cuda_toolchain

    from .bundle import link_package

    stub = cuda_toolchain._build_stub()
    site = work / "site"
    link_package(REPO, site)  # this machine's own tvm_ffi stands in for the cp312 wheel
    env = {"LD_LIBRARY_PATH": str(stub.parent), "REFQSR_ENGINE_TVM_LIB": str(unpacked / "lib"), "PATH": "/usr/bin:/bin"}
    arts = [str(p) for p in sorted((unpacked / "artifacts").iterdir())]
    proc = subprocess.run(
        [sys.executable, "-c", STATIC_LOAD, str(site), *arts], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise CheckError(f"the bundle does not load without TVM: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout)
    if result["modules"]:
        raise CheckError(f"loading the bundle imported {result['modules']}")
    return result


def pack_within_limit(
    stage: Path, archive: Path, tree: int, models: dict[str, Any], say, limit: int = CARRY_LIMIT
) -> dict[str, str]:
    """Pack ``stage`` into the xz ``archive``; while the tree plus the archive exceed ``limit``,
    drop the last optional model (every key of ``models`` after the first) from
    ``stage/artifacts`` and from ``models``, and pack again. Returns the models left out, each
    with the reason; the caller refuses a bundle that still does not fit."""
    left_out: dict[str, str] = {}
    while True:
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for item in sorted(stage.iterdir()):
                tar.add(item, arcname=item.name)
        size = archive.stat().st_size
        optional = list(models)[1:]
        if tree + size <= limit or not optional:
            return left_out
        key = optional[-1]
        mib = 1 << 20
        left_out[key] = (
            f"{models[key]['model']}: the tree ({tree / mib:.1f} MiB) plus the bundle with it "
            f"({size / mib:.1f} MiB) exceed the {limit / mib:.0f} MiB carry limit"
        )
        say(f"leaving out {key}: {left_out[key]}")
        shutil.rmtree(stage / "artifacts" / key)
        del models[key]


def prepare(out: Path, arch: str = "sm_90") -> dict[str, Any]:
    def say(msg: str) -> None:
        print(f"gpucheck: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp_name:
        stage = Path(tmp_name) / "bundle"
        compiled = compile_models(stage / "artifacts", arch, say)
        kernels = build_kernels(stage / "kernels", arch, say)
        device_kernels = build_device_kernels(stage / "device_kernels", arch, say)
        float_kernels = build_float_kernels(stage / "float_kernels", arch, say)
        versions = runtime_files(stage / "lib", stage / "wheels")
        (stage / "versions.json").write_text(json.dumps(versions))
        device_code = device_code_checks(stage / "artifacts")
        say("runtime-only load of the bundle (libcuda stub)")
        static = static_load_check(stage, Path(tmp_name))
        say("packing")
        tree = tree_bytes()
        left_out = pack_within_limit(stage, out / BUNDLE, tree, compiled, say)
        device_code = {k: v for k, v in device_code.items() if k in compiled}
        sizes = {str(p.relative_to(stage)): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
    bundle = (out / BUNDLE).stat().st_size
    description = {
        "arch": arch,
        "models": compiled,
        "left_out": left_out,
        "kernels": kernels,
        "device_kernels": device_kernels,
        "float_kernels": float_kernels,
        "versions": versions,
        "device_code": device_code,
        "static_load": static,
        "files": sizes,
        "bundle_bytes": bundle,
        "bundle_sha256": _sha256(out / BUNDLE),
        "tree_bytes": tree,
        "carry_bytes": tree + bundle,
        "carry_limit": CARRY_LIMIT,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    mib = 1 << 20
    if tree + bundle > CARRY_LIMIT:
        raise CheckError(
            f"the tree ({tree / mib:.1f} MiB) plus the bundle ({bundle / mib:.1f} MiB) exceed "
            f"the {CARRY_LIMIT / mib:.0f} MiB that can be carried"
        )
    say(f"wrote {out}: bundle {bundle / mib:.1f} MiB, with the tree {(tree + bundle) / mib:.1f} MiB")
    return description
