"""Results files: JSON-clean values, rounding, atomic writes with ordinary permissions."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from lib.results import atomic_output, atomic_write_text, load_results, save_results


def test_save_results_cleans_and_rounds(isolated_root):
    path = save_results("99_test", {"a": np.float32(0.123456789), "b": torch.tensor([1.0, 2.5]),
                                    "c": float("nan"), "d": {1: np.int64(3)}, "e": np.bool_(True)}, digits=3)
    data = json.loads(path.read_text())
    assert data == {"a": 0.123, "b": [1.0, 2.5], "c": None, "d": {"1": 3}, "e": True}
    assert load_results("99_test") == data
    assert path.parent == isolated_root / "data" / "results"


def test_atomic_write_has_ordinary_permissions_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x" / "out.json"
    atomic_write_text(target, "{}")
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.json"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]
    with atomic_output(target) as tmp:  # a binary writer that wants a file name
        torch.save({"a": 1}, tmp)
    assert torch.load(target)["a"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_missing_results_say_how_to_make_them(isolated_root):
    with pytest.raises(FileNotFoundError, match="lib.run --only 42"):
        load_results("42_nothing")
