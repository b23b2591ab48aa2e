"""Import layering of the package, checked on the source: every ``import`` and ``from ... import``
statement (top-level or inside a function), relative imports resolved to absolute module names
(folder X installs as ``refqsr_engine.X``; ``core/`` is ``refqsr_engine`` itself).

* ``kernels/`` is a leaf layer: TVM and numpy only, no torch / ONNX and none of the layers above it.
* ``models/`` (the PyTorch networks) do not import the engine, training or the benchmarks.
* ``pipeline/`` (the patch-wise algorithm both engines run) needs numpy only.
* No two folders import each other, even inside functions (no hidden package cycles); ``cli/`` is
  the top: nothing imports it.
* The runtime modules (what ``upscale`` runs from a compiled artifact) import no torch, no ONNX and
  no models, training or exporter code.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "refqsr_engine"
ROOT_FOLDER = "core"  # installs as refqsr_engine itself

# What `upscale` loads to run an artifact: none of it may need PyTorch, ONNX or the PyTorch models.
# (engine/upscale.py imports engine/torch_engine.py and the compiler only inside the functions
# that need them; test_upscale_imports.py checks what a cached-artifact run really loads.)
RUNTIME_MODULES = [
    "engine/artifact.py",
    "engine/compile_time.py",
    "engine/host_target.py",
    "engine/image_io.py",
    "engine/models_list.py",
    "engine/models_store.py",
    "engine/runtime.py",
    "engine/tvm_runtime.py",
    "engine/upscale.py",
]

KERNELS_FORBIDDEN = (
    "torch",
    "onnx",
    "onnxruntime",
    f"{PACKAGE}.models",
    f"{PACKAGE}.engine",
    f"{PACKAGE}.training",
    f"{PACKAGE}.benchmarks",
    f"{PACKAGE}.export",
)
MODELS_FORBIDDEN = (f"{PACKAGE}.engine", f"{PACKAGE}.training", f"{PACKAGE}.benchmarks", f"{PACKAGE}.cli")
# the patch-wise algorithm both engines share: numpy, nothing of the layers that use it
PIPELINE_FORBIDDEN = (*KERNELS_FORBIDDEN, "tvm", "tvm_ffi", f"{PACKAGE}.metrics", f"{PACKAGE}.cli")
RUNTIME_FORBIDDEN = ("torch", "onnx", "onnxruntime", f"{PACKAGE}.models", f"{PACKAGE}.training", f"{PACKAGE}.export")


@dataclass(frozen=True)
class Import:
    """One import statement: ``module`` is the absolute module named after ``import`` / ``from``;
    ``names`` are the names a ``from`` statement takes from it (each may be a submodule)."""

    path: str
    line: int
    module: str
    names: tuple[str, ...] = ()


def module_name(rel: str) -> str:
    """Installed module name of a source file given relative to the repository root."""
    parts = list(PurePosixPath(rel).with_suffix("").parts)
    top = PACKAGE if parts[0] == ROOT_FOLDER else f"{PACKAGE}.{parts[0]}"
    rest = parts[1:]
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([top, *rest])


def imports_of(source: str, rel: str) -> list[Import]:
    """Every import statement of ``source`` (the file ``rel``), at any depth, in line order."""
    module = module_name(rel)
    package = module if PurePosixPath(rel).name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level > len(parts):
                    raise ValueError(f"{rel}:{node.lineno}: relative import beyond the package {PACKAGE}")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            names = tuple(alias.name for alias in node.names if alias.name != "*")
            found.append(Import(rel, node.lineno, target, names))
    return sorted(found, key=lambda imp: imp.line)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(imports: list[Import], forbidden: tuple[str, ...]) -> list[str]:
    """``path:line: imports module`` for each import of a forbidden module or of anything below it
    (``from pkg import name`` counts as importing ``pkg.name`` where ``pkg`` itself is allowed)."""
    out = []
    for imp in imports:
        candidates = [imp.module] if any(_under(imp.module, f) for f in forbidden) else []
        candidates = candidates or [f"{imp.module}.{name}" for name in imp.names]
        for mod in candidates:
            hit = next((f for f in forbidden if _under(mod, f)), None)
            if hit:
                out.append(f"{imp.path}:{imp.line}: imports {mod} (no {hit} here)")
    return out


def source_files(folder: str) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py"))


def check_files(files: list[str], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for rel in files:
        out += violations(imports_of((ROOT / rel).read_text(encoding="utf-8"), rel), forbidden)
    return out


def runtime_files() -> list[str]:
    files = list(RUNTIME_MODULES)
    if (ROOT / "pipeline").is_dir():
        files += [f for f in source_files("pipeline") if f not in files]
    return files


# ----------------------------------------------------------------------------------------------
# the rules


def test_kernels_are_a_leaf_layer():
    files = source_files("kernels")
    assert "kernels/refer_kernels.py" in files and "kernels/cluster_kernels.py" in files
    bad = check_files(files, KERNELS_FORBIDDEN)
    assert not bad, "kernels/ imports torch, ONNX or a layer above it:\n" + "\n".join(bad)


def test_models_do_not_import_engine_training_or_benchmarks():
    files = source_files("models")
    assert "models/matching.py" in files
    bad = check_files(files, MODELS_FORBIDDEN)
    assert not bad, "models/ imports a layer above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", runtime_files())
def test_runtime_module_needs_no_torch_onnx_or_models(rel):
    if not (ROOT / rel).is_file():
        pytest.skip(f"{rel} does not exist")
    bad = check_files([rel], RUNTIME_FORBIDDEN)
    assert not bad, "a runtime module imports torch, ONNX or model/training/export code:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------
# the checker itself

PLANTED = """\
import numpy as np
import tvm
from . import tir_build
from ..errors import RefQSRError
from .. import kernels
import onnxsim_like
import torch.nn.functional as F


def late():
    from ..models.matching import POOL
    import onnxruntime as ort
    from .. import engine, errors
    from refqsr_engine import training


class K:
    def method(self):
        if True:
            from ..kernels.tir_build import build_kernel
            import onnx
"""


def test_module_names_and_relative_imports():
    assert module_name("core/errors.py") == "refqsr_engine.errors"
    assert module_name("core/__init__.py") == "refqsr_engine"
    assert module_name("kernels/refer_kernels.py") == "refqsr_engine.kernels.refer_kernels"
    assert module_name("engine/compiler/__init__.py") == "refqsr_engine.engine.compiler"
    got = {
        (i.line, i.module)
        for i in imports_of("from ...kernels import amx\nfrom . import build\n", "engine/compiler/x.py")
    }
    assert got == {(1, "refqsr_engine.kernels"), (2, "refqsr_engine.engine.compiler")}
    got = {i.module for i in imports_of("from . import a\nfrom .b import c\n", "kernels/__init__.py")}
    assert got == {"refqsr_engine.kernels", "refqsr_engine.kernels.b"}
    with pytest.raises(ValueError, match="beyond"):
        imports_of("from ... import x\n", "kernels/k.py")


def test_checker_catches_planted_violations():
    """Top-level, function-local and nested imports, relative and absolute, ``from pkg import
    module``; names that merely start like a forbidden one (onnxsim_like) are not flagged."""
    bad = violations(imports_of(PLANTED, "kernels/planted.py"), KERNELS_FORBIDDEN)
    assert bad == [
        "kernels/planted.py:7: imports torch.nn.functional (no torch here)",
        "kernels/planted.py:11: imports refqsr_engine.models.matching (no refqsr_engine.models here)",
        "kernels/planted.py:12: imports onnxruntime (no onnxruntime here)",
        "kernels/planted.py:13: imports refqsr_engine.engine (no refqsr_engine.engine here)",
        "kernels/planted.py:14: imports refqsr_engine.training (no refqsr_engine.training here)",
        "kernels/planted.py:21: imports onnx (no onnx here)",
    ]
    # the same source is clean under a rule that forbids none of it
    assert violations(imports_of(PLANTED, "kernels/planted.py"), ("scipy",)) == []


def test_pipeline_is_numpy_only():
    bad = check_files(source_files("pipeline"), PIPELINE_FORBIDDEN)
    assert not bad, "pipeline/ imports a layer above it:\n" + "\n".join(bad)


def package_graph() -> dict[str, dict[str, str]]:
    """folder -> {folder it imports: one ``path:line`` that does}, over every source file."""
    folders = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    folders = [f for f in folders if f not in ("tests", "research")]
    graph: dict[str, dict[str, str]] = {f: {} for f in folders}
    owner = {(PACKAGE if f == ROOT_FOLDER else f"{PACKAGE}.{f}"): f for f in folders}
    for folder in folders:
        for rel in source_files(folder):
            if folder == ROOT_FOLDER and "/" in rel[len(ROOT_FOLDER) + 1 :]:
                continue
            for imp in imports_of((ROOT / rel).read_text(encoding="utf-8"), rel):
                for mod in [imp.module, *(f"{imp.module}.{n}" for n in imp.names)]:
                    target = next((owner[p] for p in sorted(owner, key=len, reverse=True) if _under(mod, p)), None)
                    if target and target not in (folder, ROOT_FOLDER):
                        graph[folder].setdefault(target, f"{imp.path}:{imp.line}")
    return graph


def test_no_two_folders_import_each_other_and_nothing_imports_the_cli():
    graph = package_graph()
    assert "engine" in graph and "cli" in graph
    cycles = [
        f"{a} <-> {b} ({graph[a][b]}; {graph[b][a]})"
        for a in graph
        for b in graph[a]
        if a < b and a in graph.get(b, {})
    ]
    assert not cycles, "package import cycles:\n" + "\n".join(cycles)
    users = [f"{f} ({where})" for f, deps in graph.items() for t, where in deps.items() if t == "cli"]
    assert not users, "the CLI is imported by: " + ", ".join(users)
