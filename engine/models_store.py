"""Where models come from: the bundled ones (shipped inside the package) or a user's file."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import RefQSRError

DEFAULT_MODEL = "default"
# The name `default` points at the best bundled model; later issues ship RefQSR ones.
DEFAULT_ALIAS = "srresnet_fp"


def bundled_dir() -> Path:
    return Path(str(resources.files("refqsr_engine"))) / "data" / "models"


def bundled_models() -> list[str]:
    folder = bundled_dir()
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def resolve_model(name_or_path: str) -> Path:
    """A bundled model name ('default', 'srresnet_fp', ...) or a path to a model file."""
    name = DEFAULT_ALIAS if name_or_path == DEFAULT_MODEL else name_or_path
    candidate = bundled_dir() / f"{name}.pt"
    if candidate.is_file():
        return candidate
    path = Path(name_or_path)
    if path.is_file():
        return path
    known = ", ".join([DEFAULT_MODEL] + bundled_models()) or "none bundled"
    raise RefQSRError(f"model {name_or_path!r} is neither a bundled model ({known}) nor a file")
