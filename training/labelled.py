"""Base of the texture-classification sets (procedural textures, DTD): subclasses say how to
render sample i at a size and what its label is; batching and indexing live here once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class LabelledImageSet(Dataset, ABC):
    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def label(self, index: int) -> int: ...

    @abstractmethod
    def render(self, index: int, size: int | None = None) -> np.ndarray:
        """Sample ``index`` as an HxWx3 uint8 array (deterministic in the index and size)."""

    def batch(self, indices: Sequence[int], size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N x 3 x S x S float tensor in [0, 1], N labels)`` of ``indices``."""
        imgs = np.stack([self.render(int(i), size) for i in indices])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
        y = torch.tensor([self.label(int(i)) for i in indices], dtype=torch.long)
        return x, y

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        img = self.render(index)
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), self.label(index)
