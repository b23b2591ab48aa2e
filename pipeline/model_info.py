"""What a runtime needs to know of a model, as plain data: an artifact's manifest carries it, so the
compiled engine runs, reports bits and counts BitOPs without the PyTorch model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bitops import BitOpsReport, NetworkCost, PatchBits, count_bitops, decode_columns
from .clustering import Clustering


@dataclass(frozen=True)
class ModelInfo:
    """``bits``: the BitOPs setting ("8-4", "8", "32", "delta", "delta-3"); ``label``: the bits as
    users write them ("8-4", "δ-3"); ``tau``: RefQSR's clustering threshold (None otherwise);
    ``delta_columns``: for δ models, per graph ("sr", "reference", "query") how the bits its
    graph returns map onto the network (:func:`~refqsr_engine.pipeline.bitops.decode_columns`)."""

    name: str
    kind: str  # "refqsr" | "sr"
    bits: str
    label: str
    scale: int
    tau: float | None
    network: NetworkCost
    delta_columns: dict[str, dict[str, Any]] | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def refqsr(self) -> bool:
        return self.kind == "refqsr"

    @property
    def dynamic(self) -> bool:
        return self.bits.startswith("delta")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "label": self.label,
            "scale": self.scale,
            "tau": self.tau,
            "network": self.network.as_dict(),
            "delta_columns": self.delta_columns,
            "card": self.card,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        kind = d["kind"]
        if kind not in ("refqsr", "sr"):
            raise ValueError(f"unknown model kind {kind!r}")
        tau = d.get("tau")
        return cls(
            name=str(d["name"]),
            kind=kind,
            bits=str(d["bits"]),
            label=str(d["label"]),
            scale=int(d["scale"]),
            tau=None if tau is None else float(tau),
            network=NetworkCost.from_dict(d["network"]),
            delta_columns=d.get("delta_columns"),
            card=dict(d.get("card") or {}),
        )

    def decode_bits(self, bits: np.ndarray, graph: str) -> list[PatchBits]:
        """The bits each patch of one δ call of ``graph`` ran at."""
        if not self.delta_columns or graph not in self.delta_columns:
            raise ValueError(f"{self.name}: graph {graph!r} does not choose bits per patch")
        return decode_columns(self.delta_columns[graph], bits)

    def image_bitops(
        self,
        lr_size: tuple[int, int],
        patch: int,
        overlap: int,
        clustering: Clustering | None = None,
        patch_bits: list[PatchBits] | None = None,
        grid: str = "engine",
    ) -> BitOpsReport:
        """BitOPs/FQR of running this model on one LR image; RefQSR needs that image's clustering,
        δ models the bits each patch ran at."""
        if self.dynamic and patch_bits is None:
            raise ValueError("δ models' BitOPs need the bits each patch ran at")
        if not self.refqsr:
            return count_bitops(self.network, lr_size, self.bits, patch, overlap, grid, patch_bits=patch_bits)
        if clustering is None:
            raise ValueError("RefQSR BitOPs need the image's reference assignment")
        return count_bitops(
            self.network,
            lr_size,
            self.bits,
            patch,
            overlap,
            grid,
            [bool(r) for r in clustering.is_reference],
            [int(r) for r in clustering.reference_of],
            patch_bits=patch_bits,
        )

    def uniform8_bitops(self, lr_size: tuple[int, int], patch: int, overlap: int, grid: str = "engine") -> BitOpsReport:
        """The BitOPs of the network (RefQSR: its backbone) at 8 bits everywhere: what the model's
        savings are measured against."""
        return count_bitops(self.network, lr_size, "8", patch, overlap, grid)
