"""Folder mode: which images of a source folder go where in the output folder (one plan, used by
the single-process run and by the Ray run alike)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RefQSRError
from .image_io import list_images, output_path_for


@dataclass
class FolderPlan:
    """``jobs``: (input, output) pairs to run; ``existing``: inputs whose output exists already
    (``--skip-existing``); ``refused``: inputs that cannot be written (with the reason)."""

    jobs: list[tuple[Path, Path]] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def plan_folder(
    src_dir: str | Path,
    dst_dir: str | Path,
    ext: str | None = None,
    recursive: bool = False,
    skip_existing: bool = False,
) -> FolderPlan:
    """Every image of ``src_dir`` (and, ``recursive``, of its subfolders: the tree is mirrored in
    ``dst_dir``) with the output path it gets. Checks the output folder first."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if dst_dir.exists() and not dst_dir.is_dir():
        raise RefQSRError(f"output {dst_dir} is a file: give a folder for a folder of images")
    images = list_images(src_dir, recursive, exclude=dst_dir)
    if not images:
        raise RefQSRError(f"no images in {src_dir}" + ("" if recursive else " (--recursive reads subfolders)"))
    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RefQSRError(f"cannot create the output folder {dst_dir}: {err.strerror}") from None
    if not os.access(dst_dir, os.W_OK | os.X_OK):
        raise RefQSRError(f"output folder is not writable: {dst_dir}")
    plan = FolderPlan()
    for src in images:
        try:
            dst = output_path_for(src, dst_dir / src.parent.relative_to(src_dir), ext)
        except RefQSRError as err:
            plan.refused.append((src, str(err)))
            continue
        if skip_existing and dst.exists():
            plan.existing.append(src)
        else:
            plan.jobs.append((src, dst))
    return plan


def make_parent(dst: Path) -> None:
    """Create the (mirrored) folder of one output."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RefQSRError(f"cannot create {dst.parent}: {err.strerror}") from None
