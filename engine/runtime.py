"""Run a compiled artifact: the compiled graphs behind the patch-wise algorithm's runner interface.

Every graph was compiled for a few fixed batch sizes (B and B/4); a call with n patches runs as the
sub-batches that waste the fewest slots, the last one padded with zero patches whose outputs are
dropped (quantizer ranges are per tensor or per sample, so padding never changes the real
patches' results). The clustering kernel exists for a few patch-count buckets; an image's
logits are padded to the next bucket with very negative rows, which the softmax over patches turns
into exact zeros, so a padded patch is never anyone's reference.

On a GPU the batches are device-resident (:data:`RESIDENT_COPIES`): the patches go up and the HR
patches come down once per compiled batch, the RefER features stay on the device between the
reference and the query graphs and are gathered there (:class:`DeviceFeatures`, :class:`DeviceRows`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from ..pipeline.bitops import PatchBits
from ..pipeline.clustering import Clustering, assign_references
from ..pipeline.model_info import ModelInfo
from ..pipeline.patchwise import gather_rows, keep_rows
from . import tvm_runtime
from .artifact import RECOMPILE, Artifact, format_target, load_artifact

PAD_LOGIT = -1.0e30

#: host<->device copies one network call of a compiled batch makes on the device-resident path
#: (:class:`CompiledModel` with ``resident``): the patches go up once, the HR patches come down
#: once (a δ graph's chosen bits once more); the reference graph's RefER features stay on the
#: device and are gathered there for the queries.
RESIDENT_COPIES = {"to_device": 1, "to_host": 1}


class DeviceFeatures:
    """The RefER features of one reference call, left on the device: for each compiled sub-batch
    (first patch, patches, the graph's feature outputs), so :meth:`row` finds patch i's."""

    def __init__(self, parts: list[tuple[int, int, list[Any]]]) -> None:
        self.parts = parts

    def row(self, i: int) -> list[tuple[Any, int]]:
        """(device tensor, row) of each feature of patch ``i`` of the call."""
        for start, count, tensors in self.parts:
            if start <= i < start + count:
                return [(t, i - start) for t in tensors]
        raise IndexError(f"patch {i} is not in this reference call")

    def numpy(self) -> list[np.ndarray]:
        """The features as host arrays [N, C, H, W] (for checks: the resident path never downloads them)."""
        per_feature = zip(*[[tvm_runtime.to_numpy(t)[:count] for t in tensors] for _, count, tensors in self.parts])
        return [np.concatenate(parts) for parts in per_feature]


class DeviceRows(list):
    """Per query patch, :meth:`DeviceFeatures.row` of its reference: what the device-resident
    query call gathers into its feature inputs on the device."""


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

    def __init__(
        self, artifact: Artifact, tau: float | None = None, repair: str = RECOMPILE, resident: bool | None = None
    ) -> None:
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
        # device-resident batches (RefER features kept and gathered on the device): the default
        # off the CPU, where every copy crosses the bus; on the CPU a copy is a memcpy
        default = m.get("runtime", {}).get("resident", not on_cpu)
        self.resident = bool(default if resident is None else resident)
        self.copies = {"to_device": 0, "to_host": 0}  # host<->device copies made so far
        names = ("clustblock", "reference", "query") if self.refqsr else ("sr",)
        self.vms = {
            (n, b): tvm_runtime.VirtualMachine(artifact.file(f"{n}_b{b}.so"), self.device)
            for n in names
            for b in self.batches
        }
        self.cluster_lib = tvm_runtime.load_module(artifact.file("cluster.so")) if self.refqsr else None
        # the clustering kernel runs where it was built for: the GPU (cluster.device "device"), or
        # the host for CUDA artifacts that carry a CPU-scheduled one ("host")
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
        resident: bool | None = None,
    ) -> CompiledModel:
        """Load and check the artifact at ``path``; a refusal ends in ``repair`` (what to do).
        ``resident``: keep each batch on the device (default: on GPUs)."""
        return cls(load_artifact(path, target=target, repair=repair), tau, repair, resident)

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

    def _upload(self, x: np.ndarray, dev: Any = None) -> Any:
        self.copies["to_device"] += 1
        return tvm_runtime.to_device(x, self.device if dev is None else dev)

    def _download(self, tensor: Any) -> np.ndarray:
        self.copies["to_host"] += 1
        return tvm_runtime.to_numpy(tensor)

    @staticmethod
    def _padded(x: np.ndarray, start: int, m: int, b: int) -> np.ndarray:
        """Rows start..start+m of ``x``, zero-padded to b rows (the short last batch), float32."""
        x = x[start : start + m]
        if m < b:
            x = np.concatenate([x, np.zeros((b - m, *x.shape[1:]), x.dtype)])
        return np.ascontiguousarray(x, dtype=np.float32)

    def _run(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        n = inputs[0].shape[0]
        results: list[list[np.ndarray]] = []
        start = 0
        for b in self.plan(n):
            m = min(b, n - start)
            outs = self.vms[(graph, b)](*[self._upload(self._padded(x, start, m, b)) for x in inputs])
            results.append([self._download(o)[:m] for o in outs])
            start += m
        return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*results)]

    def _gather(self, rows: Sequence[list[tuple[Any, int]]], b: int) -> list[Any]:
        """The query call's feature inputs [b, C, H, W], built on the device from the kept
        reference rows (device-to-device copies; padded slots repeat the first row)."""
        copy, view = tvm_runtime.copy_tensor, tvm_runtime.view
        out = []
        for k, (first, _) in enumerate(rows[0]):
            shape = tuple(int(d) for d in first.shape)
            dtype = str(first.dtype)
            row_shape = (1, *shape[1:])
            row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            dst = tvm_runtime.empty((b, *shape[1:]), dtype, self.device)
            for slot in range(b):
                src, r = (rows[slot] if slot < len(rows) else rows[0])[k]
                copy(view(src, row_shape, dtype, r * row_bytes), view(dst, row_shape, dtype, slot * row_bytes))
            out.append(dst)
        return out

    def _run_resident(self, graph: str, x: np.ndarray, rows: DeviceRows | None = None):
        """``graph`` on patches ``x`` with one upload and one download (the HR output; a δ graph's
        bits too) per compiled batch; the other outputs stay on the device. ``rows``: the query's
        reference features, gathered on the device. Returns (host outputs, DeviceFeatures)."""
        n = x.shape[0]
        results: list[list[np.ndarray]] = []
        parts: list[tuple[int, int, list[Any]]] = []
        delta = graph in self.dynamic_graphs
        start = 0
        for b in self.plan(n):
            m = min(b, n - start)
            args = [self._upload(self._padded(x, start, m, b))]
            if rows is not None:
                args += self._gather(rows[start : start + m], b)
            outs = self.vms[(graph, b)](*args)
            host = [self._download(outs[0])[:m]]
            if delta:
                host.append(self._download(outs[-1])[:m])
            results.append(host)
            parts.append((start, m, list(outs[1 : len(outs) - int(delta)])))
            start += m
        host_outs = [np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*results)]
        return host_outs, DeviceFeatures(parts)

    def _keep_bits(self, graph: str, outs: list[np.ndarray]) -> list[np.ndarray]:
        if graph not in self.dynamic_graphs:
            return outs
        self.chosen.append(self.info.decode_bits(outs[-1], graph))
        return outs[:-1]

    # -- PatchRunner ------------------------------------------------------------------------------
    def _run_keeping_bits(self, graph: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """_run, with a δ graph's last output (the chosen bits) taken off and kept (decoded)."""
        return self._keep_bits(graph, self._run(graph, *inputs))

    def sr(self, x: np.ndarray) -> np.ndarray:
        return self._run_keeping_bits("sr", x)[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._run("clustblock", x)[0]

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray] | DeviceFeatures]:
        """HR patches and the RefER features: host arrays, or :class:`DeviceFeatures` when resident."""
        if self.resident:
            host, feats = self._run_resident("reference", x)
            return self._keep_bits("reference", host)[0], feats
        hr, *feats = self._run_keeping_bits("reference", x)
        return hr, feats

    def query(self, x: np.ndarray, features: list[np.ndarray] | DeviceRows) -> np.ndarray:
        """HR patches of queries; ``features``: host arrays [N, C, H, W] or, resident, DeviceRows."""
        if isinstance(features, DeviceRows):
            host, _ = self._run_resident("query", x, features)
            return self._keep_bits("query", host)[0]
        return self._run_keeping_bits("query", x, *features)[0]

    def keep_features(self, features: list[np.ndarray] | DeviceFeatures, row: int) -> Any:
        """What run_patchwise keeps of patch ``row``'s features until its queries have run."""
        if isinstance(features, DeviceFeatures):
            return features.row(row)
        return keep_rows(features, row)

    def gather_features(self, kept: list[Any]) -> list[np.ndarray] | DeviceRows:
        """A query batch's features from the kept rows of its references (one per query)."""
        if kept and isinstance(kept[0][0], tuple):
            return DeviceRows(kept)
        return gather_rows(kept)

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
        self.cluster_lib[f"cluster_{bucket}"](self._upload(padded, dev), ref, cos)
        return assign_references(self._download(ref)[:n].copy(), self._download(cos)[:n].copy(), self.tau)
