"""Atomic file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give ``tmp`` the permissions a normally created file would have (mkstemp makes 0600),
    then rename it over ``path`` in one step: readers see the old file or the new one, never a part."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_atomic(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def portable_paths(text: str) -> str:
    """Report text without the paths of the machine that wrote it: the working folder's prefix
    dropped (paths become relative to where the command ran), the home folder written ``~``."""
    cwd, home = os.getcwd().rstrip(os.sep) + os.sep, str(Path.home()).rstrip(os.sep) + os.sep
    text = text.replace(cwd, "")
    return text.replace(home, "~" + os.sep) if home != os.sep else text


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a report file atomically, its machine paths made portable (:func:`portable_paths`)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(portable_paths(text)))


def owned_temp_prefix(name: str) -> str:
    """A temp-file prefix that names this process (``NAME.PID.tmp-``), so that a later run can
    tell a leftover of a killed process (SIGKILL runs no cleanup) from a live one's file."""
    return f"{name}.{os.getpid()}.tmp-"


def remove_stale_temps(folder: str | Path, name: str) -> None:
    """Remove ``NAME.PID.tmp-*`` entries in ``folder`` whose process no longer exists."""
    import shutil

    try:
        entries = list(Path(folder).glob(f"{name}.*.tmp-*"))
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(name) + 1 :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
