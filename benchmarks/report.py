"""The one reading of pytest-benchmark results: rows per (op, shape, pass), shared by the session summary
(conftest.py's pytest_terminal_summary), summarize.py (markdown) and plot.py (PNG charts).

A result is a dict as in a ``--benchmark-json`` file's ``benchmarks`` list (``group``, ``name``, ``stats`` with
``median`` in seconds, ``extra_info`` with ``peak_extra_MiB`` and, for forward+backward, ``saved_MiB``). The
benchmarks name the implementation in the last test parameter (``test_x[CUB-fwd-eager]`` -> eager) and put op,
case, shape, pass and device in the group (``attribute_attention CUB B,K,R,D,Dv=(64, 312, 49, 300, 300) fwd cpu``).
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

MAIN = ("eager", "compile", "zslfast")
FUSED_COMPILED = "zslfast+compile"  # torch.compile of a model on zslfast ops (the model steps): set against compile
_SHAPE = re.compile(r"\s*\S*=\([^)]*\)|\s*\S+=\S+")  # "B,K=(64, 312)" and "B=32"
_DEVICES = ("cpu", "cuda")


def impl_of(name: str) -> str:
    """The implementation is the last test parameter: test_x[CUB-fwd-eager] -> eager."""
    return name[name.index("[") + 1: -1].split("-")[-1] if "[" in name else name


@dataclass
class Row:
    """One benchmark group: op, label (case and pass, shape dimensions left out), the full group, and per
    implementation the median ms, peak extra MiB and saved MiB (None where not measured)."""

    group: str
    op: str
    label: str
    ms: Dict[str, float] = field(default_factory=dict)
    peak: Dict[str, Optional[float]] = field(default_factory=dict)
    saved: Dict[str, Optional[float]] = field(default_factory=dict)

    def speedup(self, other: str) -> Optional[float]:
        """zslfast's speed-up over ``other``: other's median / zslfast's median."""
        if other in self.ms and "zslfast" in self.ms and self.ms["zslfast"] > 0:
            return self.ms[other] / self.ms["zslfast"]
        return None

    def compiled_gain(self) -> Optional[float]:
        """torch.compile of the zslfast model against torch.compile alone: compile's median / zslfast+compile's."""
        if "compile" in self.ms and self.ms.get(FUSED_COMPILED):
            return self.ms["compile"] / self.ms[FUSED_COMPILED]
        return None

    @property
    def others(self) -> List[str]:
        """The implementations beyond eager / compile / zslfast / zslfast+compile (loop, sdpa, floor, ...)."""
        return [name for name in self.ms if name not in MAIN and name != FUSED_COMPILED]


def split_group(group: str):
    """``attribute_attention CUB B,K=(..) fwd cpu`` -> (``attribute_attention``, ``CUB fwd``)."""
    words = _SHAPE.sub("", group).split()
    if len(words) > 1 and words[-1] in _DEVICES:
        words = words[:-1]
    return words[0], " ".join(words[1:])


def group_rows(results: List[dict]) -> List[Row]:
    """The results grouped by benchmark group, in first-seen order."""
    rows: Dict[str, Row] = {}
    for result in results:
        group = result.get("group") or result["name"]
        if group not in rows:
            rows[group] = Row(group, *split_group(group))
        row, impl, extra = rows[group], impl_of(result["name"]), result.get("extra_info") or {}
        row.ms[impl] = result["stats"]["median"] * 1e3
        row.peak[impl] = extra.get("peak_extra_MiB")
        row.saved[impl] = extra.get("saved_MiB")
    return list(rows.values())


def by_op(rows: List[Row]) -> Dict[str, List[Row]]:
    ops = defaultdict(list)
    for row in rows:
        ops[row.op].append(row)
    return dict(ops)


def machine(data: dict) -> str:
    """``AMD EPYC ..., 2 cores, torch 2.15.0, 2026-11-29``: from a JSON file's machine_info, datetime and the
    results' extra_info (device, torch)."""
    info, cpu = data.get("machine_info", {}), data.get("machine_info", {}).get("cpu", {})
    extras = [b.get("extra_info") or {} for b in data.get("benchmarks", [])]
    devices = sorted({e["device"] for e in extras if e.get("device") and e["device"] != "cpu"})
    torch_versions = sorted({e["torch"] for e in extras if e.get("torch")})
    parts = [cpu.get("brand_raw") or info.get("processor") or "unknown CPU", f"{cpu.get('count', '?')} cores"]
    parts += [f"GPU {d}" for d in devices] or ["CPU tensors"]
    parts += [f"torch {v}" for v in torch_versions]
    parts.append((data.get("datetime") or "")[:10] or "undated")
    return ", ".join(parts)


def _num(value: Optional[float], width: int, digits: int = 4) -> str:
    if value is None:
        return f"{'–':>{width}}"
    text = f"{value:.{digits}g}"
    return f"{text:>{width}}"


def _speed(value: Optional[float], width: int) -> str:
    return f"{'–' if value is None else f'{value:.2f}x':>{width}}"


def _triple(values: Dict[str, Optional[float]]) -> str:
    shown = [values.get(impl) for impl in MAIN]
    if all(v is None for v in shown):
        return "–"
    return "/".join("–" if v is None else f"{v:.3g}" for v in shown)


def summary_table(rows: List[Row], label_width: int = 30) -> List[str]:
    """A compact text table (≤ 110 columns): per op a heading line, then one line per (shape, pass): the medians
    of eager / compile / zslfast, zslfast's speed-up over each, peak extra and saved MiB (eager/compile/zslfast),
    and beneath it torch.compile of the zslfast model (against compile's time) and any other implementation timed
    (with zslfast's speed-up over it)."""
    header = (f"{'  case, pass':{label_width}} {'eager ms':>8} {'compile':>8} {'zslfast':>8} {'x eager':>7} "
              f"{'x comp.':>7}  {'peak MiB e/c/z':<16} saved MiB e/c/z")
    lines = [header]
    for op, op_rows in by_op(rows).items():
        lines.append(op)
        for row in op_rows:
            label = ("  " + row.label)[:label_width]
            times = " ".join(_num(row.ms.get(impl), 8) for impl in MAIN)
            speed = " ".join(_speed(row.speedup(impl), 7) for impl in ("eager", "compile"))
            lines.append(f"{label:{label_width}} {times} {speed}  {_triple(row.peak):<16} {_triple(row.saved):<16}"
                         .rstrip())
            if FUSED_COMPILED in row.ms:
                gain = row.compiled_gain()
                peak = row.peak.get(FUSED_COMPILED)
                lines.append(f"{'':{label_width}} {FUSED_COMPILED} {row.ms[FUSED_COMPILED]:.4g} ms"
                             + (f", {gain:.2f}x compile's speed" if gain else "")
                             + (f", peak {peak:.3g} MiB" if peak is not None else ""))
            others = [f"{name} {row.ms[name]:.4g} ms"
                      + (f" ({row.speedup(name):.2f}x)" if row.speedup(name) and name != "floor" else "")
                      for name in row.others]
            if others:
                lines.append(f"{'':{label_width}} also: " + "; ".join(others))
    return lines
