"""Where models come from: the bundled ones (shipped inside the package) or a user's file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import RefQSRError

DEFAULT_MODEL = "default"
# The name `default` points at the bundled DDTB-RefQSR (8-4) SRResNet: the method this engine exists for.
DEFAULT_ALIAS = "srresnet_ddtb_refqsr84"


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
    """The bundled model that runs at ``bits`` ("8-4", "8", "32" or "fp"); the default one if it does."""
    from ..models.checkpoint import bits_label, read_config

    want = "32" if bits == "fp" else bits
    configs = {n: read_config(bundled_dir() / f"{n}.pt") for n in bundled_models()}
    arch = configs.get(DEFAULT_ALIAS, {}).get("arch")
    # The default first, then its architecture's siblings: `--bits 8` means the default network at
    # 8 bits, not whichever architecture sorts first.
    order = sorted(configs, key=lambda n: (n != DEFAULT_ALIAS, configs[n].get("arch") != arch, n))
    have = {n: bits_label(configs[n]) for n in order}
    for name in order:
        if have[name] == want:
            return name
    listing = ", ".join(f"{n} ({b})" for n, b in have.items()) or "none"
    raise RefQSRError(f"no bundled model runs at {bits} bits; bundled: {listing}")
