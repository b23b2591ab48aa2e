"""`upscale --engine torch`: the PyTorch reference models as the engine (needs PyTorch; the
compiled engine does not)."""

from __future__ import annotations

from ..errors import RefQSRError
from ..models.checkpoint import bits_label, load_model, model_config
from ..models.model_info import describe, model_bits
from ..models.patchwise import TorchRunner
from ..models.refqsr import RefQSR
from ..pipeline.model_info import ModelInfo
from .models_store import resolve_model


def torch_engine(model: str, bits: str | None, tau: float | None, threads: int | None) -> tuple[TorchRunner, ModelInfo]:
    """The model file (or bundled model) ``model`` as a runner, and its description."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    net, card = load_model(path)
    label = bits_label(model_config(net))
    if bits is not None and label != bits.replace("fp", "32"):
        raise RefQSRError(f"{model} runs at {label} bits, not {bits}")
    if tau is not None:
        if not isinstance(net, RefQSR):
            raise RefQSRError("--tau applies to RefQSR models only")
        net.tau = tau
    return TorchRunner(net, model_bits(net)), describe(net, path.stem, card)
