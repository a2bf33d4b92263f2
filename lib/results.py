"""Key numbers of each notebook, written to ``data/results/NN_name.json``.

The README's results table and the tests read these files, so they are plain JSON with floats
rounded to a stated number of digits (stable diffs, no spurious precision).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lib import paths


def _clean(obj: Any, digits: int) -> Any:
    """Make ``obj`` JSON-serialisable: numpy / torch scalars to Python, floats rounded, NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, digits) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays, torch tensors
        return _clean(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return None if math.isnan(x) or math.isinf(x) else round(x, digits)
    return obj


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds,
    deleted when it fails, so ``path`` is never half-written.  For writers that want a file name:

    >>> with atomic_output(path) as tmp:
    ...     torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def save_results(name: str, results: dict, digits: int = 6) -> Path:
    """Write ``results`` to ``data/results/{name}.json`` (e.g. ``name="00_toy_world"``)."""
    path = paths.results_dir() / f"{name}.json"
    atomic_write_text(path, json.dumps(_clean(results, digits), indent=2, sort_keys=False) + "\n")
    return path


def load_results(name: str) -> dict:
    path = paths.results_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"No results at {path}. Run the notebook first: python -m lib.run --only {name[:2]}"
        )
    return json.loads(path.read_text())
