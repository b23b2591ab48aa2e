"""The reference assignment after ClustBlock's arg-max (paper Sec. III-C-2), in numpy.

Patch i reads the features of patch ``argmax[i]``; every patch some row points at is a reference;
a query whose cosine similarity to its reference is below tau becomes an isolated reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TAU = 0.5


@dataclass(frozen=True)
class Clustering:
    """Result of clustering N patches.

    ``reference_of[i]``: the patch whose features patch i uses (i itself for references).
    ``is_reference[i]``: True for patches run at b_high (cluster references and isolated ones).
    ``similarity[i]``: cosine similarity between V_i and V of its argmax reference.
    ``argmax[i]``: the raw row arg-max of M (before isolated references are split off).
    """

    reference_of: np.ndarray
    is_reference: np.ndarray
    similarity: np.ndarray
    argmax: np.ndarray

    @property
    def num_references(self) -> int:
        return int(self.is_reference.sum())

    @property
    def num_queries(self) -> int:
        return int((~self.is_reference).sum())

    @property
    def num_isolated(self) -> int:
        """References that no patch chose (their similarity fell below tau): run alone at b_high."""
        targeted = np.zeros_like(self.is_reference)
        targeted[self.argmax] = True
        return int((self.is_reference & ~targeted).sum())


def check_tau(tau: float | None) -> None:
    """A user's tau: a cosine-similarity threshold, so in [-1, 1] (NaN refused)."""
    if tau is not None and not -1.0 <= tau <= 1.0:
        raise ValueError(f"--tau is a cosine-similarity threshold in [-1, 1], got {tau}")


def assign_references(argmax: np.ndarray, similarity: np.ndarray, tau: float = DEFAULT_TAU) -> Clustering:
    """The O(N) bookkeeping after the arg-max (shared by the PyTorch path and the compiled kernel)."""
    argmax = np.asarray(argmax).astype(np.int64).reshape(-1)
    similarity = np.asarray(similarity).astype(np.float32).reshape(-1)
    n = argmax.shape[0]
    if similarity.shape[0] != n:
        raise ValueError(f"argmax and similarity must have the same length, got {n} and {similarity.shape[0]}")
    if n and (int(argmax.min()) < 0 or int(argmax.max()) >= n):
        raise ValueError("argmax holds indices outside [0, N)")
    is_reference = np.zeros(n, dtype=bool)
    is_reference[argmax] = True
    is_reference |= ~is_reference & (similarity < tau)  # isolated references
    reference_of = np.where(is_reference, np.arange(n), argmax)
    return Clustering(reference_of, is_reference, similarity, argmax)
