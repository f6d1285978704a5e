"""``python -m zslfast demo``: train ILPG (or, with ``--model sage``, SAGE) twice on the same batches, with the
reference ops and with the fused ops.

Prints each run's median step time, its peak memory, the largest difference between the two runs' losses (step
by step), and the GZSL U / S / H of each trained model. The default data is a synthetic CUB-shaped dataset written
in the xlsa17 format (zslfast.data.write_synthetic_xlsa17: 200 classes, 50 unseen, 312 attributes); ``--data DIR``
reads a real xlsa17 folder (res101.mat + att_splits.mat) instead.

xlsa17 ships pooled ResNet-101 features (2048 per image), not the 7x7 region maps nor the DINOv2 signatures ILPG
reads, and no attribute word vectors. The demo derives stand-ins, fixed by the seed, documented here so nobody
mistakes them for the real thing: regions[b, r] = feature[b] * pattern[r] (R non-negative random patterns of mean
1, so the regions average back to the feature), signatures = feature @ P / sqrt(2048) (P random 2048 x 384), and
attribute vectors = random (K, 300). The point of the demo is the timing and the equality of the two runs; the
accuracies show that the model trains (well above chance, 1 in 200 classes on the synthetic CUB), not what ILPG
reaches with real features and word vectors; they vary from run to run and machine to machine. Adam at 3e-3 replaces the paper's SGD at 1e-4 for 100
epochs, so a few epochs get somewhere.

``--model sage``: SAGE (zslfast.models.SAGE) reads L=3 levels of ViT hidden states (B, 1+N, D), which xlsa17 does
not have either. Stand-ins, fixed by the seed: level l's token t of image b is (feature[b] @ P_l) * pattern_l[t],
P_l random 2048 x D / sqrt(2048), pattern_l (1+N, D) non-negative random of mean 1 (``--patches N``, a square,
default 49 = 7x7; ``--embed-dim D``, default 128); attribute word vectors random (K, 300). SAGE's defaults
otherwise (d = ``--hidden-dim``, the prevalence subsets, its λ defaults); the bank and Eq. 9 run in both runs.

Under torchrun (``torchrun --nproc_per_node=N -m zslfast demo``: WORLD_SIZE > 1 in the environment) both runs,
reference and fused, train data-parallel (zslfast.distributed): the process group is gloo on CPU, nccl on CUDA
(each process on cuda:LOCAL_RANK); the model is wrapped in DistributedDataParallel; every process builds the same
data, weights and batch order from the seed and trains on its contiguous 1/N of each global batch of
``--batch-size`` (which must be a multiple of N: otherwise exit 2), a DistributedSampler-like split that keeps the
rank order equal to the batch order, so that SAGE's bank, gathered in rank order, stays identical on every rank
and equal to a one-process run's. The losses printed are the mean over the processes, the global batch's: ILPG's
terms are all per-sample means, and SAGE computes its two batch-level terms (contrastive, bank KL) over the global
batch (zslfast.models.sage), so N processes follow a one-process run at the same global batch up to float
rounding. Each process scores its part of the test images, rank 0 gathers the logits and computes U / S / H;
only rank 0 prints; step times and peak memory are rank 0's. The lock-step check runs as in one process (its
loss, too, the mean over the processes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import _backend
from . import _cli
from ._memory import peak_bytes
from ..distributed import Context, all_gather_rows, env_world, init_from_env


def _progress(prefix: str, done: int, total: int, extra: str = "") -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class StandIns:
    """Region features, instance signatures and attribute vectors derived from pooled features (module docstring)."""

    def __init__(self, feature_dim: int, num_attributes: int, num_regions: int, signature_dim: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 1)
        patterns = torch.rand(num_regions, feature_dim, generator=g) * 2
        self.patterns = (patterns / patterns.mean(0, keepdim=True)).to(device)
        self.projection = (torch.randn(feature_dim, signature_dim, generator=g) / feature_dim**0.5).to(device)
        self.attribute_vectors = torch.randn(num_attributes, 300, generator=g).to(device)

    def __call__(self, features: torch.Tensor):
        return features[:, None, :] * self.patterns, features @ self.projection


class HiddenStateStandIns:
    """SAGE's L levels of hidden states and attribute word vectors derived from pooled features (module docstring)."""

    def __init__(self, feature_dim: int, num_attributes: int, num_patches: int, embed_dim: int, seed: int, device,
                 levels: int = 3):
        g = torch.Generator().manual_seed(seed + 2)
        patterns = torch.rand(levels, 1 + num_patches, embed_dim, generator=g) * 2
        self.patterns = (patterns / patterns.mean(1, keepdim=True)).to(device)
        self.projections = (torch.randn(levels, feature_dim, embed_dim, generator=g) / feature_dim**0.5).to(device)
        self.attribute_vectors = torch.randn(num_attributes, 300, generator=g).to(device)

    def __call__(self, features: torch.Tensor):
        return [(features @ p)[:, None, :] * pattern for p, pattern in zip(self.projections, self.patterns)]


def _model_adapter(args, data, device):
    """(build(backend) -> model, inputs(features) -> the model's keyword inputs) for ``--model``."""
    from ..models import ILPG, SAGE

    if args.model == "sage":
        standins = HiddenStateStandIns(data.features.shape[1], data.num_attributes, args.patches, args.embed_dim,
                                       args.seed, device)

        def build(backend):
            torch.manual_seed(args.seed)
            return SAGE(data.att.to(device), None, attribute_word_embeddings=standins.attribute_vectors,
                        embed_dim=args.embed_dim, dim=args.hidden_dim, backend=backend,
                        checkpoint=args.weights).to(device)

        return build, lambda features: dict(hidden_states=standins(features))
    standins = StandIns(data.features.shape[1], data.num_attributes, args.regions, 384, args.seed, device)

    def build(backend):
        torch.manual_seed(args.seed)
        return ILPG(
            data.att.to(device), standins.attribute_vectors, region_dim=data.features.shape[1],
            hidden_dim=args.hidden_dim, weights=args.weight_form, checkpoint=args.weights,
            preset=args.preset if args.preset in ("CUB", "SUN", "AwA2") else None,
            unseen_classes=data.unseen_classes.to(device), backend=backend,
        ).to(device)

    def inputs(features):
        regions, signatures = standins(features)
        return dict(regions=regions, signatures=signatures)

    return build, inputs


def _evaluate(model, data, inputs, device, batch_size, ctx=None):
    """GZSL U / S / H, plain and calibrated (best gamma), and the test logits {split: (scores, labels)}. Under
    torchrun each rank scores its contiguous part of the test images and rank 0 gathers the logits and computes the
    metrics (the other ranks get four Nones)."""
    from ..metrics import gamma_sweep, gzsl_accuracy

    ctx = ctx or Context()
    model.eval()
    scores = {}
    with torch.no_grad():
        for split in ("test_seen", "test_unseen"):
            features, labels = data.split(split)
            features = features[ctx.split(len(labels))]
            chunks = [torch.zeros(0, data.num_classes)]
            for i in range(0, len(features), batch_size):
                chunks.append(model(**inputs(features[i : i + batch_size].to(device))).logits.float().cpu())
            local = torch.cat(chunks)
            if ctx.distributed:
                local = all_gather_rows(local.to(device)).cpu()
            scores[split] = (local, labels)
    model.train()
    if not ctx.is_main:
        return None, None, None, None
    args = (*scores["test_seen"], *scores["test_unseen"], data.seen_classes, data.unseen_classes)
    plain = gzsl_accuracy(*args)
    spread = 2 * torch.cat([scores["test_seen"][0], scores["test_unseen"][0]]).std().item()
    best, gamma, _ = gamma_sweep(*args, gammas=torch.linspace(-spread, spread, 41).tolist())
    return plain, best, gamma, scores


def _check_xlsa17_folder(root: Path) -> None:
    """--data: a folder holding both xlsa17 files, else a UsageError saying which are missing."""
    from ..data.xlsa17 import FEATURES_FILE, SPLITS_FILE

    if not root.is_dir():
        raise _cli.UsageError(f"--data {root}: no such folder (an xlsa17 dataset folder, e.g. xlsa17/data/CUB)")
    missing = [name for name in (FEATURES_FILE, SPLITS_FILE) if not (root / name).is_file()]
    if missing:
        raise _cli.UsageError(f"--data {root}: not an xlsa17 dataset folder (no {' and no '.join(missing)}; "
                              f"xlsa17/data/CUB and its siblings hold {FEATURES_FILE} and {SPLITS_FILE})")


def _check_patches(num_patches: int) -> None:
    """--patches for SAGE: a square, SAGE's grid for hidden states without a grid size (no option here gives one)."""
    from ..models.sage import patch_grid

    try:
        patch_grid(num_patches)
    except ValueError:
        side = math.isqrt(num_patches)
        raise _cli.UsageError(f"--patches {num_patches} is not a square: SAGE lays the patches out on a square "
                              f"grid (e.g. {side * side} or {(side + 1) ** 2})") from None


def run(args) -> dict:
    """The demo (module docstring); under torchrun (WORLD_SIZE > 1) the data-parallel run described there.

    Returns, on every rank, {"reference": ..., "fused": ...} (each: step_ms, peak_mib, losses (the global batch's,
    step by step), gzsl, calibrated, gamma, scores (the test logits; these four None but on rank 0), state_dict
    (the trained weights and buffers, SAGE's bank included, on the CPU)), lockstep_max_rel_diff, rank, world_size."""
    _, world, _ = env_world()
    if args.model == "sage":
        _check_patches(args.patches)
    _cli.device(args.device)  # a device that exists here, before torchrun's process group is set up on it
    if args.data:
        _check_xlsa17_folder(Path(args.data).expanduser())
    if world > 1 and args.batch_size % world:
        raise _cli.UsageError(f"--batch-size {args.batch_size} does not split over {world} processes (the global "
                              f"batch must be a multiple of the process count)")
    ctx = init_from_env(args.device)
    try:
        return _run(args, ctx)
    finally:
        ctx.close()


def _run(args, ctx) -> dict:
    from ..data import load_xlsa17, write_synthetic_xlsa17

    device = ctx.device
    say = print if ctx.is_main else (lambda *a, **k: None)
    if _backend.extension_warning() and ctx.is_main:
        print(_backend.extension_warning(), file=sys.stderr)
    fused_backend = _backend.resolve("demo", None, device)
    if fused_backend == "reference":
        # Both runs would be the reference ops: no "fused" figures to report. Say why: no kernel backend can run
        # here (each one's reason), or the environment chose the reference.
        kernels = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
        reasons = [reason for reason in (_backend.why_unavailable(b, device) for b in kernels) if reason]
        why = "; ".join(reasons) if len(reasons) == len(kernels) else "ZSLFAST_BACKEND=reference"
        raise _cli.UsageError(f"the fused ops cannot run on {device} tensors here (they resolve to the reference "
                              f"ops: {why}); the demo would compare the reference with itself")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data).expanduser() if args.data else write_synthetic_xlsa17(Path(tmp), preset=args.preset,
                                                                                     seed=args.seed)
        try:
            data = load_xlsa17(root)
        except ValueError as err:  # the loader names the file, key and what it found
            raise _cli.UsageError(f"--data {args.data}: {err}") from None
    build, inputs = _model_adapter(args, data, device)
    train_x, train_y = data.split("trainval")
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    if args.steps_per_epoch:
        batches = batches[: args.steps_per_epoch]
    if not batches:
        raise _cli.UsageError(f"--batch-size {args.batch_size} is larger than the {len(train_y)} training images")
    shape = f"R={args.regions}" if args.model == "ilpg" else f"N={args.patches} D={args.embed_dim} d={args.hidden_dim}"
    say(f"model: {args.model.upper()}; data: {'synthetic ' + args.preset if not args.data else args.data}, "
        f"{data.num_classes} classes ({len(data.unseen_classes)} unseen), {data.num_attributes} attributes, "
        f"{len(train_y)} training images; B={args.batch_size}, {shape}, {len(batches)} steps x {args.epochs} "
        f"epochs on {device}; fused = zslfast's {fused_backend!r} backend")
    if ctx.distributed:
        say(f"torchrun: {ctx.world_size} processes ({ctx.backend}), DistributedDataParallel; each step's global batch "
            f"of {args.batch_size} split into {ctx.world_size} x {args.batch_size // ctx.world_size}; losses: the "
            f"mean over the processes (the global batch's); times and memory: rank 0's")

    # Lock-step check during the fused run: before each step a reference-ops copy takes the fused model's weights
    # and computes the loss of the same batch (outside the timing), so the difference is the ops' alone.
    try:
        shadow = build("reference")
    except (FileNotFoundError, ValueError) as err:  # --weights: a missing file, or one of another model
        raise _cli.UsageError(f"--weights: {err}") from None
    lockstep = []

    results = {}
    for name in ("reference", "fused"):
        model = build("reference" if name == "reference" else None)
        trainer = ctx.wrap(model)  # DistributedDataParallel under torchrun
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD if getattr(args, "optimizer", "adam") == "sgd" else torch.optim.Adam
        optimiser = optimizer(trained, lr=args.lr)

        def step(idx):
            idx = ctx.shard(idx)  # this process's part of the global batch
            out = trainer(**inputs(train_x[idx].to(device)), labels=train_y[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            out.loss.backward()
            optimiser.step()
            return ctx.mean(out.loss.detach())

        losses, times = [], []
        total = args.epochs * len(batches)
        for epoch in range(args.epochs):
            for i, idx in enumerate(batches):
                if name == "fused":
                    shadow.load_state_dict(model.state_dict())
                    with torch.no_grad():
                        local = ctx.shard(idx)
                        batch = inputs(train_x[local].to(device))
                        shadow_loss = ctx.mean(shadow(**batch, labels=train_y[local].to(device)).loss).item()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = step(idx)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
                if name == "fused":
                    lockstep.append(abs(losses[-1] - shadow_loss) / max(abs(shadow_loss), 1e-12))
                if ctx.is_main:
                    _progress(f"{name:9s} epoch {epoch + 1}/{args.epochs}", epoch * len(batches) + i + 1, total,
                              f"loss {losses[-1]:.4f}")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        peak = peak_bytes(lambda: step(batches[0]), device) / 2**20
        model.load_state_dict(state)
        # (evaluation in larger chunks: the logits are per image, the chunking changes nothing but the time)
        plain, calibrated, gamma, scores = _evaluate(model, data, inputs, device, max(args.batch_size, 500), ctx)
        # the first steps include one-off warm-up (allocations, kernel compilation): time the rest
        timed = times[min(3, len(times) - 1):]
        results[name] = dict(step_ms=1e3 * statistics.median(timed), peak_mib=peak, losses=losses,
                             gzsl=plain, calibrated=calibrated, gamma=gamma, scores=scores,
                             state_dict={k: v.detach().cpu() for k, v in state.items()})
    if not ctx.is_main:
        return dict(results, lockstep_max_rel_diff=max(lockstep), rank=ctx.rank, world_size=ctx.world_size)

    ref, fused = results["reference"], results["fused"]
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref["losses"], fused["losses"])]
    print("\n" + _cli.timing_conditions(device, busy_self=torch.get_num_threads() if device.type == "cpu" else 1))
    print(f"{'':10s} {'step ms':>9s} {'peak MiB':>9s} {'U':>6s} {'S':>6s} {'H':>6s}   calibrated U / S / H (gamma)")
    for name, r in results.items():
        g, c = r["gzsl"], r["calibrated"]
        print(f"{name:10s} {r['step_ms']:9.1f} {r['peak_mib']:9.1f} {100 * g.u:6.1f} {100 * g.s:6.1f} {100 * g.h:6.1f}"
              f"   {100 * c.u:.1f} / {100 * c.s:.1f} / {100 * c.h:.1f} ({r['gamma']:.3f})")
    print(f"speed-up {ref['step_ms'] / fused['step_ms']:.2f}x (median step, reference / fused)")
    print(f"loss, fused vs reference ops at the same weights and batch, every step: max relative difference "
          f"{max(lockstep):.1e} over {len(lockstep)} steps")
    print(f"the two independent runs: first step {diffs[0]:.1e}, first epoch {max(diffs[:len(batches)]):.1e}, all steps "
          f"{max(diffs):.1e} (their weights drift apart by float rounding step after step, as any two float32 runs "
          f"that sum in different orders do; hence also their U/S/H differ)")
    results.update(lockstep_max_rel_diff=max(lockstep), rank=ctx.rank, world_size=ctx.world_size)
    if args.save:
        Path(args.save).expanduser().parent.mkdir(parents=True, exist_ok=True)
        torch.save(results["fused"]["state_dict"], Path(args.save).expanduser())
        print(f"the fused run's trained weights: {args.save} (python -m zslfast demo --weights {args.save} ... "
              f"starts from them)")
    return results


DESCRIPTION = """\
Train a ZSL model twice on the same batches, with zslfast's reference (plain PyTorch) ops and with its fused ops,
and print each run's median step time, peak memory and GZSL accuracies (U, S, H), and how far the two runs' losses
differ. The default data is a synthetic CUB-shaped dataset in the xlsa17 format (written to a temporary folder,
no download); --data reads a real xlsa17 folder. xlsa17 has pooled ResNet features only, so the region features,
signatures, hidden states and word vectors the models read are stand-ins derived from them (zslfast/tools/demo.py
documents how): the accuracies show that the model trains, not what the paper reaches.

examples:
  python -m zslfast demo
  python -m zslfast demo --model sage --epochs 2
  python -m zslfast demo --data ~/data/xlsa17/CUB --preset CUB"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import existing_file, non_negative_float, non_negative_int, output_file, positive_int, seed
    from ..data import PRESETS

    parser.add_argument("--model", default="ilpg", choices=("ilpg", "sage"), help="the model to train")
    parser.add_argument("--data", metavar="DIR",
                        help="an xlsa17 folder holding res101.mat and att_splits.mat (default: synthetic data)")
    parser.add_argument("--preset", default="CUB", choices=tuple(PRESETS),
                        help="the synthetic dataset's shape, and ILPG's loss weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--epochs", type=positive_int, default=5, help="passes over the training split")
    parser.add_argument("--steps-per-epoch", type=non_negative_int, default=0,
                        help="cap the steps per epoch (0: every batch)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per step")
    parser.add_argument("--lr", type=non_negative_float, default=3e-3,
                        help="the optimizer's learning rate (0: the weights stay where they start)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seeds the data, the stand-ins and the weights (0 to 2**32 - 1)")
    parser.add_argument("--weights", metavar="PATH", type=existing_file,
                        help="start both runs from this checkpoint of the model (a state dict, e.g. from --save) "
                             "instead of random weights; no download")
    parser.add_argument("--save", metavar="PATH", type=output_file,
                        help="write the fused run's trained weights here (a state dict)")
    parser.add_argument("--hidden-dim", type=positive_int, default=64,
                        help="ILPG: the instance semantic generator's width; SAGE: its width d")
    ilpg = parser.add_argument_group("ILPG (--model ilpg)")
    ilpg.add_argument("--regions", type=positive_int, default=49, help="R, the stand-in regions (ResNet 7x7: 49)")
    ilpg.add_argument("--weight-form", default="full", choices=("full", "attribute", "factored"),
                      help="the instance generator's weight form (zslfast.nn.InstancePrototypeClassifier)")
    sage = parser.add_argument_group("SAGE (--model sage)")
    sage.add_argument("--patches", type=positive_int, default=49,
                      help="N, the stand-in patches per level: a square (SAGE lays them out on a square grid)")
    sage.add_argument("--embed-dim", type=positive_int, default=128, help="D, the stand-in hidden states' width")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                        help="Adam, or plain SGD: SGD's weights follow the gradients' float rounding linearly, "
                             "where Adam's first steps (about lr times the gradient's sign) can turn a "
                             "rounding-level gradient into a full step")


def main(argv=None):
    from . import _cli

    return _cli.main("python -m zslfast demo", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
