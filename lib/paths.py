"""Where the compendium keeps things: one place, so that notebooks, tests and the runner agree.

Every path is relative to the repository root (the folder holding ``pyproject.toml``), found from
this file, so a notebook run from ``notebooks/`` or a test run from anywhere writes to the same
``data/`` and ``figures/``.  Set ``COMPENDIUM_ROOT`` to write somewhere else (tests do, to keep a
clean checkout clean).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def root() -> Path:
    """The folder results and figures are written under (``COMPENDIUM_ROOT`` or the repo root)."""
    return Path(os.environ.get("COMPENDIUM_ROOT", REPO_ROOT))


def data_dir() -> Path:
    return root() / "data"


def results_dir() -> Path:
    return data_dir() / "results"


def figures_dir() -> Path:
    return root() / "figures"


def datasets_dir() -> Path:
    return data_dir() / "datasets"


def cache_dir() -> Path:
    """Activation caches and checkpoints: derived data, never committed (see .gitignore)."""
    return data_dir() / "cache"


def models_dir() -> Path:
    """The committed toy-world models.  Always the repository's own, whatever COMPENDIUM_ROOT says."""
    return Path(os.environ.get("COMPENDIUM_MODELS", REPO_ROOT / "data" / "models"))
