"""`refqsr-engine upscale`: read, tile, run the patches on an engine, merge, write.

Engines: ``torch`` (the PyTorch reference models) or ``tvm`` (the compiled artifact of the same
model, compiled for this host on first use and cached, see :func:`compiled_engine`). Both go
through the one patch-wise algorithm of :mod:`refqsr_engine.models.patchwise`."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RefQSRError
from ..models.bitops import BitOpsReport, PatchBits, count_bitops, patch_bits_of_columns
from ..models.checkpoint import bits_label, load_model, model_config
from ..models.clustblock import Clustering
from ..models.patchwise import PatchRunner, TorchRunner, run_patchwise
from ..models.qconv import FP, BitSpec
from ..models.quant_cadyq import SCHEME as CADYQ
from ..models.quant_cadyq import Delta
from ..models.refqsr import RefQSR
from .image_io import (
    DEFAULT_MAX_PIXELS,
    list_images,
    output_format,
    output_path_for,
    read_image,
    upscale_alpha,
    write_image,
)
from .models_store import DEFAULT_MODEL, bundled_with_bits, resolve_model
from .tiling import make_grid


@dataclass
class UpscaleOptions:
    model: str = DEFAULT_MODEL
    patch: int = 96
    overlap: int = 6
    # 8, not 16: a 16-patch batch's HR intermediates (upsampler, tail: 16 x 64 x 384 x 384 fp32 =
    # 600 MB each) took an 8K upscale to 3.3 GiB beyond its output; 8 stays under 2 GiB
    batch: int = 8
    tau: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None
    engine: str = "tvm"  # "tvm" (the compiled engine) | "torch" (the PyTorch reference)
    recompile: bool = False  # tvm: compile again even when a cached artifact exists
    bits: str | None = None  # "8-4", "8", "32": pick the bundled model with these bits / check the model's
    target: str = "llvm"  # tvm: "llvm" (this CPU) or "cuda"
    float_math: str = "fp32"  # tvm on AMX CPUs: "fp32" (bf16x3 float convs) or "bf16" (faster, ~1e-3 relative)


def compiled_engine(
    opts: UpscaleOptions, say: Callable[[str], None] | None = None, refqsr: bool = True
) -> tuple[Any, bool]:
    """The cached compiled artifact of ``opts.model`` for this host (compiled now if missing or
    ``opts.recompile``), loaded; returns (CompiledModel, compiled_now). A compile is announced
    through ``say`` (what, for which device, about how long, where it is cached), then its stages."""
    from . import compile_time
    from .artifact import cache_dir, cache_key, cache_lock
    from .compiler.compile_model import compile_stages
    from .compiler.options import CompileOptions, artifact_cache_parts
    from .runtime import CompiledModel

    if opts.target == "cuda":
        import tvm

        if not tvm.cuda().exist:
            raise RefQSRError("--target cuda: no CUDA GPU is visible to TVM on this machine")
    copts = CompileOptions(
        model=opts.model,
        target=opts.target,
        bits=opts.bits,
        patch=opts.patch,
        batch=opts.batch,
        threads=opts.threads,
        float_math=opts.float_math,
    )
    key = cache_key(**artifact_cache_parts(copts))
    with cache_lock(key) as entry:
        fresh = opts.recompile or not (entry / "manifest.json").is_file()
        if fresh:
            from .compiler.compile_model import compile_model  # the kernel generators: only when compiling

            stages = compile_stages(3 if refqsr else 1, copts.batch, copts.target, refqsr)
            if say is not None:
                device = f"this CPU ({copts.mcpu})" if copts.target == "llvm" else f"the GPU ({copts.arch})"
                why = "--recompile" if opts.recompile else "first use"
                expected = compile_time.describe(compile_time.estimate_seconds(copts.target, stages))
                name = resolve_model(opts.model).stem
                say(f"compiling {name} for {device} ({why}, {expected}; cached in {cache_dir()})")
            t0 = time.perf_counter()
            compile_model(copts, entry, say)
            compile_time.record(copts.target, stages, time.perf_counter() - t0)
        return CompiledModel.load(entry, target=copts.target_dict(), tau=opts.tau), fresh


def is_dynamic(model: torch.nn.Module) -> bool:
    """A δ model: CADyQ/CABM bits chosen per patch and layer (an SR network or δ-RefQSR)."""
    net = model.backbone if isinstance(model, RefQSR) else model
    return getattr(net, "scheme", None) == CADYQ


def model_bits(model: torch.nn.Module) -> BitSpec | Delta:
    """The bits a model runs at: its single trained activation width, FP for RefQSR (it sets its
    own bits per path), or δ (``Delta``) for a CADyQ/CABM network."""
    if is_dynamic(model):
        return FP if isinstance(model, RefQSR) else Delta()
    if isinstance(model, RefQSR) or getattr(model, "scheme", None) is None:
        return FP
    bits = model.act_bits()
    if len(bits) != 1:
        raise RefQSRError(f"model has several activation bit widths {bits}; it is not a fixed-precision model")
    return BitSpec.uniform(bits[0])


def bitops_setting(model: torch.nn.Module) -> tuple[str, str, dict[str, int | str]]:
    """What ``count_bitops`` needs of a model: its architecture, its bits ("8-4", "8", "32",
    "delta", "delta-3") and its network sizes."""
    if isinstance(model, RefQSR):
        high = "delta" if model.dynamic else str(model.b_high)
        return model.backbone.arch, f"{high}-{model.b_low}", model.cost_sizes()
    return model.arch, "delta" if is_dynamic(model) else str(model_bits(model).act), model.sizes()


def model_bitops(
    model: torch.nn.Module,
    lr_size: tuple[int, int],
    patch: int,
    overlap: int,
    clustering: Clustering | None = None,
    grid: str = "engine",
    patch_bits: list[PatchBits] | None = None,
) -> BitOpsReport:
    """BitOPs/FQR of running ``model`` on one LR image; RefQSR needs that image's clustering, δ
    models the bits each patch ran at (``PatchwiseResult.patch_bits``)."""
    arch, setting, sizes = bitops_setting(model)
    if is_dynamic(model) and patch_bits is None:
        raise ValueError("δ models' BitOPs need the bits each patch ran at")
    if isinstance(model, RefQSR):
        if clustering is None:
            raise ValueError("RefQSR BitOPs need the image's reference assignment")
        return count_bitops(
            arch,
            lr_size,
            setting,
            patch,
            overlap,
            grid,
            clustering.is_reference.tolist(),
            clustering.reference_of.tolist(),
            patch_bits=patch_bits,
            **sizes,
        )
    return count_bitops(arch, lr_size, setting, patch, overlap, grid, patch_bits=patch_bits, **sizes)


def uniform8_bitops(
    model: torch.nn.Module, lr_size: tuple[int, int], patch: int, overlap: int, grid: str = "engine"
) -> BitOpsReport:
    """The BitOPs of the model's network (RefQSR: its backbone) at 8 bits everywhere: what the
    model's savings are measured against."""
    net = model.backbone if isinstance(model, RefQSR) else model
    return count_bitops(net.arch, lr_size, "8", patch, overlap, grid, **net.sizes())


class Upscaler:
    """One model on one engine, loaded (and for ``tvm`` compiled or taken from the cache) once,
    then used for any number of images."""

    def __init__(self, opts: UpscaleOptions, say: Callable[[str], None] | None = None) -> None:
        if opts.engine not in ("torch", "tvm"):
            raise RefQSRError(f"unknown engine {opts.engine!r}: choose torch or tvm")
        make_grid(1, 1, opts.patch, opts.overlap)  # bad patch/overlap fail here, not once per image
        if opts.threads:
            torch.set_num_threads(opts.threads)
            os.environ["TVM_NUM_THREADS"] = str(opts.threads)  # read when TVM's thread pool starts
        t0 = time.perf_counter()
        if opts.bits is not None and opts.model == DEFAULT_MODEL:  # the bundled model with those bits
            opts = dataclasses.replace(opts, model=bundled_with_bits(opts.bits))
        self.opts = opts
        self.model, self.card = load_model(resolve_model(opts.model))
        if opts.bits is not None and bits_label(model_config(self.model)) != opts.bits.replace("fp", "32"):
            raise RefQSRError(f"{opts.model} runs at {bits_label(model_config(self.model))} bits, not {opts.bits}")
        if opts.tau is not None:
            if not isinstance(self.model, RefQSR):
                raise RefQSRError("--tau applies to RefQSR models only")
            self.model.tau = opts.tau
        self.bits = model_bits(self.model)
        self.compiled_now = False
        self.runner: PatchRunner
        if opts.engine == "tvm":
            self.runner, self.compiled_now = compiled_engine(opts, say, refqsr=isinstance(self.model, RefQSR))
            if is_dynamic(self.model):  # keep each call's chosen bits for the BitOPs report
                model, names = self.model, self.runner.dynamic_convs
                weight = (model.high if isinstance(model, RefQSR) else self.bits).weight
                self.runner.set_bits_decoder(
                    lambda bits, path: patch_bits_of_columns(model, names[path], bits, weight, path)
                )
        else:
            self.runner = TorchRunner(self.model, self.bits)
        self.setup_seconds = time.perf_counter() - t0

    def upscale_file(
        self, src: str | Path, dst: str | Path, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Upscale one image file x4 and write it atomically; returns a report."""
        opts = self.opts
        t0 = time.perf_counter()
        output_format(dst)
        image = read_image(src, opts.max_pixels)
        t_read = time.perf_counter()
        lr = np.ascontiguousarray(image.rgb.transpose(2, 0, 1))  # float32 in [0, 1], 8- or 16-bit source
        h, w = image.rgb.shape[:2]
        result = run_patchwise(self.runner, lr, opts.patch, opts.overlap, opts.batch, progress)
        t_run = time.perf_counter()
        sr = result.image.transpose(1, 2, 0)  # float; write_image clips and quantizes to the output depth
        alpha = upscale_alpha(image.alpha, sr.shape[:2]) if image.alpha is not None else None
        write_image(dst, sr, alpha, gray=image.gray, bit_depth=image.bit_depth, info=image.info)
        t_end = time.perf_counter()
        clustering = result.clustering
        bitops = model_bitops(self.model, (h, w), opts.patch, opts.overlap, clustering, patch_bits=result.patch_bits)
        bitops_8 = uniform8_bitops(self.model, (h, w), opts.patch, opts.overlap)
        return {
            "input": str(src),
            "output": str(dst),
            "model": opts.model,
            "model_card": self.card,
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
                "read": round(t_read - t0, 4),
                **{k: round(v, 4) for k, v in result.seconds.items()},
                "write": round(t_end - t_run, 4),
                "total": round(t_end - t0, 4),
            },
            "bitops": bitops.as_dict(),
            "bitops_8bit_only": bitops_8.as_dict(),
            "bitops_saving": round(1.0 - bitops.gbitops / bitops_8.gbitops, 4) if bitops_8.gbitops else 0.0,
        }


def upscale_file(
    src: str | Path,
    dst: str | Path,
    opts: UpscaleOptions,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Upscale one image file x4 and write it atomically; returns a report (timings, patches, BitOPs).
    ``say`` receives the compile announcement and stages when the engine is compiled first."""
    return Upscaler(opts, say).upscale_file(src, dst, progress)


def upscale_folder(
    src_dir: str | Path,
    dst_dir: str | Path,
    opts: UpscaleOptions,
    ext: str | None = None,
    on_image: Callable[[Path, dict[str, Any] | None, str | None], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Upscale every image in ``src_dir`` into ``dst_dir`` with one engine (compiled once). Files
    that cannot be read or written are skipped and reported, not fatal."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    images = list_images(src_dir)
    if not images:
        raise RefQSRError(f"no images in {src_dir}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    upscaler = Upscaler(opts, say)
    done, skipped = [], []
    for src in images:
        try:
            report = upscaler.upscale_file(src, output_path_for(src, dst_dir, ext), progress)
        except RefQSRError as err:
            skipped.append({"input": str(src), "error": str(err)})
            if on_image is not None:
                on_image(src, None, str(err))
            continue
        done.append(report)
        if on_image is not None:
            on_image(src, report, None)
    return {"images": done, "skipped": skipped, "engine": opts.engine, "compiled_now": upscaler.compiled_now}
