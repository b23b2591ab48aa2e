"""The latency benchmark: the report's arithmetic and flags on hand-made results, and a real
``--quick`` run on tiny 4-block models (cache and results in tmp_path). The default suite runs the
quick benchmark on three configurations (one compiled engine, the whole-image PyTorch peer and
ONNX Runtime int8); compiling all five engine artifacts takes minutes, so the run over every
configuration is marked slow."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from refqsr_engine.benchmarks import configs as C
from refqsr_engine.benchmarks import latency, report
from refqsr_engine.benchmarks.run_one import compare_8bit, network_batches, summarize


def _fake_results() -> dict:
    def rec(name: str, role: str, median: float, check: dict | None = None) -> dict:
        cfg = next(c for c in C.CONFIGS if c["name"] == name)
        size = {"median": median, "p90": median * 1.1, "min": median * 0.9, "per_batch": median / 4,
                "stages": {"sr": median * 0.9, "merge": median * 0.1}, "peak_rss_mb_so_far": 500.0, "repeats": 3}
        if check is not None:
            size["check"] = check
        return {**cfg, "role": role, "ok": True, "weights": "fresh", "bits": "8", "baseline_rss_mb": 300.0,
                "disk_bytes": 2**20, "sizes": {"320x180": size}}

    good = {"max_abs_diff_8bit": 1, "frac_over_1lsb": 0.0, "within_1lsb": True}
    bad = {"max_abs_diff_8bit": 9, "frac_over_1lsb": 0.02, "within_1lsb": False}
    return {
        "machine": {"cpu": "test CPU", "logical_cpus": 2, "usable_cpus": 2, "memory_gb": 8, "loadavg_start": [0, 0, 0],
                    "python": "3", "versions": {"torch": "t", "apache-tvm": "v", "onnxruntime": "o",
                                                "refqsr-engine": "r"}},
        "settings": {"sizes": ["320x180"], "threads": 2, "patch": 96, "overlap": 6, "batch": 16, "n_blocks": 16,
                     "photo": "astronaut", "plan": [{"size": "320x180", "repeats": 3, "warmup": "full"}]},
        "configs": {"engine-ddtb-8": rec("engine-ddtb-8", "engine", 1.0, good),
                    "engine-ddtb-4": rec("engine-ddtb-4", "engine", 0.5, bad),
                    "torch-whole-fp32": rec("torch-whole-fp32", "peer", 3.0),
                    "ort-fp32": rec("ort-fp32", "peer", 2.0, good)},
        "command": "test", "timing": {"total_seconds": 1, "prepare_seconds": 0, "measure_seconds": 1},
    }


def test_ratios_are_peer_over_engine_and_disagreement_is_flagged():
    results = report.finalize(_fake_results())
    rows = {(r["engine"], r["peer"]): r for r in results["ratios"]["320x180"]}
    assert set(rows) == {(e, p) for e in ("engine-ddtb-8", "engine-ddtb-4") for p in ("torch-whole-fp32", "ort-fp32")}
    assert rows[("engine-ddtb-8", "torch-whole-fp32")]["speedup"] == pytest.approx(3.0)
    assert rows[("engine-ddtb-4", "ort-fp32")]["speedup"] == pytest.approx(4.0)
    assert rows[("engine-ddtb-4", "ort-fp32")]["time_ratio"] == pytest.approx(0.25)
    assert len(results["flags"]) == 1 and results["flags"][0].startswith("engine-ddtb-4 @ 320x180")
    md = report.markdown(results)
    assert "**NO** (max 9)" in md and "yes (max 1)" in md
    assert "| engine DDTB-8 | 3.00x | 2.00x |" in md
    assert "engine DDTB-8 vs PyTorch eager fp32 (whole image): 3.00x" in report.ratio_lines(results)[0]


def test_failed_configuration_is_reported_not_compared():
    results = _fake_results()
    results["configs"]["ort-fp32"] = {**copy.deepcopy(results["configs"]["ort-fp32"]), "ok": False,
                                      "error": "exit 1: boom", "sizes": {}}
    results = report.finalize(results)
    assert all(r["peer"] != "ort-fp32" for r in results["ratios"]["320x180"])
    assert any("ort-fp32: failed (exit 1: boom)" in f for f in results["flags"])
    assert "| ONNX Runtime fp32 | - | failed |" in report.markdown(results)


def test_compare_8bit_and_helpers():
    want = np.full((3, 40, 50), 100, np.int16)
    got = want.copy()
    got[0, 0, :2] += 1  # one LSB never counts
    assert compare_8bit(got, want) == {"max_abs_diff_8bit": 1, "frac_over_1lsb": 0.0, "within_1lsb": True}
    got[1, :3, :] += 5  # 150 of 6000 values (2.5 %) off by 5
    verdict = compare_8bit(got, want)
    assert verdict["max_abs_diff_8bit"] == 5 and not verdict["within_1lsb"]
    assert network_batches(18, None, 16) == 2 and network_batches(18, 5, 16) == 2 and network_batches(18, 3, 2) == 10
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"]) == (2.0, 1.0) and s["p90"] == pytest.approx(2.8)


def test_size_plan():
    plan = latency.plan_sizes(["1024x540", "320x180", "512x270"], None, "auto", "smallest")
    assert [p["size"] for p in plan] == ["320x180", "512x270", "1024x540"]  # ascending: memory is read after each
    assert [p["repeats"] for p in plan] == [3, 1, 1]
    assert [p["warmup"] for p in plan] == ["full", "none", "none"]  # one warm-up per process
    assert latency.plan_sizes(["1024x540"], None, "auto", "none")[0]["warmup"] == "crop"
    assert [p["check"] for p in plan] == [True, False, False]
    assert all(p["check"] for p in latency.plan_sizes(["8x8", "16x16"], 2, "full", "all"))
    with pytest.raises(Exception, match="WIDTHxHEIGHT"):
        latency.parse_size("12by5")
    with pytest.raises(ValueError, match="unknown configuration"):
        C.select_configs(["engine-nope"])


def test_lr_image_has_the_requested_size():
    lr = C.make_lr(96, 64)
    assert lr.shape == (3, 64, 96) and lr.dtype == np.float32 and 0.0 <= lr.min() and lr.max() <= 1.0


def _check_quick_run(out, names: list[str]) -> dict:
    data = json.loads((out / "latency-quick.json").read_text())
    md = (out / "latency-quick.md").read_text()
    size = data["settings"]["sizes"][0]
    assert list(data["configs"]) == names
    for name, rec in data["configs"].items():
        assert rec["ok"], rec.get("error")
        r = rec["sizes"][size]
        assert len(r["times"]) == 1 and all(t > 0 for t in r["times"]) and r["median"] > 0 and r["min"] > 0
        assert sum(r["stages"].values()) > 0
        assert rec["peak_rss_mb"] > 0 and r["peak_rss_mb_so_far"] > 0 and rec["disk_bytes"] > 0
        assert f"| {rec['label']} | fresh |" in md
        if rec["runner"] != "torch-whole":
            assert r["patches"] == 20 and r["network_batches"] >= 20 and r["per_batch"] > 0  # 96x64, patch 24, batch 1
        if rec["role"] == "engine":  # the compiled engine equals its PyTorch twin
            check = r["check"]
            assert check["within_1lsb"] and check["max_abs_diff_8bit"] <= 1, (name, check)
            assert check.get("same_clustering", True)
        if rec["runner"] == "ort":
            assert "check" in r and rec["ort_optimized_ops"]
    for row in data["ratios"][size]:
        e, p = data["configs"][row["engine"]], data["configs"][row["peer"]]
        assert row["speedup"] == pytest.approx(p["sizes"][size]["median"] / e["sizes"][size]["median"], rel=1e-2)
        assert math.isclose(row["speedup"] * row["time_ratio"], 1.0, rel_tol=1e-2)
        assert f"{row['speedup']:.2f}x" in md
    n_engines = sum(c["role"] == "engine" for c in data["configs"].values())
    n_peers = len(names) - n_engines
    assert len(data["ratios"][size]) == n_engines * n_peers
    assert not [f for f in data["flags"] if not f.startswith("ort-int8: ONNX Runtime fused no")]
    assert data["machine"]["cpu"] and data["machine"]["versions"]["apache-tvm"] != "none"
    return data


def _quick(tmp_path, monkeypatch, names: list[str] | None) -> dict:
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    argv = ["--quick", "--threads", "1", "--out", str(out)] + (["--configs", *names] if names else [])
    assert latency.main(argv) == 0
    assert (tmp_path / "cache" / "bench" / "artifacts").is_dir()  # compiled into the monkeypatched cache
    return _check_quick_run(out, names or C.config_names())


def test_quick_run(tmp_path, monkeypatch):
    _quick(tmp_path, monkeypatch, ["engine-ddtb-8", "torch-whole-fp32", "ort-int8"])


@pytest.mark.slow
def test_quick_run_every_configuration(tmp_path, monkeypatch):
    data = _quick(tmp_path, monkeypatch, None)
    refqsr = data["configs"]["engine-refqsr-8-4"]["sizes"]["96x64"]
    assert 0 < refqsr["references"] < refqsr["patches"]  # references and queries both ran
