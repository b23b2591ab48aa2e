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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from ..models.clustblock import Clustering, assign_references
from .artifact import Artifact, format_target, load_artifact

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


def _enable_amx_for(target: dict) -> None:
    """AMX kernels raise SIGILL unless Linux granted this process the tile state: ask for it when
    the artifact's target has AMX, and refuse (one clear error) when it cannot be had."""
    from ..kernels.amx import enable_amx, target_has_amx

    if target_has_amx(target) and not enable_amx():
        raise RefQSRError(
            f"this artifact was built with AMX kernels ({format_target(target)}), and this "
            f"process cannot use AMX here: recompile with --mcpu core-avx2 (or this CPU's name)"
        )


class CompiledModel:
    """A loaded artifact; implements ``models.patchwise.PatchRunner``."""

    def __init__(self, artifact: Artifact, tau: float | None = None) -> None:
        use_all_cpus_by_default()
        import tvm
        from tvm import relax

        self.artifact = artifact
        m = artifact.manifest
        self.manifest = m
        self.kind = m["kind"]
        self.refqsr = self.kind == "refqsr"
        self.scale = int(m.get("scale", 4))
        self.patch = int(m["patch"])
        self.batch = int(m["batch"])
        self.batches = [int(b) for b in m.get("batches", [self.batch])]
        self.tau = float(m["tau"] if tau is None else tau) if self.refqsr else None
        dev = tvm.cpu() if m["target"]["kind"] == "llvm" else tvm.cuda()
        if m["target"]["kind"] == "llvm":
            _enable_amx_for(m["target"])
        self._tvm = tvm
        self.device = dev
        names = ("clustblock", "reference", "query") if self.refqsr else ("sr",)
        self.vms = {
            (n, b): relax.VirtualMachine(tvm.runtime.load_module(str(artifact.file(f"{n}_b{b}.so"))), dev)
            for n in names
            for b in self.batches
        }
        self.cluster_lib = tvm.runtime.load_module(str(artifact.file("cluster.so"))) if self.refqsr else None
        # CUDA artifacts run the (CPU-scheduled) clustering kernel on the host
        host = self.refqsr and m["cluster"].get("device") == "host"
        self.cluster_device = tvm.cpu() if host else dev
        self.buckets = list(m["cluster"]["buckets"]) if self.refqsr else []
        # δ (CADyQ/CABM) graphs also return the bits each patch chose per CADyQ conv ([N, L]);
        # with a decoder set (the PyTorch model knows the layer structure), every call's bits
        # are kept as PatchBits for the BitOPs count (see models.patchwise.PatchRunner)
        self.dynamic_convs: dict[str, list[str]] | None = m.get("dynamic_convs")  # graph -> conv names
        self.decode_bits: Callable[[np.ndarray, str], list[Any]] | None = None
        self.chosen: list[list[Any]] | None = None

    @classmethod
    def load(cls, path: str | Path, target: Mapping[str, Any] | None = None, tau: float | None = None) -> CompiledModel:
        return cls(load_artifact(path, target=target), tau)

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
                args.append(self._tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.device))
            out = self.vms[(graph, b)]["main"](*args)
            results.append([o.numpy()[:m] for o in ([out] if hasattr(out, "numpy") else list(out))])
            start += m
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*results)]

    # -- PatchRunner ------------------------------------------------------------------------------
    def set_bits_decoder(self, decode: Callable[[np.ndarray, str], list[Any]]) -> None:
        """Keep the bits of every δ call, decoded by ``decode(bits [N, L], path)``."""
        if self.dynamic_convs is None:
            raise RefQSRError("this artifact's graphs do not choose bits per patch")
        self.decode_bits, self.chosen = decode, []

    def _run_keeping_bits(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """_run, with a δ graph's last output (the chosen bits) taken off and kept (decoded)."""
        outs = self._run(graph, *inputs)
        if self.dynamic_convs is None or graph not in self.dynamic_convs:
            return outs
        if self.decode_bits is not None:
            self.chosen.append(self.decode_bits(outs[-1], graph))
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
        tvm = self._tvm
        dev = self.cluster_device
        ref = tvm.runtime.empty((bucket,), "int32", dev)
        cos = tvm.runtime.empty((bucket,), "float32", dev)
        self.cluster_lib[f"cluster_{bucket}"](tvm.runtime.tensor(padded, dev), ref, cos)
        import torch

        return assign_references(
            torch.from_numpy(ref.numpy()[:n].copy()), torch.from_numpy(cos.numpy()[:n].copy()), self.tau
        )
