"""The benchmark tables as a person reads them: aligned columns, each number with its spread, rows
too noisy to trust marked, targets checked, and a header and legend that say what the numbers mean.

``render`` is the generic part (any rows, any columns); ``format_table`` lays out the kernel
benchmark's rows (one line per comparison of a case, whatever its device), ``host_table`` those of
``--host``.
"""
from __future__ import annotations

import statistics

# A row whose interquartile range (of a time or a ratio) spans more than this fraction of its
# median is marked: on a shared machine other processes' load can move single numbers 100x.
NOISY_SPREAD = 0.2
NOISY_MARK = "~"
MISS_MARK = "MISS"

RATIO_MEANS = "ratio = their time / fastcore5's time: above 1 = fastcore5 faster (median of paired repeats)"


def quartiles(samples: list[float]) -> list[float]:
    """[25th percentile, median, 75th percentile] of ``samples``."""
    if len(samples) == 1:
        return [samples[0]] * 3
    low, median, high = statistics.quantiles(samples, n=4, method="inclusive")
    return [low, median, high]


def spread(values: list[float]) -> float:
    """The interquartile range of [low, median, high] as a fraction of the median."""
    low, median, high = values
    return (high - low) / median if median > 0 else 0.0


def render(headers: list[str], lines: list[list[str]], right: set[str]) -> str:
    """An aligned text table; the columns named in ``right`` (numbers) are right-aligned."""
    widths = [max(len(str(line[c])) for line in lines + [headers]) for c in range(len(headers))]

    def row(cells):
        return "  ".join(
            str(cell).rjust(width) if header in right else str(cell).ljust(width)
            for header, cell, width in zip(headers, cells, widths)
        ).rstrip()

    return "\n".join([row(headers), row(["-" * w for w in widths])] + [row(line) for line in lines])


def is_noisy(row: dict) -> bool:
    return row.get("spread", 0.0) > NOISY_SPREAD


def missed_targets(row: dict) -> list[str]:
    """The labels whose ratio in ``row`` is below the case's target."""
    return [label for label, least in row.get("targets", {}).items()
            if label in row.get("speedup", {}) and row["speedup"][label] < least]


def _range_text(quartiles: list[float] | None, unit: str = "") -> str:
    if not quartiles:
        return ""
    low, _, high = quartiles
    return f"{low:.3g}-{high:.3g}{unit}"


def ceiling_fraction(row: dict) -> tuple[float, str] | None:
    if "fraction_of_copy_ceiling" in row:
        return row["fraction_of_copy_ceiling"], "copy"
    if "fraction_of_matmul_ceiling" in row:
        return row["fraction_of_matmul_ceiling"], "matmul"
    return None


def ceiling_text(row: dict) -> str:
    found = ceiling_fraction(row)
    if found is None:
        return ""
    fraction, kind = found
    return f"{fraction:.0%} {kind}" + ("*" if fraction > 1 else "")


def format_table(results: list[dict]) -> str:
    """One line per (case, comparison): fastcore5's median ms and its interquartile range, the
    other callable's median ms, the ratio with its range, the target (a column only when a row
    has one), the fraction of the ceiling fastcore5 reached and, when the anchors file has one,
    the H200 anchor for that comparison (a column only when a row has one). Then the legend."""
    if not results:
        return "(no results)"
    with_anchors = any(row.get("h200_anchor_ms") for row in results)
    with_targets = any(row.get("targets") for row in results)
    headers = ["op", "shape", "dtype", "mode", "ours ms", "ours IQR", "vs", "their ms", "ratio", "ratio IQR"]
    headers += ["target"] if with_targets else []
    headers += ["of ceiling"] + (["H200 anchor ms"] if with_anchors else []) + ["note"]
    right = {"ours ms", "ours IQR", "their ms", "ratio", "ratio IQR", "target", "of ceiling", "H200 anchor ms"}
    lines = []
    for row in results:
        cells = dict.fromkeys(headers, "")
        cells.update(op=row["op"], shape=row["shape"], dtype=row["dtype"], mode=row["mode"])
        if "error" in row:
            lines.append([*cells.values()][:4] + ["error", row["error"][:60]] + [""] * (len(headers) - 6))
            continue
        ours = row["ours"]
        cells["ours ms"] = f"{row['ms'][ours]:.4g}"
        cells["ours IQR"] = _range_text(row.get("ms_quartiles", {}).get(ours))
        cells["of ceiling"] = ceiling_text(row)
        noisy, missed = is_noisy(row), missed_targets(row)
        for position, label in enumerate([label for label in row["ms"] if label != ours] or [""]):
            if position:
                cells = dict.fromkeys(headers, "")
            cells["vs"] = label
            if label:
                cells["their ms"] = f"{row['ms'][label]:.4g}"
                cells["ratio"] = f"{row['speedup'][label]:.2f}x"
                cells["ratio IQR"] = _range_text(row.get("speedup_quartiles", {}).get(label), "x")
            if with_targets and label in row.get("targets", {}):
                cells["target"] = f">={row['targets'][label]:g}x"
            if with_anchors:
                anchor = row.get("h200_anchor_ms", {}).get(label)
                cells["H200 anchor ms"] = f"{anchor:.4g}" if anchor is not None else ""
            notes = ([MISS_MARK] if label in missed else []) + (["noisy " + NOISY_MARK] if noisy and not position else [])
            cells["note"] = " ".join(notes)
            lines.append(list(cells.values()))
    return "\n".join([RATIO_MEANS, render(headers, lines, right), legend(results)])


def legend(results: list[dict]) -> str:
    """What the columns and marks mean, only for what this table shows."""
    lines = [
        "ms: median of the repeats; IQR: the middle half of them (25th to 75th percentile), the spread to trust "
        "a number by",
        "of ceiling: fastcore5's rate as a fraction of the card's copy bandwidth (memory-bound ops) or matmul rate "
        "(GEMMs), both measured at the start of this run",
    ]
    if any(is_noisy(row) for row in results if "error" not in row):
        lines.append(f"noisy {NOISY_MARK}: a ratio IQR wider than {NOISY_SPREAD:.0%} of the ratio: other load on the "
                     "machine moved the timings; do not trust the row, rerun on an idle machine")
    if any(row.get("targets") for row in results):
        lines.append(f"target: the least ratio this comparison must reach; {MISS_MARK}: below it "
                     "(`--check` then exits 1)")
    return "\n".join(lines)


def ceiling_note(results: list[dict], ceilings: dict[str, float]) -> str | None:
    """Why a row reads above 100 % of its ceiling, or None when none does."""
    above = [row for row in results if "error" not in row and (ceiling_fraction(row) or (0.0,))[0] > 1]
    if not above:
        return None
    return (
        f"* {len(above)} case(s) ran faster than the ceiling measured at the start of this run "
        f"({', '.join(f'{name} {value:.4g}' for name, value in ceilings.items())}). The ceilings are measurements "
        "(one large copy, one square matmul), not hardware limits: a case whose inputs stay in cache, or a "
        "matmul shape the library runs better, can beat them. Read such a fraction as 'at the ceiling'."
    )


def host_table(report: dict) -> str:
    """``--host``'s rows: fastcore5's and eager's host time per call, their ratio (here the other
    way round: fastcore5 / eager, lower is better) with its range, the target and whether it is met."""
    headers = ["op", "entry", "fastcore5 us", "eager us", "ratio", "ratio IQR", "target", "result", "eager is"]
    lines, any_noisy = [], False
    for row in report["cases"]:
        target = row["target_ratio"]
        noisy = "ratio_quartiles" in row and spread(row["ratio_quartiles"]) > NOISY_SPREAD
        any_noisy |= noisy
        result = "" if target is None else ("ok" if row["meets_target"] else MISS_MARK)
        lines.append([
            row["op"], row["entry"], f"{row['fastcore5_us']:.1f}", f"{row['eager_us']:.1f}", f"{row['ratio']:.3g}",
            _range_text(row.get("ratio_quartiles")), "" if target is None else f"<={target:g}",
            " ".join(filter(None, [result, f"noisy {NOISY_MARK}" if noisy else ""])), row["eager"],
        ])
    legend_lines = [
        "us: host microseconds per call, the best round; ratio IQR: the middle half of the per-round ratios",
        f"target: the most the ratio may be (issue 'hot path'); ok: within it; {MISS_MARK}: above it "
        "(`--check` then exits 1)",
    ]
    if any_noisy:
        legend_lines.append(f"noisy {NOISY_MARK}: a ratio IQR wider than {NOISY_SPREAD:.0%} of the ratio: the machine "
                            "was busy; do not trust the row, rerun")
    return "\n".join([
        f"host time per call on {report['device']} (fastcore5 backend: {report['backend']}; launches: {report['launches']})",
        "ratio = fastcore5's host time / eager PyTorch's: below 1 = fastcore5 costs the host less",
        render(headers, lines, {"fastcore5 us", "eager us", "ratio", "ratio IQR", "target"}),
        *legend_lines,
    ])
