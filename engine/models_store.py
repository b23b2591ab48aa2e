"""Where models come from: the bundled ones (shipped inside the package) or a user's file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import RefQSRError

DEFAULT_MODEL = "default"
# The name `default` points at the bundled model that docs/models.md's rule picks from the model cards
# (the RefQSR model with the best mean PSNR-Y over the held-out sets); tests/test_default_rule.py checks it.
DEFAULT_ALIAS = "carn_ddtb_refqsr43"


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


def bundled_with_bits(bits: str) -> str:
    """The bundled model that runs at ``bits`` ("8-4", "8", "32" or "fp"); the default one if it
    does. Read from the model cards (no model is loaded)."""
    from .models_list import model_rows

    want = "32" if bits == "fp" else bits
    rows = {r["name"]: r for r in model_rows()}
    arch = rows.get(DEFAULT_ALIAS, {}).get("arch")
    # The default first, then its architecture's siblings: `--bits 8` means the default network at
    # 8 bits, not whichever architecture sorts first.
    order = sorted(rows, key=lambda n: (n != DEFAULT_ALIAS, rows[n]["arch"] != arch, n))
    for name in order:
        if rows[name]["bits"].replace("delta", "δ") == want.replace("delta", "δ"):
            return name
    listing = ", ".join(f"{n} ({rows[n]['bits']})" for n in order) or "none"
    raise RefQSRError(f"no bundled model runs at {bits} bits; bundled: {listing}")
