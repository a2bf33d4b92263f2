"""Shared fixtures.  Tests never touch the network: the hub is switched off for the whole session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COMPENDIUM_QUIET", "1")

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """``{"gpt2": path, "neox": path, "llama": path}``: tiny random HF model directories."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("gpt2", "neox", "llama")}


@pytest.fixture(scope="session")
def tiny_bridges(tiny_model_dirs) -> dict:
    """The tiny models loaded through ``lib.models.load_model`` (TransformerBridge, CPU)."""
    from lib.models import load_model

    return {arch: load_model(path, device="cpu") for arch, path in tiny_model_dirs.items()}


@pytest.fixture()
def isolated_root(tmp_path, monkeypatch):
    """Point results / figures / caches at a temporary folder for the duration of a test."""
    monkeypatch.setenv("COMPENDIUM_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def standin_dirs(tmp_path_factory) -> dict:
    """``{"gpt2": path, "neox": path, "llama": path}``: tiny random models of the real families with the
    toy world's tokenizer and each family's special tokens (``tests.tiny_models.FAMILIES``)."""
    from tests.tiny_models import FAMILIES, build_standin

    root = tmp_path_factory.mktemp("standins")
    return {family: build_standin(family, root / family) for family in FAMILIES}
