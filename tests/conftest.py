"""Shared test set-up: the helper modules next to the tests are importable (importlib import mode
does not put this folder on sys.path)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
