"""The standard ZSL benchmark format of Xian et al. ("xlsa17", CUB/SUN/AwA2 proposed splits), read and written.

A dataset folder holds two MATLAB files (as MATLAB writes them: column vectors, 1-based indices, floats):

    res101.mat       features   (Dfeat, N)  ResNet-101 image features, one column per image (Dfeat = 2048)
                     labels     (N, 1)      class of each image, 1-based (1..C)
                     image_files (N, 1)     cell of image paths (optional here)
    att_splits.mat   att        (K, C)      class attribute vectors, one column per class, columns L2-normalised
                     original_att (K, C)    the same before normalisation (per-class attribute strength, 0..100)
                     trainval_loc (Ntv, 1)  1-based image indices (columns of features) of the training split
                     test_seen_loc (Nts, 1) held-out images of the training (seen) classes
                     test_unseen_loc (Ntu, 1) every image of the unseen classes
                     train_loc, val_loc     the class-disjoint split of trainval for validation (optional here)
                     allclasses_names (C, 1) cell of class names (optional here)

``load_xlsa17(root)`` returns an ``XLSA17`` with everything 0-based and row-major: features (N, Dfeat),
labels (N,), att/original_att (C, K), index tensors (n,), seen_classes (classes of trainval) and unseen_classes
(classes of test_unseen). Anything off (missing file or key, index 0 or past N, labels outside 1..C, shapes that
disagree, a class both seen and unseen) raises ``ValueError`` naming the file, the key and what was found.

``write_synthetic_xlsa17(root, "CUB"|"SUN"|"AwA2")`` writes a dataset of the preset's shape in exactly that
format, with learnable class-conditioned features (no download): each image's features are
``ReLU(a_i @ P + noise)`` with a_i its class's attribute vector plus per-image attribute jitter and P a fixed
random projection, so a map from features to attributes learnt on seen classes transfers to unseen ones.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional, Union

import numpy as np
import torch

from ..validation import check_float_dtype, check_path

PathLike = Union[str, "os.PathLike[str]"]

FEATURES_FILE = "res101.mat"
SPLITS_FILE = "att_splits.mat"
SPLIT_NAMES = ("trainval", "test_seen", "test_unseen", "train", "val")


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
    """Shape of a benchmark: classes in all, how many of them are unseen, attributes per class."""

    name: str
    num_classes: int
    num_unseen: int
    num_attributes: int

    @property
    def num_seen(self) -> int:
        return self.num_classes - self.num_unseen


# Xian et al. 2017 proposed splits (PS).
PRESETS = {
    "CUB": DatasetPreset("CUB", num_classes=200, num_unseen=50, num_attributes=312),
    "SUN": DatasetPreset("SUN", num_classes=717, num_unseen=72, num_attributes=102),
    "AwA2": DatasetPreset("AwA2", num_classes=50, num_unseen=10, num_attributes=85),
}


def get_preset(name: Union[str, DatasetPreset]) -> DatasetPreset:
    """A preset by name, case-insensitively ("cub", "AWA2", ...)."""
    if isinstance(name, DatasetPreset):
        return name
    for key, preset in PRESETS.items():
        if isinstance(name, str) and key.lower() == name.lower():
            return preset
    raise ValueError(f"unknown dataset preset {name!r}; known presets: {', '.join(PRESETS)}")


@dataclasses.dataclass
class XLSA17:
    """An xlsa17 dataset in memory, 0-based and row-major.

    features (N, Dfeat) float, labels (N,) int64 in 0..C-1, att (C, K) and original_att (C, K) float,
    trainval_loc / test_seen_loc / test_unseen_loc (n,) int64 row indices into features, train_loc / val_loc
    likewise or None when the file has none, seen_classes / unseen_classes sorted int64 class ids,
    class_names and image_files lists of str or None.
    """

    features: torch.Tensor
    labels: torch.Tensor
    att: torch.Tensor
    original_att: torch.Tensor
    trainval_loc: torch.Tensor
    test_seen_loc: torch.Tensor
    test_unseen_loc: torch.Tensor
    seen_classes: torch.Tensor
    unseen_classes: torch.Tensor
    train_loc: Optional[torch.Tensor] = None
    val_loc: Optional[torch.Tensor] = None
    class_names: Optional[list] = None
    image_files: Optional[list] = None

    @property
    def num_classes(self) -> int:
        return self.att.shape[0]

    @property
    def num_attributes(self) -> int:
        return self.att.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (n, Dfeat), labels (n,)) of "trainval", "test_seen", "test_unseen" (or "train", "val")."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name must be one of {', '.join(SPLIT_NAMES)}, got {name!r}")
        loc = getattr(self, f"{name}_loc")
        if loc is None:
            raise ValueError(f"split {name!r} is not in this dataset ({SPLITS_FILE} had no {name}_loc)")
        return self.features[loc], self.labels[loc]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "XLSA17":
        """A copy with every tensor on ``device``; ``dtype`` (a floating dtype) casts the floating ones (features, att,
        original_att)."""
        if dtype is not None:
            check_float_dtype("XLSA17.to", "dtype", dtype)
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                changes[field.name] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------- reading


def _loadmat(path: pathlib.Path) -> dict:
    import scipy.io

    if not path.is_file():
        raise ValueError(f"xlsa17: file not found: {path} (a dataset folder holds {FEATURES_FILE} and {SPLITS_FILE})")
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as err:  # MATLAB v7.3 files are HDF5
        raise ValueError(f"xlsa17: {path} is a MATLAB v7.3 (HDF5) file; re-save it with -v7 or earlier") from err
    except Exception as err:
        raise ValueError(f"xlsa17: cannot read {path} as a MATLAB file: {err}") from err


def _get(mat: dict, path: pathlib.Path, key: str, required: bool = True):
    if key not in mat:
        if not required:
            return None
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"xlsa17: {path.name} has no key {key!r} (keys found: {found})")
    return mat[key]


def _matrix(mat: dict, path: pathlib.Path, key: str) -> np.ndarray:
    value = np.asarray(_get(mat, path, key))
    if value.ndim != 2 or value.dtype.kind not in "fiu" or 0 in value.shape:
        raise ValueError(
            f"xlsa17: {path.name}[{key!r}] must be a non-empty 2-D numeric matrix, "
            f"got shape {value.shape} dtype {value.dtype}"
        )
    if not np.isfinite(value).all():
        raise ValueError(f"xlsa17: {path.name}[{key!r}] holds NaN or infinite values")
    return value


def _integer_vector(mat: dict, path: pathlib.Path, key: str, low: int, high: int, what: str, required=True):
    """A MATLAB column/row vector of integers in low..high (inclusive), returned 0-based as int64."""
    value = _get(mat, path, key, required)
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim > 2 or (value.ndim == 2 and min(value.shape) > 1) or value.dtype.kind not in "fiu":
        raise ValueError(
            f"xlsa17: {path.name}[{key!r}] must be a numeric vector (n x 1) of {what}, "
            f"got shape {value.shape} dtype {value.dtype}"
        )
    value = value.reshape(-1)
    if value.size == 0:
        raise ValueError(f"xlsa17: {path.name}[{key!r}] is empty")
    if value.dtype.kind == "f":
        if not np.isfinite(value).all() or (value != np.round(value)).any():
            bad = value[~np.isfinite(value) | (value != np.round(value))][:5]
            raise ValueError(f"xlsa17: {path.name}[{key!r}] must hold whole numbers ({what}), found {bad.tolist()}")
    value = value.astype(np.int64)  # before subtracting: MATLAB often stores these as uint16
    lo, hi = int(value.min()), int(value.max())
    if lo < low or hi > high:
        hint = " (indices are 1-based: 0 is not valid; is this a 0-based file?)" if lo == 0 and low == 1 else ""
        raise ValueError(
            f"xlsa17: {path.name}[{key!r}] holds {what} in {lo}..{hi}, expected {low}..{high}{hint}"
        )
    return torch.from_numpy(value - 1)


def _strings(cell) -> Optional[list]:
    if cell is None:
        return None
    out = []
    for item in np.asarray(cell, dtype=object).reshape(-1):
        while isinstance(item, np.ndarray) and item.dtype == object and item.size == 1:
            item = item.reshape(-1)[0]
        if isinstance(item, np.ndarray):
            item = "".join(item.reshape(-1).tolist()) if item.size else ""
        out.append(str(item))
    return out


def _classes_str(classes: torch.Tensor, limit: int = 10) -> str:
    ids = classes.tolist()
    text = ", ".join(str(i) for i in ids[:limit])
    return f"[{text}{', ...' if len(ids) > limit else ''}] ({len(ids)} classes, 0-based)"


def load_xlsa17(
    root: PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    features_file: str = FEATURES_FILE,
    splits_file: str = SPLITS_FILE,
) -> XLSA17:
    """Read ``root/res101.mat`` and ``root/att_splits.mat`` (xlsa17 format, see the module docstring).

    Everything comes back 0-based and row-major: features (N, Dfeat), att (C, K). ``dtype`` is the floating dtype
    of features, att and original_att. Raises ValueError naming the file, key and what was found on any mismatch,
    and TypeError naming the argument for a ``dtype`` that is not a floating torch.dtype or a path that is not a
    str / os.PathLike, before any file is read.
    """
    root = check_path("load_xlsa17", "root", root)
    check_float_dtype("load_xlsa17", "dtype", dtype)
    feat_path = root / check_path("load_xlsa17", "features_file", features_file)
    split_path = root / check_path("load_xlsa17", "splits_file", splits_file)
    if not root.is_dir():
        raise ValueError(f"xlsa17: dataset folder not found: {root}")
    feat_mat = _loadmat(feat_path)
    split_mat = _loadmat(split_path)

    att = _matrix(split_mat, split_path, "att")
    num_attributes, num_classes = att.shape
    original_att = _matrix(split_mat, split_path, "original_att")
    if original_att.shape != att.shape:
        raise ValueError(
            f"xlsa17: {split_path.name}['original_att'] has shape {original_att.shape}, "
            f"expected the shape of 'att' (K, C) = {att.shape}"
        )

    features = _matrix(feat_mat, feat_path, "features")
    labels = _integer_vector(feat_mat, feat_path, "labels", 1, num_classes, f"class labels (C = {num_classes} "
                             f"columns of att)")
    num_samples = labels.numel()
    if features.shape[1] != num_samples:
        transposed = features.shape[0] == num_samples
        hint = " (it looks transposed: res101.mat stores one column per image)" if transposed else ""
        raise ValueError(
            f"xlsa17: {feat_path.name}['features'] has shape {features.shape}, expected (Dfeat, N) with "
            f"N = {num_samples} labels{hint}"
        )

    what = f"1-based image indices (N = {num_samples} columns of features)"
    locs = {
        name: _integer_vector(
            split_mat, split_path, f"{name}_loc", 1, num_samples, what, required=name in SPLIT_NAMES[:3]
        )
        for name in SPLIT_NAMES
    }
    seen_classes = torch.unique(labels[locs["trainval"]])
    unseen_classes = torch.unique(labels[locs["test_unseen"]])
    overlap = seen_classes[torch.isin(seen_classes, unseen_classes)]
    if overlap.numel():
        raise ValueError(
            f"xlsa17: {split_path.name}: classes {_classes_str(overlap)} appear both in 'trainval_loc' (seen) "
            f"and in 'test_unseen_loc' (unseen)"
        )
    test_seen_classes = torch.unique(labels[locs["test_seen"]])
    stray = test_seen_classes[~torch.isin(test_seen_classes, seen_classes)]
    if stray.numel():
        raise ValueError(
            f"xlsa17: {split_path.name}['test_seen_loc'] holds images of classes {_classes_str(stray)} "
            f"that have no image in 'trainval_loc'"
        )
    shared = locs["trainval"][torch.isin(locs["trainval"], locs["test_seen"])]
    if shared.numel():
        raise ValueError(
            f"xlsa17: {split_path.name}: {shared.numel()} images are both in 'trainval_loc' and "
            f"'test_seen_loc' (0-based rows {shared[:5].tolist()}...)"
        )

    return XLSA17(
        features=torch.from_numpy(np.ascontiguousarray(features.T)).to(dtype),
        labels=labels,
        att=torch.from_numpy(np.ascontiguousarray(att.T)).to(dtype),
        original_att=torch.from_numpy(np.ascontiguousarray(original_att.T)).to(dtype),
        trainval_loc=locs["trainval"],
        test_seen_loc=locs["test_seen"],
        test_unseen_loc=locs["test_unseen"],
        seen_classes=seen_classes,
        unseen_classes=unseen_classes,
        train_loc=locs["train"],
        val_loc=locs["val"],
        class_names=_strings(split_mat.get("allclasses_names")),
        image_files=_strings(feat_mat.get("image_files")),
    )


# ----------------------------------------------------------------------------------------------------- writing


def _cell(strings: list) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)
    for i, text in enumerate(strings):
        cell[i, 0] = np.array([text])
    return cell


def _loc_column(rows: np.ndarray) -> np.ndarray:
    one_based = np.sort(rows) + 1
    dtype = np.uint16 if one_based.size == 0 or one_based.max() < 2**16 else np.uint32
    return one_based.astype(dtype).reshape(-1, 1)


def write_synthetic_xlsa17(
    root: PathLike,
    preset: Union[str, DatasetPreset] = "CUB",
    *,
    samples_per_class: int = 10,
    feature_dim: int = 2048,
    seed: int = 0,
    num_classes: Optional[int] = None,
    num_unseen: Optional[int] = None,
    num_attributes: Optional[int] = None,
    test_seen_fraction: float = 0.2,
    noise: float = 1.0,
    jitter: float = 1.5,
) -> pathlib.Path:
    """Write a synthetic dataset of the preset's shape to ``root/res101.mat`` and ``root/att_splits.mat``.

    The files follow the real ones key for key (1-based column vectors, (Dfeat, N) features, (K, C) att with
    L2-normalised columns, original_att in 0..100, cells of names). ``num_classes``/``num_unseen``/
    ``num_attributes`` override the preset (tiny tests). Per seen class, ``test_seen_fraction`` of the images
    (at least one, at most all but one) go to test_seen, the rest to trainval; every image of an unseen
    class is in test_unseen; train_loc/val_loc split trainval by class. Features: ReLU(a_i @ P + noise * eps),
    a_i the class's standardised attributes plus ``jitter`` * N(0, 1) per image and attribute, P (K, Dfeat) fixed
    random, so they are learnable and transfer to unseen classes. The defaults make the task neither trivial nor
    hopeless (a ridge regression from features to attributes: CZSL ~0.7-0.8 on CUB/AwA2/SUN shapes, and
    uncalibrated GZSL strongly biased to seen classes, as on the real data). Same seed, same arrays. Returns
    ``root``.
    """
    root = check_path("write_synthetic_xlsa17", "root", root)
    base = get_preset(preset)
    C = base.num_classes if num_classes is None else int(num_classes)
    U = base.num_unseen if num_unseen is None else int(num_unseen)
    K = base.num_attributes if num_attributes is None else int(num_attributes)
    if C < 2 or not 1 <= U < C:
        raise ValueError(f"need num_classes >= 2 and 1 <= num_unseen < num_classes, got {C} classes, {U} unseen")
    if K < 1 or feature_dim < 1 or samples_per_class < 2:
        raise ValueError(
            "num_attributes and feature_dim must be >= 1 and samples_per_class >= 2 (one for trainval, one for "
            f"test_seen), got {K}, {feature_dim}, {samples_per_class}"
        )
    if not 0.0 < test_seen_fraction < 1.0:
        raise ValueError(f"test_seen_fraction must be in (0, 1), got {test_seen_fraction}")
    rng = np.random.default_rng(seed)

    # Bimodal per-class attribute strengths, as in the real class-attribute matrices.
    original_att = 100.0 * rng.beta(0.5, 0.5, size=(K, C))
    att = original_att / np.maximum(np.linalg.norm(original_att, axis=0, keepdims=True), 1e-12)

    unseen = np.sort(rng.permutation(C)[:U])
    seen = np.setdiff1d(np.arange(C), unseen)
    num_val_classes = min(U, len(seen) // 2)
    val_classes = np.sort(rng.permutation(seen)[:num_val_classes])

    # Centred, standardised attributes drive the features; per-image jitter gives intra-class variation.
    centred = (att - att.mean(axis=1, keepdims=True)) / (att.std(axis=1, keepdims=True) + 1e-12)
    projection = rng.standard_normal((K, feature_dim)) / np.sqrt(K)
    class_of_sample = np.repeat(np.arange(C), samples_per_class)
    sample_att = centred.T[class_of_sample] + jitter * rng.standard_normal((class_of_sample.size, K))
    feature_noise = noise * rng.standard_normal((class_of_sample.size, feature_dim))
    features = np.maximum(sample_att @ projection + feature_noise, 0.0)

    # Images in a shuffled order, so that the splits are only reachable through the *_loc indices.
    order = rng.permutation(class_of_sample.size)
    labels = class_of_sample[order]
    features = features[order]
    trainval, test_seen, test_unseen = [], [], []
    for c in range(C):
        rows = np.flatnonzero(labels == c)
        if c in unseen:
            test_unseen.append(rows)
            continue
        held = min(max(int(round(test_seen_fraction * rows.size)), 1), rows.size - 1)
        rows = rng.permutation(rows)
        test_seen.append(rows[:held])
        trainval.append(rows[held:])
    trainval, test_seen, test_unseen = (np.concatenate(x) for x in (trainval, test_seen, test_unseen))
    is_val = np.isin(labels[trainval], val_classes)

    name = base.name
    class_names = [f"{c + 1:03d}.synthetic_{name.lower()}_class_{c + 1:03d}" for c in range(C)]
    image_files = [
        f"/synthetic/{name}/images/{class_names[c]}/{class_names[c].split('.', 1)[1]}_{i + 1:05d}.jpg"
        for i, c in enumerate(labels)
    ]

    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        str(root / FEATURES_FILE),
        {
            "features": np.asfortranarray(features.T.astype(np.float32)),
            "labels": (labels + 1).astype(np.float64).reshape(-1, 1),
            "image_files": _cell(image_files),
        },
    )
    splits = {
        "att": att,
        "original_att": original_att,
        "trainval_loc": _loc_column(trainval),
        "test_seen_loc": _loc_column(test_seen),
        "test_unseen_loc": _loc_column(test_unseen),
        "allclasses_names": _cell(class_names),
    }
    if num_val_classes:  # a single seen class cannot be split into train and val classes
        splits.update(train_loc=_loc_column(trainval[~is_val]), val_loc=_loc_column(trainval[is_val]))
    scipy.io.savemat(str(root / SPLITS_FILE), splits)
    return root
