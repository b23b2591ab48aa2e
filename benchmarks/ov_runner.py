"""OpenVINO's CPU plugin as a patch runner (a peer of the guard; ``pip install '.[bench]'``).

Its float parts are pinned to fp32 (``INFERENCE_PRECISION_HINT``: on CPUs with bf16 the plugin
otherwise runs them in bf16), its thread pool to the guard's thread count. A QDQ graph's
QuantizeLinear/DequantizeLinear pairs are folded by OpenVINO's low-precision transformations into
int8 convolutions; :meth:`OvRunner.conv_primitives` lists which kernel each convolution got
(``*_I8``: int8), read from the compiled model's runtime graph.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

MISSING = "openvino not installed (pip install '.[bench]')"


def openvino_missing() -> str | None:
    """None when ``openvino`` can be imported, else why not (one line)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return MISSING
    return None


class OvRunner:
    """``PatchRunner`` (``sr`` only) over an ONNX graph compiled by OpenVINO for the CPU, for
    batches of ``batch`` patches of ``patch`` px (static shape; a short batch is zero-padded)."""

    refqsr = False
    scale = 4

    def __init__(self, onnx_path: str, threads: int, batch: int, patch: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(onnx_path)
        model.reshape({model.inputs[0]: [batch, 3, patch, patch]})
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.batch = batch
        self.version = ov.get_version()

    def conv_primitives(self) -> dict[str, int]:
        """How many convolutions of the runtime graph run each kernel (``primitiveType``)."""
        counts: Counter[str] = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if rt["layerType"].astype(str) == "Convolution":
                counts[rt["primitiveType"].astype(str)] += 1
        return dict(counts.most_common())

    def sr(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start : start + self.batch]
            m = part.shape[0]
            if m < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - m, *part.shape[1:]), part.dtype)])
            res = self.request.infer({0: np.ascontiguousarray(part, dtype=np.float32)})
            outs.append(np.array(res[self.compiled.outputs[0]][:m]))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]
