"""Run a compiled artifact: the compiled graphs behind the patch-wise algorithm's runner interface.

Every graph was compiled for a few fixed batch sizes (B and B/4); a call with n patches runs as the
sub-batches that waste the fewest slots, the last one padded with zero patches whose outputs are
dropped (quantizer ranges are per tensor or per sample, so padding never changes the real
patches' results). The clustering kernel exists for a few patch-count buckets; an image's
logits are padded to the next bucket with very negative rows, which the softmax over patches turns
into exact zeros, so a padded patch is never anyone's reference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from ..pipeline.bitops import PatchBits
from ..pipeline.clustering import Clustering, assign_references
from ..pipeline.model_info import ModelInfo
from . import tvm_runtime
from .artifact import RECOMPILE, Artifact, format_target, load_artifact

PAD_LOGIT = -1.0e30


def use_all_cpus_by_default() -> None:
    """Size TVM's thread pool to the CPUs this process may use, unless the user chose a number.

    Left alone, TVM sizes it to what it takes for physical cores, which on a 2-vCPU VM is one
    thread: every compiled kernel then runs at half speed. Must run before the pool starts (the
    first parallel kernel call)."""
    if "TVM_NUM_THREADS" not in os.environ:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(n)


def _enable_amx_for(manifest: Mapping[str, Any]) -> None:
    """AMX kernels raise SIGILL unless Linux granted this process the tile state: ask for it when
    the artifact was built with AMX kernels, and refuse (one clear error) when it cannot be had."""
    from ..kernels import host_cpu

    target = manifest["target"]
    if manifest.get("amx") and not host_cpu.enable_amx():
        raise RefQSRError(
            f"this artifact was built with AMX kernels ({format_target(target)}), and this "
            f"process cannot use AMX here: recompile with --mcpu core-avx2 (or this CPU's name)"
        )


class CompiledModel:
    """A loaded artifact; implements :class:`~refqsr_engine.pipeline.patchwise.PatchRunner`.

    Everything it needs is in the artifact: the compiled graphs and the manifest's ``model_info``
    (kind, bits, tau, the network's sizes for BitOPs, the δ bits layout). It runs on the TVM
    runtime alone (:mod:`.tvm_runtime`), without PyTorch or the TVM compiler."""

    def __init__(self, artifact: Artifact, tau: float | None = None, repair: str = RECOMPILE) -> None:
        use_all_cpus_by_default()
        m = artifact.manifest
        if "model_info" not in m:
            raise RefQSRError(f"{artifact.path}: artifact from an older refqsr-engine; {repair}")
        self.artifact, self.manifest = artifact, m
        self.info = ModelInfo.from_dict(m["model_info"])
        self.kind = self.info.kind
        self.refqsr = self.info.refqsr
        self.scale = self.info.scale
        self.patch = int(m["patch"])
        self.batch = int(m["batch"])
        self.batches = [int(b) for b in m.get("batches", [self.batch])]
        self.tau = float(self.info.tau if tau is None else tau) if self.refqsr else None
        on_cpu = m["target"]["kind"] == "llvm"
        if on_cpu:
            _enable_amx_for(m)
        self.device = tvm_runtime.device("cpu" if on_cpu else "cuda")
        names = ("clustblock", "reference", "query") if self.refqsr else ("sr",)
        self.vms = {
            (n, b): tvm_runtime.VirtualMachine(artifact.file(f"{n}_b{b}.so"), self.device)
            for n in names
            for b in self.batches
        }
        self.cluster_lib = tvm_runtime.load_module(artifact.file("cluster.so")) if self.refqsr else None
        # CUDA artifacts run the (CPU-scheduled) clustering kernel on the host
        host = self.refqsr and m["cluster"].get("device") == "host"
        self.cluster_device = tvm_runtime.device("cpu") if host or on_cpu else self.device
        self.buckets = list(m["cluster"]["buckets"]) if self.refqsr else []
        # δ (CADyQ/CABM) graphs also return the bits each patch chose per CADyQ conv ([N, L]); every
        # call's bits are kept as PatchBits for the BitOPs count (see pipeline.patchwise.PatchRunner)
        self.dynamic_graphs = set(self.info.delta_columns or ())
        self.chosen: list[list[PatchBits]] | None = [] if self.dynamic_graphs else None

    @classmethod
    def load(
        cls,
        path: str | Path,
        target: Mapping[str, Any] | None = None,
        tau: float | None = None,
        repair: str = RECOMPILE,
    ) -> CompiledModel:
        """Load and check the artifact at ``path``; a refusal ends in ``repair`` (what to do)."""
        return cls(load_artifact(path, target=target, repair=repair), tau, repair)

    # -- plumbing --------------------------------------------------------------------------------
    def plan(self, n: int) -> list[int]:
        """Compiled batch sizes to run n patches with: full large batches, then the cheaper of one
        padded large batch or small ones for the rest (fewest padded slots; ties to fewer calls)."""
        big, small = self.batches[0], self.batches[-1]
        plan = [big] * (n // big)
        rest = n - big * len(plan)
        if rest:
            smalls = -(-rest // small)
            plan += [big] if big <= smalls * small else [small] * smalls
        return plan

    def _run(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        n = inputs[0].shape[0]
        results: list[list[np.ndarray]] = []
        start = 0
        for b in self.plan(n):
            m = min(b, n - start)
            args = []
            for x in inputs:
                x = x[start : start + m]
                if m < b:  # pad the short last batch
                    x = np.concatenate([x, np.zeros((b - m, *x.shape[1:]), x.dtype)])
                args.append(tvm_runtime.to_device(np.ascontiguousarray(x, dtype=np.float32), self.device))
            outs = self.vms[(graph, b)](*args)
            results.append([tvm_runtime.to_numpy(o)[:m] for o in outs])
            start += m
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*results)]

    # -- PatchRunner ------------------------------------------------------------------------------
    def _run_keeping_bits(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """_run, with a δ graph's last output (the chosen bits) taken off and kept (decoded)."""
        outs = self._run(graph, *inputs)
        if graph not in self.dynamic_graphs:
            return outs
        self.chosen.append(self.info.decode_bits(outs[-1], graph))
        return outs[:-1]

    def sr(self, x: np.ndarray) -> np.ndarray:
        return self._run_keeping_bits("sr", x)[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._run("clustblock", x)[0]

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        hr, *feats = self._run_keeping_bits("reference", x)
        return hr, feats

    def query(self, x: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        return self._run_keeping_bits("query", x, *features)[0]

    def cluster(self, v: np.ndarray) -> Clustering:
        n, c = v.shape
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:
            raise RefQSRError(
                f"{n} patches exceed the largest compiled clustering size ({self.buckets[-1]}); use a larger --patch"
            )
        padded = np.full((bucket, c), PAD_LOGIT, dtype=np.float32)
        padded[:n] = v
        dev = self.cluster_device
        ref = tvm_runtime.empty((bucket,), "int32", dev)
        cos = tvm_runtime.empty((bucket,), "float32", dev)
        self.cluster_lib[f"cluster_{bucket}"](tvm_runtime.to_device(padded, dev), ref, cos)
        return assign_references(tvm_runtime.to_numpy(ref)[:n].copy(), tvm_runtime.to_numpy(cos)[:n].copy(), self.tau)
