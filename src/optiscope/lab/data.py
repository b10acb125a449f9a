"""Datasets for the lab: the embedded digits, or a user's tabular file (``--data``).

The digits keep their own scale (pixel intensity / 16, in [0, 1]): a pixel that
is rarely inked stays a feature that is rarely non-zero. A ``--data`` file is
standardised per feature with the training split's mean and standard deviation,
and features that are constant on the training split are dropped.

A CSV is read twice, streaming: once to count its records (and find its
encoding), once to parse them into a preallocated float64 array, so memory
peaks near that array, not at the Python lists of its cells.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

MIN_ROWS = 50
MAX_ROWS = 20_000  # larger files are subsampled (by --seed): the lab's runs stay short
CHUNK_ROWS = 1024  # rows parsed (or converted) at a time: bounds the extra memory
DIGITS_NAME = "digits (scikit-learn load_digits, embedded)"
STANDARDISATION = (
    "each feature standardised to mean 0 and standard deviation 1 with the "
    "training split's statistics; features constant on the training split dropped"
)
DIGITS_SCALING = "pixel intensities divided by 16 (into [0, 1]); not standardised"


class DataError(ValueError):
    """A ``--data`` file that cannot be used, with the reason in the message."""


@dataclass(frozen=True)
class Dataset:
    """Features (float32) and integer labels, split 75/25 by the seed."""

    name: str
    sha256: str
    x_train: torch.Tensor  # (n_train, d) float32
    y_train: torch.Tensor  # (n_train,) int64
    x_val: torch.Tensor  # (n_val, d)
    y_val: torch.Tensor  # (n_val,)
    preprocessing: str  # what was done to the features, for the report
    rows_in_file: int
    features_in_file: int
    encoding: str = "n/a"

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val]).max()) + 1

    @property
    def is_digits(self) -> bool:
        return self.name == DIGITS_NAME

    def describe(self) -> dict[str, object]:
        """What the report says about the data."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "rows_in_file": self.rows_in_file,
            "rows_used": len(self.y_train) + len(self.y_val),
            "train_rows": len(self.y_train),
            "validation_rows": len(self.y_val),
            "features_in_file": self.features_in_file,
            "features_used": self.n_features,
            "classes": self.n_classes,
            "preprocessing": self.preprocessing,
            "encoding": self.encoding,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | None, seed: int, label_column: str = "label") -> Dataset:
    """The digits (``path=None``) or a ``.csv``/``.npz`` file, split 75/25 by ``seed``."""
    if path is None:
        source = resources.files("optiscope.lab").joinpath("data/digits.npz")
        with source.open("rb") as handle:
            archive = np.load(handle, allow_pickle=False)
            x, y = archive["X"].astype(np.float64), archive["y"]
        sha = hashlib.sha256(source.read_bytes()).hexdigest()
        x, codes = _validate(x, y, "digits.npz")
        return _split(DIGITS_NAME, sha, x, codes, seed, standardise=False)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--data {path}: no such file")
    suffix = file.suffix.lower()
    encoding, names = "n/a", None
    try:
        if suffix == ".npz":
            x, y = _from_npz(file)
        elif suffix == ".csv":
            x, y, names, encoding = _from_csv(file, label_column)
        else:
            raise DataError(f"--data {path}: expected a .csv or .npz file")
        sha = file_sha256(file)
    except OSError as error:
        raise DataError(f"--data {path}: cannot read it ({error.strerror})") from None
    x, codes = _validate(x, y, file.name, names)
    return _split(file.name, sha, x, codes, seed, standardise=True, encoding=encoding)


def _from_npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(file, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{file.name}: not a readable .npz archive ({error})") from None
    if not hasattr(archive, "files"):
        raise DataError(f"{file.name}: a single array, not an .npz archive of X and y")
    with archive:
        missing = [k for k in ("X", "y") if k not in archive.files]
        if missing:
            raise DataError(
                f"{file.name}: missing array(s) {missing}; the file needs X and y"
            )
        arrays = []
        for key in ("X", "y"):
            try:
                arrays.append(archive[key])
            except ValueError:  # object arrays need pickle, which stays off
                raise DataError(
                    f"{file.name}: {key} is an object array; save numbers (X) and "
                    "numbers or strings (y), e.g. np.savez(f, X=X.astype(float), y=y)"
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as error:
                raise DataError(f"{file.name}: {key} is unreadable ({error})") from None
    x, y = arrays
    if x.dtype.kind not in "biuf":
        raise DataError(f"{file.name}: X must hold real numbers, got dtype {x.dtype}")
    if y.dtype.kind not in "biuUS":
        raise DataError(f"{file.name}: y must hold integers or strings, not {y.dtype}")
    return x, y


def _encoding_of(file: Path) -> str:
    """UTF-16/UTF-8 by their byte-order mark, else UTF-8 if every byte decodes."""
    with file.open("rb") as handle:
        head = handle.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"  # every byte is a character: labels stay distinct
    return "utf-8"


def _records(file: Path, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank CSV record."""
    with file.open(newline="", encoding=encoding) as handle:
        reader = csv.reader(handle)
        try:
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as error:
            raise DataError(
                f"{file.name}, line {reader.line_num}: not valid CSV ({error})"
            ) from None


def _from_csv(
    file: Path, label_column: str
) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    encoding = _encoding_of(file)
    records = _records(file, encoding)
    first = next(records, None)
    if first is None:
        raise DataError(f"{file.name}: the file is empty")
    header = [h.strip().lstrip("\ufeff") for h in first[1]]
    lowered = [h.lower() for h in header]
    wanted = label_column.strip().lower()
    positions = [i for i, h in enumerate(lowered) if h == wanted]
    if not positions:
        raise DataError(
            f"{file.name}: missing label column {label_column!r}; "
            f"the header has {header[:12]}{' …' if len(header) > 12 else ''}"
        )
    if len(positions) > 1:
        raise DataError(f"{file.name}: {len(positions)} columns named {label_column!r}")
    label_at = positions[0]
    if len(header) < 2:
        raise DataError(
            f"{file.name}: only the label column {header[label_at]!r}; "
            "the lab needs at least one feature column"
        )
    rows = 0
    for line, row in records:  # pass 1: count, and check every record's width
        if len(row) != len(header):
            raise DataError(
                f"{file.name}, line {line}: {len(row)} fields, the header has "
                f"{len(header)}"
            )
        rows += 1
    if rows == 0:
        raise DataError(f"{file.name}: a header and no data rows")

    features = [i for i in range(len(header)) if i != label_at]
    x = np.empty((rows, len(features)), dtype=np.float64)
    codes = np.empty(rows, dtype=np.int64)
    labels: dict[str, int] = {}
    chunk: list[list[str]] = []
    lines: list[int] = []
    filled = 0

    def flush() -> None:
        nonlocal filled
        try:
            block = np.array(chunk, dtype=np.float64)
        except ValueError:
            _locate_bad_cell(file.name, chunk, lines, [header[i] for i in features])
            raise
        x[filled : filled + len(chunk)] = block
        filled += len(chunk)
        chunk.clear()
        lines.clear()

    records = _records(file, encoding)
    next(records)  # the header
    for index, (line, row) in enumerate(records):  # pass 2: parse into x
        label = row[label_at].strip()
        if not label:
            raise DataError(f"{file.name}, line {line}: empty label")
        codes[index] = labels.setdefault(label, len(labels))
        chunk.append([row[i] for i in features])
        lines.append(line)
        if len(chunk) == CHUNK_ROWS:
            flush()
    if chunk:
        flush()
    return x, codes, list(labels), encoding


def _locate_bad_cell(
    name: str, chunk: list[list[str]], lines: list[int], columns: list[str]
) -> None:
    for row, line in zip(chunk, lines, strict=True):
        for column, cell in zip(columns, row, strict=True):
            try:
                float(cell)
            except ValueError:
                what = (
                    "empty value" if not cell.strip() else f"non-numeric value {cell!r}"
                )
                raise DataError(
                    f"{name}, line {line}, column {column!r}: {what}"
                ) from None


def _validate(
    x: np.ndarray, y: np.ndarray, name: str, names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Checks that need the whole array; ``names`` are the labels ``y`` codes for."""
    if x.ndim != 2:
        raise DataError(f"{name}: X must be 2-D (rows, features), got shape {x.shape}")
    if x.shape[1] == 0:
        raise DataError(f"{name}: X has no feature columns")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
        raise DataError(
            f"{name}: X has NaN or infinite values (first in data row {row + 1})"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: y must be 1-D with one label per row of X")
    if len(x) < MIN_ROWS:
        raise DataError(f"{name}: {len(x)} rows; the lab needs at least {MIN_ROWS}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        only = names[int(classes[0])] if names is not None else classes[0]
        raise DataError(f"{name}: a single class ({only!r}); need at least 2")
    return x, codes.astype(np.int64)


def _split(
    name: str,
    sha: str,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    *,
    standardise: bool,
    encoding: str = "n/a",
) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    notes = []
    if len(order) > MAX_ROWS:
        order = order[:MAX_ROWS]
        notes.append(f"{MAX_ROWS} of {len(x)} rows drawn at random by --seed")
    n_train = round(0.75 * len(order))
    train, val = order[:n_train], order[n_train:]
    keep = np.arange(x.shape[1])
    if standardise:
        mean, std = _column_stats(x, train)
        keep = np.nonzero(std > 0)[0]
        if len(keep) == 0:
            raise DataError(
                f"{name}: every feature is constant on the training split; "
                "there is nothing to learn from"
            )
        shift, scale = mean[keep], std[keep]
        notes.insert(0, STANDARDISATION)
        dropped = x.shape[1] - len(keep)
        if dropped:
            notes.append(f"{dropped} constant feature(s) dropped")
    else:
        shift, scale = np.zeros(x.shape[1]), np.full(x.shape[1], 16.0)
        notes.insert(0, DIGITS_SCALING)

    def features(rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), len(keep)), dtype=np.float32)
        every = len(keep) == x.shape[1]
        for start in range(0, len(rows), CHUNK_ROWS):  # chunks: no float64 copy
            part = x[rows[start : start + CHUNK_ROWS]]
            part = part if every else part[:, keep]
            part -= shift
            part /= scale
            out[start : start + len(part)] = part
        return torch.from_numpy(out)

    return Dataset(
        name=name,
        sha256=sha,
        x_train=features(train),
        y_train=torch.from_numpy(y[train].copy()),
        x_val=features(val),
        y_val=torch.from_numpy(y[val].copy()),
        preprocessing="; ".join(notes),
        rows_in_file=len(x),
        features_in_file=x.shape[1],
        encoding=encoding,
    )


def _column_stats(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation over ``rows``, in chunks, two passes."""
    total = np.zeros(x.shape[1])
    for start in range(0, len(rows), CHUNK_ROWS):
        total += x[rows[start : start + CHUNK_ROWS]].sum(axis=0)
    mean = total / len(rows)
    square = np.zeros(x.shape[1])
    for start in range(0, len(rows), CHUNK_ROWS):
        square += ((x[rows[start : start + CHUNK_ROWS]] - mean) ** 2).sum(axis=0)
    std = np.sqrt(square / len(rows))
    # A column whose spread is float rounding of a constant counts as constant.
    std[std <= 1e-12 * np.maximum(np.abs(mean), 1.0)] = 0.0
    return mean, std
