"""Bit widths: what a conv call runs at, and the fixed widths of RefQSR's parts."""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL_PRECISION = 32
SUPPORTED_BITS = range(2, 9)
#: CADyQ's k_bits: the width of every weight of a δ (CADyQ/CABM) model
DELTA_WEIGHT_BITS = 8
#: shared matching's cosine grid: unit cell vectors quantized symmetrically to 8 bits
COSINE_BITS = 8
#: RefER matches average-pooled feature cells of POOL x POOL pixels
POOL = 3


def check_bits(bits: int) -> int:
    if bits != FULL_PRECISION and bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits} is not supported (2..8, or 32 for full precision)")
    return bits


@dataclass(frozen=True)
class BitSpec:
    """Bit widths of one conv call: activations (the conv input) and weights."""

    act: int
    weight: int

    def __post_init__(self) -> None:
        check_bits(self.act)
        check_bits(self.weight)

    @classmethod
    def uniform(cls, bits: int) -> BitSpec:
        return cls(bits, bits)


FP = BitSpec(FULL_PRECISION, FULL_PRECISION)


def medium_bits(b_high: int, b_low: int) -> int:
    """b_medium = round((b_high + b_low) / 2) with Python's round (half to even): 8-5 -> 6,
    8-3 -> 6, 4-3 -> 4, 4-2 -> 3. Half-to-even is what reproduces the paper's Table II BitOPs for
    8-5 (65.49 G on Test4K needs 6-bit query weights, not 7)."""
    return round((b_high + b_low) / 2)


def pooled_size(size: int, pool: int = POOL) -> int:
    return math.ceil(size / pool)
