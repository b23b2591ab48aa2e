"""``summary.md``: the suite's compact tables for the README (latency + peak memory per size,
Table II, the patch-size study), the machine they ran on and the pictures."""

from __future__ import annotations

from typing import Any

from .configs import weights_label
from .report import timed


def machine_lines(m: dict[str, Any]) -> list[str]:
    v = m["versions"]
    return [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), {m['memory_gb']} GB, "
        f"ISA {', '.join(m['isa']) or '-'}; {m['platform']}; load average {m['loadavg_start']} at start.",
        "Software: Python " + m["python"] + ", " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
    ]


def latency_table(lat: dict[str, Any]) -> list[str]:
    sizes = lat["settings"]["sizes"]
    lines = [
        "| configuration | weights | "
        + " | ".join(f"{s} LR: median s (min-p90) / peak RSS MB" for s in sizes)
        + " | on disk MB |",
        "| --- | --- |" + " ---: |" * (len(sizes) + 1),
    ]
    for rec in lat["configs"].values():
        cells = []
        for size in sizes:
            r = timed(rec, size)
            raw = rec.get("sizes", {}).get(size)
            if r is not None:
                cells.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['p90']:.2f}) / {r['peak_rss_mb_so_far']:.0f}")
            elif raw is not None and "skipped" in raw:
                cells.append("skipped (time budget)")
            elif not rec.get("ok"):
                cells.append("failed")
            else:
                cells.append("-")
        disk = rec.get("disk_bytes")
        lines.append(
            f"| {rec['label']} | {weights_label(str(rec.get('weights', '?')))} | "
            + " | ".join(cells)
            + f" | {'-' if disk is None else f'{disk / 2**20:.1f}'} |"
        )
    return lines


def quality_tables(q: dict[str, Any]) -> list[str]:
    lines = [
        f"Table II layout, patch {q['settings']['patch']} px, {len(q['validation']['images'])} validation image(s) "
        f"({q['validation']['source']}); BitOPs per image on the engine grid with each image's actual "
        "reference assignment:",
        "",
        "| model | weights | BitOPs (G) | FQR | PSNR-Y | SSIM-Y | references |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in q["table2"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | skipped (time budget) | | | | | |")
            continue
        refs = f"{100 * r['reference_share']:.0f} %" if "-" in r["bits"] else "-"
        lines.append(
            f"| {r['label']} | {r['weights_label']} | {r['bitops_g']:.2f} | {r['fqr']:.2f} | {r['psnr_y']:.2f} | "
            f"{r['ssim_y']:.4f} | {refs} |"
        )
    lines += [
        "",
        "Patch-size study (Table VII layout):",
        "",
        "| model | patch | BitOPs (G) | FQR | PSNR-Y | references |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in q["patch_study"]:
        patch = "full image" if r["patch"] is None else f"{r['patch']}"
        if "skipped" in r:
            lines.append(f"| {r['bits']} | {patch} | skipped (time budget) | | | |")
            continue
        refs = f"{100 * r['reference_share']:.0f} %" if "-" in r["bits"] else "-"
        lines.append(
            f"| {r['bits']} ({r['weights_label']}) | {patch} | {r['bitops_g']:.2f} | {r['fqr']:.2f} | "
            f"{r['psnr_y']:.2f} | {refs} |"
        )
    return lines


def markdown(suite: dict[str, Any], lat: dict[str, Any] | None, q: dict[str, Any] | None) -> str:
    t = suite["timing"]
    lines = [
        "# Benchmark summary",
        "",
        f"Created {suite['created']} by `{suite['command']}` in {t['total_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in t.items() if k != 'total_seconds')}); {suite['cache_note']}.",
        "",
    ]
    lines += machine_lines(suite["machine"])
    if suite.get("quick"):
        lines += ["", "**Quick run**: tiny models and images; a smoke test, not a measurement."]
    if lat is not None:
        s = lat["settings"]
        lines += [
            "",
            "## Latency and peak memory",
            "",
            f"{s['n_blocks']}-block SRResNet x4, patch {s['patch']}, overlap {s['overlap']}, batch {s['batch']}, "
            f"{s['threads']} threads everywhere; each configuration in its own process (peak RSS = its VmHWM after "
            "that size, sizes ascending). Details, per-batch and per-stage times: `latency.md`.",
            "",
        ]
        lines += latency_table(lat)
    if q is not None:
        lines += (
            ["", "## BitOPs, FQR and quality", ""] + quality_tables(q) + ["", "Details: `table2.md`, `patch_size.md`."]
        )
    pics = suite.get("pictures", {})
    if pics:
        lines += ["", "## Pictures", ""] + [f"![{k}]({v})" for k, v in pics.items()]
    return "\n".join(lines) + "\n"
