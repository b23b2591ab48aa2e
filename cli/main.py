"""The `refqsr-engine` command line. This file only parses options; the work is in plain functions."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..errors import RefQSRError


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors a user can cause into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (RefQSRError, ValueError) as err:
            click.echo(f"refqsr-engine: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("refqsr-engine: interrupted", err=True)
            sys.exit(130)

    return wrapper


MODEL_HELP = "Bundled model (list them with `refqsr-engine models`) or a model file (.pt)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refqsr-engine")
def main() -> None:
    """RefQSR: reference-based quantized x4 super-resolution.

    \b
    refqsr-engine upscale IN.png OUT.png        # the default model, compiled for this CPU on first use
    refqsr-engine models                        # the bundled models (--model NAME)
    """
    # SIGTERM ends the command like an exception: every atomic write and temp folder is cleaned up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@main.command()
@click.option(
    "--arch", default="srresnet", show_default=True, help="Network architecture (srresnet, carn, elan_light)."
)
@click.option("--hr-size", required=True, help="HR output size WIDTHxHEIGHT, e.g. 1280x720 (LR = HR/4).")
@click.option("--patch", type=int, default=96, show_default=True, help="Patch size in LR pixels; 0 = whole image.")
@click.option("--overlap", type=int, default=6, show_default=True, help="Patch overlap in LR pixels.")
@click.option(
    "--bits",
    default="8",
    show_default=True,
    help="32 (full precision), 8, 4, ... or RefQSR b_high-b_low, e.g. 8-4; a comma list prints a table.",
)
@click.option("--ref-fraction", type=float, default=None, help="RefQSR: share of patches that are references (0..1).")
@click.option("--grid", type=click.Choice(["both", "paper", "engine"]), default="both", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@user_errors
def bitops(
    arch: str, hr_size: str, patch: int, overlap: int, bits: str, ref_fraction: float | None, grid: str, as_json: bool
) -> None:
    """BitOPs and FQR of the quantized feature extraction (paper Tables II and VII)."""
    from ..engine.bitops_cli import bitops_rows, format_bitops

    rows = bitops_rows(arch, hr_size, patch, overlap, bits, ref_fraction, grid)
    click.echo(json.dumps(rows, indent=2) if as_json else format_bitops(rows))


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--model", default="default", show_default=True, help=MODEL_HELP)
@click.option("--patch", type=int, default=None, help="Patch size in LR pixels.  [default: 96, or the artifact's]")
@click.option("--overlap", type=int, default=6, show_default=True, help="Patch overlap in LR pixels.")
@click.option(
    "--batch",
    type=click.IntRange(1, 256),
    default=None,
    help="Patches per batch: 16 is ~10% faster on a CPU but needs ~1.7 GB more memory.  "
    "[default: 8, or the artifact's]",
)
@click.option("--tau", type=float, default=None, help="RefQSR cosine-similarity threshold (default: the model's).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads.")
@click.option(
    "--max-pixels", type=click.IntRange(1), default=64_000_000, show_default=True, help="Refuse larger inputs."
)
@click.option(
    "--engine",
    type=click.Choice(["torch", "tvm"]),
    default="tvm",
    show_default=True,
    help="PyTorch reference models, or the TVM-compiled engine (compiled on first use, cached).",
)
@click.option("--recompile", is_flag=True, help="tvm: compile again even if a cached artifact exists.")
@click.option(
    "--target",
    type=click.Choice(["llvm", "cuda"]),
    default="llvm",
    show_default=True,
    help="tvm: where the compiled engine runs.",
)
@click.option("--bits", default=None, help="Bundled model with these bits (8-4, 8, 32), or check --model's.")
@click.option(
    "--artifact",
    type=click.Path(path_type=str),
    default=None,
    help="tvm: run this artifact (made by `refqsr-engine compile`) instead of compiling --model.",
)
@click.option(
    "--float-math",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="tvm on AMX CPUs: fp32-grade float convs (bf16x3 tiles, ~3e-6 relative error) or bf16 "
    "(one bf16 product per MAC: faster, ~1e-3 relative error).",
)
@click.option(
    "--ext", default=None, help="Folder mode: output format (png, jpg, webp, tif, bmp); default: the input's."
)
@click.option("--recursive", "-r", is_flag=True, help="Folder mode: subfolders too, mirrored in DST.")
@click.option("--skip-existing", is_flag=True, help="Folder mode: leave images whose output exists alone.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Folder mode on a Ray cluster (ADDRESS, e.g. ray://head:10001 or auto; alone: a local one).",
)
@click.option("--workers", type=click.IntRange(1, 4096), default=2, show_default=True, help="--ray: actors.")
@click.option("--codec", default=None, help="Video: encoder (default libx264; libvpx-vp9 for .webm).")
@click.option("--crf", type=float, default=None, help="Video: constant quality (default 18 for x264, 32 for VP9).")
@click.option("--gpus-per-worker", type=click.FloatRange(0, 64), default=0.0, help="--ray: GPUs per actor.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def upscale(
    src: str,
    dst: str,
    model: str,
    patch: int | None,
    overlap: int,
    batch: int | None,
    tau: float | None,
    threads: int | None,
    max_pixels: int,
    engine: str,
    recompile: bool,
    target: str,
    bits: str | None,
    artifact: str | None,
    float_math: str,
    ext: str | None,
    recursive: bool,
    skip_existing: bool,
    ray_address: str | None,
    workers: int,
    gpus_per_worker: float,
    codec: str | None,
    crf: float | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Super-resolve SRC x4 into DST (format from DST's extension). With a folder as SRC, every
    image in it goes to the folder DST (one engine for all; unreadable files are skipped and listed;
    --ray spreads them over a Ray cluster)."""
    from pathlib import Path

    from tqdm import tqdm

    from ..engine.upscale import UpscaleOptions, upscale_file, upscale_folder

    if target != "llvm" and engine != "tvm":
        raise RefQSRError("--target applies to --engine tvm")
    if float_math != "fp32" and engine != "tvm":
        raise RefQSRError("--float-math applies to --engine tvm")
    opts = UpscaleOptions(
        model, patch, overlap, batch, tau, max_pixels, threads, engine, recompile, bits, target, float_math, artifact
    )
    if engine == "tvm":  # this process compiles nothing once its engine is loaded (or compiled first)
        from ..engine import tvm_runtime

        tvm_runtime.lean_imports = True
    bar = None
    no_bars = quiet or as_json or not sys.stderr.isatty()  # bars only for a person at a terminal

    def say(msg: str) -> None:  # the first-use compile: what, for which device, how long, where cached
        if not quiet:
            tqdm.write(f"refqsr-engine: {msg}", file=sys.stderr)

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if bar is None or bar.total != total or bar.n >= bar.total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit="patch", desc="patches", file=sys.stderr, disable=no_bars, leave=False)
        bar.update(n)

    from ..engine.video import is_video

    if is_video(src) or is_video(dst):
        if ext is not None or recursive or skip_existing:
            raise RefQSRError("--ext, --recursive and --skip-existing apply to folders of images, not videos")
        ray = (
            None if ray_address is None else (None if ray_address == "local" else ray_address, workers, gpus_per_worker)
        )
        report = _upscale_video(src, dst, opts, codec, crf, max_pixels, say, no_bars, ray)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        elif not quiet:
            r = report
            click.echo(
                f"wrote {dst} ({r['width_out']}x{r['height_out']}, {r['frames']} frames) "
                f"in {r['seconds']['total']:.1f} s"
            )
        return
    if codec is not None or crf is not None:
        raise RefQSRError("--codec and --crf apply to videos (SRC and DST .mp4, .mkv, .webm, .mov, ...)")
    folder_only = {"--recursive": recursive, "--skip-existing": skip_existing, "--ray": ray_address is not None}
    if not Path(src).is_dir() and any(folder_only.values()):
        raise RefQSRError(f"{', '.join(k for k, v in folder_only.items() if v)}: folder mode only (SRC a folder)")
    if ray_address is not None:
        from ..engine.distributed import upscale_folder_on_ray

        address = None if ray_address == "local" else ray_address
        report = upscale_folder_on_ray(src, dst, opts, address, workers, gpus_per_worker, ext, recursive, skip_existing)
        _folder_summary(report, dst, as_json, quiet)
        return
    if Path(src).is_dir():
        from ..engine.image_io import list_images

        total = len(list_images(Path(src), recursive, exclude=Path(dst)))
        images = tqdm(total=total, unit="image", desc="images", file=sys.stderr, disable=no_bars)

        def on_image(path, report, error) -> None:
            images.update(1)
            if error is not None and not as_json:
                tqdm.write(f"refqsr-engine: skipped {path.name}: {error}", file=sys.stderr)

        try:
            report = upscale_folder(src, dst, opts, ext, on_image, progress, say, recursive, skip_existing)
        finally:
            images.close()
            if bar is not None:
                bar.close()
        _folder_summary(report, dst, as_json, quiet)
        return
    if ext is not None:
        raise RefQSRError("--ext applies to folder mode (SRC a folder); for one file, DST's extension decides")
    try:
        report = upscale_file(src, dst, opts, progress, say)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(f"wrote {dst} ({report['hr_size'][1]}x{report['hr_size'][0]}) in {report['seconds']['total']:.1f} s")


def _upscale_video(src, dst, opts, codec, crf, max_pixels, say, no_bars, ray=None) -> dict[str, Any]:
    """A video through the engine: checked whole (streams, codec, output) before the engine loads;
    ``ray``: (address, workers, GPUs per worker) to upscale the frames on Ray actors."""
    from tqdm import tqdm

    from ..engine.upscale import Upscaler
    from ..engine.video import probe_video, upscale_video

    info = probe_video(src, dst, codec=codec, crf=crf)
    if info["width"] * info["height"] > max_pixels:
        raise RefQSRError(f"{src}: {info['width']}x{info['height']} frames exceed --max-pixels {max_pixels}")
    bar = tqdm(total=info["frames"], unit="frame", desc="frames", file=sys.stderr, disable=no_bars)
    if ray is not None:
        from ..engine.distributed import upscale_video_on_ray

        address, workers, gpus = ray
        try:
            return upscale_video_on_ray(
                src, dst, opts, address, workers, gpus, codec, crf, lambda n, total: bar.update(1), say
            )
        finally:
            bar.close()
    upscaler = Upscaler(opts, say)
    try:
        return upscale_video(
            src,
            dst,
            lambda rgb: upscaler.upscale_rgb(rgb)[0],
            codec=codec,
            crf=crf,
            progress=lambda n, total: bar.update(1),
            say=say,
        )
    finally:
        bar.close()


def _folder_summary(report: dict[str, Any], dst: str, as_json: bool, quiet: bool) -> None:
    """Print a folder run's report; exit status 1 when an image was skipped."""
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        existing = f", {len(report['existing'])} existed" if report.get("existing") else ""
        click.echo(f"wrote {len(report['images'])} images to {dst}; skipped {len(report['skipped'])}{existing}")
    if report["skipped"]:
        sys.exit(1)


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@user_errors
def models_cmd(as_json: bool) -> None:
    """List the bundled models: architecture, bits, quality, BitOPs and size, from their cards."""
    from ..engine.models_list import format_models, model_rows

    rows = model_rows()
    click.echo(json.dumps(rows, indent=2) if as_json else format_models(rows))


@main.command("cache")
@click.option(
    "--prune", is_flag=True, help="Remove stale entries (older refqsr-engine, TVM or model) and damaged ones."
)
@click.option("--clear", is_flag=True, help="Remove every compiled model from the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries (or the removed ones) as JSON.")
@user_errors
def cache_cmd(prune: bool, clear: bool, as_json: bool) -> None:
    """List the compiled models `upscale` keeps (REFQSR_ENGINE_CACHE, else ~/.cache/refqsr-engine),
    or remove the ones no run will use again."""
    from ..engine.cache_admin import cache_entries, format_entries, remove_entries

    if prune or clear:
        removed = remove_entries(everything=clear)
        freed = sum(r["bytes"] for r in removed) / 1e6
        click.echo(json.dumps(removed, indent=2) if as_json else f"removed {len(removed)} entries ({freed:.1f} MB)")
        return
    rows = cache_entries()
    click.echo(json.dumps(rows, indent=2) if as_json else format_entries(rows))


@main.command("compile")
@click.option("--model", default="default", show_default=True, help=MODEL_HELP)
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True)
@click.option(
    "--mcpu",
    default=None,
    help="llvm: CPU the code may assume (needs AVX2); default: this machine's "
    "CPU as LLVM names it; core-avx2 builds for any AVX2 CPU.",
)
@click.option(
    "--arch",
    type=click.Choice(["sm_80", "sm_86", "sm_89", "sm_90"]),
    default="sm_80",
    show_default=True,
    help="cuda: GPU architecture.",
)
@click.option("--bits", default=None, help="Check the model's bits (e.g. 8-4 for RefQSR, 8, 32).")
@click.option("--patch", type=int, default=96, show_default=True, help="Patch size in LR pixels (multiple of 3).")
@click.option("--batch", type=click.IntRange(1, 256), default=16, show_default=True, help="Patches per compiled batch.")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="llvm: cores to parallelise for.")
@click.option(
    "--float-math",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="llvm on AMX CPUs: fp32-grade float convs (bf16x3 tiles, ~3e-6 relative error) or bf16 "
    "(one bf16 product per MAC: faster, ~1e-3 relative error).",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Graph builds run at once in worker processes (each build is single-threaded).",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Artifact directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the compile report (times per stage).")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
@user_errors
def compile_cmd(
    model: str,
    target: str,
    mcpu: str | None,
    arch: str,
    bits: str | None,
    patch: int,
    batch: int,
    threads: int | None,
    float_math: str,
    jobs: int,
    out: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Compile a model into a self-describing artifact (libraries + manifest)."""
    from ..engine.compiler.options import CompileOptions, check_shapes, host_mcpu

    check_shapes(patch, batch)  # before host_mcpu and the compiler load (seconds of imports)
    from ..engine.compiler.compile_model import compile_model

    def say(msg: str) -> None:
        if not quiet and not as_json:
            click.echo(f"[compile] {msg}", err=True)

    opts = CompileOptions(model, target, mcpu or host_mcpu(), arch, bits, patch, batch, threads, jobs, float_math)
    report = compile_model(opts, out, say)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        click.echo(f"wrote {out} in {report['seconds']['total']:.1f} s")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmarks: bench [all|latency|quality] [OPTIONS]. `all` (the default) writes latency, peak
    memory, BitOPs/quality tables, plots and the assignment picture into benchmarks/results;
    `refqsr-engine bench STEP --help` lists a step's options."""
    from ..benchmarks.dispatch import run

    sys.exit(run(list(args)))  # SIGTERM (see main) still stops its measuring child and removes its work folder


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option(
    "--model",
    default="default",
    show_default=True,
    help="RefQSR model or ClustBlock file (its ClustBlock and tau); default: the bundled ClustBlock.",
)
@click.option("--patch", type=int, default=96, show_default=True, help="Patch size in LR pixels.")
@click.option("--overlap", type=int, default=6, show_default=True, help="Patch overlap in LR pixels.")
@click.option("--tau", type=float, default=None, help="Cosine-similarity threshold (default: the model's, else 0.5).")
@click.option(
    "--max-pixels", type=click.IntRange(1), default=64_000_000, show_default=True, help="Refuse larger inputs."
)
@click.option("--json", "as_json", is_flag=True, help="Print the assignment summary as JSON.")
@user_errors
def explain(
    src: str, dst: str, model: str, patch: int, overlap: int, tau: float | None, max_pixels: int, as_json: bool
) -> None:
    """Draw how SRC's patches are clustered (paper Fig. 5): colour per reference group,
    references marked R, isolated references grey and marked I; written atomically to DST."""
    from ..engine.explain import explain_file

    info = explain_file(src, dst, model, patch, overlap, tau, max_pixels)
    if as_json:
        click.echo(json.dumps({k: v for k, v in info.items() if k != "cells"}, indent=2))
    else:
        click.echo(
            f"wrote {dst} ({info['picture_size'][1]}x{info['picture_size'][0]}): {info['patches']} patches, "
            f"{info['references']} references ({info['isolated_references']} isolated), {info['queries']} queries, "
            f"{info['groups']} groups, tau {info['tau']:g}"
        )


def _training_group() -> click.Group:
    """`refqsr-engine train fp|qat|refqsr|clust`: the training commands (imported lazily: torch
    training code stays off the start-up path of upscale)."""
    from ..training.loop import make_command
    from ..training.train_clust import main as clust

    group = click.Group("train", help="Train models: fp, qat (fixed bits), refqsr (b_high-b_low), clust (ClustBlock).")
    for task in ("fp", "qat", "refqsr"):
        group.add_command(make_command(task))
    group.add_command(clust, name="clust")
    return group


class _LazyTrain(click.Group):
    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _training_group().get_command(ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["fp", "qat", "refqsr", "clust"]


main.add_command(
    _LazyTrain("train", help="Train models: fp, qat (fixed bits), refqsr (b_high-b_low), clust (ClustBlock).")
)


if __name__ == "__main__":
    main()
