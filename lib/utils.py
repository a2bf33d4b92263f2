"""Small shared helpers: seeding, determinism, device choice, quiet mode for headless runs."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = True, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, make reruns on one machine identical.

    ``deterministic`` asks torch for deterministic kernels (``use_deterministic_algorithms``,
    cuDNN without autotuning, the cuBLAS workspace setting CUDA needs for it).  ``threads`` fixes
    torch's CPU threads: a reduction split over another number of threads adds in another order.
    ``make test`` runs with ``OMP_NUM_THREADS=1``, which torch reads at start-up, for the same reason.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
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


def as_names(value, what: str = "names") -> list[str]:
    """A list of names from one name or several: ``"cities"`` is one name, never ``c, i, t, ...``.

    Accepts a string or any iterable of strings; anything else raises ``TypeError`` naming ``what``.
    """
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"{what} must be a name or a list of names, got {type(value).__name__} {value!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must be strings; got {bad[:3]!r}")
    return names


def require_texts(texts, what: str = "texts") -> list[str]:
    """``texts`` as a list of strings; a single string is refused (it would be read letter by letter)."""
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of texts, got a single string; wrap it in a list: [{texts[:40]!r}]")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{what} must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts
