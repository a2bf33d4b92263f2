"""Read a CSV file with errors that name the file, the line and the fix.

``pandas.read_csv`` alone answers a non-UTF-8 file with a bare ``UnicodeDecodeError``, a badly
quoted one with a tokenizer error, and a file whose rows all carry one field more than the header
by silently taking the first column as the index (so the columns shift and the labels look
non-binary).  :func:`read_csv` checks the text first with the standard ``csv`` module (UTF-8,
quoting, the same number of fields on every row as in the header, required columns) and then
parses it with pandas exactly as ``pd.read_csv(..., keep_default_na=False, na_values=[""])``.

>>> frame = read_csv("data/datasets/cities.csv", required_columns=("statement", "label"))
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

QUOTING_HINT = ('a field holding a comma, a quote or a line break must be enclosed in double quotes, '
                'and a double quote inside such a field written twice ("")')


class CSVFormatError(ValueError):
    """A CSV file that cannot be read as a table: its message names the file, the line and the fix."""


def read_text(path: str | os.PathLike) -> str:
    """The file's text as UTF-8 (a byte-order mark is dropped); errors name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No CSV file at {path}.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the path of one .csv file.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CSVFormatError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} cannot be decoded. "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`, or choose "
            "UTF-8 when exporting from a spreadsheet)."
        ) from None


def read_csv(path: str | os.PathLike, required_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read ``path`` as a table after checking its encoding, quoting and field counts.

    Raises ``CSVFormatError`` (a ``ValueError``) naming the file, the line and what to do; an
    empty file, a header without names, a row with too many or too few fields and missing
    ``required_columns`` are errors.  Blank lines are skipped, as pandas does.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise CSVFormatError(f"{path} is empty; a CSV needs a header line naming its columns, then one row per line.")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    try:
        for row in reader:
            if not row or all(not field.strip() for field in row) and len(row) <= 1:
                continue  # a blank line
            if header is None:
                header = row
                empty = [i + 1 for i, name in enumerate(header) if not name.strip()]
                if empty:
                    raise CSVFormatError(f"{path} line {reader.line_num}: header column(s) {empty} have no name; "
                                         f"the header is {header}.")
                dupes = sorted({n for n in header if header.count(n) > 1})
                if dupes:
                    raise CSVFormatError(f"{path} line {reader.line_num}: the header names {dupes} more than once.")
                continue
            if len(row) != len(header):
                more = "more" if len(row) > len(header) else "fewer"
                raise CSVFormatError(
                    f"{path} line {reader.line_num}: {len(row)} fields, {more} than the header's {len(header)} "
                    f"({', '.join(header)}); {QUOTING_HINT}. The row reads: {row}")
    except csv.Error as err:
        raise CSVFormatError(f"{path} line {reader.line_num}: {err}; {QUOTING_HINT}.") from None
    assert header is not None
    missing = [c for c in required_columns if c not in header]
    if missing:
        raise CSVFormatError(f"{path} has no column(s) {missing}; its header is {header}.")
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""], index_col=False)
