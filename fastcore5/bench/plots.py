"""The kernel benchmark's plots: each comparison's ratio, and the fraction of the card's ceiling.

Horizontal bars with one labelled row per case, so labels never overlap however many cases run;
each plot has a title, axis labels with units and a legend. matplotlib is imported only here.
"""
from __future__ import annotations

from pathlib import Path

from .table import ceiling_fraction


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'fastcore5[bench]')")
        return None
    matplotlib.use("Agg")  # off-screen; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _case_label(row: dict, with_op: bool = False) -> str:
    return (f"{row['op']}  " if with_op else "") + f"{row['shape']}  {row['dtype']} {row['mode']}"


def plot(results: list[dict], out: Path, stem: str, card: str) -> list[Path]:
    """<stem>-speedup.png and, when a case has a ceiling, <stem>-ceiling.png under ``out``."""
    ok = [row for row in results if "error" not in row]
    if not ok:
        return []
    plt = _pyplot()
    if plt is None:
        return []
    paths = [_speedup_plot(plt, ok, out / f"{stem}-speedup.png", card)]
    with_ceiling = [row for row in ok if ceiling_fraction(row)]
    if with_ceiling:
        paths.append(_ceiling_plot(plt, with_ceiling, out / f"{stem}-ceiling.png", card))
    return paths


def _speedup_plot(plt, rows: list[dict], path: Path, card: str) -> Path:
    """One panel per op; per case a bar for each comparison, its IQR as an error bar."""
    ops = list(dict.fromkeys(row["op"] for row in rows))
    per_op = {op: [row for row in rows if row["op"] == op] for op in ops}
    heights = [1.2 + 0.45 * len(per_op[op]) * max(len(row["speedup"]) for row in per_op[op]) for op in ops]
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, op in zip(axes[:, 0], ops):
        cases = per_op[op]
        labels = list(dict.fromkeys(label for row in cases for label in row["speedup"]))
        width = 0.8 / max(len(labels), 1)
        for k, label in enumerate(labels):
            positions, ratios, low, high = [], [], [], []
            for i, row in enumerate(cases):
                if label in row["speedup"]:
                    q = row.get("speedup_quartiles", {}).get(label) or [row["speedup"][label]] * 3
                    positions.append(i + (k - (len(labels) - 1) / 2) * width)
                    ratios.append(q[1])
                    low.append(q[1] - q[0])
                    high.append(q[2] - q[1])
            ax.barh(positions, ratios, width, xerr=[low, high], capsize=2, label=f"vs {label}", color=f"C{k}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(cases)), [_case_label(row) for row in cases], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel("ratio: their time / fastcore5's time (x, log scale; right of 1 = fastcore5 faster)")
        ax.set_title(f"{op}: fastcore5 against each alternative")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"fastcore5 benchmark on {card} (error bars: interquartile range)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ceiling_plot(plt, rows: list[dict], path: Path, card: str) -> Path:
    """A bar per case: the percentage of the copy or matmul ceiling fastcore5 reached, coloured by op."""
    ops = list(dict.fromkeys(row["op"] for row in rows))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.35 * len(rows)))
    for i, row in enumerate(rows):
        fraction, kind = ceiling_fraction(row)
        ax.barh(i, 100 * fraction, color=f"C{ops.index(row['op'])}", hatch="" if kind == "copy" else "//")
    ax.set_yticks(range(len(rows)), [_case_label(row, with_op=True) for row in rows], fontsize=9)
    ax.invert_yaxis()
    ax.axvline(100, color="black", linewidth=0.8)
    ax.set_xlabel("fastcore5's rate, % of the ceiling measured at the start of the run")
    ax.set_title(f"fastcore5 on {card}: % of copy bandwidth (memory-bound ops) or matmul rate (GEMMs)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{k}") for k in range(len(ops))]
    names = list(ops)
    kinds = {ceiling_fraction(row)[1] for row in rows}
    for kind, hatch in (("copy", ""), ("matmul", "//")):
        if kind in kinds:
            handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch=hatch))
            names.append(f"{kind} ceiling")
    ax.legend(handles, names, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
