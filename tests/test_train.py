"""``python -m zslfast train`` end to end on a synthetic benchmark in the real layout: an xlsa17 folder whose
res101.mat names images under a foreign prefix, the images themselves (32x32 JPEGs), a word-vector file; tiny timm
backbones (test_resnet, test_vit, test_vit3 at 64x64, random weights: no download).

Each model trains 2 epochs through the CLI (a validation run, then the test run) and writes every file of its run
folder; gamma comes from the validation split, never the test sets; a run killed while writing a checkpoint
resumes from the last complete one and ends bitwise equal to an uninterrupted run (SVIP: its augmentations draw
from the restored RNG states); the feature cache is hit by a later run and missed when an input changes; 2 gloo
processes train as one; every mistake on the command line is one line and exit code 2.
"""

import json
import os
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import free_port, spawn_ranks, threads

timm = pytest.importorskip("timm")

from zslfast.data import image_paths, load_word_vectors, write_synthetic_images, write_synthetic_xlsa17  # noqa: E402
from zslfast.training import loop, runfolder  # noqa: E402
from zslfast.tools.train import main  # noqa: E402

BACKBONES = {"ilpg": ["--backbone", "test_resnet", "--encoder", "test_vit", "--encoder-weights", "none"],
             "svip": ["--backbone", "test_vit3"], "sage": ["--backbone", "test_vit3"]}
pytestmark = pytest.mark.skipif(not all(timm.is_model(n) for n in ("test_resnet", "test_vit", "test_vit3")),
                                reason="this timm has no test_resnet / test_vit / test_vit3 models")
TIMES = ("train_s", "eval_s", "images_per_s")  # the only fields two runs of the same settings may differ in


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """6 classes (2 unseen; 2 train and 2 val classes), 4 images each, 5 attributes, 12-d word vectors."""
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_xlsa17(root / "xlsa17", "AwA2", num_classes=6, num_unseen=2, num_attributes=5,
                           samples_per_class=4, feature_dim=8)
    write_synthetic_images(root / "xlsa17", root / "images")
    np.save(root / "words.npy", np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads spinning on each other's barriers make each of
    these tiny steps 100x slower (0.76 s against 1.2 ms, ILPG)."""
    with threads(1):
        yield


def argv(bench, model, out, *extra):
    return ["--model", model, "--data", str(bench / "xlsa17"), "--images", str(bench / "images"), "--word-vectors",
            str(bench / "words.npy"), "--out", str(out), *BACKBONES[model], "--backbone-weights", "none",
            "--image-size", "64", "--epochs", "2", "--batch-size", "2", "--lr", "0.01", "--workers", "0",
            "--device", "cpu", *extra]


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(history: list) -> list:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in history]


@pytest.mark.parametrize("model", ["ilpg", "svip", "sage"])
def test_each_model_trains_and_writes_its_run_folder(model, bench, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(argv(bench, model, out))
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["model"] == model and config["settings"]["epochs"] == 2 and config["seed"] == 0
    assert config["recipe"].startswith({"ilpg": "ILPG §5", "svip": "SVIP §4.1", "sage": "SAGE"}[model])
    assert {"torch", "timm", "zslfast", "numpy", "python"} <= set(config["versions"])
    for folder, phase in ((out / "val", "val"), (out, "test")):
        history = lines(folder / "metrics.jsonl")
        assert [r["epoch"] for r in history] == [1, 2]
        for r in history:
            assert {"loss", "parts", "czsl", "u", "s", "h", "gamma", "u_cal", "s_cal", "h_cal", "train_s",
                    "eval_s", "lr"} <= set(r) and np.isfinite(r["loss"]) and 0 <= r["h_cal"] <= 1
        last, best = (runfolder.load_checkpoint(folder / name) for name in ("last.pt", "best.pt"))
        assert last["epoch"] == 2 and last["phase"] == phase and last["history"] == history
        assert best["epoch"] == best["best"]["epoch"] == max(history, key=lambda r: r["h_cal"])["epoch"]
        assert printed.count(f"[{phase}] epoch 2/2 loss") == 1  # one summary line per epoch
    assert (out / "curves.png").exists() != ("matplotlib is not installed" in printed)
    assert result["history"] == lines(out / "metrics.jsonl") and "best epoch" in printed


def test_gamma_is_chosen_on_the_validation_split(bench, tmp_path, monkeypatch):
    """Every gamma sweep sees the validation images only (2 held-out train-class images, the 6 val_loc images),
    and each test epoch uses the gamma its validation epoch chose."""
    swept = []

    def spy(*args, **kwargs):
        swept.append((len(args[1]), len(args[3])))
        return sweep(*args, **kwargs)

    sweep = loop.gamma_sweep
    monkeypatch.setattr(loop, "gamma_sweep", spy)
    result = main(argv(bench, "ilpg", tmp_path / "run"))
    problems = loop.make_problems(loop_data(bench), 0.2, 0)
    assert swept == [(len(problems["val"].eval_seen), len(problems["val"].eval_unseen))] * 2
    assert (len(problems["test"].eval_seen), len(problems["test"].eval_unseen)) not in swept
    assert [r["gamma"] for r in result["history"]] == [r["gamma"] for r in result["val_history"]]
    assert all(r["gamma_source"] == "val" for r in result["history"])


def loop_data(bench):
    from zslfast.data import load_xlsa17

    return load_xlsa17(bench / "xlsa17")


class Killed(Exception):
    pass


def test_a_run_killed_mid_checkpoint_resumes_bitwise(bench, tmp_path, monkeypatch):
    """SVIP (its timm augmentations draw from the global RNGs): killed while writing the validation run's epoch-2
    last.pt, the run keeps epoch 1's complete checkpoint; resumed, it ends bitwise equal to an uninterrupted run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    main(argv(bench, "svip", whole))
    save = torch.save

    def killing(obj, path, *args, **kwargs):
        if Path(path).parent.name == "val" and "last.pt" in Path(path).name and obj["epoch"] == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise Killed
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killing)
    with pytest.raises(Killed):
        main(argv(bench, "svip", killed))
    monkeypatch.setattr(torch, "save", save)
    assert runfolder.load_checkpoint(killed / "val" / "last.pt")["epoch"] == 1
    main(["--model", "svip", "--resume", str(killed), "--workers", "0"])
    for phase in ("val", "."):
        a, b = (runfolder.load_checkpoint(run / phase / "last.pt") for run in (whole, killed))
        assert a["epoch"] == b["epoch"] == 2
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"{phase} {key}"
        for key, value in a["optimizer"]["state"].items():
            assert all(torch.equal(value[k], b["optimizer"]["state"][key][k]) for k in value), f"{phase} {key}"
        assert without_times(a["history"]) == without_times(b["history"])
        assert without_times(lines(whole / phase / "metrics.jsonl")) == without_times(lines(killed / phase /
                                                                                            "metrics.jsonl"))


def test_the_feature_cache_is_hit_by_a_later_run(bench, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["--cache-dir", str(cache), "--gamma", "0", "--epochs", "1"]
    first = main(argv(bench, "ilpg", tmp_path / "a", *common))
    assert "feature cache: written" in capsys.readouterr().out
    entry = next(cache.iterdir())
    stamp = (entry / "regions.npy").stat().st_mtime_ns
    second = main(argv(bench, "ilpg", tmp_path / "b", *common))
    assert "feature cache: hit" in capsys.readouterr().out
    assert [p.name for p in cache.iterdir()] == [entry.name] and (entry / "regions.npy").stat().st_mtime_ns == stamp
    assert without_times(first["history"]) == without_times(second["history"])
    # another resolution: another entry (and no word vectors: the stand-ins, with a warning)
    args = argv(bench, "ilpg", tmp_path / "c", *common, "--image-size", "32")
    del args[args.index("--word-vectors") : args.index("--word-vectors") + 2]
    main(args)
    out, err = capsys.readouterr()
    assert "feature cache: written" in out and len(list(cache.iterdir())) == 2
    assert "warning: no --word-vectors: the 5 attribute word vectors are random stand-ins" in err


# ------------------------------------------------------------------------------------------- two processes

WORLD = 2


def worker(rank: int, world: int, port: int, args: list, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = main(args)
        torch.save({"rank": result["rank"], "world": result["world_size"]}, os.path.join(result_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_train_as_one(bench, tmp_path, monkeypatch):
    """SAGE (its memory bank sees each global batch in one order), 2 epochs, a global batch of 4 = 2 x 2: the
    features extracted by 2 processes, the weights, the bank and the metrics equal one process's (float32
    rounding: the gradients are summed in another order; SGD, whose steps follow that rounding linearly, where
    Adam's first steps can turn a rounding-level gradient into a step of lr, see test_demo_distributed)."""
    fixed = ["--gamma", "0", "--batch-size", "4", "--optimizer", "sgd", "--lr", "0.1"]
    spawn_ranks(worker, (WORLD, free_port(), argv(bench, "sage", tmp_path / "two", *fixed), str(tmp_path)), WORLD,
                tmp_path, lambda rank: f"{rank}.pt", timeout=240)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    main(argv(bench, "sage", tmp_path / "one", *fixed))
    (two_cache,), (one_cache,) = ((tmp_path / run / "cache").iterdir() for run in ("two", "one"))
    assert two_cache.name == one_cache.name  # the same key
    torch.testing.assert_close(np.load(two_cache / "hidden_states.npy"), np.load(one_cache / "hidden_states.npy"))
    two, one = (runfolder.load_checkpoint(tmp_path / run / "last.pt") for run in ("two", "one"))
    assert two["epoch"] == one["epoch"] == 2 and len(two["rng"]) == 2
    assert (one["model"]["mbgf.bank.counts"] > 0).any()  # the bank holds entries to compare
    for key, want in one["model"].items():
        if want.is_floating_point():
            scale = max(want.abs().max().item(), 1e-3)
            torch.testing.assert_close(two["model"][key], want, rtol=1e-5, atol=1e-5 * scale, msg=key)
        else:
            assert torch.equal(two["model"][key], want), key
    for a, b in zip(two["history"], one["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert [a[k] for k in ("czsl", "u", "s", "h")] == [b[k] for k in ("czsl", "u", "s", "h")]


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken(bench, tmp_path_factory):
    """Copies of the images with one file missing, and with one file that is not an image; a run folder of ILPG;
    a GloVe-format text file."""
    root = tmp_path_factory.mktemp("broken")
    files = sorted((bench / "images").rglob("*.jpg"))
    for name in ("missing", "corrupt"):
        shutil.copytree(bench / "images", root / name)
    (root / "missing" / files[3].relative_to(bench / "images")).unlink()
    (root / "corrupt" / files[3].relative_to(bench / "images")).write_bytes(b"not a jpeg")
    (root / "ilpg-run").mkdir()
    (root / "ilpg-run" / "config.json").write_text(json.dumps({"settings": {"model": "ilpg", "lr": 0.01}}))
    (root / "glove.txt").write_text("bill 1 2\nshape 3 4\n")
    (root / "bad.pt").write_bytes(b"not a tensor file")
    return root, files[3].relative_to(bench / "images")


@pytest.mark.parametrize("model, change, message", [
    ("ilpg", ["--data", "{missing}"], "--data {missing}: no such folder"),
    ("ilpg", ["--images", "{missing}"], "--images {missing}: no such folder"),
    ("ilpg", ["--images", "{broken}/missing"], "{broken}/missing/{file} does not exist: image"),
    ("ilpg", ["--images", "{broken}/corrupt"], "cannot read image {broken}/corrupt/{file}"),
    ("ilpg", ["--word-vectors", "{broken}/glove.txt"], "give the attribute names too"),
    ("ilpg", ["--word-vectors", "{broken}/bad.pt"], "bad.pt: not a tensor saved with torch.save"),
    ("svip", ["--encoder", "test_vit"], "are ILPG's"),
    ("sage", ["--backbone", "test_resnet"], "building SAGE on --backbone test_resnet: "),
    ("ilpg", ["--backbone", "resnet1O1"], "--backbone 'resnet1O1': timm has no such model; did you mean "
                                          "'resnet101'?"),
    ("ilpg", ["--batch-size", "13"], "--batch-size 13 is larger than the 12 training images of the test run"),
    ("ilpg", ["--out", "{broken}/ilpg-run"], "already holds a run (config.json): --resume it"),
    ("ilpg", ["--lr", "nan"], "argument --lr: must be a finite number >= 0, got 'nan'"),
    ("ilpg", ["--val-holdout", "1"], "argument --val-holdout: must be a finite number > 0 and < 1, got '1'"),
    ("ilpg", ["--gamma", "high"], "argument --gamma: must be 'val' or a number, got 'high'"),
    ("ilpg", ["--backbone-weights", "{missing}"], "argument --backbone-weights: {missing}: no such file"),
    ("ilpg", ["--resume", "{broken}/ilpg-run"], "argument --resume: not allowed with argument --out"),
    ("ilpg", ["--images", None], "a new run needs --images (or --resume RUN"),
])
def test_usage_errors_are_one_line_with_exit_2(model, change, message, bench, broken, tmp_path, capsys):
    """One line on stderr naming the problem, exit code 2, and no run left behind (no config.json)."""
    root, file = broken
    paths = dict(missing=tmp_path / "missing", broken=root, bench=bench, file=file.as_posix())
    args = argv(bench, model, tmp_path / "run")
    for option, value in zip(change[::2], change[1::2]):
        at = args.index(option) if option in args else None
        if value is None:
            del args[at : at + 2]
        elif at is None:
            args += [option, value.format(**paths)]
        else:
            args[at + 1] = value.format(**paths)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(**paths) in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "sage", "--resume", "{run}"], "that run trains ilpg, not --model sage"),
    (["--model", "ilpg", "--resume", "{run}", "--lr", "0.1"], "--lr 0.1 (the run's: 0.01)"),
    (["--model", "ilpg", "--resume", "{missing}"], "no run there"),
])
def test_resume_mistakes_are_one_line_with_exit_2(args, message, broken, tmp_path, capsys):
    paths = dict(run=broken[0] / "ilpg-run", missing=tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(**paths) in err and err.count("\n") == 1, err


def test_word_vectors_and_image_paths(tmp_path):
    """GloVe text: each attribute name's words averaged (missing words left out); image paths: the common folder of
    res101.mat's paths (AwA2's double slash included) replaced by the images folder."""
    glove = tmp_path / "glove.txt"
    glove.write_text("has 1 1\nbill 3 5\nshape 5 3\nblack 0 8\n")
    vectors = load_word_vectors(glove, ["has_bill_shape::curved", "black"])
    torch.testing.assert_close(vectors, torch.tensor([[3.0, 3.0], [0.0, 8.0]]))
    with pytest.raises(ValueError, match="no vector for any word of 1 attribute names: 'furry'"):
        load_word_vectors(glove, ["black", "furry"])
    (tmp_path / "images" / "antelope").mkdir(parents=True)
    (tmp_path / "images" / "antelope" / "a_1.jpg").write_bytes(b"")
    (tmp_path / "images" / "bat").mkdir()
    (tmp_path / "images" / "bat" / "b_1.jpg").write_bytes(b"")
    found = image_paths(["/BS/xian/Animals_with_Attributes2//JPEGImages/antelope/a_1.jpg",
                         "/BS/xian/Animals_with_Attributes2/JPEGImages/bat/b_1.jpg"], tmp_path / "images")
    assert found == [tmp_path / "images" / "antelope" / "a_1.jpg", tmp_path / "images" / "bat" / "b_1.jpg"]
