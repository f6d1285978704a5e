"""Attribute word vectors, as the papers use them (ILPG: GloVe; SAGE: Word2Vec; SVIP's W2P: GloVe).

    read_names(path) -> list[str]
        one name a line, blank lines skipped; a leading whole number is an id and dropped (CUB's attributes.txt
        "1 has_bill_shape::curved_(up_or_down)", AwA2's predicates.txt "1\\tblack")
    load_word_vectors(path, names=None, *, rows=None) -> (K, D) float32 tensor
        a .npy array or a .pt/.pth tensor (K, D) saved with torch.save; or a word-vector text file (GloVe's format,
        "word v1 ... vD" a line; a word2vec header line "count D" is skipped) read for ``names``: each name's
        vector is the mean of the vectors of its words (lower-case runs of letters: "has_bill_shape::curved_(up_
        or_down)" -> has, bill, shape, curved, up, or, down), words the file lacks left out. ``rows``: the K
        expected. ValueError naming the file and what is wrong (shape, a name none of whose words is in the file).
    stand_in_vectors(num_rows, seed, dim=300) -> (K, 300) float32
        the stand-in when the user has no word vectors: independent N(0, 1) rows fixed by the seed, as
        ``python -m zslfast demo``'s. They carry no meaning: the models' attribute queries then start arbitrary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..validation import check_path

_WORD = re.compile(r"[a-z]+")


def read_names(path) -> list:
    """The names in ``path``, one a line (module docstring)."""
    path = check_path("read_names", "path", path)
    names = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        names.append(parts[1].strip() if len(parts) == 2 and parts[0].isdigit() else line.strip())
    if not names:
        raise ValueError(f"{path}: no names in it (one name a line expected)")
    return names


def _words(name: str) -> list:
    return _WORD.findall(name.lower())


def _from_text(path: Path, names: Sequence[str]) -> np.ndarray:
    wanted = {word for name in names for word in _words(name)}
    vectors, dim = {}, None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines):
            parts = line.rstrip().split(" ")
            if number == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec's header: count and width
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}: line 1 is not 'word v1 ... vD' (GloVe's text format)")
            word = " ".join(parts[: len(parts) - dim])  # (some GloVe files have words with spaces)
            if word in wanted and word not in vectors:
                try:
                    vectors[word] = np.array(parts[len(parts) - dim :], dtype=np.float64)
                except ValueError:
                    raise ValueError(f"{path}: line {number + 1} is not 'word v1 ... v{dim}'") from None
    if dim is None:
        raise ValueError(f"{path}: empty")
    missing = [name for name in names if not any(w in vectors for w in _words(name))]
    if missing:
        raise ValueError(f"{path} has no vector for any word of {len(missing)} attribute names: "
                         f"{', '.join(repr(m) for m in missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return np.stack([np.mean([vectors[w] for w in _words(name) if w in vectors], axis=0) for name in names])


def load_word_vectors(path, names: Optional[Sequence[str]] = None, *, rows: Optional[int] = None) -> torch.Tensor:
    """(K, D) float32 word vectors from ``path`` (module docstring)."""
    path = check_path("load_word_vectors", "path", path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a .npy array ({error})") from None
    elif suffix in (".pt", ".pth"):
        try:
            array = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - pickle / zip errors: one message
            raise ValueError(f"{path}: not a tensor saved with torch.save ({type(error).__name__})") from None
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"{path} holds a {type(array).__name__}, not a (K, D) tensor")
        array = array.double().numpy()
    else:
        if names is None:
            raise ValueError(f"{path} is a text file of word vectors: give the attribute names too (e.g. CUB's "
                             f"attributes.txt) to pick and average each name's words")
        array = _from_text(path, names)
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "fiu" or 0 in array.shape:
        raise ValueError(f"{path}: word vectors must be a (K, D) numeric array, got shape {array.shape} "
                         f"dtype {array.dtype}")
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"{path}: {array.shape[0]} word vectors, but the dataset has {rows} attributes")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the word vectors hold NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))


def stand_in_vectors(num_rows: int, seed: int, dim: int = 300) -> torch.Tensor:
    """(num_rows, dim) N(0, 1) stand-in word vectors fixed by ``seed`` (module docstring)."""
    return torch.randn(num_rows, dim, generator=torch.Generator().manual_seed(seed + 1))
