"""``python -m zslfast demo`` under torchrun: 2 gloo CPU processes against 1 process at the same global batch.

The two ranks run the demo as torchrun would start them (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the
environment; mp.spawn, a free local port) and save what run() returns; the test then runs the demo in one process
with the same arguments. Each step's loss (the mean over the ranks: the global batch's) and the final weights must
equal the one-process run's within float32 rounding, for the reference and the fused run, for ILPG and SAGE; the
ranks' weights and SAGE's memory bank must be identical (bitwise) on both ranks, and the bank equal to the one
process's. One more test runs the real command (``python -m torch.distributed.run --nproc_per_node=2 -m zslfast
demo``) and checks that only rank 0 prints; one that a global batch that does not split over the ranks exits 2.
"""

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import free_port, require_backend, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
# SGD: its weights follow the gradients' float rounding linearly. (Adam's first steps are about lr times the sign of
# the gradient: an element whose gradient is at rounding level, summed in another order over 2 ranks, can move by a
# full lr the other way; measured on ILPG, 21 of W_q's 90000 weights 4.5e-5 apart after 2 steps at lr 3e-3.)
OPT = ["--optimizer", "sgd", "--lr", "0.1", "--epochs", "1", "--hidden-dim", "4"]
ARGS = {
    "ilpg": OPT + ["--steps-per-epoch", "2", "--batch-size", "6", "--regions", "3"],
    # AwA2's 50 classes and 3 steps of 8: a class recurs, so the bank's KL (Eq. 9) is active in a step
    "sage": OPT + ["--model", "sage", "--preset", "AwA2", "--steps-per-epoch", "3", "--batch-size", "8",
                   "--patches", "4", "--embed-dim", "8"],
}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker(rank: int, world: int, port: int, argv: list, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        from zslfast.tools.demo import main as demo

        results = demo(argv)
        keep = {name: {k: results[name][k] for k in ("losses", "state_dict")} for name in ("reference", "fused")}
        for name in ("reference", "fused"):  # U / S / H: rank 0's from the gathered logits, None elsewhere
            gzsl, calibrated = results[name]["gzsl"], results[name]["calibrated"]
            keep[name]["uhs"] = None if gzsl is None else [*gzsl[:3], *calibrated[:3]]
            keep[name]["scores"] = results[name]["scores"]
        keep.update(rank=results["rank"], world_size=results["world_size"])
        partial = os.path.join(result_dir, f"rank{rank}.partial")
        torch.save(keep, partial)
        os.replace(partial, os.path.join(result_dir, f"rank{rank}.pt"))  # whole, or not there
    except BaseException:
        with open(os.path.join(result_dir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(argv: list, result_dir: Path) -> list:
    """What run() returned on each rank (worker's saved dict), rank by rank."""
    paths = spawn_ranks(worker, (WORLD, free_port(), argv, str(result_dir)), WORLD, result_dir,
                        lambda rank: f"rank{rank}.pt", timeout=240)
    return [torch.load(path, weights_only=False) for path in paths]


@pytest.mark.parametrize("model", ["ilpg", "sage"])
def test_two_gloo_processes_follow_one_process(model, tmp_path, monkeypatch):
    require_backend("cpu")  # the demo refuses to compare the reference with itself
    ranks = run_ranks(ARGS[model], tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)

    from zslfast.tools.demo import main as demo

    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    single = demo(ARGS[model])
    assert single["world_size"] == 1
    for run in ("reference", "fused"):
        one, (r0, r1) = single[run], (ranks[0][run], ranks[1][run])
        assert r0["losses"] == r1["losses"]  # the mean over the ranks, on every rank
        torch.testing.assert_close(torch.tensor(r0["losses"], dtype=torch.float64),
                                   torch.tensor(one["losses"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert r0["state_dict"].keys() == one["state_dict"].keys()
        for key, want in one["state_dict"].items():
            # DDP: the same averaged gradients, the same Adam steps: the ranks agree bit for bit, banks included
            assert torch.equal(r0["state_dict"][key], r1["state_dict"][key]), f"{run} {key}: the ranks differ"
            if want.is_floating_point():
                # float32, summed in other orders (2 half-batches, then the gradient all-reduce): 1e-5 of the
                # tensor's scale (measured: at most 3.3e-6 of it, SAGE's msfe.up_weight)
                scale = max(want.abs().max().item(), 1e-3)
                torch.testing.assert_close(r0["state_dict"][key], want, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{run} {key}: {m}")
            else:
                assert torch.equal(r0["state_dict"][key], want), f"{run} {key} differs from one process"
        # the test images split over the ranks, their logits gathered back to rank 0 in order: the one process's
        # logits (float rounding), hence its accuracies (up to an argmax flipped by rounding: none seen)
        assert r1["uhs"] is None and r1["scores"] is None
        for split, (scores, labels) in one["scores"].items():
            assert torch.equal(r0["scores"][split][1], labels)
            scale = scores.abs().max().item()
            torch.testing.assert_close(r0["scores"][split][0], scores, rtol=1e-5, atol=1e-5 * scale)
        assert r0["uhs"] == pytest.approx([*one["gzsl"][:3], *one["calibrated"][:3]], abs=5e-3)
        if model == "sage":
            assert (one["state_dict"]["mbgf.bank.counts"] > 0).any()  # the bank holds entries to compare


def test_shards():
    from zslfast.distributed import Context

    batch = torch.arange(12)
    parts = [Context(r, 3).shard(batch) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch) and all(len(p) == 4 for p in parts)  # contiguous, in rank order
    with pytest.raises(ValueError, match="does not split over 5"):
        Context(0, 5).shard(batch)
    assert [Context(r, 3).split(8) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert torch.equal(Context().shard(batch), batch) and Context().split(8) == slice(0, 8)


def test_batch_that_does_not_split_exits_2(monkeypatch, capsys):
    from zslfast.tools.demo import main as demo

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as exit_info:
        demo(["--batch-size", "6"])
    assert exit_info.value.code == 2 and "does not split over 4 processes" in capsys.readouterr().err


def test_torchrun_command_prints_on_rank_0_only(tmp_path):
    require_backend("cpu")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               "-m", "zslfast", "demo", "--steps-per-epoch", "1", "--batch-size", "4", "--regions", "2",
               "--hidden-dim", "4", "--epochs", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("torchrun: 2 processes (gloo)") == 1
    assert done.stdout.count("(median step, reference / fused)") == 1 and done.stdout.count("model: ILPG") == 1
