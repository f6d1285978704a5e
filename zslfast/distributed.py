"""Small helpers for data-parallel training under ``torchrun`` (used by ``python -m zslfast demo``).

    env_world()                  (rank, world_size, local_rank) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    Context / init_from_env()    the process group (gloo for CPU, nccl for CUDA on cuda:LOCAL_RANK) and its rank
    Context.shard(batch)         this rank's contiguous slice of a global batch (every rank the same size)
    Context.wrap(model)          DistributedDataParallel around the model (the model itself in one process)
    Context.mean(t)              the mean over the ranks of a tensor (each step's loss: the global batch's)
    all_gather_rows(t, group)    every rank's rows, rank 0's first, for ranks holding different numbers of rows
    all_gather_rows_of(ts, group)    the same for several tensors of equal row counts (one gather of the sizes)

One process (no torchrun, or WORLD_SIZE=1) is a Context of world 1 whose methods do nothing: the code that uses it
reads the same either way.

Why contiguous shards and not torch.utils.data.DistributedSampler's strided ones (indices[rank::world]): SAGE's
memory bank (zslfast.nn.MemoryBank) applies the gathered offers in rank order, then batch order, so the ranks'
banks equal one bank fed the global batch in order only when rank r holds rows [r·b, (r+1)·b) of it. Both give
every rank the same number of samples of the same global batch.
"""

from __future__ import annotations

import datetime
import inspect
import os
from typing import Optional

import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch without distributed support
    dist = None


def env_world() -> tuple:
    """(rank, world_size, local_rank) as torchrun sets them in the environment; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Context:
    """The process's place in a data-parallel run: rank, world_size, device (and the default process group).

    Build it with init_from_env(); close() destroys the process group it created (a no-op in one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None, backend=None):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device("cpu") if device is None else device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """Rows [rank·b, (rank+1)·b) of a global batch of world·b rows (ValueError when it does not divide)."""
        if len(batch) % self.world_size:
            raise ValueError(f"a batch of {len(batch)} does not split over {self.world_size} processes")
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def split(self, n: int) -> slice:
        """This rank's contiguous part of range(n), the parts as even as can be (the first n % world one longer)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel(model) on several processes, the model itself on one.

        Buffers are not re-synced at each forward: they are either constants or SAGE's bank, which every rank keeps
        identical by gathering the offers (re-broadcasting rank 0's each step would only cost time)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # newer torch renames the option (and still syncs the buffers once at init: the same here)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, **sync)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (a new tensor; ``t`` itself in one process)."""
        if not self.distributed:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def close(self) -> None:
        """Destroy the process group init_from_env created (all ranks must call it)."""
        if self.distributed and dist.is_initialized():
            # Every rank enters the teardown together: rank 1 reaching it while rank 0 still printed its results,
            # then rank 0 exiting (its TCPStore with it), left rank 1 in destroy_process_group for good (torch 2.4,
            # gloo, about 1 run in 4)
            dist.barrier()
            dist.destroy_process_group()


def init_from_env(device) -> Context:
    """The Context of this process: under torchrun (WORLD_SIZE > 1), initialise the default process group, gloo for
    a CPU ``device``, nccl for a CUDA one (this process then works on cuda:LOCAL_RANK); otherwise world 1, nothing
    initialised. Rendezvous as torchrun sets it up (MASTER_ADDR / MASTER_PORT in the environment)."""
    device = torch.device(device)
    rank, world, local_rank = env_world()
    if world <= 1:
        return Context(0, 1, device)
    if dist is None or not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    return Context(rank, world, device, backend)


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (n_r, ...) concatenated in rank order, on every rank; the n_r may differ (padded
    all_gathers: sizes first, then the rows). No gradient flows back through it."""
    return all_gather_rows_of((t,), group)[0]


def all_gather_rows_of(tensors, group=None) -> list:
    """all_gather_rows of several tensors with the same row count on each rank, one all_gather of the sizes."""
    world = dist.get_world_size(group)
    size = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=tensors[0].device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    gathered = []
    for t in tensors:
        padded = t.detach().new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return gathered
