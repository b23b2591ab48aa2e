"""`python -m gpucheck run BUNDLE OUT`: on the GPU host, one command that proves the CUDA engine.

It loads the bundled artifacts with TVM's runtime library alone (no TVM package), and writes
``OUT/report.json`` and ``OUT/report.md``:

* every standalone integer conv kernel bit-exact against its reference on worst-case operands
  (output buffers poisoned first, so an unwritten element shows), and the GPU schedules of the
  RefER kernels and the clustering kernel bit-exact against the CPU kernels' outputs;
* every graph against the PyTorch model on the same GPU (TF32 off): HR PSNR >= 50 dB, RefER
  features close, ClustBlock logits close and the reference assignment equal, the query on
  features gathered on the device equal to it on host copies;
* ``examples/coffee_lr.png`` and a 480x270 frame end to end (the images are written to OUT);
* latency, synchronised with the device (warm-up, then median and p90 of 20 or more runs): the
  engine's graphs and end to end, beside PyTorch fp32, TF32 and fp16 (channels_last) eager on the
  same card, on the whole frame and on 96-px patches; a per-kernel profile; peak device memory;
* the environment: GPU, driver, CUDA, clocks.

The measuring functions take a torch device and a ``sync`` callable, so they also run on a CPU
(tests/test_gpucheck.py runs them on a CPU artifact).
"""

from __future__ import annotations

import ctypes
import json
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import CheckError, activate, build_site, unpack

REPO = Path(__file__).resolve().parents[1]
PSNR_BAR = 50.0
FP_MODEL = "srresnet_fp"


# -- measuring ------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], sync: Callable[[], None], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median, p90 and min of ``runs`` calls of ``fn`` in ms, each ended by ``sync``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 3),
        "min_ms": round(times[0], 3),
        "runs": runs,
    }


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(want, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-30))


def photo_patches(n: int, patch: int, seed: int = 0) -> np.ndarray:
    """``n`` patches of ``examples/coffee_lr.png`` (random positions, flipped copies where the
    photo is smaller than the patch), [n, 3, patch, patch] float32 in [0, 1]."""
    from PIL import Image

    img = np.asarray(Image.open(REPO / "examples" / "coffee_lr.png").convert("RGB"), np.float32) / 255.0
    reps = (-(-patch * 2 // img.shape[0]), -(-patch * 2 // img.shape[1]), 1)
    big = np.tile(np.concatenate([img, img[:, ::-1]], axis=1), reps)
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, patch, patch), np.float32)
    for i in range(n):
        y, x = rng.integers(0, big.shape[0] - patch), rng.integers(0, big.shape[1] - patch)
        out[i] = big[y : y + patch, x : x + patch].transpose(2, 0, 1)
    return out


# -- correctness ----------------------------------------------------------------------------------
def check_kernels(folder: Path, kind: str = "cuda") -> list[dict[str, Any]]:
    """Each standalone kernel on its worst-case operands, output poisoned first: bit-exact?"""
    from refqsr_engine.engine import tvm_runtime as rt

    dev = rt.device(kind)
    rows = []
    for npz in sorted(folder.glob("*.npz")):
        data = np.load(npz)
        lib = rt.load_module(npz.with_suffix(".so"))
        out_shape = tuple(int(v) for v in data["out_shape"])
        poison = np.full(out_shape, 0x7F7F7F7F, np.int32)
        a, w, out = rt.to_device(data["a"], dev), rt.to_device(data["w"], dev), rt.to_device(poison, dev)
        lib["main"](a, w, out)
        got = rt.to_numpy(out).astype(np.int64).ravel()[data["order"]]
        want = data["expected"]
        wrong = int((got != want).sum())
        rows.append({"kernel": npz.stem, "elements": int(want.size), "wrong": wrong, "bit_exact": wrong == 0})
    return rows


def _library_calls(folder: Path, library: str, kind: str):
    """For each call ``calls.json`` lists: (the call, its inputs on the device, the arrays, the
    library ``library``.so, the device). Nothing when the folder has no calls."""
    from refqsr_engine.engine import tvm_runtime as rt

    if not (folder / "calls.json").is_file():
        return
    dev = rt.device(kind)
    data = np.load(folder / f"{library}.npz")
    lib = rt.load_module(folder / f"{library}.so")
    for call in json.loads((folder / "calls.json").read_text()):
        yield call, [rt.to_device(data[name], dev) for name in call["inputs"]], data, lib, dev


def check_device_kernels(folder: Path, kind: str = "cuda") -> list[dict[str, Any]]:
    """The RefER and clustering kernels' GPU schedules (``calls.json``: function, input and
    expected-output arrays), outputs poisoned first: each output bit for bit as the CPU kernel's?"""
    from refqsr_engine.engine import tvm_runtime as rt

    rows = []
    for call, inputs, data, lib, dev in _library_calls(folder, "device_kernels", kind):
        wants = [data[name] for name in call["outputs"]]  # float32 / int32: compared as 32-bit words
        outs = [rt.to_device(np.full(w.shape, 0x7F7F7F7F, np.int32).view(w.dtype), dev) for w in wants]
        lib[call["function"]](*inputs, *outs)
        for name, out, want in zip(call["outputs"], outs, wants):
            wrong = int((rt.to_numpy(out).view(np.int32) != want.view(np.int32)).sum())
            row = {"kernel": f"{call['function']}:{name}", "elements": int(want.size), "wrong": wrong}
            rows.append({**row, "bit_exact": wrong == 0})
    return rows


#: the f16mma kernels' tolerance against numpy's fp16 conv: the same fp32 products summed in
#: another order can move a sum across one fp16 rounding step (2**-11 relative) and a little more
FLOAT_RTOL, FLOAT_ATOL = 2e-3, 1e-4


def check_float_kernels(folder: Path, kind: str = "cuda") -> list[dict[str, Any]]:
    """The f16mma kernels' stores (``calls.json``), outputs poisoned with fp16 NaNs first: every
    half written, and each within :data:`FLOAT_RTOL` / :data:`FLOAT_ATOL` of numpy's fp16 conv
    (the shuffled store's border words exactly 0)?"""
    from refqsr_engine.engine import tvm_runtime as rt

    rows = []
    for call, inputs, data, lib, dev in _library_calls(folder, "float_kernels", kind):
        word = np.uint32 if call["out_dtype"] == "uint32" else np.uint16
        poison = np.full(call["out_shape"], np.iinfo(word).max, word)  # every bit set: fp16 NaNs
        out = rt.to_device(poison.view(call["out_dtype"]), dev)
        sums = call.get("sums")
        if sums:  # a second output: per-tile channel sums, poisoned with fp32 NaNs
            sums_out = rt.to_device(np.full(data[f"{sums}_want"].shape, np.nan, np.float32), dev)
            lib[call["function"]](*inputs, out, sums_out)
        else:
            lib[call["function"]](*inputs, out)
        got = rt.to_numpy(out).view(np.float16).astype(np.float32)
        want = data[call["output"]].view(np.float16).astype(np.float32)
        close = np.abs(got - want) <= FLOAT_RTOL * np.abs(want) + FLOAT_ATOL  # NaN: not close
        wrong = int(got.size - close.sum())
        if sums:  # fp32 sums of the fp16 outputs: the outputs' bound, summed
            bound = FLOAT_RTOL * data[f"{sums}_scale"] + FLOAT_ATOL * (want.size // data[f"{sums}_want"].size)
            got_sums = rt.to_numpy(sums_out)
            wrong += int(got_sums.size - (np.abs(got_sums - data[f"{sums}_want"]) <= bound).sum())
        rows.append({"kernel": call["function"], "elements": int(want.size), "wrong": wrong, "within": wrong == 0})
    return rows


def check_graphs(engine: Any, model: Any, device: Any, batch: int) -> dict[str, Any]:
    """Every graph of ``engine`` (a CompiledModel) against the PyTorch ``model`` on ``device``,
    on the same photo patches: HR PSNR, feature and logit differences, the reference assignment."""
    import torch
    from refqsr_engine.models.clustblock import cluster_patches
    from refqsr_engine.models.model_info import model_bits
    from refqsr_engine.models.refqsr import RefQSR

    x = photo_patches(batch, engine.patch, seed=1)
    xt = torch.from_numpy(x).to(device)
    rows: dict[str, Any] = {}
    with torch.no_grad():
        if not isinstance(model, RefQSR):
            want = model(xt, model_bits(model)).cpu().numpy()
            got = engine.sr(x)
            rows["sr"] = {"psnr_db": round(psnr(np.clip(got, 0, 1), np.clip(want, 0, 1)), 2)}
            return rows
        logits = engine.logits(x)
        want_logits = model.clustblock(xt).cpu().numpy()
        scale = float(np.abs(want_logits).max()) or 1.0
        got_c = engine.cluster(np.concatenate([logits] * 2))  # a bigger image: two copies of each patch
        want_c = cluster_patches(torch.from_numpy(np.concatenate([want_logits] * 2)), engine.tau)
        rows["clustblock"] = {
            "max_abs_diff_rel": round(float(np.abs(logits - want_logits).max()) / scale, 6),
            "assignment_equal": bool(np.array_equal(got_c.reference_of, want_c.reference_of.numpy())),
        }
        hr, kept = engine.reference(x)
        feats = kept if isinstance(kept, list) else kept.numpy()  # resident: the features stay on the device
        want_hr, want_feats = model.reference_forward(xt)
        rows["reference"] = {
            "psnr_db": round(psnr(np.clip(hr, 0, 1), np.clip(want_hr.cpu().numpy(), 0, 1)), 2),
            "feature_max_abs_diff": round(
                max(float(np.abs(f - w.cpu().numpy()).max()) for f, w in zip(feats, want_feats)), 6
            ),
        }
        q = photo_patches(batch, engine.patch, seed=2)
        got_q = engine.query(q, [w.cpu().numpy() for w in want_feats])
        want_q = model.query_forward(torch.from_numpy(q).to(device), list(want_feats), hard=True).cpu().numpy()
        rows["query"] = {"psnr_db": round(psnr(np.clip(got_q, 0, 1), np.clip(want_q, 0, 1)), 2)}
        # the query on its references' features gathered on the device equals it on host copies
        order = list(range(batch))[::-1]
        rows_of = engine.gather_features([engine.keep_features(kept, i) for i in order])
        on_device = engine.query(q, rows_of)
        on_host = engine.query(q, [f[order] for f in feats])
        rows["query"]["gathered_equal"] = bool(np.array_equal(on_device, on_host))
    return rows


def graphs_pass(rows: dict[str, Any]) -> bool:
    ok = all(r.get("psnr_db", PSNR_BAR) >= PSNR_BAR and r.get("gathered_equal", True) for r in rows.values())
    c = rows.get("clustblock")
    return ok and (c is None or (c["assignment_equal"] and c["max_abs_diff_rel"] < 1e-3))


# -- timing ---------------------------------------------------------------------------------------
def time_engine_graphs(engine: Any, sync: Callable[[], None], runs: int) -> dict[str, Any]:
    """Each compiled graph at its batch size, inputs already on the device."""
    from refqsr_engine.engine import tvm_runtime as rt

    b = engine.batches[0]
    x = rt.to_device(photo_patches(b, engine.patch), engine.device)
    out = {}
    if not engine.refqsr:
        out["sr"] = timed(lambda: engine.vms[("sr", b)](x), sync, runs)
        return out
    out["clustblock"] = timed(lambda: engine.vms[("clustblock", b)](x), sync, runs)
    _, *feats = engine.vms[("reference", b)](x)
    out["reference"] = timed(lambda: engine.vms[("reference", b)](x), sync, runs)
    out["query"] = timed(lambda: engine.vms[("query", b)](x, *feats), sync, runs)
    for v in out.values():
        v["per_patch_ms"] = round(v["median_ms"] / b, 3)
    return out


def kernel_profile(engine: Any, graph: str, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Time of every packed-function call of one run of ``graph`` (device-synchronised around each
    call, so the sum exceeds an unprofiled run), summed per function name, largest first."""
    from refqsr_engine.engine import tvm_runtime as rt

    b = engine.batches[0]
    vm = engine.vms[(graph, b)]
    x = rt.to_device(photo_patches(b, engine.patch), engine.device)
    args = [x]
    if graph == "query":
        _, *feats = engine.vms[("reference", b)](x)
        args += feats
    totals: dict[str, list[float]] = {}
    started: list[float] = []

    def instrument(func, name, before, ret, *call_args):
        sync()
        if before:
            started.append(time.perf_counter())
        else:
            totals.setdefault(str(name), []).append((time.perf_counter() - started.pop()) * 1e3)
        return 0

    vm(*args)  # warm
    vm.module["set_instrument"](instrument)
    try:
        vm(*args)
        sync()
    finally:
        vm.module["set_instrument"](None)
    rows = [{"function": k, "calls": len(v), "ms": round(sum(v), 4)} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def time_torch(model: Any, device: Any, sync: Callable[[], None], frame: np.ndarray, runs: int) -> dict[str, Any]:
    """PyTorch eager on the same card: fp32 (TF32 off), TF32, fp16 channels_last; the whole frame
    and 16 patches of 96 px."""
    import torch

    cases = {}
    patches = torch.from_numpy(photo_patches(16, 96)).to(device)
    whole = torch.from_numpy(frame[None]).to(device)
    for mode in ("fp32", "tf32", "fp16_channels_last"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        net = model.to(device)
        dtype = torch.float16 if mode.startswith("fp16") else torch.float32
        fmt = torch.channels_last if mode.startswith("fp16") else torch.contiguous_format
        net = net.to(dtype=dtype, memory_format=fmt)
        for what, inp in (("whole_frame", whole), ("patches_16x96", patches)):
            x = inp.to(dtype=dtype).contiguous(memory_format=fmt)
            with torch.no_grad():
                cases[f"{mode}/{what}"] = timed(lambda net=net, x=x: net(x), sync, runs)
        model.to(torch.float32, memory_format=torch.contiguous_format)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return cases


# -- the host -------------------------------------------------------------------------------------
def _nvidia_smi(fields: str) -> list[str]:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    proc = subprocess.run([tool, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True)
    return [x.strip() for x in proc.stdout.strip().split(",")] if proc.returncode == 0 else []


def environment() -> dict[str, Any]:
    import torch

    fields = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,power.limit"
    smi = _nvidia_smi(fields)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
        "nvidia_smi": dict(zip(fields.split(","), smi)) if smi else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }


class DeviceMemory:
    """Device memory in use, from ``cudaMemGetInfo`` of the bundled CUDA runtime (it sees TVM's and
    PyTorch's allocations alike)."""

    def __init__(self, lib_dir: Path) -> None:
        self.cudart = ctypes.CDLL(str(lib_dir / "libcudart.so.13"))
        self.peak = 0
        self.base = self.used()

    def used(self) -> int:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        used = total.value - free.value
        self.peak = max(getattr(self, "peak", 0), used)
        return used


def run(bundle_dir: Path, out: Path, quick: bool = False) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise CheckError("PyTorch is not installed here: the check compares the engine with it") from None
    if not torch.cuda.is_available():
        raise CheckError("no CUDA GPU on this machine: run the check on a GPU host")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    unpacked, site = out / "bundle", out / "site"
    for d in (unpacked, site):
        shutil.rmtree(d, ignore_errors=True)
    description = unpack(bundle_dir, unpacked)
    build_site(REPO, unpacked, site)
    activate(site, unpacked)
    from refqsr_engine.engine import tvm_runtime as rt
    from refqsr_engine.engine.artifact import load_artifact
    from refqsr_engine.engine.models_store import resolve_model
    from refqsr_engine.engine.runtime import CompiledModel
    from refqsr_engine.models.checkpoint import load_model

    rt.load_runtime(cuda=True)
    memory = DeviceMemory(unpacked / "lib")
    cuda = torch.device("cuda")

    def sync() -> None:
        torch.cuda.synchronize()
        memory.used()

    runs = 5 if quick else 20
    report: dict[str, Any] = {
        "environment": environment(),
        "bundle": {"arch": description["arch"], "left_out": description.get("left_out", {})},
    }
    report["kernels"] = check_kernels(unpacked / "kernels") + check_device_kernels(unpacked / "device_kernels")
    report["float_kernels"] = check_float_kernels(unpacked / "float_kernels")
    report["graphs"], report["latency"], report["profile"] = {}, {"engine": {}}, {}
    engines = {}
    models = {key: m["model"] for key, m in description["models"].items()}  # as prepare compiled them
    for key, name in models.items():
        engine = CompiledModel(load_artifact(unpacked / "artifacts" / key))
        model = load_model(resolve_model(name))[0].to(cuda).eval()
        engines[key] = engine
        rows = check_graphs(engine, model, cuda, engine.batches[0])
        report["graphs"][key] = {"model": name, "checks": rows, "pass": graphs_pass(rows)}
        report["graphs"][key]["copies"] = dict(engine.copies)  # host<->device copies of these checks
        report["latency"]["engine"][key] = time_engine_graphs(engine, sync, runs)
        graphs = ("clustblock", "reference", "query") if engine.refqsr else ("sr",)
        report["profile"][key] = {g: kernel_profile(engine, g, sync)[:15] for g in graphs}
    report["end_to_end"] = end_to_end(unpacked, out, cuda, sync, runs, models["default"])
    fp = load_model(resolve_model(FP_MODEL))[0].eval()
    frame = np.asarray(_frame_480x270(), np.float32).transpose(2, 0, 1) / 255.0
    report["latency"]["pytorch_" + FP_MODEL] = time_torch(fp, cuda, sync, np.ascontiguousarray(frame), runs)
    report["peak_device_memory_mib"] = round((memory.peak - memory.base) / 2**20, 1)
    report["pass"] = (
        all(k["bit_exact"] for k in report["kernels"])
        and all(k["within"] for k in report["float_kernels"])
        and all(g["pass"] for g in report["graphs"].values())
        and all(e["psnr_vs_pytorch_db"] >= PSNR_BAR for e in report["end_to_end"].values())
    )
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(f"gpucheck: {'PASS' if report['pass'] else 'FAIL'}; report in {out / 'report.md'}")
    return report


def _frame_480x270():
    from PIL import Image

    return Image.open(REPO / "examples" / "coffee_lr.png").convert("RGB").resize((480, 270), Image.BICUBIC)


def end_to_end(
    unpacked: Path, out: Path, device: Any, sync: Callable[[], None], runs: int, default_model: str
) -> dict[str, Any]:
    """``upscale --artifact`` of the default model on the photo and a 480x270 frame (images written
    to ``out``), each against the PyTorch model run patch-wise on the same GPU."""
    from PIL import Image
    from refqsr_engine.engine.image_io import read_image
    from refqsr_engine.engine.models_store import resolve_model
    from refqsr_engine.engine.upscale import UpscaleOptions, Upscaler
    from refqsr_engine.models.checkpoint import load_model
    from refqsr_engine.models.model_info import model_bits
    from refqsr_engine.models.patchwise import TorchRunner
    from refqsr_engine.pipeline.patchwise import run_patchwise

    frame = out / "frame_480x270.png"
    _frame_480x270().save(frame)
    up = Upscaler(UpscaleOptions(artifact=str(unpacked / "artifacts" / "default"), target="cuda"))
    model = load_model(resolve_model(default_model))[0].to(device).eval()
    results = {}
    for name, src in (("coffee_150x100", REPO / "examples" / "coffee_lr.png"), ("frame_480x270", frame)):
        dst = out / f"{name}_x4.png"
        report = up.upscale_file(src, dst)
        image = read_image(src)
        lr = np.ascontiguousarray(image.rgb.transpose(2, 0, 1))
        o = up.opts
        want = run_patchwise(TorchRunner(model, model_bits(model)), lr, o.patch, o.overlap, o.batch).image
        want8 = np.clip(np.round(want.transpose(1, 2, 0) * 255), 0, 255) / 255.0
        got = np.asarray(Image.open(dst).convert("RGB"), np.float32) / 255.0
        scratch = out / f".{name}_timing.png"
        results[name] = {
            "output": dst.name,
            "psnr_vs_pytorch_db": round(psnr(got, want8), 2),
            "patches": report["patches"],
            "references": report["references"],
            "stage_seconds": report["seconds"],
            "latency": timed(
                lambda image=image, src=src, scratch=scratch: up.upscale_image(image, src, scratch),
                sync,
                max(5, runs // 4),
            ),
        }
        scratch.unlink(missing_ok=True)
    return results


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [
        "# GPU check",
        "",
        f"Result: **{'PASS' if r['pass'] else 'FAIL'}** on {env['gpu']} ({env['capability']}), "
        f"PyTorch {env['torch']} (CUDA {env['torch_cuda']}), {r['seconds']} s in all.",
        "",
        "## Integer kernels (worst-case operands, poisoned outputs)",
        "",
        "| kernel | elements | wrong | bit-exact |",
        "| --- | ---: | ---: | --- |",
        *(f"| {k['kernel']} | {k['elements']} | {k['wrong']} | {k['bit_exact']} |" for k in r["kernels"]),
        "",
        "## f16mma kernels (parts read in place, pixel-shuffled stores; poisoned outputs)",
        "",
        f"Against numpy's fp16 conv within {FLOAT_RTOL:g} relative + {FLOAT_ATOL:g}; every half written.",
        "",
        "| kernel | elements | wrong | within |",
        "| --- | ---: | ---: | --- |",
        *(f"| {k['kernel']} | {k['elements']} | {k['wrong']} | {k['within']} |" for k in r.get("float_kernels", [])),
        "",
        "## Graphs against PyTorch on the same GPU (TF32 off)",
        "",
        "| artifact | graph | check | pass |",
        "| --- | --- | --- | --- |",
    ]
    for key, g in r["graphs"].items():
        for graph, checks in g["checks"].items():
            lines.append(f"| {key} ({g['model']}) | {graph} | {json.dumps(checks)} | {g['pass']} |")
    for key, why in r["bundle"].get("left_out", {}).items():
        lines.append(f"| {key} | - | left out of the bundle: {why} | - |")
    lines += ["", "## End to end (`upscale --artifact`, default model)", ""]
    lines += ["| image | PSNR vs PyTorch (dB) | patches | median ms | p90 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, e in r["end_to_end"].items():
        lat = e["latency"]
        lines.append(f"| {name} | {e['psnr_vs_pytorch_db']} | {e['patches']} | {lat['median_ms']} | {lat['p90_ms']} |")
    lines += ["", "## Latency (device-synchronised)", "", "| what | median ms | p90 ms | per patch ms |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for key, graphs in r["latency"]["engine"].items():
        for graph, t in graphs.items():
            lines.append(f"| engine {key} {graph} | {t['median_ms']} | {t['p90_ms']} | {t.get('per_patch_ms', '')} |")
    for name, cases in r["latency"].items():
        if name == "engine":
            continue
        for case, t in cases.items():
            lines.append(f"| {name} {case} | {t['median_ms']} | {t['p90_ms']} | |")
    lines += ["", f"Peak device memory above the start: {r['peak_device_memory_mib']} MiB.", ""]
    lines += ["## Slowest kernels per graph", ""]
    for key, graphs in r["profile"].items():
        for graph, rows in graphs.items():
            top = ", ".join(f"{x['function']} {x['ms']} ms" for x in rows[:5])
            lines.append(f"- {key} {graph}: {top}")
    return "\n".join(lines) + "\n"
