"""The bundle `prepare` writes and `run` unpacks, and the import site `run` builds from it.

``OUT/bundle.tar.xz`` holds ``artifacts/NAME/`` (CUDA artifacts without their ONNX copies),
``kernels/`` (standalone integer conv kernels with operands and expected outputs), ``lib/`` (TVM's
runtime libraries and the CUDA runtime they link), ``wheels/`` (the cp312 ``apache-tvm-ffi`` wheel);
``OUT/bundle.json`` describes it. Stdlib only: the GPU host has no TVM.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

BUNDLE = "bundle.tar.xz"
DESCRIPTION = "bundle.json"
#: the working tree plus the bundle must fit what is carried to the GPU host
CARRY_LIMIT = 64 << 20
#: repository folder -> installed package (setup.cfg's package_dir)
PACKAGES = {
    "engine": "engine",
    "kernels": "kernels",
    "export": "export",
    "benchmarks": "benchmarks",
    "models": "models",
    "training": "training",
    "metrics": "metrics",
    "pipeline": "pipeline",
    "cli": "cli",
}


class CheckError(Exception):
    """A condition the check reports in one line (no GPU, a bundle that does not fit, ...)."""


def unpack(bundle_dir: Path, into: Path) -> dict:
    """Unpack ``bundle_dir``'s bundle into ``into``; returns its description."""
    archive, desc = bundle_dir / BUNDLE, bundle_dir / DESCRIPTION
    if not archive.is_file() or not desc.is_file():
        raise CheckError(f"{bundle_dir} holds no prepared bundle: run `python -m gpucheck prepare` first")
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(into, filter="data")
    return json.loads(desc.read_text())


def link_package(repo: Path, site: Path) -> None:
    """``site/refqsr_engine``: the package made of the repository's folders as setup.cfg installs
    them (the root's modules copied, the subpackages and the bundled data linked)."""
    pkg = site / "refqsr_engine"
    pkg.mkdir(parents=True, exist_ok=True)
    for f in (repo / "core").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    if (repo / "core" / "data").is_dir() and not (pkg / "data").exists():
        os.symlink(repo / "core" / "data", pkg / "data")
    for folder, name in PACKAGES.items():
        if not (pkg / name).exists():
            os.symlink(repo / folder, pkg / name)


def build_site(repo: Path, unpacked: Path, site: Path) -> None:
    """An import folder for this process: ``refqsr_engine`` made of the repository's folders (as
    installed, without installing), ``tvm_ffi`` from the bundled wheel, and the metadata of the
    TVM version the artifacts were built with (its runtime library is the bundled one)."""
    link_package(repo, site)
    wheels = sorted((unpacked / "wheels").glob("apache_tvm_ffi-*.whl"))
    if not wheels:
        raise CheckError("the bundle has no apache-tvm-ffi wheel")
    with zipfile.ZipFile(wheels[0]) as whl:
        whl.extractall(site)
    desc = json.loads((unpacked / "versions.json").read_text())
    meta = site / f"apache_tvm-{desc['apache-tvm']}.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: apache-tvm\nVersion: {desc['apache-tvm']}\n")


def activate(site: Path, unpacked: Path) -> None:
    """Make this process import from ``site`` and load TVM's runtime from the bundle."""
    sys.path.insert(0, str(site))
    os.environ["REFQSR_ENGINE_TVM_LIB"] = str(unpacked / "lib")
