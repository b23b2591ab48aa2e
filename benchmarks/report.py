"""The latency benchmark's results as JSON and a Markdown table: per size, every configuration's
times, stages, memory and agreement with its PyTorch twin, then the engine-over-peer speed-ups.

A speed-up is ``peer median / engine median`` on the same image (> 1: the engine is faster);
``time_ratio`` (engine / peer) is its inverse. Only configurations that ran are compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_text_atomic

WARMUP = {
    "full": "one run on this image",
    "crop": "one run on its top-left 2 x 2 patches",
    "none": "none, the process is warm from the smaller size",
}


def weights_cell(rec: dict[str, Any]) -> str:
    from .configs import weights_label  # no heavy import: configs imports torch lazily

    label = weights_label(str(rec.get("weights", "?")))
    return f"{label}: {rec['source']}" if rec.get("weights") == "trained" and rec.get("source") else label


def batch_cell(r: dict[str, Any]) -> str:
    """Per-batch times of one size: 'reference 1234 / 1300 / 1200 (4)' per stage, ms, (full batches)."""
    batches = r.get("batches")
    if not batches:
        return "-"

    def ms(v: float) -> str:
        return f"{v:.0f}" if v >= 10 else f"{v:.2g}"

    return "; ".join(
        f"{stage} {ms(b['median_ms'])} / {ms(b['p90_ms'])} / {ms(b['min_ms'])} "
        f"({b['full_batches'] or str(b['short_batches']) + ' short'})"
        for stage, b in batches.items()
    )


def _ok(rec: dict[str, Any]) -> bool:
    return bool(rec.get("ok"))


def timed(rec: dict[str, Any], size: str) -> dict[str, Any] | None:
    """The configuration's result at ``size`` if it ran there (not failed, not skipped)."""
    r = rec.get("sizes", {}).get(size) if _ok(rec) else None
    return None if r is None or "skipped" in r else r


def ratios(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per size: one entry per (engine configuration, peer) pair that both ran on that size."""
    configs = results["configs"]
    out: dict[str, list[dict[str, Any]]] = {}
    for size in results["settings"]["sizes"]:
        rows = []
        for e_name, e in configs.items():
            if e["role"] != "engine" or timed(e, size) is None:
                continue
            for p_name, p in configs.items():
                if p["role"] != "peer" or timed(p, size) is None:
                    continue
                te, tp = e["sizes"][size]["median"], p["sizes"][size]["median"]
                rows.append(
                    {"engine": e_name, "peer": p_name, "speedup": round(tp / te, 3), "time_ratio": round(te / tp, 3)}
                )
        out[size] = rows
    return out


def flags(results: dict[str, Any]) -> list[str]:
    """Failed configurations, outputs that disagree with their PyTorch twin (more than 0.1 % of
    8-bit pixels off by more than 1, or a different clustering), and quantized ONNX Runtime
    graphs that ORT ran without integer kernels."""
    found = []
    for name, rec in results["configs"].items():
        if not _ok(rec):
            found.append(f"{name}: failed ({rec.get('error', 'no result')})")
            continue
        for size, r in rec["sizes"].items():
            if "skipped" in r:
                found.append(f"{name} @ {size}: skipped ({r['skipped']})")
                continue
            check = r.get("check")
            if check is None:
                continue
            if not check["within_1lsb"]:
                found.append(
                    f"{name} @ {size}: output differs from its PyTorch twin by more than 1 LSB on "
                    f"{100 * check['frac_over_1lsb']:.2f} % of pixels (max {check['max_abs_diff_8bit']})"
                )
            if check.get("same_clustering") is False:
                found.append(f"{name} @ {size}: clustering differs from its PyTorch twin")
        if rec.get("ort_integer_ops") == 0 and rec.get("bits") != "32":
            found.append(
                f"{name}: ONNX Runtime fused no QDQ node into an integer kernel; it ran the "
                f"{rec.get('bits')}-bit graph's convs in float"
            )
    return found


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _check_cell(r: dict[str, Any]) -> str:
    check = r.get("check")
    if check is None:
        return "-"
    mark = "yes" if check["within_1lsb"] and check.get("same_clustering", True) else "**NO**"
    on = " on 2x2 patches" if check.get("on") == "crop" else ""
    return f"{mark} (max {check['max_abs_diff_8bit']}{on})"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report: machine, settings, one table per size, speed-ups, flags."""
    m, s = results["machine"], results["settings"]
    configs = results["configs"]
    lines = ["# Latency and peak memory", ""]
    lines.append(
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['memory_gb']} GB; load average {m['loadavg_start']} at start, {m.get('loadavg_end', '?')} at end."
    )
    lines.append(
        f"Software: Python {m['python']}, torch {m['versions']['torch']}, TVM {m['versions']['apache-tvm']}, "
        f"ONNX Runtime {m['versions']['onnxruntime']}, refqsr-engine {m['versions']['refqsr-engine']}."
    )
    lines.append(
        f"Threads: {s['threads']} everywhere (torch.set_num_threads, ORT intra_op_num_threads, "
        "TVM_NUM_THREADS, OMP_NUM_THREADS)."
    )
    lines.append(
        f"Grid: patch {s['patch']}, overlap {s['overlap']}, batch {s['batch']}; {s['n_blocks']}-block SRResNet x4 "
        f"models; LR images: the scikit-image '{s['photo']}' photo, centre-cropped to each aspect ratio "
        "and resized (bicubic)."
    )
    lines.append(
        "Times: wall time of the whole pipeline per image (tiling, network batches, merge; RefQSR also "
        "clusters), in a process warmed up by one run on a crop; median / p90 / min over the runs. Per batch: "
        "every network call inside those runs timed on its own, statistics over the full batches of each stage "
        "(`cluster` = ClustBlock batches; `reference`/`query` = RefQSR's; `sr` = everything else). "
        "CPU/wall: the process's CPU time over its wall time "
        "(about the thread count when it had its cores to itself; less when other work shared the CPU). "
        "Peak RSS: VmHWM of the configuration's own "
        "process (imports included; `+model` = above the post-import baseline). On disk: what the runner "
        "loads (compiled libraries, ONNX graph or model file)."
    )
    if s.get("quick"):
        lines.append("**Quick run**: tiny models and one small image; a smoke test, not a measurement.")
    lines.append("")
    for size in s["sizes"]:
        plan = next(p for p in s["plan"] if p["size"] == size)
        lines += [
            f"## {size} LR -> x4 (at most {plan['repeats']} run(s)"
            + (f" within {plan['budget_s']:.0f} s" if plan.get("budget_s") else "")
            + f"; warm-up: {WARMUP[plan['warmup']]})",
            "",
            "| configuration | weights | runs | median s | p90 s | min s | per batch ms: median / p90 / min "
            "(full batches) | CPU/wall | stages (median s) | peak RSS MB (+model) | on disk MB | = PyTorch twin |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | --- |",
        ]
        for name, rec in configs.items():
            if name not in plan.get("configs", [name]):
                continue
            if _ok(rec) and "skipped" in rec["sizes"].get(size, {}):
                lines.append(f"| {rec['label']} | - | skipped: {rec['sizes'][size]['skipped']} | | | | | | | | | |")
                continue
            if not _ok(rec) or size not in rec["sizes"]:
                lines.append(f"| {rec['label']} | - | failed | | | | | | | | | |")
                continue
            r = rec["sizes"][size]
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items() if v)
            cpu = f"{r['cpu_seconds_median'] / r['median']:.2f}" if r.get("cpu_seconds_median") else "-"
            lines.append(
                f"| {rec['label']} | {weights_cell(rec)} | {r['repeats']} | {r['median']:.3f} | {r['p90']:.3f} | "
                f"{r['min']:.3f} | {batch_cell(r)} | {cpu} | {stages} | {r['peak_rss_mb_so_far']:.0f} "
                f"(+{r['peak_rss_mb_so_far'] - rec['baseline_rss_mb']:.0f}) | {_mb(rec.get('disk_bytes'))} | "
                f"{_check_cell(r)} |"
            )
        rows = results["ratios"].get(size, [])
        peers = [n for n in configs if configs[n]["role"] == "peer" and any(x["peer"] == n for x in rows)]
        engines = [n for n in configs if configs[n]["role"] == "engine" and any(x["engine"] == n for x in rows)]
        if rows:
            lines += [
                "",
                "Speed-up of the engine (peer median / engine median; > 1 = engine faster):",
                "",
                "| engine \\ peer | " + " | ".join(configs[p]["label"] for p in peers) + " |",
                "| --- |" + " ---: |" * len(peers),
            ]
            for e in engines:
                cells = [
                    next((f"{x['speedup']:.2f}x" for x in rows if x["engine"] == e and x["peer"] == p), "-")
                    for p in peers
                ]
                lines.append(f"| {configs[e]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    ort = [n for n, r in configs.items() if _ok(r) and r.get("ort_optimized_ops")]
    if ort:
        lines += [
            "ONNX Runtime's optimised graphs: "
            + "; ".join(
                f"{configs[n]['label']}: {configs[n]['ort_integer_ops']} integer kernels "
                "(QLinearConv, ConvInteger, ...); "
                "top ops " + ", ".join(f"{k} {v}" for k, v in list(configs[n]["ort_optimized_ops"].items())[:6])
                for n in ort
            ),
            "",
        ]
    if results.get("flags"):
        lines += ["## Flags", ""] + [f"- {f}" for f in results["flags"]] + [""]
    lines.append(
        f"Command: `{results['command']}`; {results['timing']['total_seconds']:.0f} s in all "
        f"({results['timing']['prepare_seconds']:.0f} s preparing models/artifacts, "
        f"{results['timing']['measure_seconds']:.0f} s measuring)."
    )
    return "\n".join(lines) + "\n"


def ratio_lines(results: dict[str, Any]) -> list[str]:
    """One line per (size, engine, peer): 'RefQSR 8-4 vs PyTorch eager fp32: 3.1x'."""
    configs = results["configs"]
    return [
        f"{size}: {configs[x['engine']]['label']} vs {configs[x['peer']]['label']}: {x['speedup']:.2f}x"
        for size, rows in results["ratios"].items()
        for x in rows
    ]


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Add the speed-ups and flags to a results dict (in place) and return it."""
    results["ratios"] = ratios(results)
    results["flags"] = flags(results)
    return results


def write(results: dict[str, Any], out_dir: str | Path, stem: str = "latency") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(results, indent=1) + "\n")
    write_text_atomic(md_path, markdown(results))
    return json_path, md_path
