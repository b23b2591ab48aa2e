"""File and folder names as model cards record them: never an absolute path of the machine that trained.

Cards ship inside the package (``core/data/models/NAME.json``), so a path in one must mean the same
thing anywhere: a path relative to the repository (``data/sr/train``,
``core/data/models/srresnet_fp.pt``) or, for files elsewhere, as few trailing components as name it
(a data folder from its root's name on, a model file from its run folder on).
"""

from __future__ import annotations

from pathlib import Path

import refqsr_engine


def _relative(path: Path, base: Path) -> str | None:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return None


def card_path(path: str | Path | None, root: str | Path | None = None) -> str | None:
    """``path`` as a card records it. Relative paths stay as given (relative to where training ran,
    e.g. ``data/sr/train``). Absolute ones become relative to the current directory when under it,
    else to the folder holding the package (a bundled model: ``core/data/models/NAME.pt`` in a
    checkout), else to the parent of ``root`` when under ``root`` (the data folder: ``sr/train``),
    else the last two components (a checkpoint's run folder and name: ``fp/best.pt``)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    p = p.resolve()
    package_parent = Path(refqsr_engine.__file__).resolve().parent.parent  # a checkout, or site-packages
    bases = [Path.cwd().resolve(), package_parent]
    if root is not None:
        bases.append(Path(root).resolve().parent)
    for base in bases:
        rel = _relative(p, base)
        if rel is not None and rel != ".":
            return rel
    return Path(*p.parts[-2:]).as_posix()
