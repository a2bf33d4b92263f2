"""Small shared helpers: seeding, determinism, device choice, quiet mode for headless runs."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def default_device() -> torch.device:
    """CUDA when present, else CPU (MPS is skipped: several ops used here are missing there)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet() -> bool:
    """True in headless runs (papermill, nbval, CI) where progress bars only add noise."""
    return bool(os.environ.get("COMPENDIUM_QUIET") or os.environ.get("CI"))


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that stays silent in headless runs."""
    from tqdm import tqdm  # text bars: they render in JupyterLab and terminals without ipywidgets

    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
