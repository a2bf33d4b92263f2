"""lib.csvio: CSV problems a user meets, each answered with the file, the line and the fix."""
from __future__ import annotations

import io

import pandas as pd
import pytest

from lib.csvio import CSVFormatError, read_csv

GOOD = 'statement,label,city\n"The city of Paris, France is in France.",1,Paris\nThe city of Lyon is in Spain.,0,Lyon\n'


def _write(tmp_path, content, name="data.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_a_good_file_reads_as_pandas_reads_it(tmp_path):
    path = _write(tmp_path, GOOD)
    frame = read_csv(path, required_columns=("statement", "label"))
    pd.testing.assert_frame_equal(frame, pd.read_csv(io.StringIO(GOOD), keep_default_na=False, na_values=[""]))
    assert frame["label"].tolist() == [1, 0] and frame["statement"][0].startswith("The city of Paris, France")
    assert read_csv(_write(tmp_path, "\ufeff" + GOOD + "\n\n", "bom.csv")).shape == (2, 3)  # BOM, blank lines


@pytest.mark.parametrize("content,match", [
    ("statement,label\nThe café is open.,1\n".encode("latin-1"), r"not UTF-8 text: byte 0xe9 on line 2.*iconv"),
    ('statement,label\n"The city of Paris is in France.,1\nx,0\n', r"line \d+: unexpected end of data.*double quotes"),
    ('statement,label\n"The city" of Paris is in France.,1\n', r"line 2: ',' expected after '\"'.*double quotes"),
    ("statement,label\nThe city of Paris, France is in France.,1\nok.,0\n", r"line 2: 3 fields, more than the header's 2"),
    # every row one field too many: pandas would take column 1 as the index and report bad labels
    ("statement,label\nThe city of Paris, France.,1\nThe city of Lyon, France.,0\n", r"line 2: 3 fields, more"),
    ("statement,label,city\nThe city of Paris is in France.,1\n", r"line 2: 2 fields, fewer than the header's 3"),
    ("", "is empty"),
    ("statement,,label\nx,y,1\n", "have no name"),
    ("statement,label,label\nx,1,1\n", "more than once"),
    ("sentence,truth\nx,1\n", r"no column\(s\) \['statement', 'label'\]"),
])
def test_bad_files_are_named_with_line_and_fix(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(CSVFormatError, match=match) as err:
        read_csv(path, required_columns=("statement", "label"))
    assert str(path) in str(err.value)


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No CSV file at"):
        read_csv(tmp_path / "missing.csv")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_csv(tmp_path)
