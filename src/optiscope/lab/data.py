"""Datasets for the lab: the embedded digits, or a user's tabular file (``--data``)."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

MIN_ROWS = 50


class DataError(ValueError):
    """A ``--data`` file that cannot be used, with the reason in the message."""


@dataclass(frozen=True)
class Dataset:
    """Features scaled to [-1, 1] by one global factor, and integer labels.

    One factor for all columns (not per-column standardisation) keeps the
    difference between rarely and commonly active features that claim C3 measures.
    """

    name: str
    sha256: str
    x_train: torch.Tensor  # (n_train, d) float32
    y_train: torch.Tensor  # (n_train,) int64
    x_val: torch.Tensor  # (n_val, d)
    y_val: torch.Tensor  # (n_val,)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val]).max()) + 1


def load(path: str | None, seed: int, label_column: str = "label") -> Dataset:
    """The digits (``path=None``) or a ``.csv``/``.npz`` file, split 75/25 by ``seed``."""
    if path is None:
        raw = resources.files("optiscope.lab").joinpath("data/digits.npz").read_bytes()
        name = "digits (scikit-learn load_digits, embedded)"
        x, y = _from_npz_bytes(raw, "digits.npz")
    else:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"--data {path}: no such file")
        raw = file.read_bytes()
        name = file.name
        if file.suffix == ".npz":
            x, y = _from_npz_bytes(raw, file.name)
        elif file.suffix == ".csv":
            x, y = _from_csv(file, label_column)
        else:
            raise DataError(f"--data {path}: expected a .csv or .npz file")
    return _split(name, hashlib.sha256(raw).hexdigest(), *_validate(x, y, name), seed)


def _from_npz_bytes(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    import io

    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as error:
        raise DataError(f"{name}: not a readable .npz archive ({error})") from None
    missing = [k for k in ("X", "y") if k not in archive.files]
    if missing:
        raise DataError(f"{name}: missing array(s) {missing}; the file needs X and y")
    return archive["X"], archive["y"]


def _from_csv(file: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with file.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{file.name}: the file is empty")
    header = [h.strip() for h in rows[0]]
    lowered = [h.lower() for h in header]
    if label_column.lower() not in lowered:
        raise DataError(
            f"{file.name}: missing label column {label_column!r}; "
            f"the header has {header}"
        )
    label_at = lowered.index(label_column.lower())
    features, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"{file.name}, line {line}: {len(row)} fields, the header has {len(header)}"
            )
        labels.append(row[label_at].strip())
        values = []
        for column, cell in enumerate(row):
            if column == label_at:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                raise DataError(
                    f"{file.name}, line {line}, column {header[column]!r}: "
                    f"non-numeric value {cell!r}"
                ) from None
        features.append(values)
    return np.asarray(features, dtype=np.float64), np.asarray(labels)


def _validate(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2:
        raise DataError(f"{name}: X must be 2-D (rows, features), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: X has non-numeric values (dtype {x.dtype})")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: X has NaN or infinite values")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: y must be 1-D with one label per row of X")
    if len(x) < MIN_ROWS:
        raise DataError(f"{name}: {len(x)} rows; the lab needs at least {MIN_ROWS}")
    classes, y_index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{name}: a single class ({classes[0]!r}); need at least 2")
    return x, y_index


def _split(name: str, sha: str, x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    scale = np.abs(x).max() or 1.0
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = round(0.75 * len(x))
    train, val = order[:n_train], order[n_train:]

    def as_x(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor(x[rows] / scale, dtype=torch.float32)

    def as_y(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor(y[rows], dtype=torch.int64)

    return Dataset(name, sha, as_x(train), as_y(train), as_x(val), as_y(val))
