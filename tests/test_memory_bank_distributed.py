"""MemoryBank under torch.distributed: 2 CPU processes, gloo, a free local port.

Each rank offers its own batch (different sizes, one rank sometimes empty); after every update both ranks' banks
must be identical to each other and to one bank (on one process) fed the concatenated batch, rank 0's offers
first. Both policies; the value checks (a bad label on one rank) must raise on every rank, not hang the other.
"""

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from helpers import free_port, spawn_ranks
from zslfast.nn import MemoryBank

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

C, M, K, D = 6, 2, 3, 5
BATCH_SIZES = [(7, 4), (0, 5), (9, 9), (3, 0)]  # per step: (rank 0, rank 1)


def step_offers(step: int, rank: int, size: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    z = torch.randn(size, M, D, generator=g)
    y = torch.randint(0, 2, (size,), generator=g)  # two classes only: the queues overflow
    conf = torch.rand(size, M, generator=g)
    return z, y, conf


def worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    try:
        for policy in ("fifo", "min_conf"):
            bank = MemoryBank(C, M, K, D, threshold=0.3, policy=policy)
            single = MemoryBank(C, M, K, D, threshold=0.3, policy=policy, backend="reference")
            single._distributed_world = lambda: 1  # the one-process bank the ranks must equal
            for step, sizes in enumerate(BATCH_SIZES):
                bank.update(*step_offers(step, rank, sizes[rank]))
                parts = [step_offers(step, r, sizes[r]) for r in range(world)]
                single.update(*(torch.cat([p[i] for p in parts]) for i in range(3)))
                bank.prototypes(), single.prototypes()  # refresh the means of the changed queues
                for name in ("features", "confidences", "counts", "next_slot", "means"):
                    buf, want = getattr(bank, name), getattr(single, name)
                    if name == "means":  # summed in another order by the reference
                        torch.testing.assert_close(buf, want)
                    else:
                        assert torch.equal(buf, want), f"rank {rank} {policy} step {step}: {name} differs"
                    gathered = [torch.empty_like(buf) for _ in range(world)]
                    dist.all_gather(gathered, buf)
                    assert all(torch.equal(g, buf) for g in gathered), f"{policy} step {step}: ranks differ"
            assert (bank.counts == K).any()
        # a bad label on rank 1 only: both ranks raise (the value check runs on the gathered offers)
        bank = MemoryBank(C, M, K, D, threshold=0.3)
        z, y, conf = step_offers(0, rank, 4)
        if rank == 1:
            y[2] = C
        try:
            bank.update(z, y, conf)
        except ValueError as exc:
            assert f"label {C}" in str(exc)
        else:
            raise AssertionError(f"rank {rank} did not raise on rank 1's bad label")
        open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    except Exception:
        with open(os.path.join(result_dir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_banks_stay_identical(tmp_path):
    world = 2
    spawn_ranks(worker, (world, free_port(), str(tmp_path)), world, tmp_path, lambda rank: f"ok{rank}", timeout=180)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]
