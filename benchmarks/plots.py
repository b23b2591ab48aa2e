"""The suite's pictures: PSNR vs BitOPs (the paper's Fig. 1 for our models) and latency per
configuration, as PNG files written atomically (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import write_atomic
from .report import timed

#: Fig. 1's dashed lines: from a fixed-precision baseline to its RefQSR variants
FAMILIES = {"ddtb-8": ("refqsr-8-5", "refqsr-8-4", "refqsr-8-3"), "ddtb-4": ("refqsr-4-3", "refqsr-4-2")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def psnr_vs_bitops(quality: dict[str, Any], path: str | Path) -> Path:
    """Mean PSNR-Y against mean BitOPs per image (log scale) for every Table II row; dashed lines
    join each DDTB baseline to its RefQSR variants, as in the paper's Fig. 1."""
    plt = _pyplot()
    rows = {r["key"]: r for r in quality["table2"] if "skipped" not in r}
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for base, variants in FAMILIES.items():
        chain = [rows[k] for k in (base, *variants) if k in rows]
        if len(chain) > 1:
            ax.plot([r["bitops_g"] for r in chain], [r["psnr_y"] for r in chain], "--", color="0.6", zorder=1)
    markers = {"fp32": ("*", "tab:red"), "ddtb-8": ("s", "tab:green"), "ddtb-4": ("s", "tab:olive")}
    cmap = plt.get_cmap("tab10")
    for i, (key, r) in enumerate(rows.items()):
        marker, colour = markers.get(key, ("o", cmap(i % 10)))
        ax.scatter(
            r["bitops_g"],
            r["psnr_y"],
            marker=marker,
            color=colour,
            s=60 if marker == "*" else 36,
            zorder=2,
            label=f"{r['label']}: {r['bitops_g']:.3g} G, {r['psnr_y']:.2f} dB",
        )
    ax.set_xscale("log")
    ax.set_xlabel("BitOPs per image (G, engine grid, log scale)")
    ax.set_ylabel("PSNR-Y (dB)")
    weights = sorted({r["weights_label"] for r in rows.values()})
    ax.set_title(
        f"PSNR vs BitOPs, x4, {len(quality['validation']['images'])} validation image(s)\n"
        f"weights: {'; '.join(weights)}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def latency(results: dict[str, Any], path: str | Path) -> Path:
    """Median wall time per image of every configuration that ran, one panel per LR size (its
    own linear axis: sizes differ ~10x), min..p90 whiskers; engines and peers in two colours."""
    plt = _pyplot()
    sizes = [
        s for s in results["settings"]["sizes"] if any(timed(c, s) is not None for c in results["configs"].values())
    ]
    rows = {
        s: [(c["label"], c["role"], timed(c, s)) for c in results["configs"].values() if timed(c, s) is not None]
        for s in sizes
    }
    fig, axes = plt.subplots(
        len(sizes),
        1,
        squeeze=False,
        figsize=(8.0, 1.0 + sum(0.32 * len(rows[s]) + 0.6 for s in sizes)),
        gridspec_kw={"height_ratios": [max(1, len(rows[s])) for s in sizes]},
    )
    for ax, size in zip(axes[:, 0], sizes):
        labels = [label for label, _, _ in rows[size]]
        med = [r["median"] for _, _, r in rows[size]]
        err = [[r["median"] - r["min"] for _, _, r in rows[size]], [r["p90"] - r["median"] for _, _, r in rows[size]]]
        colours = ["tab:blue" if role == "engine" else "tab:gray" for _, role, _ in rows[size]]
        ax.barh(range(len(med)), med, xerr=err, color=colours, capsize=2)
        for y, v in enumerate(med):
            ax.text(v, y, f" {v:.2f} s", va="center", fontsize=7)
        ax.set_yticks(range(len(med)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.18 * max(m + e for m, e in zip(med, err[1])))
        ax.set_title(f"{size} LR -> x4", fontsize=8, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds per image (median; whiskers min..p90); blue: engine, grey: peers")
    m = results["machine"]
    fig.suptitle(f"Latency, {results['settings']['threads']} threads, {m['cpu']}", fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
