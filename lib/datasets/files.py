"""The on-disk format of every dataset here: a Geometry of Truth-style CSV.

At least the columns ``statement`` (one sentence) and ``label`` (1 true, 0 false), plus whatever
columns the dataset keeps about itself.  Reading validates and says what is wrong and how to fix
it; writing is atomic and leaves a file alone when its content has not changed, so a rerun of a
notebook does not touch committed CSVs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib import paths
from lib.results import atomic_write_text

REQUIRED_COLUMNS: tuple[str, ...] = ("statement", "label")


class DatasetFormatError(ValueError):
    """A truth-dataset CSV that cannot be used: missing columns, bad labels, no rows."""


def write_dataset_csv(frame: pd.DataFrame, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Write ``frame`` to ``{directory}/{name}.csv`` (default ``data/datasets/``) atomically, and only
    when the content changed; return the path."""
    out = Path(directory) if directory is not None else paths.datasets_dir()
    text = frame.to_csv(index=False, lineterminator="\n")
    path = out / f"{name}.csv"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


_LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}


def validate_truth_frame(frame: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """Check a truth dataset and return it with ``label`` as int 0/1 and ``statement`` as str.

    Raises ``DatasetFormatError`` naming the file, the problem and the fix when a required column
    is missing, there are no rows, a statement is empty, or a label is not binary.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetFormatError(
            f"{source} is missing column(s) {missing}; found {list(frame.columns)}. A truth dataset "
            f"needs a header with 'statement' (the sentence) and 'label' (1 true, 0 false)."
        )
    if len(frame) == 0:
        raise DatasetFormatError(f"{source} has a header but no rows; a truth dataset needs statements.")
    frame = frame.copy()
    statements = frame["statement"]
    empty = statements.isna() | (statements.astype(str).str.strip() == "")
    if empty.any():
        rows = [int(i) + 2 for i in np.flatnonzero(empty.to_numpy())[:5]]
        raise DatasetFormatError(f"{source} has empty statements at line(s) {rows} (counting the header as 1).")
    frame["statement"] = statements.astype(str)
    words = frame["label"].astype(str).str.strip().str.lower()
    bad = ~words.isin(list(_LABEL_WORDS))
    if bad.any():
        idx = np.flatnonzero(bad.to_numpy())
        values = sorted({str(v) for v in frame["label"].iloc[idx[:20]]})
        raise DatasetFormatError(
            f"{source} has non-binary labels {values} at line(s) {[int(i) + 2 for i in idx[:5]]} "
            f"({len(idx)} rows in all); labels must be 1 (true) or 0 (false)."
        )
    frame["label"] = words.map(_LABEL_WORDS).astype(np.int64)
    return frame


def read_truth_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate one truth-dataset CSV (see :func:`validate_truth_frame`).  Encoding,
    quoting and field-count problems are reported with the file and line (:mod:`lib.csvio`)."""
    from lib.csvio import CSVFormatError, read_csv

    path = Path(path)
    try:
        frame = read_csv(path)  # columns and labels are checked below, with the dataset's own messages
    except CSVFormatError as err:
        raise DatasetFormatError(str(err)) from None
    return validate_truth_frame(frame, source=str(path))


def available_truth_datasets(directory: str | os.PathLike) -> list[str]:
    """The dataset names (file stems) of the CSVs in ``directory``, sorted."""
    return sorted(p.stem for p in Path(directory).glob("*.csv"))
