"""The Makefile's targets as a new user meets them (dry runs: nothing is installed or started)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _recipe(target: str, **variables) -> str:
    """The last command ``make -n target`` would run (continuation lines joined)."""
    args = ["make", "-s", "-n", target] + [f"{k}={v}" for k, v in variables.items()]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    commands = out.stdout.replace("\\\n", " ").strip().splitlines()
    return commands[-1]


def test_lab_starts_as_root_too():
    """JupyterLab refuses to run as root without --allow-root; the Makefile expects root for apt."""
    line = _recipe("lab")
    assert "jupyter lab notebooks/" in line
    shown = subprocess.run(["bash", "-c", line.replace(".venv/bin/jupyter", "echo", 1)],
                           capture_output=True, text=True, check=True).stdout
    assert ("--allow-root" in shown) == (os.geteuid() == 0)


def test_make_test_runs_notebooks_in_parallel_one_thread_each():
    line = _recipe("test", JOBS=2)
    assert "-n 2 --dist loadfile" in line and "--nbval-lax" in line
    assert "OMP_NUM_THREADS=1" in line and "COMPENDIUM_ROOT=" in line
