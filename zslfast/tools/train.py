"""``python -m zslfast train``: ILPG, SVIP or SAGE trained from a benchmark's images with its paper's recipe, and
evaluated after every epoch as the ZSL papers report it; resumable; on one process or many (torchrun).

The command line is read and checked here, everything before the first step: the options (zslfast.tools._cli's
types), the folders, the dataset (zslfast.data.load_xlsa17), every image file (zslfast.data.image_paths), the word
vectors, the timm model names and the split sizes; a problem is one line and exit code 2. The training itself is
zslfast.training (recipes, feature cache, loop, run folder), which documents the protocol.

Every option that a recipe sets defaults to None here and is filled from zslfast.training.RECIPES, so that
``--resume RUN`` can tell an option given on its command line (checked against the run's config.json: a
different value would not continue the same run) from one left out (the run's own value).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import textwrap
from pathlib import Path

import torch

from . import _cli
from ._cli import UsageError

PROG = "python -m zslfast train"


def _recipes_text() -> str:
    from ..training.recipes import RECIPES

    return "\n".join(textwrap.fill(recipe.source, 116, initial_indent=f"  {name}: ", subsequent_indent="    ")
                     for name, recipe in RECIPES.items())


DESCRIPTION = f"""\
Train ILPG, SVIP or SAGE (zslfast.models) from a benchmark's images with the paper's recipe, and evaluate it after
every epoch as the ZSL papers report it (Xian et al.'s xlsa17 protocol, per-class mean top-1): CZSL on the unseen
classes, GZSL U / S / H, and calibrated stacking with its gamma chosen on the validation split (train_loc /
val_loc, a validation run trained first in RUN/val; never on the test sets). Writes RUN/config.json,
metrics.jsonl, best.pt (best calibrated H), last.pt and curves.png (with matplotlib); --resume RUN continues a
run that stopped. Frozen backbones (ILPG's ResNet-101 and DINOv2, SAGE's ViT) run once: their features are cached
under RUN/cache (or --cache-dir), memory-mapped, and reused by every later run with the same backbone, weights,
resolution and images. Under torchrun the run is data-parallel (DistributedDataParallel, --batch-size global).

--data is an xlsa17 folder (res101.mat, att_splits.mat); --images the benchmark's image folder: the paths in
res101.mat's image_files, their common folder replaced by it (CUB: CUB_200_2011/images). Without --word-vectors
the attribute vectors are random stand-ins (a warning says so).

recipes (the defaults of --optimizer, --lr, --momentum, --weight-decay, --batch-size, --epochs, --schedule):
{_recipes_text()}

examples:
  python -m zslfast train --model ilpg --data xlsa17/data/CUB --images CUB_200_2011/images \\
      --word-vectors glove.6B.300d.txt --attribute-names CUB_200_2011/attributes/attributes.txt --out runs/ilpg-cub
  python -m zslfast train --model ilpg --resume runs/ilpg-cub
  torchrun --nproc_per_node=4 -m zslfast train --model svip --device cuda --amp bf16 --data ... --out runs/svip"""


def _weights(text: str) -> str:
    """--backbone-weights / --encoder-weights: timm, none, or a checkpoint file that exists."""
    if text in ("timm", "none"):
        return text
    return _cli.existing_file(text)


def _gamma(text: str):
    """--gamma: "val", or a fixed finite number."""
    if text == "val":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'val' or a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be 'val' or a finite number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import existing_file, fraction, non_negative_float, non_negative_int, output_folder, positive_int
    from ._cli import seed
    from ..data import PRESETS
    from ..training.recipes import SPECS

    recipe = "the recipe's (see above)"
    parser.add_argument("--model", required=True, choices=tuple(SPECS), help="the paper's model to train")
    where = parser.add_argument_group("data and run folder")
    where.add_argument("--data", metavar="DIR", help="an xlsa17 dataset folder (res101.mat, att_splits.mat)")
    where.add_argument("--images", metavar="DIR", help="the benchmark's image folder (CUB: CUB_200_2011/images)")
    runs = where.add_mutually_exclusive_group()
    runs.add_argument("--out", metavar="RUN", type=output_folder, help="the new run's folder")
    runs.add_argument("--resume", metavar="RUN",
                      help="continue this run (its config.json's settings; options given must agree with them)")
    where.add_argument("--preset", choices=tuple(PRESETS),
                       help="the benchmark, for ILPG's loss weights (default: the --data folder's name, else CUB)")
    where.add_argument("--word-vectors", metavar="FILE", type=existing_file,
                       help="attribute word vectors: a (K, D) .npy or .pt array, or a GloVe-format text file with "
                            "--attribute-names (default: random stand-ins, with a warning)")
    where.add_argument("--attribute-names", metavar="FILE", type=existing_file,
                       help="the attributes' names, one a line (CUB's attributes.txt), for a text --word-vectors")
    nets = parser.add_argument_group("backbones")
    nets.add_argument("--backbone", metavar="NAME",
                      help="timm model (default: the model's: ILPG resnet101, SVIP deit_base_patch16_224, SAGE "
                           "vit_base_patch16_224)")
    nets.add_argument("--backbone-weights", metavar="SOURCE", type=_weights,
                      help="timm (timm's pretrained weights, downloaded once), none (random), or a local timm "
                           "checkpoint file (default: timm)")
    nets.add_argument("--encoder", metavar="NAME", help="ILPG's instance encoder (default: vit_small_patch14_dinov2)")
    nets.add_argument("--encoder-weights", metavar="SOURCE", type=_weights,
                      help="its weights, as --backbone-weights (default: timm)")
    nets.add_argument("--image-size", type=_cli.integer(16), help="input resolution (default: 224)")
    opt = parser.add_argument_group("optimisation (defaults: the recipe's)")
    opt.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help=f"default: {recipe}")
    opt.add_argument("--lr", type=non_negative_float, help=f"learning rate; default: {recipe}")
    opt.add_argument("--momentum", type=non_negative_float, help=f"SGD's momentum; default: {recipe}")
    opt.add_argument("--weight-decay", type=non_negative_float, help=f"default: {recipe}")
    opt.add_argument("--batch-size", type=positive_int, help=f"images per step (global under torchrun); default: "
                                                             f"{recipe}")
    opt.add_argument("--epochs", type=positive_int, help=f"default: {recipe}")
    opt.add_argument("--schedule", choices=("constant", "cosine"),
                     help=f"the learning rate per epoch (cosine: annealed to 0 over the epochs); default: {recipe}")
    opt.add_argument("--seed", type=seed, help="seeds the weights, batches and held-out images (default: 0)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--gamma", type=_gamma,
                    help="calibrated stacking's gamma: val (chosen on the validation split each epoch, by a "
                         "validation run trained first) or a fixed number (no validation run) (default: val)")
    ev.add_argument("--val-holdout", type=fraction,
                    help="the fraction of each train_loc class held out as the validation's seen images (default: "
                         "0.2)")
    ev.add_argument("--eval-batch-size", type=positive_int,
                    help="images per evaluation (and feature extraction) batch (default: 128)")
    run = parser.add_argument_group("devices and speed")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    run.add_argument("--amp", choices=("none", "bf16"), help="autocast to bfloat16 (default: none)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--workers", type=non_negative_int,
                     help="DataLoader worker processes reading images (default: min(8, the cores))")
    run.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                     help="run the frozen backbones on every batch instead of caching their features")
    run.add_argument("--cache-dir", metavar="DIR", type=output_folder,
                     help="where the feature cache lives (default: RUN/cache); share one between runs")
    run.add_argument("--cache-dtype", choices=("float16", "float32"), help="the cached features' dtype "
                                                                            "(default: float16)")


# ------------------------------------------------------------------------------------------- the settings


def _given(args) -> dict:
    """The settings given on the command line (every option defaults to None; the flags count when set)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("run", "command", "resume")}
    if not args.compile:
        given.pop("compile")
    return given


def _option(name: str) -> str:
    return "--" + name.replace("_", "-") if name not in ("cache", "compile") else {"cache": "--no-cache",
                                                                                   "compile": "--compile"}[name]


def _preset_of(data: str):
    from ..data import PRESETS

    name = Path(data).expanduser().resolve().name.lower()
    return next((key for key in PRESETS if key.lower() == name), None)


def settings_from(args):
    """The run's Settings: a new run's from the options and the recipe, or --resume's from its config.json."""
    from ..training.recipes import RECIPES, RUNTIME, SPECS, Settings

    given = _given(args)
    if args.resume:
        folder = Path(args.resume).expanduser()
        try:
            saved = json.loads((folder / "config.json").read_text())["settings"]
        except (OSError, ValueError, KeyError):
            raise UsageError(f"--resume {args.resume}: no run there (no readable config.json)") from None
        if saved.get("model") != args.model:
            raise UsageError(f"--resume {args.resume}: that run trains {saved.get('model')}, not --model "
                             f"{args.model}")
        differ = [f"{_option(k)} {v} (the run's: {saved.get(k)})" for k, v in given.items()
                  if k not in RUNTIME and saved.get(k) != v]
        if differ:
            raise UsageError(f"--resume {args.resume}: {'; '.join(differ)}: the resumed run keeps its own settings "
                             f"(leave these out, or start a new run with --out)")
        saved.update({k: v for k, v in given.items() if k in RUNTIME}, out=str(folder))
        return Settings(**saved)
    missing = [f"--{name}" for name in ("data", "images", "out") if name not in given]
    if missing:
        raise UsageError(f"a new run needs {', '.join(missing)} (or --resume RUN to continue one)")
    if (Path(args.out).expanduser() / "config.json").exists():
        raise UsageError(f"--out {args.out} already holds a run (config.json): --resume it, or choose another folder")
    spec, recipe = SPECS[args.model], RECIPES[args.model]
    if args.model != "ilpg" and ("encoder" in given or "encoder_weights" in given):
        raise UsageError("--encoder and --encoder-weights are ILPG's (its DINOv2 instance encoder)")
    if not spec.cached and "cache" in given:
        raise UsageError(f"--no-cache: {args.model.upper()} fine-tunes its backbone, there is no feature cache")
    values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name != "source"}
    values.update(backbone=spec.default_backbone(), backbone_weights="timm", encoder=spec.default_encoder(),
                  encoder_weights="timm" if args.model == "ilpg" else None, seed=0, gamma="val", val_holdout=0.2,
                  amp="none", compile=False, cache=spec.cached, cache_dtype="float16", eval_batch_size=128,
                  preset=_preset_of(args.data), device="cuda" if torch.cuda.is_available() else "cpu",
                  workers=min(8, os.cpu_count() or 1))
    values.update(given)
    return Settings(**values)


# ------------------------------------------------------------------------------------------------ the checks


def _check_timm_names(settings) -> None:
    import timm

    for option, name in (("--backbone", settings.backbone), ("--encoder", settings.encoder)):
        if name is not None and not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            raise UsageError(f"{option} {name!r}: timm has no such model"
                             + (f"; did you mean {close[0]!r}?" if close else ""))


def _word_vectors(settings, data, rank: int) -> torch.Tensor:
    from ..data import load_word_vectors, read_names, stand_in_vectors

    K = data.num_attributes
    if settings.word_vectors is None:
        if settings.attribute_names:
            raise UsageError("--attribute-names goes with --word-vectors (a GloVe-format text file)")
        if rank == 0:
            sys.stderr.write(f"{PROG}: warning: no --word-vectors: the {K} attribute word vectors are random "
                             f"stand-ins (zslfast.data.stand_in_vectors, seed {settings.seed}); the papers use "
                             f"GloVe / Word2Vec\n")
        return stand_in_vectors(K, settings.seed)
    try:
        names = read_names(settings.attribute_names) if settings.attribute_names else None
        if names is not None and len(names) != K:
            raise ValueError(f"{settings.attribute_names} names {len(names)} attributes, the dataset has {K}")
        return load_word_vectors(settings.word_vectors, names, rows=K)
    except ValueError as err:
        raise UsageError(f"--word-vectors: {err}") from None


def prepare(settings):
    """Every check before training (module docstring): (data, image paths, word vectors)."""
    from ..data import image_paths, load_xlsa17
    from ..distributed import env_world
    from ..training.loop import make_problems
    from .demo import _check_xlsa17_folder

    rank, world, _ = env_world()
    _cli.device(settings.device)
    _check_xlsa17_folder(Path(settings.data).expanduser())
    if not Path(settings.images).expanduser().is_dir():
        raise UsageError(f"--images {settings.images}: no such folder (the benchmark's images, e.g. "
                         f"CUB_200_2011/images)")
    if settings.batch_size % world:
        raise UsageError(f"--batch-size {settings.batch_size} does not split over {world} processes (the global "
                         f"batch must be a multiple of the process count)")
    _check_timm_names(settings)
    try:
        data = load_xlsa17(Path(settings.data).expanduser())
    except ValueError as err:
        raise UsageError(f"--data {settings.data}: {err}") from None
    if not data.image_files:
        raise UsageError(f"--data {settings.data}: res101.mat has no image_files (train reads the images it names)")
    try:
        paths = image_paths(data.image_files, Path(settings.images).expanduser())
    except ValueError as err:
        raise UsageError(f"--images {settings.images}: {err}") from None
    words = _word_vectors(settings, data, rank)
    try:
        problems = make_problems(data, settings.val_holdout, settings.seed)
    except ValueError as err:
        raise UsageError(f"--data {settings.data}: {err}") from None
    if settings.gamma == "val" and problems["val"] is None:
        raise UsageError(f"--data {settings.data}: att_splits.mat has no train_loc / val_loc, so --gamma val has no "
                         f"validation split; give a fixed --gamma")
    for name, problem in problems.items():
        if problem is not None and (name == "test" or settings.gamma == "val") and len(problem.fit) < \
                settings.batch_size:
            raise UsageError(f"--batch-size {settings.batch_size} is larger than the {len(problem.fit)} training "
                             f"images of the {name} run")
    return data, paths, words


def _one_line(err: Exception, marker: str) -> str:
    """The line of ``err``'s message holding ``marker`` (a DataLoader worker's error comes with its traceback)."""
    return next((line.strip() for line in str(err).splitlines() if marker in line), str(err).strip())


def run(args) -> dict:
    """Train (module docstring); returns zslfast.training.train's result (rank 0's holds the metrics)."""
    from ..data import ImageReadError
    from ..distributed import init_from_env
    from ..training import SetupError, train

    settings = settings_from(args)
    data, paths, words = prepare(settings)
    ctx = init_from_env(settings.device)
    log = print if ctx.is_main else (lambda *a, **k: None)
    log(f"train {settings.model.upper()} on {settings.data}: {len(paths)} images, {data.num_classes} classes "
        f"({len(data.seen_classes)} seen, {len(data.unseen_classes)} unseen), {data.num_attributes} attributes; "
        f"{settings.optimizer} lr {settings.lr:g}, batch {settings.batch_size}, {settings.epochs} epochs, "
        f"{settings.schedule}; {ctx.device}, {ctx.world_size} process{'es' if ctx.distributed else ''} -> "
        f"{settings.out}")
    if settings.model == "ilpg" and settings.preset is None:
        log("ILPG's loss weights: CUB's (no --preset, and the --data folder's name is none of CUB, SUN, AwA2)")
    try:
        return train(settings, data, paths, words, ctx, log=log)
    except ImageReadError as err:
        raise UsageError(_one_line(err, "cannot read image")) from None
    except SetupError as err:
        raise UsageError(str(err)) from None
    finally:
        ctx.close()


def main(argv=None):
    return _cli.main(PROG, DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
