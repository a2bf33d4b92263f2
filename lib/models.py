"""Load a model as a TransformerLens ``TransformerBridge``: toy-world name, local directory, or hub name.

>>> from lib.models import load_model
>>> model = load_model("toy-2l")                      # a committed toy-world model (no download)
>>> model = load_model("path/to/hf_dir")              # any local Hugging Face causal-LM directory
>>> model = load_model("gpt2", device="cuda")         # a hub name: needs internet (or the HF cache)

All three go through ``TransformerBridge.boot_transformers``, so hook names are TransformerLens's
(``blocks.{l}.hook_resid_post``, ``blocks.{l}.hook_mlp_out``, ...) whichever model is loaded.
Toy models and hub models differ in one way that matters for positions: whether ``to_tokens``
prepends BOS by default (GPT-2 and Llama do, GPT-NeoX does not).  Code in ``lib`` always passes
``prepend_bos`` explicitly; use :func:`prepend_bos_default` to read what a model expects.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from lib import paths
from lib.utils import default_device


class ModelNotFoundError(LookupError):
    """A model name that is neither a toy model, a local directory, nor reachable on the hub."""


def toy_model_names() -> list[str]:
    """Names of the toy-world models under ``data/models/`` (each a Hugging Face directory)."""
    root = paths.models_dir()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


def toy_model_info(name: str) -> dict:
    """The provenance record (``provenance.json``) of a toy model: command, seed, steps, losses."""
    path = paths.models_dir() / name / "provenance.json"
    if not path.exists():
        raise ModelNotFoundError(f"{name!r} has no provenance.json under {path.parent}")
    return json.loads(path.read_text())


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    parsed = urlparse(constants.ENDPOINT)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return isinstance(found, str)


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Return ``(kind, location)``: kind is ``"toy"``, ``"local"`` or ``"hub"``.

    Raises ``ModelNotFoundError`` at once (no 30-second retry loop) when the name is not a toy
    model, not a directory, not in the Hugging Face cache and the hub cannot be reached.
    """
    text = str(name_or_path)
    toy_dir = paths.models_dir() / text
    if (toy_dir / "config.json").exists():
        return "toy", str(toy_dir)
    local = Path(text).expanduser()
    if local.is_file():
        raise ModelNotFoundError(
            f"{local} is a file, not a model directory: pass the folder that holds its config.json, weights "
            f"and tokenizer (here probably {local.parent})."
        )
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(
                f"{local} is a directory but has no config.json: it is not a Hugging Face model "
                "directory (save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))."
            )
        return "local", str(local)
    if _in_hf_cache(text) or _hub_reachable():
        return "hub", text
    toys = ", ".join(toy_model_names()) or "(none built yet: run `make models`)"
    raise ModelNotFoundError(
        f"Model {text!r} is not a toy-world model, not a local directory, and the Hugging Face hub "
        f"cannot be reached (offline) nor is it in the local HF cache.\n"
        f"  Toy models available offline: {toys}\n"
        f"  To use your own weights, pass the path of a Hugging Face model directory "
        f"(config.json + weights + tokenizer), e.g. load_model('/data/llama-2-13b-hf')."
    )


def choose_dtype(kind: str, device: str | torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype a model is loaded in: ``dtype`` when given (a ``torch.dtype`` or its name, e.g.
    ``"bfloat16"``), else float32 for the toy models and on the CPU, bfloat16 for any other model
    on a GPU (a 7B+ model in float32 would not fit, and bfloat16 is what it was trained in)."""
    if dtype is not None:
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype name such as 'float32' or 'bfloat16'")
            return getattr(torch, dtype)
        return dtype
    return torch.bfloat16 if kind != "toy" and torch.device(device).type == "cuda" else torch.float32


def _boot(location: str, device, dtype: torch.dtype, name: str, kind: str, hf_model=None):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars add nothing for models this size
    extra = {} if hf_model is None else {"hf_model": hf_model}
    bridge = TransformerBridge.boot_transformers(location, device=device, dtype=dtype, **extra)
    bridge.eval()
    bridge.compendium_name = name  # the name the user asked for (cache keys use it)
    bridge.compendium_kind = kind
    return bridge


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load ``name_or_path`` as a ``TransformerBridge`` in eval mode.

    Args:
        name_or_path: a toy model name (``toy_model_names()``), a local HF directory, or a hub name.
        device: defaults to CUDA when available, else CPU (:func:`lib.utils.default_device`).
        dtype: defaults to :func:`choose_dtype`'s rule: float32, except bfloat16 for a non-toy
            model on a GPU.  The only place a notebook's model dtype is decided.
    """
    kind, location = resolve_model(name_or_path)
    device = device or default_device()
    return _boot(location, device, choose_dtype(kind, device, dtype), str(name_or_path), kind)


def prepend_bos_default(model) -> bool:
    """Whether ``model.to_tokens`` prepends BOS unless told otherwise."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


RESET_MODES = ("reinit", "shuffle")


def reset_model(name_or_path: str | os.PathLike, mode: str = "reinit", seed: int = 0,
                device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
    """The same architecture (and tokenizer) as ``name_or_path`` with its training destroyed: the
    "reset network" control of the XOR experiments.

    - ``"reinit"``: a fresh initialisation, the architecture's own Hugging Face initializer
      seeded with ``seed``.
    - ``"shuffle"``: the trained weights, each tensor permuted along its last dimension (one
      random permutation per tensor).  Every weight keeps its values, so its scale and
      distribution stay those of training; what training put where is gone.  This is what the
      public XOR-probing code calls a reset network.

    Returns a ``TransformerBridge`` like :func:`load_model`, with ``compendium_name``
    ``"{name}@reset-{mode}-{seed}"``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if mode not in RESET_MODES:
        raise ValueError(f"mode must be one of {RESET_MODES}, got {mode!r}")
    kind, location = resolve_model(name_or_path)
    device = device or default_device()
    dtype = choose_dtype(kind, device, dtype)
    if mode == "reinit":
        config = AutoConfig.from_pretrained(location)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hf.parameters():  # tied tensors appear once, so they stay tied
                perm = torch.randperm(p.shape[-1], generator=gen)
                p.copy_(p[..., perm].clone())
    hf.eval()
    return _boot(location, device, dtype, f"{name_or_path}@reset-{mode}-{seed}", kind, hf_model=hf)
