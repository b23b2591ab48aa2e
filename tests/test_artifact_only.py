"""The compiled engine runs from its artifact alone: `upscale --artifact` in a folder without the
model file and with an empty cache, and a process that loads neither PyTorch, ONNX nor the TVM
compiler; its image equals the PyTorch model's, run patch-wise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from compile_helpers import PATCH, assert_images_match, compile_saved, small_refqsr
from PIL import Image
from refqsr_engine.models.patchwise import upscale_patchwise
from skimage import data

BATCH = 4
HEAVY = ("torch", "onnx", "onnxruntime", "tvm")  # tvm: the compiler package (the runtime is tvm_ffi)

# Runs the CLI in a fresh interpreter, then lists the heavy top-level packages it imported.
PROBE = f"""
import sys
HEAVY = {HEAVY!r}
from refqsr_engine.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}} & set(HEAVY))
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def moved_artifact(tmp_path_factory):
    """A RefQSR model compiled, then its artifact copied elsewhere and the model file deleted."""
    root = tmp_path_factory.mktemp("artifact_only")
    model = small_refqsr("ddtb", seed=7)
    artifact, _ = compile_saved(model, root / "build", PATCH, BATCH)
    moved = root / "deploy" / "model.art"
    shutil.copytree(artifact, moved)
    shutil.rmtree(root / "build")
    return model, moved, root


def _run(args: list[str], cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFQSR_ENGINE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_upscale_with_an_artifact_needs_no_model_torch_or_compiler(moved_artifact, tmp_path):
    model, artifact, _ = moved_artifact
    lr = data.astronaut()[100:160, 180:250]
    Image.fromarray(lr).save(tmp_path / "in.png")
    cache = tmp_path / "empty-cache"
    proc = _run(
        [
            "upscale",
            str(tmp_path / "in.png"),
            str(tmp_path / "out.png"),
            "--artifact",
            str(artifact),
            "--patch",
            str(PATCH),
            "--batch",
            str(BATCH),
            "--json",
            "-q",
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr  # nothing heavy was imported
    report = json.loads(proc.stdout)
    assert report["compiled_now"] is False and report["references"] > 0 and report["queries"] > 0
    assert not cache.exists()  # the cache was never needed
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255.0
    want = upscale_patchwise(model, lr.astype(np.float32).transpose(2, 0, 1) / 255.0, PATCH, 6, BATCH)
    assert_images_match(got.transpose(2, 0, 1), np.clip(want.image, 0, 1), within_one=0.995)
    # the report's BitOPs come from the manifest: the same as the PyTorch model's description
    from refqsr_engine.models.model_info import describe

    ops = describe(model, "m").image_bitops(lr.shape[:2], PATCH, 6, want.clustering)
    assert report["bitops"]["bitops_g"] == pytest.approx(ops.gbitops, abs=1e-4)


def test_a_damaged_or_foreign_artifact_is_refused_in_one_line(moved_artifact, tmp_path):
    _, artifact, root = moved_artifact
    Image.fromarray(data.astronaut()[:40, :40]).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    wrong_target = _run(
        ["upscale", str(tmp_path / "in.png"), str(out), "--artifact", str(artifact), "--target", "cuda"], tmp_path / "c"
    )
    assert wrong_target.returncode == 2 and "built for --target llvm" in wrong_target.stderr
    broken = root / "broken.art"
    shutil.copytree(artifact, broken)
    lib = next(broken.glob("query_b*.so"))
    damaged = bytearray(lib.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    lib.write_bytes(bytes(damaged))
    proc = _run(["upscale", str(tmp_path / "in.png"), str(out), "--artifact", str(broken)], tmp_path / "c")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not out.exists()
    assert len([x for x in proc.stderr.splitlines() if x.startswith("refqsr-engine: error")]) == 1
