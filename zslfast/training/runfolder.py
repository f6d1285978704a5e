"""A run folder's files, each written atomically: a temporary file in the same folder, flushed to disk, then renamed
over the old one (os.replace), so a run killed at any moment, even mid-write, leaves every file whole: the previous
version or the new one.

    config.json     every setting (zslfast.training.recipes.Settings), the recipe's source, versions, the seed
    metrics.jsonl   one JSON line per epoch (losses, CZSL, U/S/H plain and calibrated, gamma, times)
    last.pt         the state after the last complete epoch: model, optimizer, scheduler, epoch, each process's RNG
                    states, the metrics so far, best epoch; best.pt: the same at the epoch of the best H
    curves.png      losses and accuracies per epoch (matplotlib, when it is installed)

The checkpoints are what resuming reads; metrics.jsonl is rewritten from the checkpoint's history (the one home of
the metrics), so a run killed between writing last.pt and metrics.jsonl loses nothing. Every value in a checkpoint
loads with torch.load(weights_only=True) (numpy's RNG state as a tensor): resuming runs no pickled code, and
``zslfast.models.load_checkpoint(model, "RUN/best.pt")`` reads the model's weights (its "model" entry).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import dist

CONFIG, METRICS, LAST, BEST, CURVES = "config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then the temporary file renamed to ``path`` (module docstring)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def write_metrics(folder: Path, history: list) -> None:
    write_text(folder / METRICS, "".join(json.dumps(record) + "\n" for record in history))


# ------------------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    """This process's random states: torch (CPU and every CUDA device), Python's random, numpy's global."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                python=random.getstate(), numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached])


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int, rank: int = 0) -> None:
    """torch, Python's random and numpy seeded from (seed, rank): each process its own stream."""
    value = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def gathered_rng_states(ctx) -> Optional[list]:
    """Every process's rng_state(), rank by rank, on rank 0 (None elsewhere); collective under torchrun."""
    state = rng_state()
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


# ----------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, state: dict, best: bool) -> None:
    """last.pt, and best.pt too when ``best`` (best.pt first: a run killed between the two replays the epoch)."""
    for name in (BEST, LAST) if best else (LAST,):
        atomic_write(folder / name, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------- curves


def plot_curves(folder: Path, history: list, title: str) -> Optional[str]:
    """curves.png of ``history``; returns why there is none (matplotlib missing), else None."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no curves.png (pip install matplotlib to get one)"
    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    losses, accuracies = figure.subplots(1, 2)
    losses.plot(epochs, [r["loss"] for r in history], label="loss", linewidth=2)
    for part in history[0]["parts"] if history else ():
        losses.plot(epochs, [r["parts"][part] for r in history], label=part, linewidth=1)
    losses.set(xlabel="epoch", title="training loss (mean per epoch)", yscale="log")
    losses.legend(fontsize=7)
    for key, label, style in (("czsl", "CZSL", "k-"), ("u", "U", "b:"), ("s", "S", "g:"), ("h", "H", "r:"),
                              ("u_cal", "U (calibrated)", "b-"), ("s_cal", "S (calibrated)", "g-"),
                              ("h_cal", "H (calibrated)", "r-")):
        accuracies.plot(epochs, [100 * r[key] for r in history], style, label=label)
    accuracies.set(xlabel="epoch", ylabel="%", title="per-class mean top-1")
    accuracies.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(folder / CURVES, lambda p: figure.savefig(p, format="png", dpi=100))
    return None
