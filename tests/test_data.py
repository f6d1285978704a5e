"""zslfast.data: the xlsa17 reader on synthetic files written in the real format, the files' conventions
(1-based column vectors, (Dfeat, N) and (K, C) layouts), the writer's presets, learnability and determinism, and
every error the reader raises."""

import re

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from zslfast.data import PRESETS, XLSA17, load_xlsa17, write_synthetic_xlsa17
from zslfast.metrics import czsl_accuracy

TINY = dict(num_classes=7, num_unseen=3, num_attributes=5, feature_dim=16, samples_per_class=5)


@pytest.fixture
def tiny(tmp_path):
    return write_synthetic_xlsa17(tmp_path / "tiny", "CUB", seed=3, **TINY)


def raw(root):
    return scipy.io.loadmat(str(root / "res101.mat")), scipy.io.loadmat(str(root / "att_splits.mat"))


def test_round_trip_matches_the_raw_files(tiny):
    feat, splits = raw(tiny)
    ds = load_xlsa17(tiny, dtype=torch.float64)
    assert isinstance(ds, XLSA17)
    np.testing.assert_array_equal(ds.features.numpy(), feat["features"].T.astype(np.float64))
    np.testing.assert_array_equal(ds.labels.numpy(), feat["labels"].reshape(-1).astype(np.int64) - 1)
    np.testing.assert_array_equal(ds.att.numpy(), splits["att"].T)
    np.testing.assert_array_equal(ds.original_att.numpy(), splits["original_att"].T)
    for name in ("trainval", "test_seen", "test_unseen", "train", "val"):
        loc = getattr(ds, f"{name}_loc")
        assert loc.dtype == torch.int64
        np.testing.assert_array_equal(loc.numpy(), splits[f"{name}_loc"].reshape(-1).astype(np.int64) - 1)
    assert ds.labels.dtype == torch.int64 and ds.features.dtype == torch.float64
    assert ds.num_classes == 7 and ds.num_attributes == 5 and ds.feature_dim == 16
    assert len(ds.class_names) == 7 and len(ds.image_files) == 35 and ds.image_files[0].endswith(".jpg")


def test_splits_follow_the_proposed_split_protocol(tiny):
    ds = load_xlsa17(tiny)
    assert ds.unseen_classes.numel() == 3 and ds.seen_classes.numel() == 4
    assert not set(ds.seen_classes.tolist()) & set(ds.unseen_classes.tolist())
    assert set(ds.seen_classes.tolist()) | set(ds.unseen_classes.tolist()) == set(range(7))
    assert torch.equal(ds.seen_classes, ds.seen_classes.sort().values)
    # test_unseen = every image of the unseen classes; test_seen = 1 of the 5 images of each seen class.
    unseen_rows = torch.nonzero(torch.isin(ds.labels, ds.unseen_classes)).view(-1)
    assert set(ds.test_unseen_loc.tolist()) == set(unseen_rows.tolist())
    assert torch.bincount(ds.labels[ds.test_seen_loc], minlength=7)[ds.seen_classes].tolist() == [1] * 4
    assert torch.bincount(ds.labels[ds.trainval_loc], minlength=7)[ds.seen_classes].tolist() == [4] * 4
    everything = torch.cat([ds.trainval_loc, ds.test_seen_loc, ds.test_unseen_loc]).sort().values
    assert torch.equal(everything, torch.arange(35))
    # train/val partition trainval by class.
    assert torch.equal(torch.cat([ds.train_loc, ds.val_loc]).sort().values, ds.trainval_loc.sort().values)
    assert not set(ds.labels[ds.train_loc].tolist()) & set(ds.labels[ds.val_loc].tolist())
    x, y = ds.split("test_seen")
    assert torch.equal(x, ds.features[ds.test_seen_loc]) and torch.equal(y, ds.labels[ds.test_seen_loc])
    with pytest.raises(ValueError, match="split name"):
        ds.split("test")


def test_files_use_the_real_conventions(tiny):
    feat, splits = raw(tiny)
    assert feat["features"].shape == (16, 35)  # Dfeat x N: one column per image
    assert feat["labels"].shape == (35, 1) and feat["labels"].min() == 1 and feat["labels"].max() == 7
    assert splits["att"].shape == (5, 7) and splits["original_att"].shape == (5, 7)  # K x C
    np.testing.assert_allclose(np.linalg.norm(splits["att"], axis=0), 1.0, rtol=1e-12)
    assert splits["original_att"].min() >= 0 and splits["original_att"].max() <= 100
    for name in ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc"):
        loc = splits[name]
        assert loc.ndim == 2 and loc.shape[1] == 1 and loc.min() >= 1 and loc.max() <= 35, name
    assert feat["image_files"].shape == (35, 1) and feat["image_files"].dtype == object
    assert splits["allclasses_names"].shape == (7, 1)
    # The images are shuffled, so a reader that ignores the *_loc indices gets wrong splits.
    labels = feat["labels"].reshape(-1)
    assert (np.diff(labels) < 0).any()


@pytest.mark.parametrize("name", ["CUB", "SUN", "AwA2"])
def test_presets_give_the_benchmark_shapes(tmp_path, name):
    preset = PRESETS[name]
    expected = {"CUB": (200, 50, 312), "SUN": (717, 72, 102), "AwA2": (50, 10, 85)}[name]
    assert (preset.num_classes, preset.num_unseen, preset.num_attributes) == expected
    ds = load_xlsa17(write_synthetic_xlsa17(tmp_path, name, samples_per_class=2, feature_dim=4))
    assert ds.att.shape == (expected[0], expected[2]) and ds.features.shape == (2 * expected[0], 4)
    assert ds.unseen_classes.numel() == expected[1] and ds.seen_classes.numel() == expected[0] - expected[1]


def test_writer_is_deterministic_per_seed(tmp_path):
    a = load_xlsa17(write_synthetic_xlsa17(tmp_path / "a", seed=5, **TINY))
    b = load_xlsa17(write_synthetic_xlsa17(tmp_path / "b", seed=5, **TINY))
    c = load_xlsa17(write_synthetic_xlsa17(tmp_path / "c", seed=6, **TINY))
    for field in ("features", "labels", "att", "trainval_loc", "test_seen_loc", "test_unseen_loc", "unseen_classes"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.features, c.features)


def test_synthetic_features_transfer_to_unseen_classes(tmp_path):
    """A ridge map features -> attributes fit on trainval recognises unseen classes far above chance."""
    ds = load_xlsa17(write_synthetic_xlsa17(tmp_path, "AwA2", samples_per_class=20, feature_dim=256, seed=1),
                     dtype=torch.float64)
    x, y = ds.split("trainval")
    mean = x.mean(0)
    xc = x - mean
    proj = torch.linalg.solve(xc.T @ xc + 10 * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ ds.att[y])
    xu, yu = ds.split("test_unseen")
    scores = F.normalize((xu - mean) @ proj, dim=1) @ F.normalize(ds.att, dim=1).T
    chance = 1.0 / ds.unseen_classes.numel()
    assert czsl_accuracy(scores, yu, ds.unseen_classes) > 3 * chance
    # ... and a shuffled attribute matrix (no semantic link) does not.
    perm = torch.randperm(ds.num_classes, generator=torch.Generator().manual_seed(0))
    scores = F.normalize((xu - mean) @ proj, dim=1) @ F.normalize(ds.att[perm], dim=1).T
    assert czsl_accuracy(scores, yu, ds.unseen_classes) < 0.5


def test_to_moves_and_casts(tiny):
    ds = load_xlsa17(tiny).to(dtype=torch.float64)
    assert ds.features.dtype == torch.float64 and ds.att.dtype == torch.float64 and ds.labels.dtype == torch.int64


@pytest.mark.parametrize("call, error, message", [
    (lambda root: load_xlsa17(root, dtype=torch.int64), TypeError,
     "load_xlsa17: dtype must be a floating-point torch.dtype, got torch.int64"),
    (lambda root: load_xlsa17(root, dtype="float32"), TypeError,
     "load_xlsa17: dtype must be a floating-point torch.dtype, got str 'float32' (torch.float32?)"),
    (lambda root: load_xlsa17(root).to(dtype=torch.int32), TypeError,
     "XLSA17.to: dtype must be a floating-point torch.dtype, got torch.int32"),
    (lambda root: load_xlsa17(None), TypeError, "load_xlsa17: root must be a path (str or os.PathLike), got NoneType"),
    (lambda root: load_xlsa17(root, splits_file=None), TypeError, "load_xlsa17: splits_file must be a path"),
    (lambda root: write_synthetic_xlsa17(None), TypeError, "write_synthetic_xlsa17: root must be a path"),
], ids=["dtype int64", "dtype str", "to int32", "root None", "splits_file None", "writer root None"])
def test_bad_arguments_are_named(tiny, call, error, message):
    """A dtype that is not a floating torch.dtype, or a root that is not a path, is refused naming the argument:
    never features truncated to integers, a string read as a device, or a TypeError from inside pathlib."""
    with pytest.raises(error) as info:
        call(tiny)
    assert message in str(info.value), str(info.value)


def test_writer_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="num_unseen"):
        write_synthetic_xlsa17(tmp_path, num_classes=4, num_unseen=4)
    with pytest.raises(ValueError, match="unknown dataset preset"):
        write_synthetic_xlsa17(tmp_path, "ImageNet")
    with pytest.raises(ValueError, match="samples_per_class >= 2"):
        write_synthetic_xlsa17(tmp_path, samples_per_class=1)


def test_smallest_dataset_is_readable(tmp_path):
    ds = load_xlsa17(write_synthetic_xlsa17(tmp_path, num_classes=2, num_unseen=1, num_attributes=1,
                                            feature_dim=1, samples_per_class=2))
    assert ds.trainval_loc.numel() == 1 and ds.test_seen_loc.numel() == 1 and ds.test_unseen_loc.numel() == 2
    assert ds.train_loc is None and ds.val_loc is None


# ------------------------------------------------------------------------------------------------- errors


def rewrite(root, filename, **changes):
    """Re-save one file with keys replaced (value) or deleted (None)."""
    mat = {k: v for k, v in scipy.io.loadmat(str(root / filename)).items() if not k.startswith("__")}
    for key, value in changes.items():
        if value is None:
            del mat[key]
        else:
            mat[key] = value
    scipy.io.savemat(str(root / filename), mat)


def expect_error(root, *patterns):
    with pytest.raises(ValueError) as info:
        load_xlsa17(root)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_missing_folder_and_files(tmp_path, tiny):
    expect_error(tmp_path / "nowhere", "folder not found")
    (tiny / "res101.mat").unlink()
    expect_error(tiny, "file not found", "res101.mat")


def test_missing_split_file(tiny):
    (tiny / "att_splits.mat").unlink()
    expect_error(tiny, "file not found", "att_splits.mat")


def test_not_a_mat_file(tiny):
    (tiny / "att_splits.mat").write_bytes(b"not a matlab file at all" * 10)
    expect_error(tiny, "cannot read", "att_splits.mat")


@pytest.mark.parametrize(
    "filename,key",
    [("att_splits.mat", "att"), ("att_splits.mat", "original_att"), ("att_splits.mat", "trainval_loc"),
     ("att_splits.mat", "test_unseen_loc"), ("res101.mat", "features"), ("res101.mat", "labels")],
)
def test_missing_key(tiny, filename, key):
    rewrite(tiny, filename, **{key: None})
    expect_error(tiny, re.escape(filename), f"no key '{key}'", "keys found")


def test_optional_keys_may_be_missing(tiny):
    rewrite(tiny, "att_splits.mat", train_loc=None, val_loc=None, allclasses_names=None)
    ds = load_xlsa17(tiny)
    assert ds.train_loc is None and ds.class_names is None
    with pytest.raises(ValueError, match="no train_loc"):
        ds.split("train")


def test_zero_index_is_rejected_as_not_one_based(tiny):
    loc = scipy.io.loadmat(str(tiny / "att_splits.mat"))["trainval_loc"].astype(np.int64) - 1  # a 0-based file
    rewrite(tiny, "att_splits.mat", trainval_loc=loc)
    expect_error(tiny, "att_splits.mat", "'trainval_loc'", r"holds .* in 0\.\.", "1-based")


def test_index_past_the_end(tiny):
    loc = scipy.io.loadmat(str(tiny / "att_splits.mat"))["test_unseen_loc"].astype(np.int64)
    loc[0, 0] = 36
    rewrite(tiny, "att_splits.mat", test_unseen_loc=loc)
    expect_error(tiny, "'test_unseen_loc'", r"\.\.36", r"expected 1\.\.35")


def test_non_integer_index(tiny):
    loc = scipy.io.loadmat(str(tiny / "att_splits.mat"))["test_seen_loc"].astype(np.float64)
    loc[0, 0] += 0.5
    rewrite(tiny, "att_splits.mat", test_seen_loc=loc)
    expect_error(tiny, "'test_seen_loc'", "whole numbers")


def test_index_matrix_instead_of_vector(tiny):
    rewrite(tiny, "att_splits.mat", trainval_loc=np.ones((3, 2)))
    expect_error(tiny, "'trainval_loc'", "vector", r"\(3, 2\)")


@pytest.mark.parametrize("bad", [0, 8])
def test_labels_out_of_range(tiny, bad):
    labels = scipy.io.loadmat(str(tiny / "res101.mat"))["labels"].copy()
    labels[4, 0] = bad
    rewrite(tiny, "res101.mat", labels=labels)
    expect_error(tiny, "res101.mat", "'labels'", r"expected 1\.\.7")


def test_transposed_features(tiny):
    features = scipy.io.loadmat(str(tiny / "res101.mat"))["features"]
    rewrite(tiny, "res101.mat", features=np.ascontiguousarray(features.T))
    expect_error(tiny, "'features'", r"\(35, 16\)", "transposed")


def test_features_labels_count_mismatch(tiny):
    features = scipy.io.loadmat(str(tiny / "res101.mat"))["features"]
    rewrite(tiny, "res101.mat", features=features[:, :30])
    expect_error(tiny, "'features'", r"\(16, 30\)", "N = 35")


def test_original_att_shape_mismatch(tiny):
    original = scipy.io.loadmat(str(tiny / "att_splits.mat"))["original_att"]
    rewrite(tiny, "att_splits.mat", original_att=original[:, :6])
    expect_error(tiny, "'original_att'", r"\(5, 6\)", r"\(5, 7\)")


def test_transposed_att_is_caught_by_the_label_range(tiny):
    att = scipy.io.loadmat(str(tiny / "att_splits.mat"))["att"]
    rewrite(tiny, "att_splits.mat", att=np.ascontiguousarray(att.T), original_att=np.ascontiguousarray(att.T))
    expect_error(tiny, "'labels'", r"C = 5")


def test_nan_features(tiny):
    features = scipy.io.loadmat(str(tiny / "res101.mat"))["features"].copy()
    features[0, 0] = np.nan
    rewrite(tiny, "res101.mat", features=features)
    expect_error(tiny, "'features'", "NaN")


def test_seen_unseen_overlap(tiny):
    splits = scipy.io.loadmat(str(tiny / "att_splits.mat"))
    trainval = np.concatenate([splits["trainval_loc"], splits["test_unseen_loc"][:1]])
    rewrite(tiny, "att_splits.mat", trainval_loc=trainval)
    expect_error(tiny, "both in 'trainval_loc'", "'test_unseen_loc'")


def test_test_seen_class_without_training_images(tiny):
    feat, splits = raw(tiny)
    labels = feat["labels"].reshape(-1)
    trainval = splits["trainval_loc"].reshape(-1)
    dropped_class = labels[trainval[0] - 1]
    keep = trainval[labels[trainval - 1] != dropped_class]
    rewrite(tiny, "att_splits.mat", trainval_loc=keep.reshape(-1, 1))
    expect_error(tiny, "'test_seen_loc'", "no image in 'trainval_loc'")


def test_trainval_and_test_seen_share_images(tiny):
    splits = scipy.io.loadmat(str(tiny / "att_splits.mat"))
    rewrite(tiny, "att_splits.mat", trainval_loc=np.concatenate([splits["trainval_loc"], splits["test_seen_loc"][:1]]))
    expect_error(tiny, "both in 'trainval_loc' and 'test_seen_loc'")
