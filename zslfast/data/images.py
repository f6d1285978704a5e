"""The images of an xlsa17 benchmark as users have them, and a synthetic benchmark in that layout.

xlsa17's ``res101.mat`` names each image by the path it had on its authors' machine (CUB:
``/BS/Deep_Fragments/work/MSc/CUB_200_2011/CUB_200_2011/images/001.Black_footed_Albatross/...jpg``). Every file
lies under one common folder (CUB's ``.../images``, AwA2's ``.../JPEGImages``, SUN's ``.../images``); replacing
that folder by where the user keeps the benchmark's images (``CUB_200_2011/images``) finds each file.

    image_paths(image_files, images_root) -> list[Path]
        each of ``image_files`` with their common folder replaced by ``images_root``; ValueError naming the first
        file that is missing, not a file, unreadable, or would lie outside ``images_root``
    ImageFolderDataset(paths, labels, transform)     dataset[i] -> (transform(RGB image), label, i);
        an image that cannot be decoded raises ImageReadError naming the file
    write_synthetic_images(xlsa17_root, images_root, *, size=32, seed=0) -> images_root
        one small JPEG per ``image_files`` entry of an xlsa17 folder (zslfast.data.write_synthetic_xlsa17's), at the
        path ``image_paths`` resolves it to: tests and examples run ``python -m zslfast train`` on the real layout
        without a download. Each image is a coarse colour grid driven by its class's attributes plus per-image
        noise, so the classes are told apart by what the attributes say.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..validation import check_path


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (the message names it)."""


def common_folder(image_files: Sequence[str]) -> str:
    """The folder every one of ``image_files`` (POSIX paths, as xlsa17 stores them) lies under."""
    folders = [posixpath.dirname(posixpath.normpath(f)) for f in image_files]
    return posixpath.commonpath(folders) if folders else ""


def image_paths(image_files: Sequence[str], images_root) -> list:
    """``image_files`` with their common folder replaced by ``images_root`` (module docstring), each checked."""
    root = check_path("image_paths", "images_root", images_root)
    if not root.is_dir():
        raise ValueError(f"images folder not found: {root}")
    if not image_files:
        raise ValueError("image_paths: image_files is empty (res101.mat has no 'image_files')")
    common = common_folder(image_files)
    paths = []
    for i, name in enumerate(image_files):
        relative = posixpath.relpath(posixpath.normpath(name), common)
        where = f"image {i} ({name!r} in res101.mat's image_files, its folder {common!r} replaced by {str(root)!r})"
        if relative.split("/")[0] == "..":
            raise ValueError(f"{where} lies outside the images folder")
        path = root.joinpath(*relative.split("/"))
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ValueError(f"{path} {what}: {where}; is --images the folder that holds the class folders?")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{path} is not readable: {where}")
        paths.append(path)
    return paths


class ImageFolderDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> (transform(the RGB image at paths[i]), labels[i], i)."""

    def __init__(self, paths: Sequence, labels: Sequence[int], transform: Optional[Callable] = None):
        if len(paths) != len(labels):
            raise ValueError(f"ImageFolderDataset: {len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), [int(y) for y in labels], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ImageReadError(f"cannot read image {path}: {error}") from None
        return (image if self.transform is None else self.transform(image)), self.labels[i], i


def write_synthetic_images(xlsa17_root, images_root, *, size: int = 32, seed: int = 0, grid: int = 4) -> Path:
    """Write the images of the xlsa17 folder ``xlsa17_root`` under ``images_root`` (module docstring); returns it.

    Image i of class c: sigmoid(a_c P + 0.5 N(0, 1)) as a (grid x grid) RGB pattern scaled up to size x size, with a_c
    the class's standardised attributes and P a fixed random (K, 3·grid²) projection (``seed``)."""
    from PIL import Image

    from .xlsa17 import load_xlsa17

    images_root = check_path("write_synthetic_images", "images_root", images_root)
    data = load_xlsa17(xlsa17_root)
    if not data.image_files:
        raise ValueError(f"write_synthetic_images: {xlsa17_root}'s res101.mat has no image_files")
    att = data.att.double().numpy()
    centred = (att - att.mean(0)) / (att.std(0) + 1e-12)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((att.shape[1], 3 * grid * grid)) / np.sqrt(att.shape[1]) * 2
    common = common_folder(data.image_files)
    for name, label in zip(data.image_files, data.labels.tolist()):
        logits = centred[label] @ projection + 0.5 * rng.standard_normal(3 * grid * grid)
        pixels = (255 / (1 + np.exp(-logits))).astype(np.uint8).reshape(grid, grid, 3)
        path = images_root.joinpath(*posixpath.relpath(posixpath.normpath(name), common).split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(path, quality=95)
    return images_root
