"""Does a trained RefQSR model's RefER use its reference? PSNR of the same model, five ways.

    python -m research.refer_probe MODEL --val data/sr/val

Every row runs the same network patch-wise (96 px, 6 px overlap) on whole validation images with
the same reference assignment; only what the query patches' RefER blocks get changes:

* ``assigned``: the reference the ClustBlock chose (the model as it runs);
* ``self``: the query's own features (the paper's Table V "self-reference");
* ``aligned``: the query's own features from the b_high reference path, a reference that matches
  every query pixel exactly;
* ``high``: no RefER; query patches run the reference path at b_high (the ceiling);
* ``skip``: every RefER passes its input through, as if the blocks it replaces were removed (the
  floor).

Reading it: ``assigned`` above ``self`` means the refinement uses a reference at all; ``aligned``
above ``assigned`` means better matches would pay; ``high`` minus ``assigned`` is the quantization
loss RefER has left on the query patches; ``high`` minus ``skip`` is all that RefER blocks can
ever add to this backbone's query path (the room, printed under the table).

The feature column (fixed-precision models) asks the same at the RefERs' own level: the mean L1
between the last RefER's output and the output of the block it replaces when the query patch runs
wholly at b_high, the feature a perfect repair would give. A RefER can close that gap (feature
error well under ``self``'s) and still leave the PSNR where it was, when the b_high path is no
better than the low-bit one on the image (``high`` level with ``self``): then the reference has
nothing to repair that the image shows. The probe also scores the matching step itself: in
``aligned`` mode the right flow is zero everywhere, so the share of query pixels whose arg-max flow
stays under half a pooling cell says whether the cost volume can find even an identical patch.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import numpy as np
import torch
from refqsr_engine.engine.models_store import resolve_model
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import psnr_y
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.model_info import model_bits
from refqsr_engine.models.quant_cadyq import Selection
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.training.bundle import run_pair
from refqsr_engine.training.datasets import PairedFolder
from refqsr_engine.training.reference_modes import REFERENCE_MODES, ReferenceModeRunner

# A query pixel "finds itself" when its inference-time (arg-max) flow against its own b_high
# features is under half a pooling cell: a match to any other cell moves it by >= 3 px.
SELF_MATCH_PX = 1.5


class SelfMatchCounter:
    """Forward hooks on a model's matching steps that score every call: the share of query pixels
    whose arg-max flow is under :data:`SELF_MATCH_PX`, per RefER (paper matching) or for the one
    shared flow (shared matching). Meaningful in ``aligned`` mode, where the reference is the
    query's own b_high feature, so the right flow is zero."""

    def __init__(self, model: RefQSR) -> None:
        if model.shared:  # one flow per query, the matcher's output
            modules, hook = [model.matcher], self._shared_hook
        else:
            modules, hook = list(model.refers), self._refer_hook
        self.hits = [0] * len(modules)
        self.pixels = [0] * len(modules)
        self.handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]

    def _count(self, k: int, flow: torch.Tensor) -> None:
        size = flow.norm(dim=1)
        self.hits[k] += int((size < SELF_MATCH_PX).sum())
        self.pixels[k] += size.numel()

    def _refer_hook(self, k: int):
        def hook(refer: torch.nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            self._count(k, refer.flow(inputs[0], inputs[1], hard=True))

        return hook

    def _shared_hook(self, k: int):
        def hook(_matcher: torch.nn.Module, _inputs: tuple, flow: torch.Tensor) -> None:
            self._count(k, flow)

        return hook

    def shares(self) -> list[float]:
        return [h / max(p, 1) for h, p in zip(self.hits, self.pixels)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class FeatureErrorRunner(ReferenceModeRunner):
    """The patch runner of a RefQSR model that also scores every query batch: L1 between the last
    RefER's output (in ``skip`` mode the feature passed through in its place) and the replaced
    block's output with the same patches wholly at b_high (:meth:`RefQSR.high_block_outputs`).
    Fixed precision only (δ has no single b_high)."""

    def __init__(self, model: RefQSR, reference: str) -> None:
        super().__init__(model, model_bits(model), reference)
        self.abs_sum, self.count = 0.0, 0

    def _query_forward(
        self,
        x: torch.Tensor,
        features: list[torch.Tensor] | None,
        selection: Selection | None,
        refer_outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        outputs: list[torch.Tensor] = [] if refer_outputs is None else refer_outputs
        out = super()._query_forward(x, features, selection, outputs)
        target = self.model.high_block_outputs(x)[-1]
        self.abs_sum += float((outputs[-1] - target).abs().sum())
        self.count += target.numel()
        return out

    def mean_error(self) -> float | None:
        """None in ``high`` mode: no query call (the query runs the reference path, its own target)."""
        return self.abs_sum / self.count if self.count else None


def probe(model: RefQSR, folder: PairedFolder, patch: int = 96, overlap: int = 6) -> dict[str, Any]:
    """PSNR-Y (shave 4) per image and mean, for each of :data:`REFERENCE_MODES`; per mode the last
    RefER's feature error (see :class:`FeatureErrorRunner`; None for δ models and for ``high``);
    and per RefER the share of query pixels its matching (or the shared flow) maps onto themselves
    in ``aligned`` mode."""
    if not (isinstance(model, RefQSR) and model.tail == "refer"):
        raise RefQSRError("the probe needs a RefQSR model with RefER blocks")
    out: dict[str, Any] = {"images": [folder[i].name for i in range(len(folder))], "modes": {}}
    for mode in REFERENCE_MODES:
        counter = SelfMatchCounter(model) if mode == "aligned" else None
        runner = (
            ReferenceModeRunner(model, model_bits(model), mode) if model.dynamic else FeatureErrorRunner(model, mode)
        )
        scores = []
        for i in range(len(folder)):
            pair = folder[i]
            sr, _ = run_pair(runner, pair, patch, overlap)
            scores.append(psnr_y(sr, pair.hr, 4))
        feature = runner.mean_error() if isinstance(runner, FeatureErrorRunner) else None
        out["modes"][mode] = {"psnr_y": float(np.mean(scores)), "images": scores, "feature_l1": feature}
        if counter is not None:
            counter.remove()
            out["self_match"] = counter.shares()
            out["matching"] = model.matching
    return out


def markdown(result: dict[str, Any]) -> str:
    head = "| RefER input | PSNR-Y (dB) | last RefER feature L1 to b_high | " + " | ".join(result["images"]) + " |\n"
    head += "| --- | ---: | ---: |" + " ---: |" * len(result["images"]) + "\n"
    rows = [
        f"| {mode} | {r['psnr_y']:.3f} | "
        + ("-" if r["feature_l1"] is None else f"{r['feature_l1']:.4f}")
        + " | "
        + " | ".join(f"{p:.3f}" for p in r["images"])
        + " |"
        for mode, r in result["modes"].items()
    ]
    shares = result["self_match"]
    if result.get("matching") == "shared":
        match = f"shared flow {shares[0]:.1%}"
    else:
        match = ", ".join(f"RefER {k + 1} {share:.1%}" for k, share in enumerate(shares))
    modes = result["modes"]
    room = modes["high"]["psnr_y"] - modes["skip"]["psnr_y"]
    return (
        head + "\n".join(rows) + f"\n\nRoom for RefER (high - skip): {room:+.3f} dB; what it takes of it "
        f"(assigned - skip): {modes['assigned']['psnr_y'] - modes['skip']['psnr_y']:+.3f} dB\n"
        "\nQuery pixels that the matching maps onto themselves in aligned mode "
        f"(arg-max flow under {SELF_MATCH_PX} px): {match}\n"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_name")
@click.option(
    "--val", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of HR images (held out)."
)
@click.option("--patch", type=click.IntRange(min=8), default=96, show_default=True, help="LR patch size.")
def main(model_name: str, val: str, patch: int) -> None:
    """PSNR of a RefQSR model with its RefER fed the assigned, self, aligned or no reference, or skipped."""
    try:
        model, _ = load_model(resolve_model(model_name))
        with torch.no_grad():
            result = probe(model.eval(), PairedFolder(val, 4, None, None), patch)
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(markdown(result))


if __name__ == "__main__":
    main()
