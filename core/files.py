"""Publishing a finished temp file: the last step of every atomic write in the project."""

from __future__ import annotations

import os
from pathlib import Path


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give ``tmp`` the permissions a normally created file would have (mkstemp makes 0600),
    then rename it over ``path`` in one step: readers see the old file or the new one, never a part."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
