"""``python -m zslfast train``'s training and evaluation, as the ZSL papers report it (Xian et al.'s xlsa17 protocol).

    train(settings, data, paths, words, ctx, log=print) -> {"history", "val_history", "folder", ...}

Two problems come from one xlsa17 split (``make_problems``):
    test   train on trainval (every seen class); evaluate test_seen (S) and test_unseen (U) over every class
    val    train on train_loc minus a held-out ``val_holdout`` of each of its classes; evaluate the held-out
           images (S) and val_loc (U) over the train and val classes only (the test's unseen classes are left out
           of the model, its classes, and its logits): the validation split, class-disjoint, of Xian et al.
After every epoch: CZSL (per-class mean top-1 of the unseen images among the unseen classes), GZSL U, S, H at
gamma 0, and calibrated stacking (Chao et al.): U, S, H with gamma subtracted from the seen classes' scores. In the
val problem gamma is the one with the best H (zslfast.metrics.gamma_sweep); in the test problem it is the val
run's gamma of the same epoch (``--gamma val``, the default: the val run trains first, with the same recipe, in
RUN/val/), or a fixed ``--gamma``: the test sets never choose it. best.pt is the epoch of the best calibrated H.

Batches: each epoch a permutation of the training images (seeded by seed + epoch) cut into global batches of
``batch_size``, the last incomplete one dropped; under torchrun each process takes its contiguous part of each
global batch (``Context.shard``, zslfast.distributed: SAGE's memory bank then sees the batch in the one-process
order), the model in DistributedDataParallel; each process scores its part of the evaluation images and rank 0
gathers the logits, computes the metrics and alone writes the run folder (zslfast.training.runfolder).

Resuming: a phase whose last.pt exists continues after its epoch with the model, optimizer, scheduler and every
process's RNG states restored; the batches depend on (seed, epoch) alone, so on CPU a resumed run is bitwise the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import all_gather_rows
from ..metrics import czsl_accuracy, gamma_sweep, gzsl_accuracy
from . import runfolder
from .cache import CacheRangeError, cached_features, digest_images, digest_modules
from .progress import Progress
from .recipes import RECIPES, SPECS, Settings, data_config, optimizer_and_schedule


class SetupError(Exception):
    """A setting that cannot work, found while building the run (a backbone that is not a ViT for SVIP or SAGE,
    a checkpoint of another model, features beyond the cache dtype's range): before any training step."""


def _built(build: Callable, settings: Settings, *args):
    try:
        return build(settings, *args)
    except (ValueError, TypeError, FileNotFoundError) as err:  # the models name the argument and what is wrong
        weights = "" if settings.backbone_weights in ("timm", "none") else f" {settings.backbone_weights}"
        raise SetupError(f"building {settings.model.upper()} on --backbone {settings.backbone}{weights}: "
                         f"{err}") from err


@dataclasses.dataclass
class Problem:
    """A ZSL problem over ``classes`` (global ids; the model's classes, in order): its seen and unseen classes as
    indices into ``classes``, the images it trains on and evaluates, image rows of res101.mat, with their labels as
    indices into ``classes``."""

    name: str
    classes: torch.Tensor
    seen: torch.Tensor
    unseen: torch.Tensor
    fit: torch.Tensor
    fit_labels: torch.Tensor
    eval_seen: torch.Tensor
    eval_seen_labels: torch.Tensor
    eval_unseen: torch.Tensor
    eval_unseen_labels: torch.Tensor


def _problem(name, data, seen, unseen, fit, eval_seen, eval_unseen) -> Problem:
    classes = torch.cat([seen, unseen]).sort().values
    local = torch.full((data.num_classes,), -1, dtype=torch.int64)
    local[classes] = torch.arange(len(classes))
    return Problem(name, classes, local[seen], local[unseen], fit, local[data.labels[fit]], eval_seen,
                   local[data.labels[eval_seen]], eval_unseen, local[data.labels[eval_unseen]])


def make_problems(data, val_holdout: float, seed: int) -> dict:
    """{"test": Problem, "val": Problem or None (no train_loc / val_loc in att_splits.mat)}; ValueError when the
    validation split is not class-disjoint or leaves nothing to hold out."""
    problems = {"test": _problem("test", data, data.seen_classes, data.unseen_classes, data.trainval_loc,
                                 data.test_seen_loc, data.test_unseen_loc), "val": None}
    if data.train_loc is None or data.val_loc is None:
        return problems
    train_classes, val_classes = data.labels[data.train_loc].unique(), data.labels[data.val_loc].unique()
    if torch.isin(train_classes, val_classes).any():
        raise ValueError("att_splits.mat: train_loc and val_loc share classes; the validation split must be "
                         "class-disjoint (Xian et al.)")
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in train_classes.tolist():
        rows = data.train_loc[data.labels[data.train_loc] == c]
        rows = rows[torch.randperm(len(rows), generator=generator)]
        k = min(max(round(val_holdout * len(rows)), 1), len(rows) - 1) if len(rows) > 1 else 0
        held.append(rows[:k])
        fit.append(rows[k:])
    held = torch.cat(held).sort().values
    if not len(held):
        raise ValueError("train_loc has one image per class: nothing to hold out for the validation's seen images")
    problems["val"] = _problem("val", data, train_classes, val_classes, torch.cat(fit).sort().values, held,
                               data.val_loc)
    return problems


class GlobalBatches:
    """A batch sampler (torch.utils.data.DataLoader's ``batch_sampler``): each epoch (``set_epoch``) a permutation
    of range(n) seeded by seed + epoch, cut into global batches of ``batch_size`` (the last incomplete one
    dropped: every process steps the same number of times), of which this process yields its contiguous part."""

    def __init__(self, n: int, batch_size: int, seed: int, ctx):
        self.n, self.batch_size, self.seed, self.ctx, self.epoch = n, batch_size, seed, ctx, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for i in range(len(self)):
            yield self.ctx.shard(order[i * self.batch_size : (i + 1) * self.batch_size]).tolist()


class Feeder:
    """Batches of a model's inputs on the device: rows of the feature cache, or images read and transformed (then,
    for a frozen backbone without the cache, run through it)."""

    def __init__(self, spec, paths: list, settings: Settings, ctx, features: Optional[dict] = None,
                 extract: Optional[Callable] = None, transforms: Optional[dict] = None):
        self.spec, self.paths, self.settings, self.ctx = spec, paths, settings, ctx
        self.features, self.extract, self.transforms = features, extract, transforms

    def autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.settings.amp == "bf16")

    def batches(self, rows: torch.Tensor, labels: torch.Tensor, batch_sampler, train: bool):
        """(inputs, labels) on the device for each batch of positions into ``rows`` / ``labels``."""
        device = self.ctx.device
        if self.features is not None:
            for batch in batch_sampler:
                picked = rows[batch].numpy()
                inputs = {name: torch.from_numpy(array[picked]).to(device).float()
                          for name, array in self.features.items()}
                yield self.spec.inputs(inputs), labels[batch].to(device)
            return
        from ..data import ImageFolderDataset

        transform = self.transforms["train" if train and self.extract is None else "eval"]
        dataset = ImageFolderDataset([self.paths[r] for r in rows.tolist()], labels.tolist(), transform)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.settings.workers,
                                             pin_memory=device.type == "cuda")
        for images, y, _ in loader:
            images = images.to(device, non_blocking=True)
            if self.extract is None:
                yield {"images": images}, y.to(device)
                continue
            with torch.no_grad(), self.autocast():
                inputs = {name: value.float() for name, value in self.extract(images).items()}
            yield self.spec.inputs(inputs), y.to(device)


def transforms_for(module, image_size: int) -> dict:
    """timm's eval and training transforms of ``module``'s data config at image_size."""
    from timm.data import create_transform

    config = data_config(module, image_size)
    return {"eval": create_transform(**config, is_training=False), "train": create_transform(**config,
                                                                                          is_training=True)}


# ------------------------------------------------------------------------------------------------ one epoch


def train_epoch(trainer, model, feeder: Feeder, rows, labels, sampler, optimizer, ctx, label: str) -> dict:
    model.train()
    bar = Progress(label, len(sampler), unit="step", enabled=ctx.is_main)
    total, parts, steps, start = torch.zeros((), device=ctx.device), {}, 0, time.perf_counter()
    for inputs, y in feeder.batches(rows, labels, sampler, train=True):
        with feeder.autocast():
            out = trainer(**inputs, labels=y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        total += out.loss.detach().float()
        for name, value in out.parts.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                parts[name] = parts.get(name, 0.0) + value.detach().float()
        steps += 1
        bar.update(steps, lambda: f"loss {total.item() / steps:.4f}")
    bar.close()
    names = sorted(parts)
    means = ctx.mean(torch.stack([total, *(parts[n] for n in names)]) / max(steps, 1)).tolist()
    return dict(loss=means[0], parts=dict(zip(names, means[1:])), steps=steps,
                train_s=time.perf_counter() - start)


def evaluate(model, feeder: Feeder, problem: Problem, S: torch.Tensor, gamma: Optional[float], ctx,
             batch_size: int) -> Optional[dict]:
    """The epoch's CZSL, U/S/H and calibrated U/S/H (gamma None: chosen here by the best H) on rank 0."""
    model.eval()
    extra = {"class_attributes": S} if feeder.spec.seen_only else {}
    scores = []
    with torch.no_grad():
        for rows, labels in ((problem.eval_seen, problem.eval_seen_labels),
                             (problem.eval_unseen, problem.eval_unseen_labels)):
            part = ctx.split(len(rows))
            n = len(rows[part])
            chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
            logits = [torch.zeros(0, len(problem.classes))]
            for inputs, _ in feeder.batches(rows[part], labels[part], chunks, train=False):
                with feeder.autocast():
                    logits.append(model(**inputs, **extra).logits.float().cpu())
            local = torch.cat(logits)
            scores.append(all_gather_rows(local.to(ctx.device)).cpu() if ctx.distributed else local)
    model.train()
    if not ctx.is_main:
        return None
    args = (scores[0], problem.eval_seen_labels, scores[1], problem.eval_unseen_labels, problem.seen, problem.unseen)
    plain = gzsl_accuracy(*args)
    if gamma is None:
        calibrated, gamma, _ = gamma_sweep(*args)
    else:
        calibrated = gzsl_accuracy(*args, gamma=gamma)
    return dict(czsl=czsl_accuracy(scores[1], problem.eval_unseen_labels, problem.unseen), u=plain.u, s=plain.s,
                h=plain.h, gamma=float(gamma), u_cal=calibrated.u, s_cal=calibrated.s, h_cal=calibrated.h)


def summary(phase: str, epochs: int, r: dict, best: bool) -> str:
    pct = lambda key: f"{100 * r[key]:.1f}"  # noqa: E731
    chosen = "chosen" if phase == "val" else "from val" if r.get("gamma_source") == "val" else "fixed"
    return (f"[{phase}] epoch {r['epoch']}/{epochs} loss {r['loss']:.4f} | CZSL {pct('czsl')} | U {pct('u')} "
            f"S {pct('s')} H {pct('h')} | calibrated (γ {r['gamma']:.3f}, {chosen}) U {pct('u_cal')} "
            f"S {pct('s_cal')} H {pct('h_cal')} | {r['train_s']:.1f} s train, {r['eval_s']:.1f} s eval"
            + (" | best" if best else ""))


# ------------------------------------------------------------------------------------------------------ a phase


def run_phase(problem: Problem, settings: Settings, feeder: Feeder, data, words, shapes, info, folder: Path, ctx,
              gammas: Optional[list], log: Callable) -> list:
    """Train ``problem`` for settings.epochs epochs into ``folder`` (resuming from its last.pt); its history."""
    spec, device = feeder.spec, ctx.device
    runfolder.seed_everything(settings.seed)  # the same initial weights on every process
    S = data.att[problem.classes].to(device)
    model = _built(spec.build_model, settings, S[problem.seen] if spec.seen_only else S, words.to(device),
                   problem.unseen, shapes, info).to(device)
    if feeder.transforms is None:
        feeder.transforms = transforms_for(model.backbone, settings.image_size)
    write_config(settings, ctx)  # once the run is built: a setting that cannot work leaves no run behind
    seen_index = torch.full((len(problem.classes),), -1, dtype=torch.int64)
    seen_index[problem.seen] = torch.arange(len(problem.seen))
    labels = seen_index[problem.fit_labels] if spec.seen_only else problem.fit_labels
    optimizer, scheduler = optimizer_and_schedule(settings, [p for p in model.parameters() if p.requires_grad])
    history, best, start = [], None, 0
    last = folder / runfolder.LAST
    if last.exists():
        state = runfolder.load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history, best = state["epoch"], state["history"], state["best"]
        if len(state["rng"]) == ctx.world_size:
            runfolder.set_rng_state(state["rng"][ctx.rank])
        else:
            warnings.warn(f"{last} was written by {len(state['rng'])} processes, this run has {ctx.world_size}: "
                          f"the random states start afresh (the batches do not depend on them)")
            runfolder.seed_everything(settings.seed + start, ctx.rank)
        if start < settings.epochs:
            log(f"[{problem.name}] resuming after epoch {start} ({last})")
        if ctx.is_main:
            runfolder.write_metrics(folder, history)  # drops the line of an epoch lost in a kill
    else:
        runfolder.seed_everything(settings.seed, ctx.rank)
    trainer = ctx.wrap(model)
    if settings.compile:
        trainer = torch.compile(trainer)
    sampler = GlobalBatches(len(problem.fit), settings.batch_size, settings.seed, ctx)
    for epoch in range(start, settings.epochs):
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        record = dict(epoch=epoch + 1, lr=lr, **train_epoch(trainer, model, feeder, problem.fit, labels, sampler,
                                                            optimizer, ctx, f"[{problem.name}] epoch {epoch + 1}/"
                                                                            f"{settings.epochs}"))
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"[{problem.name}] epoch {epoch + 1}: the loss is {record['loss']}; the run stops "
                               f"(last.pt holds epoch {epoch}); a lower --lr may help")
        scheduler.step()
        start_eval = time.perf_counter()
        metrics = evaluate(model, feeder, problem, S, gammas[epoch] if gammas else None, ctx,
                           settings.eval_batch_size)
        rng = runfolder.gathered_rng_states(ctx)
        if not ctx.is_main:
            continue
        record.update(metrics, eval_s=time.perf_counter() - start_eval,
                      images_per_s=record["steps"] * settings.batch_size / max(record["train_s"], 1e-9))
        if problem.name == "test":
            record["gamma_source"] = "val" if settings.gamma == "val" else "fixed"
        history.append(record)
        is_best = best is None or record["h_cal"] > best["h_cal"]
        if is_best:
            best = dict(epoch=record["epoch"], h_cal=record["h_cal"], gamma=record["gamma"])
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     epoch=epoch + 1, rng=rng, history=history, best=best, phase=problem.name,
                     settings=settings.to_dict())
        runfolder.save_checkpoint(folder, state, is_best)
        runfolder.write_metrics(folder, history)
        note = runfolder.plot_curves(folder, history, f"{settings.model.upper()} {problem.name}: {folder}")
        log(summary(problem.name, settings.epochs, record, is_best))
        if note and epoch == start:
            log(note)
    return history


# ---------------------------------------------------------------------------------------------------- the run


def versions() -> dict:
    import timm

    from .. import __version__

    return dict(zslfast=__version__, python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, numpy=np.__version__)


def write_config(settings: Settings, ctx) -> None:
    """config.json of a new run (rank 0; kept as it is on resume)."""
    path = Path(settings.out) / runfolder.CONFIG
    if ctx.is_main and not path.exists():
        Path(settings.out).mkdir(parents=True, exist_ok=True)
        runfolder.write_json(path, dict(settings=settings.to_dict(), recipe=RECIPES[settings.model].source,
                                        seed=settings.seed, versions=versions(), world_size=ctx.world_size))


def train(settings: Settings, data, paths: list, words: torch.Tensor, ctx, log: Callable = print) -> dict:
    """The run of module docstring; every process calls it. Returns the histories (rank 0's hold the metrics)."""
    spec, out = SPECS[settings.model], Path(settings.out)
    say = log if ctx.is_main else (lambda *a, **k: None)
    problems = make_problems(data, settings.val_holdout, settings.seed)
    feeder, shapes, info = Feeder(spec, paths, settings, ctx), {}, {}
    if spec.cached:
        runfolder.seed_everything(settings.seed)
        holder, frozen, extract, reader, info = _built(spec.build_extractor, settings, data.att, words)
        holder.to(ctx.device)
        feeder.transforms = transforms_for(reader, settings.image_size)
        if settings.cache:
            from ..data import ImageFolderDataset

            fields = dict(model=spec.name, backbone=settings.backbone, encoder=settings.encoder,
                          weights=digest_modules(frozen), transform=repr(feeder.transforms["eval"]),
                          images=digest_images(paths, Path(settings.images)), count=len(paths),
                          dtype=settings.cache_dtype, amp=settings.amp)
            cache_dir = Path(settings.cache_dir) if settings.cache_dir else out / "cache"
            dataset = ImageFolderDataset(paths, data.labels.tolist(), feeder.transforms["eval"])
            try:
                features, hit, folder = cached_features(
                    cache_dir, fields, extract, dataset, ctx, batch_size=settings.eval_batch_size,
                    workers=settings.workers, dtype=settings.cache_dtype, autocast=feeder.autocast())
            except CacheRangeError as err:
                raise SetupError(str(err)) from None
            meta = json.loads((folder / "meta.json").read_text())
            arrays = ", ".join(f"{name} {tuple(shape)}" for name, shape in meta["shapes"].items())
            say(f"feature cache: {'hit' if hit else 'written'}, {folder} ({arrays} {meta['dtype']}; extracted in "
                f"{meta['seconds']:.1f} s)")
            feeder.features = features
            shapes = {name: tuple(array.shape[1:]) for name, array in features.items()}
            del holder, frozen, extract, reader  # the backbones' memory back before training
        else:
            feeder.extract = extract
            with torch.inference_mode():
                probe = extract(torch.zeros(1, 3, settings.image_size, settings.image_size, device=ctx.device))
            shapes = {name: tuple(value.shape[1:]) for name, value in probe.items()}
            say("feature cache off (--no-cache): the frozen backbones run on every batch")
    result = dict(folder=str(out), rank=ctx.rank, world_size=ctx.world_size, val_history=None)
    gammas = None
    if settings.gamma == "val":
        val = problems["val"]
        say(f"validation run (calibrated stacking's γ, epoch by epoch): trains on {len(val.fit)} images of "
            f"{len(val.seen)} train classes; evaluates {len(val.eval_seen)} held-out images of them and "
            f"{len(val.eval_unseen)} of {len(val.unseen)} val classes -> {out / 'val'}")
        (out / "val").mkdir(parents=True, exist_ok=True)
        result["val_history"] = run_phase(problems["val"], settings, feeder, data, words, shapes, info, out / "val",
                                          ctx, None, say)
        gammas = [r["gamma"] for r in result["val_history"]] if ctx.is_main else None
    else:
        gammas = [float(settings.gamma)] * settings.epochs
    test = problems["test"]
    say(f"test run: {len(test.fit)} trainval images of {len(test.seen)} seen classes; test_seen "
        f"{len(test.eval_seen)}, test_unseen {len(test.eval_unseen)} of {len(test.unseen)} unseen -> {out}")
    result["history"] = run_phase(test, settings, feeder, data, words, shapes, info, out, ctx, gammas, say)
    if ctx.is_main and result["history"]:
        best = max(result["history"], key=lambda r: r["h_cal"])
        say(f"best epoch {best['epoch']}: calibrated H {100 * best['h_cal']:.1f} (U {100 * best['u_cal']:.1f}, "
            f"S {100 * best['s_cal']:.1f}, γ {best['gamma']:.3f}), CZSL {100 * best['czsl']:.1f} -> "
            f"{out / runfolder.BEST}")
    return result
