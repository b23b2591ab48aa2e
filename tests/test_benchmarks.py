"""The benchmarks: the latency report's arithmetic and flags on hand-made results, the plan, the
per-batch timer, the Table II / patch-size code on a tiny configuration (BitOPs checked against
``count_bitops``), the plots, and a real ``--quick`` latency run on tiny 4-block models (cache and
results in tmp_path). The default suite runs the quick latency benchmark on three configurations
(one compiled engine, the whole-image PyTorch peer and ONNX Runtime int8); compiling all five
engine artifacts takes minutes, so the run over every configuration, and the quick run of the
whole suite, are marked slow."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from refqsr_engine.benchmarks import configs as C
from refqsr_engine.benchmarks import latency, plots, quality, quality_report, report, suite, summary
from refqsr_engine.benchmarks.run_one import BatchTimer, batch_stats, compare_8bit, network_batches, summarize
from refqsr_engine.benchmarks.valdata import fallback_pairs
from refqsr_engine.models.bitops import count_bitops


def _fake_results() -> dict:
    def rec(name: str, role: str, median: float, check: dict | None = None) -> dict:
        cfg = next(c for c in C.CONFIGS if c["name"] == name)
        size = {
            "median": median,
            "p90": median * 1.1,
            "min": median * 0.9,
            "per_batch": median / 4,
            "stages": {"sr": median * 0.9, "merge": median * 0.1},
            "peak_rss_mb_so_far": 500.0,
            "repeats": 3,
        }
        if check is not None:
            size["check"] = check
        return {
            **cfg,
            "role": role,
            "ok": True,
            "weights": "ptq",
            "bits": "8",
            "baseline_rss_mb": 300.0,
            "disk_bytes": 2**20,
            "sizes": {"320x180": size},
        }

    good = {"max_abs_diff_8bit": 1, "frac_over_1lsb": 0.0, "within_1lsb": True}
    bad = {"max_abs_diff_8bit": 9, "frac_over_1lsb": 0.02, "within_1lsb": False}
    return {
        "machine": {
            "cpu": "test CPU",
            "logical_cpus": 2,
            "usable_cpus": 2,
            "memory_gb": 8,
            "loadavg_start": [0, 0, 0],
            "python": "3",
            "versions": {"torch": "t", "apache-tvm": "v", "onnxruntime": "o", "refqsr-engine": "r"},
        },
        "settings": {
            "sizes": ["320x180"],
            "threads": 2,
            "patch": 96,
            "overlap": 6,
            "batch": 16,
            "n_blocks": 16,
            "photo": "astronaut",
            "plan": [{"size": "320x180", "repeats": 3, "warmup": "full", "budget_s": 20}],
        },
        "configs": {
            "engine-ddtb-8": rec("engine-ddtb-8", "engine", 1.0, good),
            "engine-ddtb-4": rec("engine-ddtb-4", "engine", 0.5, bad),
            "torch-whole-fp32": rec("torch-whole-fp32", "peer", 3.0),
            "ort-fp32": rec("ort-fp32", "peer", 2.0, good),
        },
        "command": "test",
        "timing": {"total_seconds": 1, "prepare_seconds": 0, "measure_seconds": 1},
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
    results["configs"]["ort-fp32"] = {
        **copy.deepcopy(results["configs"]["ort-fp32"]),
        "ok": False,
        "error": "exit 1: boom",
        "sizes": {},
    }
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
    plan = latency.plan_sizes(None, None, "auto", "crop")  # the default plan
    assert [p["size"] for p in plan] == ["320x180", "512x270", "1024x540"]  # ascending: memory is read after each
    assert plan[0]["configs"] == C.config_names() and plan[0]["budget_s"] == 20.0
    assert set(plan[2]["configs"]) < set(plan[1]["configs"]) < set(plan[0]["configs"])
    assert [p["repeats"] for p in plan] == [3, 1, 1]
    assert [p["warmup"] for p in plan] == ["crop", "none", "none"]  # one warm-up per process, on a crop
    assert [p["check"] for p in plan] == ["crop", False, False]
    sub = latency.plan_sizes(None, 2, "auto", "smallest", 5.0, ["torch-whole-fp32"])
    assert [(p["size"], p["repeats"], p["budget_s"], p["check"]) for p in sub] == [
        ("320x180", 2, 5.0, "image"),
        ("512x270", 2, 5.0, False),
        ("1024x540", 2, 5.0, False),
    ]
    given = latency.plan_sizes(["1024x540", "320x180"], None, "auto", "none")
    assert [(p["size"], p["repeats"], p["check"]) for p in given] == [("320x180", 3, False), ("1024x540", 1, False)]
    assert all(p["configs"] == C.config_names() for p in given)
    assert all(p["check"] == "image" for p in latency.plan_sizes(["8x8", "16x16"], 2, "full", "all"))
    with pytest.raises(Exception, match="WIDTHxHEIGHT"):
        latency.parse_size("12by5")
    with pytest.raises(ValueError, match="unknown configuration"):
        C.select_configs(["engine-nope"])


def test_batch_timer_and_stats():
    class Fake:
        refqsr, scale = False, 4

        def sr(self, x):
            return np.zeros((x.shape[0], 3, 4, 4), np.float32)

    timer = BatchTimer(Fake())
    for n in (4, 4, 4, 1):
        assert timer.sr(np.zeros((n, 3, 1, 1), np.float32)).shape[0] == n
    assert [c[:2] for c in timer.calls] == [("sr", 4)] * 3 + [("sr", 1)]
    stats = batch_stats([("sr", 4, 0.1), ("sr", 4, 0.3), ("sr", 4, 0.2), ("sr", 1, 9.0), ("cluster", 2, 0.5)], 4)
    assert stats["sr"]["full_batches"] == 3 and stats["sr"]["short_batches"] == 1
    assert stats["sr"]["median_ms"] == pytest.approx(200.0) and stats["sr"]["min_ms"] == pytest.approx(100.0)
    assert stats["cluster"]["full_batches"] == 0 and stats["cluster"]["median_ms"] == pytest.approx(500.0)


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
        if rec["runner"] != "torch-whole":  # every network call of the run, timed on its own
            stage = "sr" if "sr" in r["batches"] else "query"
            assert r["batches"][stage]["full_batches"] >= 1 and r["batches"][stage]["median_ms"] > 0
        assert sum(r["stages"].values()) > 0
        assert rec["peak_rss_mb"] > 0 and r["peak_rss_mb_so_far"] > 0 and rec["disk_bytes"] > 0
        assert f"| {rec['label']} | {C.weights_label(rec['weights'])} | 1 |" in md
        assert rec["weights"] == ("fp-truncated" if rec["bits"] == "32" else "ptq")  # 4 blocks: nothing bundled
        if rec["runner"] != "torch-whole":
            assert r["patches"] == 20 and r["network_batches"] >= 20 and r["per_batch"] > 0  # 96x64, patch 24, batch 1
        if rec["role"] == "engine":  # the compiled engine equals its PyTorch twin
            check = r["check"]
            assert check["on"] == "crop" and check["within_1lsb"] and check["max_abs_diff_8bit"] <= 1, (name, check)
            assert check.get("same_clustering", True)
        if rec["runner"] == "ort":
            assert rec["ort_optimized_ops"]
            if rec.get("ort_quant") == "static":  # ORT's own int8: integer kernels, no PyTorch twin
                assert rec["ort_integer_ops"] > 0 and "check" not in r
            else:
                assert "check" in r
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


# ---------------------------------------------------------------------------------------------
# Table II / patch-size study, plots


@pytest.fixture(scope="module")
def tiny_quality(tmp_path_factory):
    """Two passes of the quality code on 4-block PTQ models and one 64x48 LR crop."""
    mp = pytest.MonkeyPatch()
    mp.setenv("REFQSR_ENGINE_CACHE", str(tmp_path_factory.mktemp("cache")))
    pairs = fallback_pairs((192, 256))[:1]
    runner = quality.Runner(dict(quality.QUICK), pairs, lambda msg: None)
    rows = {
        "refqsr": runner.row("refqsr-8-4", 24),
        "ddtb_full": runner.row("ddtb-8", None),
        "fp": runner.row("fp32", 24),
    }
    yield runner, pairs, rows
    mp.undo()


def test_quality_bitops_match_count_bitops(tiny_quality):
    runner, pairs, rows = tiny_quality
    lr_hw = pairs[0].lr.shape[:2]
    assert lr_hw == (48, 64)
    r = rows["refqsr"]
    img = r["images"][0]
    want = count_bitops("srresnet", lr_hw, "8-4", 24, 6, "engine", img["is_reference"], img["reference_of"], n_blocks=4)
    assert img["patches"] == want.num_patches == 12 and img["references"] == want.num_references
    assert r["bitops_g"] == pytest.approx(want.gbitops, rel=1e-9)
    assert r["fqr"] == pytest.approx(want.total.fqr, rel=1e-9) and 4 < r["fqr"] < 8
    assert r["reference_share"] == pytest.approx(want.num_references / 12)
    assert r["clustblock_g"] == pytest.approx(want.total.clustblock / 1e9, rel=1e-9)
    paper = count_bitops("srresnet", (180, 320), "8-4", 72, 6, "paper", ref_fraction=r["reference_share"], n_blocks=4)
    assert r["paper_setting"]["bitops_g"] == pytest.approx(paper.gbitops)
    full = count_bitops("srresnet", lr_hw, "8", None, grid="full", n_blocks=4)
    assert rows["ddtb_full"]["bitops_g"] == pytest.approx(full.gbitops) and rows["ddtb_full"]["fqr"] == 8.0
    fp = count_bitops("srresnet", lr_hw, "32", 24, 6, "engine", n_blocks=4)
    assert rows["fp"]["bitops_g"] == pytest.approx(fp.gbitops) and rows["fp"]["fqr"] == 32.0
    for row in rows.values():
        assert 15 < row["psnr_y"] < 60 and 0 < row["ssim_y"] <= 1
    assert rows["refqsr"]["weights_label"] == "PTQ from FP (not QAT)"
    assert rows["fp"]["weights"] == "fp-truncated"


def test_quality_tables_and_budget(tiny_quality, tmp_path):
    runner, pairs, rows = tiny_quality
    runner.deadline = 0.0  # long past: any pass not done yet is skipped, done ones are reused
    skipped = runner.row("refqsr-4-2", 24)
    assert "skipped" in skipped and runner.row("refqsr-8-4", 24)["bitops_g"] == rows["refqsr"]["bitops_g"]
    runner.deadline = None
    results = {
        "quick": True,
        "settings": {
            **quality.QUICK,
            "threads": 1,
            "grid": "engine",
            "paper_setting": {"lr_size": [180, 320], "patch": 72, "overlap": 6},
        },
        "validation": {
            "source": "test",
            "images": [{"name": "x", "lr_size": [64, 48]}],
            "degradation": "bicubic",
            "hr_crop": None,
        },
        "table2": [
            {**rows["fp"], "label": "SRResNet (FP32)"},
            {**rows["refqsr"], "label": "+RefQSR (8-4 bit)"},
            {**skipped, "label": "+RefQSR (4-2 bit)"},
        ],
        "patch_study": [{**rows["ddtb_full"], "label": "8"}, {**rows["refqsr"], "label": "8-4"}],
    }
    paths = quality_report.write(results, tmp_path)
    assert sorted(p.name for p in paths) == [
        "patch_size-quick.json",
        "patch_size-quick.md",
        "table2-quick.json",
        "table2-quick.md",
    ]
    t2 = (tmp_path / "table2-quick.md").read_text()
    r = rows["refqsr"]
    assert (
        f"| +RefQSR (8-4 bit) | PTQ from FP (not QAT) | {r['bitops_g']:.2f} | {r['fqr']:.2f} | {r['psnr_y']:.2f} |"
        in t2
    )
    assert "| +RefQSR (4-2 bit) | skipped: predicted" in t2
    study = (tmp_path / "patch_size-quick.md").read_text()
    assert "| SRResNet-DDTB | 8 | PTQ from FP (not QAT) | full image | 1 |" in study
    data = json.loads((tmp_path / "table2-quick.json").read_text())
    assert data["rows"][1]["images"][0]["is_reference"] == r["images"][0]["is_reference"]
    png = plots.psnr_vs_bitops(results, tmp_path / "bitops.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_latency_plot_and_summary(tmp_path):
    results = report.finalize(_fake_results())
    results["configs"]["ort-fp32"]["sizes"]["1024x540"] = {"skipped": "one run predicted at 99 s would end past"}
    results["settings"]["sizes"].append("1024x540")
    png = plots.latency(results, tmp_path / "lat.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    suite_info = {
        "created": "now",
        "command": "refqsr-engine bench all",
        "cache_note": "from the cache",
        "timing": {"latency_seconds": 1.0, "total_seconds": 2.0},
        "machine": {**results["machine"], "isa": ["avx2"], "platform": "linux", "versions": {"torch": "t"}},
        "pictures": {"latency": "lat.png"},
    }
    md = summary.markdown(suite_info, results, None)
    assert "| engine DDTB-8 | PTQ from FP (not QAT) | 1.00 (0.90-1.10) / 500 | - | 1.0 |" in md
    assert "skipped (time budget)" in md and "![latency](lat.png)" in md and "test CPU" in md


@pytest.mark.slow
def test_quick_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    assert (
        suite.main(
            ["--quick", "--threads", "1", "--out", str(out), "--configs", "engine-refqsr-8-4", "torch-whole-fp32"]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    for stem in ("latency", "table2", "patch_size", "suite"):
        assert f"{stem}-quick.json" in names
    assert {"summary-quick.md", "psnr_vs_bitops-quick.png", "latency-quick.png", "explain-quick.png"} <= names
    info = json.loads((out / "suite-quick.json").read_text())
    assert info["timing"]["total_seconds"] > 0 and info["explain"]["patches"] > 1


def test_measure_budget_and_deadline(tmp_path, monkeypatch):
    """run_one.measure in-process on a tiny FP model: the run budget caps the repeats, per-batch
    samples come from the runs, and a size predicted to end past the deadline is skipped."""
    import time

    from refqsr_engine.benchmarks import run_one

    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "cache"))
    model = C.prepare_model("fp32", 2)
    images = {}
    for w, h in ((48, 40), (96, 80)):
        images[f"{w}x{h}"] = str(tmp_path / f"lr_{w}x{h}.npy")
        np.save(images[f"{w}x{h}"], C.make_lr(w, h))
    cfg = next(c for c in C.CONFIGS if c["name"] == "torch-patches-fp32")
    sizes = [
        {
            "size": "48x40",
            "width": 48,
            "height": 40,
            "configs": [cfg["name"]],
            "repeats": 3,
            "budget_s": None,
            "warmup": "crop",
            "check": False,
        },
        {
            "size": "96x80",
            "width": 96,
            "height": 80,
            "configs": [cfg["name"]],
            "repeats": 3,
            "budget_s": 0.0,
            "warmup": "none",
            "check": False,
        },
    ]
    spec = {
        "configs": [cfg],
        "prepared": {cfg["name"]: {"model_path": model["path"]}},
        "threads": 1,
        "patch": 24,
        "overlap": 6,
        "batch": 2,
        "sizes": sizes,
        "images": images,
        "work": str(tmp_path),
        "deadline": None,
    }
    rec = run_one.measure(spec, cfg["name"])
    small, big = rec["sizes"]["48x40"], rec["sizes"]["96x80"]
    assert small["repeats"] == 3 and big["repeats"] == 1  # a zero budget still times one run
    assert small["patches"] == 6 and small["batches"]["sr"]["full_batches"] == 9  # 3 runs x 3 batches of 2
    assert small["peak_rss_mb_so_far"] > 0 and big["per_batch"] > 0
    spec["deadline"] = time.time()  # already reached: the larger size cannot fit
    rec = run_one.measure(spec, cfg["name"])
    assert "median" in rec["sizes"]["48x40"] and "would end past" in rec["sizes"]["96x80"]["skipped"]


def test_guard_judges_ratios_against_floors():
    from refqsr_engine.benchmarks.guard import judge

    measured = {"end_to_end": {"ratio": 2.5}, "int8_conv": {"ratio": 1.0}, "new": {"ratio": 9.0}}
    floors = {"end_to_end": 2.9, "int8_conv": 1.5}
    assert judge(measured, floors, 0.15) == {"end_to_end": "ok", "int8_conv": "REGRESSION", "new": "no floor yet"}
    assert judge(measured, floors, 0.10)["end_to_end"] == "REGRESSION"  # 2.5 < 2.9 * 0.9


def test_report_files_hold_no_machine_paths(tmp_path, monkeypatch) -> None:
    """Result files name paths relative to where the command ran, and the home folder as ``~``."""
    import os

    from refqsr_engine.files import write_text_atomic

    home = tmp_path / "home" / "alice"
    work = home / "refqsr"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    text = f"Command: `bench --out {work}/runs/x`\nartifact: {home}/.cache/refqsr-engine/a1\nother: /opt/data\n"
    out = write_text_atomic(tmp_path / "r.md", text)
    assert out.read_text() == (
        "Command: `bench --out runs/x`\nartifact: ~" + os.sep + ".cache/refqsr-engine/a1\nother: /opt/data\n"
    )
