"""`refqsr-engine upscale`: read, tile, run the patches on an engine, merge, write.

Engines: ``tvm`` (a compiled artifact: ``--artifact``, or the model compiled for this host on first
use and cached, see :func:`compiled_engine`) or ``torch`` (the PyTorch reference models). Both go
through the one patch-wise algorithm of :mod:`refqsr_engine.pipeline.patchwise`.

The compiled engine runs from the artifact alone: with a cached or given artifact nothing here
imports PyTorch, ONNX or the TVM compiler (see :mod:`.tvm_runtime`); they load only to compile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from ..pipeline.clustering import check_tau
from ..pipeline.model_info import ModelInfo
from ..pipeline.patchwise import PatchRunner, PatchwiseResult, run_patchwise
from ..pipeline.tiling import check_engine_patch, make_grid
from .image_io import (
    DEFAULT_MAX_PIXELS,
    LoadedImage,
    output_format,
    read_image,
    upscale_alpha,
    write_image,
)
from .models_store import DEFAULT_MODEL, bundled_with_bits

DEFAULT_PATCH = 96
# 8, not 16: a 16-patch batch's HR intermediates (upsampler, tail: 16 x 64 x 384 x 384 fp32 =
# 600 MB each) took an 8K upscale to 3.3 GiB beyond its output; 8 stays under 2 GiB
DEFAULT_BATCH = 8
Say = Callable[[str], None]
Progress = Callable[[int, int], None]


@dataclass
class UpscaleOptions:
    model: str = DEFAULT_MODEL
    patch: int | None = None  # None: an --artifact's own, else DEFAULT_PATCH
    overlap: int = 6
    batch: int | None = None  # None: an --artifact's own, else DEFAULT_BATCH
    tau: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None
    engine: str = "tvm"  # "tvm" (the compiled engine) | "torch" (the PyTorch reference)
    recompile: bool = False  # tvm: compile again even when a cached artifact exists
    bits: str | None = None  # "8-4", "8", "32": pick the bundled model with these bits / check the model's
    target: str = "llvm"  # tvm: "llvm" (this CPU) or "cuda"
    float_math: str = "fp32"  # tvm on AMX CPUs: "fp32" (bf16x3 float convs) or "bf16" (faster, ~1e-3 relative)
    artifact: str | None = None  # tvm: run this prebuilt artifact (made by `compile`) instead of the cache


def compiled_engine(opts: UpscaleOptions, say: Say | None = None) -> tuple[Any, bool]:
    """The cached compiled artifact of ``opts.model`` for this host (compiled now if missing or
    ``opts.recompile``), loaded; returns (CompiledModel, compiled_now). A compile is announced
    through ``say`` (what, for which device, about how long, where it is cached), then its stages."""
    from .artifact import REPAIR_CACHED, cache_dir, cache_key, cache_lock
    from .compiler.options import CompileOptions, artifact_cache_parts
    from .host_target import host_mcpu_cached
    from .models_store import resolve_model
    from .runtime import CompiledModel

    copts = CompileOptions(
        model=opts.model,
        target=opts.target,
        mcpu=host_mcpu_cached() if opts.target == "llvm" else "core-avx2",
        bits=opts.bits,
        patch=opts.patch,
        batch=opts.batch,
        # built for every core of this machine; --threads only sizes the thread pool at run time, so
        # it never makes a second cache entry
        threads=None,
        float_math=opts.float_math,
    )
    key = cache_key(**artifact_cache_parts(copts))
    with cache_lock(key) as entry:
        fresh = opts.recompile or not (entry / "manifest.json").is_file()
        if fresh:
            from . import compile_time, tvm_runtime
            from .compiler.compile_model import compile_model, compile_stages, model_kind

            tvm_runtime.lean_imports = False  # the compiler needs all of tvm_ffi
            if opts.target == "cuda":
                import tvm

                if not tvm.cuda().exist:
                    raise RefQSRError("--target cuda: no CUDA GPU is visible to TVM on this machine")

            refqsr = model_kind(copts.model) == "refqsr"
            stages = compile_stages(3 if refqsr else 1, copts.batch, copts.target, refqsr)
            if say is not None:
                device = f"this CPU ({copts.mcpu})" if copts.target == "llvm" else f"the GPU ({copts.arch})"
                why = "--recompile" if opts.recompile else "first use"
                expected = compile_time.describe(compile_time.estimate_seconds(copts.target, stages))
                name = resolve_model(opts.model).stem
                say(f"compiling {name} for {device} ({why}, {expected}; cached in {cache_dir()})")
            t0 = time.perf_counter()
            compile_model(copts, entry, say, owned=True)
            compile_time.record(copts.target, stages, time.perf_counter() - t0)
        return CompiledModel.load(entry, target=copts.target_dict(), tau=opts.tau, repair=REPAIR_CACHED), fresh


def prebuilt_engine(opts: UpscaleOptions) -> Any:
    """``opts.artifact`` loaded: integrity checked, built for ``opts.target``'s kind, and runnable
    on this CPU (its instruction set) or a visible GPU."""
    from .artifact import load_artifact
    from .runtime import CompiledModel

    artifact = load_artifact(opts.artifact)
    kind = artifact.manifest.get("target", {}).get("kind")
    if kind != opts.target:
        raise RefQSRError(f"{opts.artifact} was built for --target {kind}, not {opts.target}")
    built_patch = artifact.manifest.get("patch")
    if opts.patch is not None and opts.patch != built_patch:
        raise RefQSRError(f"{opts.artifact} was compiled for --patch {built_patch}, not {opts.patch}")
    return CompiledModel(artifact, opts.tau)


def read_input(src: str | Path, dst: str | Path, max_pixels: int, scale: int) -> tuple[LoadedImage, float]:
    """SRC decoded, after checking that DST names a writable place of a known format and is not
    SRC (the input is never replaced) and that the x``scale`` output fits in memory; with the
    seconds it took."""
    t0 = time.perf_counter()
    output_format(dst)
    if Path(dst).exists() and Path(src).exists() and Path(dst).resolve() == Path(src).resolve():
        raise RefQSRError(f"output {dst} is the input: choose another output file")
    return read_image(src, max_pixels, scale), time.perf_counter() - t0


def _check_against_model(info: ModelInfo, opts: UpscaleOptions) -> None:
    if opts.bits is not None and info.label != opts.bits.replace("fp", "32"):
        raise RefQSRError(f"{info.name} runs at {info.label} bits, not {opts.bits}")
    if opts.tau is not None and not info.refqsr:
        raise RefQSRError("--tau applies to RefQSR models only")


class Upscaler:
    """One model on one engine, loaded (and for ``tvm`` compiled or taken from the cache) once,
    then used for any number of images."""

    def __init__(self, opts: UpscaleOptions, say: Say | None = None) -> None:
        if opts.engine not in ("torch", "tvm"):
            raise RefQSRError(f"unknown engine {opts.engine!r}: choose torch or tvm")
        if opts.artifact is not None and opts.engine != "tvm":
            raise RefQSRError("--artifact applies to --engine tvm")
        check_tau(opts.tau)
        if opts.patch is not None:
            check_engine_patch(opts.patch, compiled=opts.engine == "tvm")
        if opts.artifact is None:
            opts = dataclasses.replace(opts, patch=opts.patch or DEFAULT_PATCH, batch=opts.batch or DEFAULT_BATCH)
            make_grid(1, 1, opts.patch, opts.overlap)  # bad patch/overlap fail here, not once per image
        if opts.threads:
            os.environ["TVM_NUM_THREADS"] = str(opts.threads)  # read when TVM's thread pool starts
        t0 = time.perf_counter()
        if opts.bits is not None and opts.model == DEFAULT_MODEL and opts.artifact is None:
            opts = dataclasses.replace(opts, model=bundled_with_bits(opts.bits))  # the bundled model with those bits
        self.opts = opts
        self.compiled_now = False
        self.runner: PatchRunner
        if opts.engine == "torch":
            from .torch_engine import torch_engine

            self.runner, self.info = torch_engine(opts.model, opts.bits, opts.tau, opts.threads)
        else:
            if opts.artifact is not None:
                self.runner = prebuilt_engine(opts)
                opts = dataclasses.replace(opts, patch=self.runner.patch, batch=opts.batch or self.runner.batch)
                make_grid(1, 1, opts.patch, opts.overlap)
                self.opts = opts
            else:
                self.runner, self.compiled_now = compiled_engine(opts, say)
            self.info = self.runner.info
            _check_against_model(self.info, opts)
        self.setup_seconds = time.perf_counter() - t0

    def upscale_file(self, src: str | Path, dst: str | Path, progress: Progress | None = None) -> dict[str, Any]:
        """Upscale one image file x4 and write it atomically; returns a report."""
        image, read_seconds = read_input(src, dst, self.opts.max_pixels, self.info.scale)
        return self.upscale_image(image, src, dst, progress, read_seconds)

    def upscale_rgb(self, rgb: np.ndarray, progress: Progress | None = None) -> tuple[np.ndarray, PatchwiseResult]:
        """Super-resolve one H x W x 3 float32 RGB image in [0, 1] (a decoded file or a video frame):
        the (sH x sW x 3 float32, not clipped) result and the patch-wise run's record."""
        opts = self.opts
        lr = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        result = run_patchwise(self.runner, lr, opts.patch, opts.overlap, opts.batch, progress)
        return result.image.transpose(1, 2, 0), result

    def upscale_image(
        self,
        image: LoadedImage,
        src: str | Path,
        dst: str | Path,
        progress: Progress | None = None,
        read_seconds: float = 0.0,
    ) -> dict[str, Any]:
        """Upscale an image already read from ``src`` x4 and write it to ``dst`` atomically."""
        opts = self.opts
        t_read = time.perf_counter()
        h, w = image.rgb.shape[:2]
        sr, result = self.upscale_rgb(image.rgb, progress)
        t_run = time.perf_counter()
        alpha = upscale_alpha(image.alpha, sr.shape[:2]) if image.alpha is not None else None
        write_image(dst, sr, alpha, gray=image.gray, bit_depth=image.bit_depth, info=image.info)
        t_end = time.perf_counter()
        clustering = result.clustering
        info = self.info
        bitops = info.image_bitops((h, w), opts.patch, opts.overlap, clustering, result.patch_bits)
        bitops_8 = info.uniform8_bitops((h, w), opts.patch, opts.overlap)
        return {
            "input": str(src),
            "output": str(dst),
            "model": info.name,
            "bits": info.label,
            "model_card": info.card,
            "engine": opts.engine,
            "compiled_now": self.compiled_now,
            "lr_size": [h, w],
            "hr_size": [int(sr.shape[0]), int(sr.shape[1])],
            "patches": result.grid.num_patches,
            "references": clustering.num_references if clustering is not None else result.grid.num_patches,
            "isolated_references": clustering.num_isolated if clustering is not None else 0,
            "queries": clustering.num_queries if clustering is not None else 0,
            "seconds": {
                "setup": round(self.setup_seconds, 4),
                "read": round(read_seconds, 4),
                **{k: round(v, 4) for k, v in result.seconds.items()},
                "write": round(t_end - t_run, 4),
                "total": round(read_seconds + t_end - t_read, 4),
            },
            "bitops": bitops.as_dict(),
            "bitops_8bit_only": bitops_8.as_dict(),
            "bitops_saving": round(1.0 - bitops.gbitops / bitops_8.gbitops, 4) if bitops_8.gbitops else 0.0,
        }


def upscale_file(
    src: str | Path,
    dst: str | Path,
    opts: UpscaleOptions,
    progress: Progress | None = None,
    say: Say | None = None,
) -> dict[str, Any]:
    """Upscale one image file x4 and write it atomically; returns a report (timings, patches, BitOPs).
    The input and the output path are checked before any engine loads, so a bad file or path fails
    at once. ``say`` receives the compile announcement and stages when the engine is compiled first."""
    # read before the engine loads, the memory checked at x4 (the presets' scale; a model may set another)
    image, read_seconds = read_input(src, dst, opts.max_pixels, 4)
    return Upscaler(opts, say).upscale_image(image, src, dst, progress, read_seconds)


def upscale_folder(
    src_dir: str | Path,
    dst_dir: str | Path,
    opts: UpscaleOptions,
    ext: str | None = None,
    on_image: Callable[[Path, dict[str, Any] | None, str | None], None] | None = None,
    progress: Progress | None = None,
    say: Say | None = None,
    recursive: bool = False,
    skip_existing: bool = False,
) -> dict[str, Any]:
    """Upscale every image in ``src_dir`` (``recursive``: and its subfolders, mirrored) into
    ``dst_dir`` with one engine (compiled once). Files that cannot be read or written are skipped and
    reported, not fatal; ``skip_existing`` leaves images whose output exists alone."""
    from .folders import make_parent, plan_folder

    plan = plan_folder(src_dir, dst_dir, ext, recursive, skip_existing)
    skipped = [{"input": str(src), "error": why} for src, why in plan.refused]
    for src, why in plan.refused:
        if on_image is not None:
            on_image(src, None, why)
    upscaler = Upscaler(opts, say)
    done = []
    for src, dst in plan.jobs:
        try:
            make_parent(dst)
            report = upscaler.upscale_file(src, dst, progress)
        except RefQSRError as err:
            skipped.append({"input": str(src), "error": str(err)})
            if on_image is not None:
                on_image(src, None, str(err))
            continue
        done.append(report)
        if on_image is not None:
            on_image(src, report, None)
    return {
        "images": done,
        "skipped": skipped,
        "existing": [str(p) for p in plan.existing],
        "engine": opts.engine,
        "compiled_now": upscaler.compiled_now,
    }
