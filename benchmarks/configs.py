"""What the latency benchmark runs: its configurations (plain dicts), the models behind them, the LR
test images, and how each configuration's model, compiled artifact or ONNX graph is prepared and
turned into a runner.

A configuration is ``{"name", "label", "role", "runner", "model"}``:

* ``role``: ``"engine"`` (the compiled TVM engine) or ``"peer"`` (what the engine is compared with);
* ``runner``: ``"tvm"`` (a compiled artifact), ``"torch"`` (PyTorch, patch-wise), ``"torch-whole"``
  (PyTorch, one forward over the whole image) or ``"ort"`` (ONNX Runtime, patch-wise);
* ``model``: a key of :data:`MODELS`.

Models (see :func:`prepare_model`): a bundled trained model when one runs at the configuration's
bits with its quantizer and block count (``models_store.bundled_with_bits``); otherwise the
quantized model is made from the bundled full-precision SRResNet by post-training quantization:
its weights copied in, RefER blocks started as the identity (refinement conv zeroed; they are
untrained), the quantizer ranges calibrated by one train-mode forward on patches of a photo that is
in no validation set (``"weights": "ptq"``, labelled "PTQ from FP (not QAT)" in every table). Made
once and cached. Compiled artifacts and exported graphs are cached under ``cache_dir()/bench``.

Nothing here imports torch, TVM or ONNX Runtime at module level: the benchmark's parent process
imports this module and must stay small (its children's ``ru_maxrss`` starts from its peak).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Models by key; ``scheme`` None is full precision. ``bits`` is the label models carry ("8-4", "8", "32").
MODELS: dict[str, dict[str, Any]] = {
    "fp32": {"kind": "sr", "scheme": None, "bits": "32"},
    "ddtb-8": {"kind": "sr", "scheme": "ddtb", "bits": "8", "act_bits": 8},
    "ddtb-4": {"kind": "sr", "scheme": "ddtb", "bits": "4", "act_bits": 4},
    "refqsr-8-5": {"kind": "refqsr", "scheme": "ddtb", "bits": "8-5", "b_high": 8, "b_low": 5},
    "refqsr-8-4": {"kind": "refqsr", "scheme": "ddtb", "bits": "8-4", "b_high": 8, "b_low": 4},
    "refqsr-8-3": {"kind": "refqsr", "scheme": "ddtb", "bits": "8-3", "b_high": 8, "b_low": 3},
    "refqsr-4-3": {"kind": "refqsr", "scheme": "ddtb", "bits": "4-3", "b_high": 4, "b_low": 3},
    "refqsr-4-2": {"kind": "refqsr", "scheme": "ddtb", "bits": "4-2", "b_high": 4, "b_low": 2},
}

#: how each kind of weights is named in every table
WEIGHTS_LABELS = {
    "trained": "trained (bundled)",
    "ptq": "PTQ from FP (not QAT)",
    "fp-truncated": "FP, first blocks only (smoke test)",
}

CONFIGS: list[dict[str, str]] = [
    {
        "name": "engine-refqsr-8-4",
        "label": "engine RefQSR 8-4",
        "role": "engine",
        "runner": "tvm",
        "model": "refqsr-8-4",
    },
    {
        "name": "engine-refqsr-4-3",
        "label": "engine RefQSR 4-3",
        "role": "engine",
        "runner": "tvm",
        "model": "refqsr-4-3",
    },
    {"name": "engine-ddtb-8", "label": "engine DDTB-8", "role": "engine", "runner": "tvm", "model": "ddtb-8"},
    {"name": "engine-ddtb-4", "label": "engine DDTB-4", "role": "engine", "runner": "tvm", "model": "ddtb-4"},
    {"name": "engine-fp32", "label": "engine fp32", "role": "engine", "runner": "tvm", "model": "fp32"},
    {
        "name": "torch-whole-fp32",
        "label": "PyTorch eager fp32 (whole image)",
        "role": "peer",
        "runner": "torch-whole",
        "model": "fp32",
    },
    {
        "name": "torch-patches-fp32",
        "label": "PyTorch fp32 (patches)",
        "role": "peer",
        "runner": "torch",
        "model": "fp32",
    },
    {"name": "ort-fp32", "label": "ONNX Runtime fp32", "role": "peer", "runner": "ort", "model": "fp32"},
    # What a user would reach for: ORT's own static int8 quantization of the FP graph (QDQ, per-channel
    # weights, min/max calibration), every conv quantized, which ORT fuses into QLinearConv.
    {
        "name": "ort-int8",
        "label": "ONNX Runtime int8 (static QDQ of the whole FP network)",
        "role": "peer",
        "runner": "ort",
        "model": "fp32",
        "ort_quant": "static",
    },
    # Our exported DDTB-8 graph as ORT sees it (dynamic per-sample scales: ORT cannot fuse them).
    {
        "name": "ort-qdq-ddtb8",
        "label": "ONNX Runtime on the exported DDTB-8 QDQ graph",
        "role": "peer",
        "runner": "ort",
        "model": "ddtb-8",
    },
]

#: runners whose output is compared with the PyTorch model they were built from (same file)
TWIN_CHECKED = ("tvm", "ort")
#: ONNX Runtime ops that compute on integers (what QDQ fusion turns convs into)
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "NhwcQLinearConv")
SEED = 0
PHOTO = "astronaut"  # scikit-image photo every LR test image is cut from
CALIBRATION_PHOTO = "chelsea"  # PTQ ranges: a photo in no validation set (astronaut, coffee are)
PTQ_VERSION = 3  # bump when the PTQ recipe changes: cached PTQ models are rebuilt


def config_names() -> list[str]:
    return [c["name"] for c in CONFIGS]


def select_configs(names: list[str] | None) -> list[dict[str, str]]:
    """The configurations named (all when ``names`` is empty), in :data:`CONFIGS` order."""
    if not names:
        return [dict(c) for c in CONFIGS]
    unknown = sorted(set(names) - set(config_names()))
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(config_names())}")
    return [dict(c) for c in CONFIGS if c["name"] in names]


# ---------------------------------------------------------------------------------------------
# LR test images


def _photo(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)())[..., :3]


def make_lr(width: int, height: int, photo: str = PHOTO) -> np.ndarray:
    """The LR test image of one size: the largest centred crop of the photo with the size's aspect
    ratio, resized (bicubic) to ``width`` x ``height``; 3 x H x W float32 in [0, 1]."""
    from PIL import Image

    img = _photo(photo)
    h, w = img.shape[:2]
    if w * height > h * width:  # too wide: crop the width
        cw, ch = max(1, round(h * width / height)), h
    else:
        cw, ch = w, max(1, round(w * height / width))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(img[y0 : y0 + ch, x0 : x0 + cw])
    if crop.size != (width, height):
        crop = crop.resize((width, height), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0)


def _calibration_patches(n: int = 16, patch: int = 48, seed: int = SEED):
    import torch

    img = _photo(CALIBRATION_PHOTO).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, img.shape[0] - patch, n)
    xs = rng.integers(0, img.shape[1] - patch, n)
    crops = np.stack([img[y : y + patch, x : x + patch].transpose(2, 0, 1) for y, x in zip(ys, xs)])
    return torch.from_numpy(np.ascontiguousarray(crops))


# ---------------------------------------------------------------------------------------------
# models


def bench_cache() -> Path:
    """``cache_dir()/bench``: PTQ models, compiled artifacts and exported graphs of the benchmark."""
    from ..engine.artifact import cache_dir

    return cache_dir() / "bench"


def clustblock_path() -> Path:
    from ..engine.models_store import bundled_dir

    return bundled_dir().parent / "clustblock" / "textures47.pt"


def weights_label(weights: str) -> str:
    return WEIGHTS_LABELS.get(weights, weights)


def _matches(cfg: dict[str, Any], spec: dict[str, Any], n_blocks: int) -> bool:
    from ..models.checkpoint import bits_label

    return (
        cfg.get("kind") == spec["kind"]
        and cfg.get("arch") == "srresnet"
        and cfg.get("scheme") == spec["scheme"]
        and bits_label(cfg) == spec["bits"]
        and cfg.get("n_blocks") == n_blocks
    )


def bundled_model(key: str, n_blocks: int) -> Path | None:
    """The bundled trained model that is exactly ``MODELS[key]`` with ``n_blocks`` blocks, if any:
    ``bundled_with_bits`` first (the name users get with ``--bits``), then any other bundled one."""
    from ..engine.models_store import bundled_dir, bundled_models, bundled_with_bits
    from ..errors import RefQSRError
    from ..models.checkpoint import read_config

    try:
        first = [bundled_with_bits(MODELS[key]["bits"])]
    except RefQSRError:
        first = []
    for name in first + [n for n in bundled_models() if n not in first]:
        path = bundled_dir() / f"{name}.pt"
        if _matches(read_config(path), MODELS[key], n_blocks):
            return path
    return None


def fp_source() -> Path:
    """The trained full-precision SRResNet every PTQ model starts from."""
    from ..engine.models_store import resolve_model

    return resolve_model("srresnet_fp")  # by name: `--bits 32` follows the default's architecture


def _copy_fp_weights(net, fp_state: dict[str, Any]) -> None:
    """Copy every FP tensor whose name and shape exist in ``net`` (a shorter net takes the first
    blocks); quantizer state and RefER blocks are not in the FP model and stay as built."""
    own = net.state_dict()
    fitting = {k: v for k, v in fp_state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(fitting, strict=False)


def build_ptq(key: str, n_blocks: int, seed: int = SEED):
    """``MODELS[key]`` by post-training quantization of the bundled FP SRResNet (eval mode).

    RefER blocks are new layers no FP model has; their refinement conv starts at zero so each
    RefER passes the query feature through unchanged (the warped reference only matters once
    QAT trains it). Quantizer ranges come from one train-mode forward on calibration patches
    (RefQSR: both paths, with the bundled 8-bit ClustBlock)."""
    import torch

    from ..models.checkpoint import load_model
    from ..models.qconv import BitSpec
    from ..models.registry import build_refqsr, build_sr

    spec = MODELS[key]
    torch.manual_seed(seed)
    fp, _ = load_model(fp_source())
    fp_state = fp.state_dict()
    x = _calibration_patches(seed=seed)
    if spec["kind"] == "refqsr":
        clust, _ = load_model(clustblock_path())
        model = build_refqsr("srresnet", spec["scheme"], spec["b_high"], spec["b_low"], clust, n_blocks=n_blocks)
        _copy_fp_weights(model.backbone, fp_state)
        with torch.no_grad():
            for refer in model.refers:
                refer.conv2.conv.weight.zero_()
                refer.conv2.conv.bias.zero_()
        model.train()
        with torch.no_grad():
            model(x.flip(-1), x)  # (queries, references): both paths' ranges
    elif spec["scheme"] is None:
        model = build_sr("srresnet", None, (), n_blocks=n_blocks)
        _copy_fp_weights(model, fp_state)
    else:
        model = build_sr("srresnet", spec["scheme"], (spec["act_bits"],), n_blocks=n_blocks)
        _copy_fp_weights(model, fp_state)
        model.train()
        with torch.no_grad():
            model(x, BitSpec.uniform(spec["act_bits"]))
    return model.eval()


def prepare_model(key: str, n_blocks: int) -> dict[str, Any]:
    """The model file of ``MODELS[key]``: a bundled trained one if it exists, else made by PTQ from
    the bundled FP model (built once, cached; keyed by the FP file's hash and the recipe version).
    ``weights``: "trained", "ptq", or "fp-truncated" (a full-precision model cut to ``n_blocks``)."""
    path = bundled_model(key, n_blocks)
    if path is not None:
        return {
            "path": str(path),
            "weights": "trained",
            "bits": MODELS[key]["bits"],
            "n_blocks": n_blocks,
            "source": path.stem,
        }
    from ..engine.artifact import sha256_file
    from ..models.checkpoint import save_model

    fp = fp_source()
    weights = "fp-truncated" if MODELS[key]["scheme"] is None else "ptq"
    path = bench_cache() / "models" / f"{key}-{n_blocks}blocks-{weights}{PTQ_VERSION}-{sha256_file(fp)[:12]}.pt"
    if not path.is_file():
        card = {
            "weights": weights,
            "label": weights_label(weights),
            "fp_source": str(fp),
            "purpose": "benchmark only: weights of the bundled FP SRResNet, quantizer ranges calibrated by one "
            f"train-mode forward on {CALIBRATION_PHOTO} patches, RefER blocks identity-initialised; no QAT",
        }
        save_model(path, build_ptq(key, n_blocks), card, half=False)
    return {"path": str(path), "weights": weights, "bits": MODELS[key]["bits"], "n_blocks": n_blocks, "source": fp.stem}


# ---------------------------------------------------------------------------------------------
# compiled artifacts and ONNX graphs


def dir_bytes(path: str | Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_artifact(model_path: str, patch: int, batch: int, threads: int) -> dict[str, Any]:
    """The compiled artifact of a model file for this host (compiled now unless cached)."""
    from ..engine.artifact import cache_key, package_version
    from ..engine.compiler.compile_model import compile_model
    from ..engine.compiler.options import CompileOptions, artifact_cache_parts

    opts = CompileOptions(model=model_path, target="llvm", patch=patch, batch=batch, threads=threads)
    key = cache_key(**artifact_cache_parts(opts), engine=package_version())
    out = bench_cache() / "artifacts" / key
    compiled_now = not (out / "manifest.json").is_file()
    t = time.perf_counter()
    if compiled_now:
        compile_model(opts, out)
    libs = [p for p in out.iterdir() if p.suffix == ".so"]
    return {
        "artifact": str(out),
        "compiled_now": compiled_now,
        "prepare_seconds": round(time.perf_counter() - t, 2),
        "disk_bytes": sum(p.stat().st_size for p in libs),
        "artifact_bytes": dir_bytes(out),
    }


def prepare_onnx(model_path: str, patch: int) -> dict[str, Any]:
    """``sr.onnx`` of a full- or fixed-precision model file (``export_sr``; exported now unless cached)."""
    from importlib import metadata

    from ..engine.artifact import cache_key, sha256_file

    key = cache_key(
        model_sha256=sha256_file(model_path),
        patch=patch,
        torch=metadata.version("torch"),
        onnx=metadata.version("onnx"),
    )
    out = bench_cache() / "onnx" / key
    path = out / "sr.onnx"
    exported_now = not path.is_file()
    t = time.perf_counter()
    if exported_now:
        from ..export.onnx_export import export_sr
        from ..models.checkpoint import load_model
        from ..models.model_info import model_bits

        model, _ = load_model(model_path)
        tmp = out.with_name(out.name + ".tmp")
        written = export_sr(model, model_bits(model), tmp, patch)["sr"]
        out.mkdir(parents=True, exist_ok=True)
        written.replace(path)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "onnx": str(path),
        "exported_now": exported_now,
        "prepare_seconds": round(time.perf_counter() - t, 2),
        "disk_bytes": path.stat().st_size,
    }


def prepare_ort_static(fp_onnx: str, patch: int, split: bool = False) -> dict[str, Any]:
    """ONNX Runtime's static int8 quantization of an FP ``sr.onnx`` (QDQ format, u8 activations,
    per-channel s8 weights, min/max ranges from patches of the calibration photo); cached.

    ``split``: only the residual blocks' convs are quantized, as the engine does
    (:func:`.qdq_split.body_conv_nodes`; head, body-end conv, upsampler, tail and the skip paths
    stay fp32, :func:`.qdq_split.float_outside`); else every op ORT quantizes by default."""
    from importlib import metadata

    from ..engine.artifact import cache_key, sha256_file

    parts = {"fp_onnx_sha256": sha256_file(fp_onnx), "patch": patch, "ort": metadata.version("onnxruntime")}
    key = cache_key(**parts, recipe=1) if not split else cache_key(**parts, recipe=1, split="body-convs-1")
    path = bench_cache() / "onnx-int8" / key / "sr_int8.onnx"
    exported_now = not path.is_file()
    t = time.perf_counter()
    if exported_now:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        patches = _calibration_patches(n=8, patch=patch).numpy()
        input_name = onnx.load(fp_onnx, load_external_data=False).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{input_name: patches[i : i + 1]} for i in range(len(patches))])

            def get_next(self):
                return next(self.items, None)

        tmp = path.parent.with_name(path.parent.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        pre = tmp / "pre.onnx"
        quant_pre_process(fp_onnx, str(pre), skip_symbolic_shape=True)
        nodes = None
        if split:
            from .qdq_split import body_conv_nodes

            nodes = body_conv_nodes(onnx.load(str(pre), load_external_data=False))
        quantize_static(
            str(pre),
            str(tmp / path.name),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
        )
        if split:
            from .qdq_split import float_outside

            graph = onnx.load(str(tmp / path.name))
            float_outside(graph, nodes)
            onnx.save(graph, str(tmp / path.name))
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp / path.name).replace(path)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "onnx": str(path),
        "exported_now": exported_now,
        "prepare_seconds": round(time.perf_counter() - t, 2),
        "disk_bytes": path.stat().st_size,
    }


def prepare_all(
    configs: list[dict[str, str]],
    n_blocks: int,
    patch: int,
    batch: int,
    threads: int,
    say: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Models, artifacts and graphs of every configuration (each model/artifact/graph once)."""
    models: dict[str, dict[str, Any]] = {}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for cfg in configs:
        key = cfg["model"]
        if key not in models:
            models[key] = prepare_model(key, n_blocks)
            say(f"model {key}: {models[key]['weights']} ({Path(models[key]['path']).name})")
        model = models[key]
        entry = {
            "model_path": model["path"],
            "weights": model["weights"],
            "source": model["source"],
            "bits": model["bits"],
            "n_blocks": n_blocks,
            "model_bytes": dir_bytes(model["path"]),
        }
        graph = (cfg["runner"], key, cfg.get("ort_quant"))
        if cfg["runner"] in ("tvm", "ort") and graph not in done:
            what = "compiled artifact" if cfg["runner"] == "tvm" else "ONNX graph"
            say(f"{cfg['name']}: {what} of {key} (from the cache, else built now: a 16-block compile takes minutes)")
            made = (
                prepare_artifact(model["path"], patch, batch, threads)
                if cfg["runner"] == "tvm"
                else prepare_onnx(model["path"], patch)
            )
            if cfg.get("ort_quant") == "static":
                made = prepare_ort_static(made["onnx"], patch)
            done[graph] = made
            built = made.get("compiled_now") or made.get("exported_now")
            say(f"{cfg['name']}: " + (f"built in {made['prepare_seconds']:.0f} s" if built else "from the cache"))
        if cfg["runner"] in ("tvm", "ort"):
            entry.update(done[graph])
        else:
            entry["disk_bytes"] = entry["model_bytes"]
        out[cfg["name"]] = entry
    return out


# ---------------------------------------------------------------------------------------------
# runners (used inside the measuring subprocess)


class OrtRunner:
    """``PatchRunner`` over an ONNX Runtime ``InferenceSession`` of ``sr.onnx`` (every patch through one graph).

    ORT's graph optimisations are all on (``ORT_ENABLE_ALL``), so on a QDQ graph it may fuse
    DequantizeLinear -> Conv -> QuantizeLinear into its integer kernels; the op types of the
    optimised graph are kept in ``optimized_ops`` and the number of integer kernels among them
    (:data:`INTEGER_OPS`) in ``integer_ops``."""

    refqsr = False
    scale = 4

    def __init__(self, onnx_path: str, threads: int, optimized_path: str | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_path:
            so.optimized_model_filepath = optimized_path
            so.log_severity_level = 3  # not the warning that the saved graph is for this CPU: it is only counted
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.optimized_ops: dict[str, int] = {}
        self.integer_ops: int | None = None
        if optimized_path and Path(optimized_path).is_file():
            import onnx

            counts: dict[str, int] = {}
            for node in onnx.load(optimized_path, load_external_data=False).graph.node:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            self.optimized_ops = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            self.integer_ops = sum(counts.get(op, 0) for op in INTEGER_OPS)

    def sr(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]


class WholeImage:
    """The PyTorch model on the whole LR image: one forward, no patches (``__call__`` -> HR, C x sH x sW)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(lr))[None]).numpy()[0]


def load_torch(model_path: str):
    """(model, the BitSpec it runs at)."""
    from ..models.checkpoint import load_model
    from ..models.model_info import model_bits

    model, _ = load_model(model_path)
    return model, model_bits(model)


def build_runner(cfg: dict[str, str], prepared: dict[str, Any], threads: int, scratch: str | None = None):
    """The runner of one configuration: a ``PatchRunner`` (tvm, torch, ort) or a :class:`WholeImage`."""
    kind = cfg["runner"]
    if kind == "tvm":
        from ..engine.runtime import CompiledModel

        return CompiledModel.load(prepared["artifact"])
    if kind == "ort":
        return OrtRunner(prepared["onnx"], threads, str(Path(scratch) / "optimized.onnx") if scratch else None)
    from ..models.patchwise import TorchRunner

    model, bits = load_torch(prepared["model_path"])
    return WholeImage(model) if kind == "torch-whole" else TorchRunner(model, bits)


if __name__ == "__main__":  # list the configurations
    print(json.dumps({"configs": CONFIGS, "models": MODELS}, indent=1))
