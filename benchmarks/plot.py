"""One PNG per op from a pytest-benchmark JSON file: time and peak memory of eager / torch.compile / zslfast.

    python benchmarks/plot.py benchmarks/results/<file>.json [--out DIR]

Each chart has two panels, the median time (ms, log scale) and the peak extra memory (MiB), with grouped bars
eager / compile / zslfast per shape and pass (report.group_rows, as the session summary and summarize.py read the
same results), and the machine in the title (the JSON's machine_info: CPU and cores; the torch version and any
GPU from the results' extra_info; the date). Writes ``DIR/<op>.png`` (default DIR: ``plots`` beside the JSON file).
Needs matplotlib: ``pip install 'zslfast[plot]'``.
"""

import argparse
import json
import os
import sys
from typing import Dict, List

from report import FUSED_COMPILED, MAIN, Row, by_op, group_rows, machine

COLOURS = {"eager": "#9e9e9e", "compile": "#5b8bd6", "zslfast": "#e4572e", FUSED_COMPILED: "#8e3b9e"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install 'zslfast[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    return plt, FuncFormatter(lambda value, _: f"{value:g}")


def _bars(ax, rows: List[Row], values: Dict[str, List], unit: str, log, notes: List[str] = ()):
    """Grouped bars, one group per row; ``notes`` go above zslfast's bars; ``log``: a tick formatter for a log
    scale (plain numbers), or None for a linear one."""
    impls = list(values)
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(rows))]
        heights = [v if v is not None else 0 for v in values[impl]]
        bars = ax.bar(xs, heights, width, label=impl, color=COLOURS[impl])
        if impl == "zslfast":
            for bar, note in zip(bars, notes):
                if note and bar.get_height() > 0:
                    ax.annotate(note, (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom",
                                fontsize=7)
    ax.set_ylabel(unit)
    shown = [v for vs in values.values() for v in vs if v]
    if log and shown:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(log)
        if max(shown) / min(shown) < 20:  # within about a decade: label the minor ticks too
            ax.yaxis.set_minor_formatter(log)
            ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(rows)))
    tilt = len(rows) > 3
    ax.set_xticklabels([row.label for row in rows], rotation=20 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_op(op: str, rows: List[Row], title: str, path: str, dpi: int = 100) -> str:
    """Write the chart of one op's rows to ``path``; returns ``path``."""
    plt, plain = _pyplot()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 3), 3.8))
    notes = [f"{row.speedup('eager'):.1f}x" if row.speedup("eager") else "" for row in rows]
    impls = MAIN + ((FUSED_COMPILED,) if any(FUSED_COMPILED in row.ms for row in rows) else ())
    _bars(ax_time, rows, {impl: [row.ms.get(impl) for row in rows] for impl in impls}, "median time, ms (log scale)",
          plain, notes)
    ax_time.set_title("time: lower is better; above zslfast, its speed-up over eager", fontsize=8)
    _bars(ax_mem, rows, {impl: [row.peak.get(impl) for row in rows] for impl in impls}, "peak extra memory, MiB",
          None)
    ax_mem.set_title("peak memory beyond the inputs: lower is better", fontsize=8)
    fig.legend(*ax_time.get_legend_handles_labels(), loc="lower center", ncol=len(impls), fontsize=8, frameon=False)
    fig.suptitle(f"{op} — {title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_results(data: dict, out: str, dpi: int = 100) -> List[str]:
    """One PNG per op of a benchmark JSON's results (ops with neither compile nor zslfast rows are left out)."""
    os.makedirs(out, exist_ok=True)
    title = machine(data)
    paths = []
    for op, rows in by_op(group_rows(data["benchmarks"])).items():
        rows = [row for row in rows if any(impl in row.ms for impl in MAIN)]
        if rows:
            paths.append(plot_op(op, rows, title, os.path.join(out, f"{op}.png"), dpi))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--out", help="folder for the PNGs (default: plots/ beside the JSON file)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), "plots")
    for path in plot_results(data, out, args.dpi):
        print(path)


if __name__ == "__main__":
    main()
