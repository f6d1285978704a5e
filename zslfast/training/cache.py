"""Frozen backbones run once: their features for every image of the dataset, memory-mapped on disk.

    features, hit, folder = cached_features(cache_dir, fields, extract, dataset, ctx, ...)
        features: {name: np.memmap (N, ...)} opened read-only, row i the features of image i of res101.mat

A cache entry is the folder ``cache_dir/<key>``: one ``<name>.npy`` per feature (numpy's format, opened with
mmap_mode="r", so a run pages in the rows it reads and several runs share the pages) and ``meta.json``. The key is
the SHA-256 of ``fields``, which ``train`` fills with everything the features depend on: the model, the backbones'
names, a digest of their weights (``digest_modules``: the tensors themselves, so a pretrained file, timm's weights
and a random initialisation each get their own entry), timm's eval transform (resolution, crop, interpolation,
mean and std), the image list (``digest_images``: each file's path under the images folder and its size), the
storage dtype and the autocast. Any change is another entry; the same settings in a later run find it (a hit).

An entry is written into ``<key>.partial`` and renamed to ``<key>`` once complete (meta.json last): a run killed
during the extraction leaves only the partial folder, which the next run replaces. Under torchrun every process
extracts its contiguous share of the images into the same files (rank 0 creates them), so the extraction is
data-parallel too. Storage dtype float16 halves the disk and the page cache against float32 (ILPG at CUB: 4.8 GB
of ResNet-101 regions in float32); a value beyond float16's range (65504) stops the extraction with a message
naming --cache-dtype float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..distributed import dist
from .progress import Progress

FORMAT = 1  # bump when the layout of an entry changes


class CacheRangeError(ValueError):
    """A feature beyond the storage dtype's range."""


def digest_modules(modules: dict) -> str:
    """SHA-256 of the modules' state dicts (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for owner in sorted(modules):
        for name, tensor in sorted(modules[owner].state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{owner}.{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest_images(paths: Sequence[Path], root: Path) -> str:
    """SHA-256 of each image's path under ``root`` and its size in bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{Path(path).relative_to(root).as_posix()}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **fields}, sort_keys=True).encode()).hexdigest()[:32]


def _complete(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def _open(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["shapes"]}


def _barrier(ctx) -> None:
    if ctx.distributed:
        dist.barrier()


def cached_features(cache_dir: Path, fields: dict, extract: Callable, dataset, ctx, *, batch_size: int, workers: int,
                    dtype: str, autocast) -> tuple:
    """(features, hit, folder): the entry of ``fields`` under ``cache_dir``, extracted first if it is not there.

    ``extract(images) -> {name: (B, ...)}`` runs on ``ctx.device`` under torch.inference_mode and ``autocast``;
    ``dataset[i] -> (image, label, i)`` over every image (zslfast.data.ImageFolderDataset with the eval transform).
    Every process calls it (collective under torchrun)."""
    cache_dir = Path(cache_dir)
    key = key_of(fields)
    folder = cache_dir / key
    if ctx.max(0.0 if _complete(folder, key) else 1.0) == 0.0:
        return _open(folder), True, folder
    partial = cache_dir / f"{key}.partial"
    n, device = len(dataset), ctx.device
    with torch.inference_mode(), autocast:
        probe = extract(dataset[0][0][None].to(device))
    shapes = {name: [n, *value.shape[1:]] for name, value in probe.items()}
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, shape in shapes.items():
            np.lib.format.open_memmap(partial / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape)).flush()
    _barrier(ctx)
    arrays = {name: np.load(partial / f"{name}.npy", mmap_mode="r+") for name in shapes}
    mine = list(range(n))[ctx.split(n)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    bar = Progress(f"extracting features ({ctx.world_size} process{'es' if ctx.distributed else ''})", len(mine),
                   unit="img", enabled=ctx.is_main)
    start, done = time.perf_counter(), 0
    with torch.inference_mode(), autocast:
        for images, _, index in loader:
            out = extract(images.to(device, non_blocking=True))
            for name, value in out.items():
                stored = value.to(getattr(torch, dtype))
                if not bool(torch.isfinite(stored).all()):
                    raise CacheRangeError(f"feature cache: {name} of image {int(index[0])}.. exceeds {dtype}'s range "
                                     f"(largest magnitude {float(value.abs().max()):.3g}); use --cache-dtype float32")
                arrays[name][index.numpy()] = stored.cpu().numpy()
            done += len(index)
            bar.update(done)
    bar.close()
    for array in arrays.values():
        array.flush()
    del arrays
    _barrier(ctx)
    if ctx.is_main:
        meta = dict(key=key, fields=fields, shapes=shapes, dtype=dtype, images=n,
                    seconds=round(time.perf_counter() - start, 3), world_size=ctx.world_size)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete entry of the same key (meta.json missing)
        os.replace(partial, folder)
    _barrier(ctx)
    return _open(folder), False, folder
