"""What a compile is asked for (:class:`CompileOptions`) and what names a cached artifact.

Kept apart from :mod:`.compile_model` on purpose: loading a cached artifact needs these and nothing
else, and must not import the kernel generators (parsing their TVMScript takes seconds)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from ...errors import RefQSRError
from ...kernels.host_cpu import host_mcpu  # noqa: F401 - the default mcpu (re-exported)
from ...pipeline.tiling import check_engine_patch
from ..models_store import resolve_model

#: compiled batch sizes (``--batch``)
BATCH_RANGE = (1, 256)
#: --float-math -> bf16 products per MAC on AMX tiles
FLOAT_MATH = {"fp32": 3, "bf16": 1}


@dataclass
class CompileOptions:
    model: str = "default"
    target: str = "llvm"  # "llvm" | "cuda"
    # llvm: the CPU the code may assume (AVX2 is required); "core-avx2" is the portable baseline
    mcpu: str = field(default_factory=host_mcpu)
    arch: str = "sm_80"  # cuda
    bits: str | None = None  # "8-4", "8", "32": checked against the model's trained bits
    patch: int = 96
    batch: int = 16
    threads: int | None = None  # llvm: cores the parallel loops are sized for
    jobs: int = 1  # graph builds at once (worker processes): worth it from about 4 cores on (one build is serial)
    # llvm on AMX CPUs: "fp32" = fp32-grade float convs (bf16x3 tiles), "bf16" = one bf16 product per MAC
    float_math: str = "fp32"

    def __post_init__(self) -> None:
        check_shapes(self.patch, self.batch)
        if self.float_math not in FLOAT_MATH:
            raise RefQSRError(f"--float-math must be one of {', '.join(FLOAT_MATH)}, got {self.float_math!r}")

    @property
    def float_terms(self) -> int:
        """bf16 products per MAC of the AMX float convs (see engine.compiler.float_conv_amx)."""
        return FLOAT_MATH[self.float_math]

    def target_dict(self) -> dict[str, Any]:
        if self.target == "llvm":
            return {"kind": "llvm", "mcpu": self.mcpu, "num-cores": int(self.threads or os.cpu_count() or 1)}
        if self.target == "cuda":
            return {"kind": "cuda", "arch": self.arch}
        raise RefQSRError(f"unknown target {self.target!r}: choose llvm or cuda")


def check_shapes(patch: int, batch: int) -> None:
    """The compiled shapes a compile accepts: the engine's patch rule and 1..256 patches a batch.
    Cheap on purpose: the CLI checks its options with it before the compiler loads."""
    check_engine_patch(patch)
    if not BATCH_RANGE[0] <= batch <= BATCH_RANGE[1]:
        raise RefQSRError(f"--batch must be in {BATCH_RANGE[0]}..{BATCH_RANGE[1]} (got {batch})")


# The packages whose code ends up in an artifact: the compiler passes and schedules, the kernels,
# the exporter, the models it traces and the model description the manifest carries. A change to
# any of them must not reuse an older build.
_COMPILED_PACKAGES = (
    "refqsr_engine.engine.compiler",
    "refqsr_engine.kernels",
    "refqsr_engine.export",
    "refqsr_engine.models",
    "refqsr_engine.pipeline",
)


def compiler_digest() -> str:
    """SHA-256 over the source files that decide what a compile produces (_COMPILED_PACKAGES)."""
    import importlib.util
    from pathlib import Path

    h = hashlib.sha256()
    for name in _COMPILED_PACKAGES:  # found, not imported: importing the compiler costs seconds
        folder = Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))
        for path in sorted(folder.glob("*.py")):
            h.update(f"{name}/{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def artifact_cache_parts(opts: CompileOptions) -> dict[str, Any]:
    """What identifies a compiled default model in the cache (model bytes, target, shapes, the
    compiler's own sources)."""
    from ..artifact import tvm_version

    model_path = resolve_model(opts.model)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return {
        "model_sha256": digest,
        "target": opts.target_dict(),
        "patch": opts.patch,
        "batch": opts.batch,
        "float_math": opts.float_math,
        "tvm": tvm_version(),
        "compiler": compiler_digest(),
    }
