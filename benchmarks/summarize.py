"""Turn a pytest-benchmark JSON file into the markdown table of benchmarks/README.md.

    python benchmarks/summarize.py benchmarks/results/<file>.json

One row per benchmark group (op, shape, pass, device): the median time of eager / torch.compile / zslfast, the
speed-up of zslfast over each, each one's peak extra memory (extra_info["peak_extra_MiB"]), where a benchmark
has one the floor (the time of one plain read of the inputs), and any other implementation it times (the Python
loop research code writes, SDPA + a separate score, ...) with zslfast's speed-up over it; for the model steps,
torch.compile of the zslfast model with its speed over torch.compile's. The rows come from
report.group_rows, as do the session summary (conftest.py) and the charts (plot.py).
"""

import json
import sys

from report import FUSED_COMPILED, MAIN, group_rows, machine


def markdown(data: dict):
    """The lines of the markdown table of one JSON file's results."""
    lines = [f"Machine: {machine(data)}\n",
             "| benchmark | eager ms | compile ms | zslfast ms | vs eager | vs compile | peak MiB eager / compile / zslfast | floor ms (one read) | other implementations |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in group_rows(data["benchmarks"]):
        cells = [f"{row.ms[impl]:.3f}" if impl in row.ms else "–" for impl in MAIN]
        speed = [f"{row.speedup(impl):.2f}x" if row.speedup(impl) else "–" for impl in ("eager", "compile")]
        mem = " / ".join(("?" if row.peak[impl] is None else f"{row.peak[impl]}") if impl in row.peak else "–"
                         for impl in MAIN)
        floor = f"{row.ms['floor']:.3f}" if "floor" in row.ms else "–"
        others = [f"{name} {row.ms[name]:.3f} ms" + (f" ({row.speedup(name):.1f}x)" if row.speedup(name) else "")
                  for name in row.others if name != "floor"]
        if FUSED_COMPILED in row.ms:  # torch.compile of the zslfast model (model steps), against compile's time
            gain = row.compiled_gain()
            others.insert(0, f"{FUSED_COMPILED} {row.ms[FUSED_COMPILED]:.3f} ms, peak {row.peak.get(FUSED_COMPILED)}"
                             f" MiB" + (f" ({gain:.2f}x compile's speed)" if gain else ""))
        lines.append(f"| {row.group} | " + " | ".join(cells + speed) + f" | {mem} | {floor} | {'; '.join(others) or '–'} |")
    return lines


def main(path: str) -> None:
    with open(path) as f:
        print("\n".join(markdown(json.load(f))))


if __name__ == "__main__":
    main(sys.argv[1])
