"""Registry of quantization schemes: name -> (activation quantizer, weight quantizer) factories."""

from __future__ import annotations

from collections.abc import Callable

from .quant_base import ActivationQuantizer, WeightQuantizer
from .quant_ddtb import DdtbActivation, DdtbWeight
from .quant_minmax import MinMaxActivation, MinMaxWeight
from .quant_pams import PamsActivation, PamsWeight

ActivationFactory = Callable[[int, int, bool], ActivationQuantizer]  # (bits, channels, static)

QUANTIZERS: dict[str, tuple[ActivationFactory, type[WeightQuantizer]]] = {
    "pams": (lambda bits, channels, static: PamsActivation(bits, channels), PamsWeight),
    "ddtb": (lambda bits, channels, static: DdtbActivation(bits, channels, dynamic=not static), DdtbWeight),
    # CADyQ (models/quant_cadyq.py): PAMS quantizers, one activation quantizer per candidate width.
    "cadyq": (lambda bits, channels, static: PamsActivation(bits, channels), PamsWeight),
    # ClustBlock's post-training 8-bit quantization; not offered for the SR networks.
    "minmax": (lambda bits, channels, static: MinMaxActivation(bits, channels), MinMaxWeight),
}
SR_QUANTIZERS = ("pams", "ddtb", "cadyq")


def quantizer_names() -> list[str]:
    return sorted(QUANTIZERS)


def make_activation_quantizer(scheme: str, bits: int, channels: int, static: bool = False) -> ActivationQuantizer:
    """``static``: a range that does not depend on the input (DDTB without its dynamic gate)."""
    return _lookup(scheme)[0](bits, channels, static)


def make_weight_quantizer(scheme: str) -> WeightQuantizer:
    return _lookup(scheme)[1]()


def _lookup(scheme: str) -> tuple[ActivationFactory, type[WeightQuantizer]]:
    try:
        return QUANTIZERS[scheme]
    except KeyError:
        raise ValueError(f"unknown quantizer {scheme!r}; choose from {', '.join(quantizer_names())}") from None
