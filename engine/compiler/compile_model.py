"""`refqsr-engine compile`: a trained model -> ONNX graphs -> compiled libraries -> one artifact.

A RefQSR model gives three graphs (``clustblock``, ``reference``, ``query``) plus the clustering
kernel compiled for a few patch-count buckets (an image's patches are padded up to the next
bucket, see :mod:`refqsr_engine.engine.runtime`); a fixed- or full-precision network gives ``sr``.
Every graph is compiled for fixed batches of ``patch`` LR pixels: ``batch`` patches and a quarter
of that (:func:`batch_sizes`), so that an image's last, short batch of references or queries does
not pay for a full batch of padding (a 720p output has 8 patches of 96 px: 3 references and 5
queries ran as 2 x 16 slots with one size, 2 x 4 + 1 x 4 with two).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
import torch
import tvm

from ...errors import RefQSRError
from ...export.onnx_export import export_refqsr, export_sr
from ...files import owned_temp_prefix, remove_stale_temps
from ...kernels.amx import target_has_amx
from ...kernels.cluster_kernels import cluster_primfunc
from ...kernels.host_cpu import required_cpu_flags
from ...models.checkpoint import bits_label, load_model, model_config
from ...models.model_info import describe
from ...models.refqsr import RefQSR
from ..artifact import sha256_file, write_artifact
from ..models_store import resolve_model
from .build import build_graph
from .options import CompileOptions

#: patch-count buckets of the compiled clustering kernel; images with more patches than the
#: largest are clustered in the PyTorch twin's way, chunk by chunk, which the runtime refuses
CLUSTER_BUCKETS = (64, 256, 1024, 4096, 16384)

Progress = Callable[[str], None]


def _check_bits(model: torch.nn.Module, requested: str | None) -> str:
    have = bits_label(model_config(model))
    if requested is not None and requested.replace("fp", "32") != have:
        raise RefQSRError(
            f"this model was trained for {have} bits, not {requested}; pick a model trained at those bits"
        )
    return have


def batch_sizes(batch: int, target: str = "llvm") -> list[int]:
    """The batch sizes compiled for ``--batch``: itself and a quarter of it (at least 1) on CPUs,
    where a padded slot costs as much as a real one; only itself on GPUs, where a short batch
    leaves the device idle rather than doing more work."""
    if target == "cuda":
        return [batch]
    return sorted({batch, max(1, batch // 4)}, reverse=True)


def graph_file(name: str, batch: int) -> str:
    return f"{name}_b{batch}.so"


def _build_cluster_library(classes: int, target: tvm.target.Target, path: Path) -> list[int]:
    funcs = {
        f"cluster_{n}": cluster_primfunc(n, classes).with_attr("global_symbol", f"cluster_{n}") for n in CLUSTER_BUCKETS
    }
    tvm.compile(tvm.IRModule(funcs), target=target).export_library(str(path))
    return list(CLUSTER_BUCKETS)


class _GraphBuilder:
    """How one target compiles a graph at one batch size; the rest of compile_model is shared."""

    def __init__(self, opts: CompileOptions) -> None:
        self.opts = opts
        self.cuda = opts.target == "cuda"
        self.device_code: dict[str, dict[str, int]] = {}
        if self.cuda:
            from ...kernels import cuda_toolchain

            try:
                cuda_toolchain.cuda_target(opts.arch)
                cuda_toolchain.ensure_cuda_build_env()
            except (ValueError, cuda_toolchain.CudaToolchainError) as err:
                raise RefQSRError(f"cannot compile for CUDA: {err}") from None
            # the clustering kernel's GPU schedule: CUDA artifacts cluster on the device
            self.cluster_target = cuda_toolchain.cuda_target(opts.arch)
            self.cluster_extra = {"device": "device", "arch": opts.arch}
        else:
            self.target = tvm.target.Target(opts.target_dict())
            self.cluster_target, self.cluster_extra = self.target, {"device": "same"}
        if opts.float_math != "fp32" and (self.cuda or not target_has_amx(self.target)):
            raise RefQSRError(
                f"--float-math {opts.float_math} needs an AMX CPU target (llvm, e.g. --mcpu "
                f"sapphirerapids); CUDA targets compute float convs on fp16 tensor cores (f16mma), other "
                f"CPU targets in fp32"
            )

    def build_cluster(self, classes: int, path: Path) -> list[int]:
        """The clustering kernel for every bucket, for this target, exported to ``path``."""
        if not self.cuda:
            return _build_cluster_library(classes, self.cluster_target, path)
        from .cuda_build import build_cluster_library_cuda

        self.cluster_extra.update(build_cluster_library_cuda(classes, CLUSTER_BUCKETS, self.opts.arch, path))
        return list(CLUSTER_BUCKETS)

    def build(self, graph: onnx.ModelProto, name: str, batch: int, lib: Path) -> dict[str, Any]:
        """Compile and export ``graph`` to ``lib``; returns the graph's report."""
        if not self.cuda:
            built = build_graph(graph, name, batch, self.target, self.opts.float_terms)
            built.executable.export_library(str(lib))
            return {**built.report(), "build_seconds": sum(built.seconds.values())}
        from .cuda_build import build_graph_cuda, library_has_binary

        built = build_graph_cuda(graph, name, batch, self.opts.arch)
        built.executable.export_library(str(lib))
        if not library_has_binary(lib, built.binary):
            raise RefQSRError(f"{lib.name} does not embed the CUDA device binary")
        self.device_code[name] = built.device_code
        return {**built.report(), "build_seconds": sum(built.seconds.values())}


class _Stages:
    """Numbers one compile's stage messages ("[3/8] compiling query ..."), so a user sees how far it is."""

    def __init__(self, say: Progress, total: int) -> None:
        self.say, self.total, self.done = say, total, 0

    def __call__(self, msg: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {msg}")


def model_kind(model: str) -> str:
    """ "refqsr" or "sr": what ``model`` (a bundled name or a file) is, from its saved config."""
    from ...models.checkpoint import read_config

    return read_config(resolve_model(model))["kind"]


def compile_stages(n_graphs: int, batch: int, target: str, refqsr: bool) -> int:
    """How many stages a compile has: the ONNX export, one build per graph and batch size, the
    clustering kernel (RefQSR) and writing the artifact."""
    return 1 + n_graphs * len(batch_sizes(batch, target)) + int(refqsr) + 1


def _run_jobs(opts: CompileOptions, builder: _GraphBuilder, jobs: list, say: Progress, step: Progress):
    """Build every (graph, batch size). LLVM code generation is single-threaded, so independent
    builds run as ``opts.jobs`` worker processes (``python -m ...compiler.build_worker``: a fresh
    interpreter per build, so nothing depends on fork safety or on the caller's ``__main__``)."""
    workers = min(len(jobs), max(1, int(opts.jobs or 1)))
    if workers == 1:
        for name, path, b, lib in jobs:
            step(f"compiling {name} for {opts.target} (batch {b}, {opts.patch}x{opts.patch})")
            graph_report = builder.build(onnx.load(path), name, b, Path(lib))
            yield name, b, graph_report, builder.device_code.get(name)
        return
    import json
    import subprocess
    import sys

    say(f"compiling {len(jobs)} graph builds, {workers} at a time")
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, tuple, Path]] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                result = Path(job[3]).with_suffix(".json")
                spec = json.dumps({"options": dataclasses.asdict(opts), "job": job, "result": str(result)})
                proc = subprocess.Popen(
                    [sys.executable, "-m", "refqsr_engine.engine.compiler.build_worker", spec],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                running.append((proc, job, result))
            proc, job, result = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                last = (err or "").strip().splitlines()[-1:] or ["no output"]
                raise RefQSRError(f"building {job[0]} (batch {job[2]}) failed: {last[0]}")
            done = json.loads(result.read_text())
            step(f"compiled {job[0]} (batch {job[2]}) in {done['report']['build_seconds']:.1f} s")
            yield job[0], job[2], done["report"], done["device_code"]
    finally:
        for proc, _, _ in running:
            proc.kill()


def _dynamic_convs(graphs: dict[str, Path]) -> dict[str, list[str]] | None:
    """δ graphs name the CADyQ convs behind the columns of their ``bits`` output (export
    metadata): graph name -> conv names, or None for graphs without per-patch bits."""
    import onnx

    found = {}
    for name, path in graphs.items():
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "refqsr.dynamic_convs" in props:
            found[name] = json.loads(props["refqsr.dynamic_convs"])
    return found or None


def compile_model(
    opts: CompileOptions,
    out: str | Path,
    progress: Progress | None = None,
    owned: bool = False,
    keep_onnx: bool = True,
) -> dict[str, Any]:
    """Compile ``opts.model`` into the artifact directory ``out``; returns the compile report.
    ``owned``: ``out`` is a cache entry, replaced even when damaged. ``keep_onnx``: also store
    the ONNX graphs that were compiled (running the artifact does not need them)."""
    say = progress or (lambda msg: None)
    target_dict = opts.target_dict()
    builder = _GraphBuilder(opts)
    t0 = time.perf_counter()
    model_path = resolve_model(opts.model)
    model, card = load_model(model_path)
    model.eval()
    bits = _check_bits(model, opts.bits)
    report: dict[str, Any] = {"graphs": {}, "seconds": {}}
    refqsr = isinstance(model, RefQSR)
    step = _Stages(say, compile_stages(3 if refqsr else 1, opts.batch, opts.target, refqsr))
    remove_stale_temps(tempfile.gettempdir(), "refqsr-compile")  # left by compiles that were killed
    with tempfile.TemporaryDirectory(prefix=owned_temp_prefix("refqsr-compile")) as tmp_name:
        tmp = Path(tmp_name)
        step("exporting ONNX graphs")
        t = time.perf_counter()
        if isinstance(model, RefQSR):
            graphs = export_refqsr(model, tmp / "onnx", opts.patch)
        else:
            from ...models.model_info import model_bits

            graphs = export_sr(model, model_bits(model), tmp / "onnx", opts.patch)
        report["seconds"]["export"] = time.perf_counter() - t
        # the graphs compiled, for inspection
        files: dict[str, Path] = {f"{name}.onnx": path for name, path in graphs.items()} if keep_onnx else {}
        jobs = [
            (name, str(path), b, str(tmp / graph_file(name, b)))
            for name, path in graphs.items()
            for b in batch_sizes(opts.batch, opts.target)
        ]
        for name, b, graph_report, device_code in _run_jobs(opts, builder, jobs, say, step):
            files[graph_file(name, b)] = tmp / graph_file(name, b)
            report["seconds"][f"{name}_b{b}"] = graph_report.pop("build_seconds")
            report["graphs"].setdefault(name, graph_report)
            if device_code is not None:
                builder.device_code[name] = device_code
        cluster = None
        if isinstance(model, RefQSR):
            step("compiling the clustering kernel")
            t = time.perf_counter()
            buckets = builder.build_cluster(model.clustblock.num_classes, tmp / "cluster.so")
            files["cluster.so"] = tmp / "cluster.so"
            cluster = {"buckets": buckets, "classes": model.clustblock.num_classes, **builder.cluster_extra}
            report["seconds"]["cluster"] = time.perf_counter() - t
        report["seconds"]["total"] = time.perf_counter() - t0
        manifest = {
            "target": target_dict,
            "model": {
                "name": opts.model,
                "file": model_path.name,
                "sha256": sha256_file(model_path),
                "config": model_config(model),
                "card": card,
            },
            "kind": "refqsr" if isinstance(model, RefQSR) else "sr",
            "bits": bits,
            # CUDA: full-precision convs on fp16 tensor cores (per conv under graphs.*.f16mma)
            "float_math": "f16mma" if opts.target == "cuda" else opts.float_math,
            "patch": opts.patch,
            "batch": opts.batch,
            "batches": batch_sizes(opts.batch, opts.target),
            "scale": int((model.backbone if isinstance(model, RefQSR) else model).scale),
            "tau": float(model.tau) if isinstance(model, RefQSR) else None,
            "n_refer": model.n_refer if isinstance(model, RefQSR) else 0,
            "cluster": cluster,
            # where the clustering kernel runs: "device" (CUDA artifacts), "cpu" (LLVM ones)
            "clustering": ("device" if builder.cuda else "cpu") if cluster else None,
            "graphs": report["graphs"],
            "compile_seconds": round(report["seconds"]["total"], 2),
            "options": asdict(opts),
        }
        dynamic = _dynamic_convs(graphs)
        if dynamic is not None:
            manifest["dynamic_convs"] = dynamic
        # what the runtime needs of the model, so the artifact runs without it (and without PyTorch)
        manifest["model_info"] = describe(model, model_path.stem, card, dynamic).as_dict()
        manifest["amx"] = opts.target == "llvm" and target_has_amx(target_dict)
        if opts.target == "llvm":  # the host must have these, or the code faults (SIGILL)
            manifest["cpu_flags"] = required_cpu_flags(tvm.target.Target(target_dict))
        if builder.device_code:
            manifest["device_code"] = report["device_code"] = builder.device_code
        if builder.cuda:  # the runtime keeps each batch on the GPU (engine.runtime.RESIDENT_COPIES)
            from ..runtime import RESIDENT_COPIES

            copies = {**RESIDENT_COPIES, "to_host": RESIDENT_COPIES["to_host"] + int(dynamic is not None)}
            manifest["runtime"] = {"resident": True, "copies_per_batch": copies}
        step("writing the artifact")
        write_artifact(out, files, manifest, owned)
    report["artifact"] = str(out)
    report["seconds"] = {k: round(v, 2) for k, v in report["seconds"].items()}
    return report
