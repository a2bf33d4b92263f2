"""Save and load SAEs in SAELens's on-disk format: a folder with ``cfg.json`` + ``sae_weights.safetensors``.

The weights file holds ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``
(+ ``threshold`` for JumpReLU), the names and shapes our modules use, so a folder written here
loads with ``sae_lens.SAE.load_from_disk`` and one written by SAELens loads here.  The gated SAE
is the one whose names differ: SAELens calls the gate's bias ``b_gate`` (ours is ``b_enc``, the
paper's ``b_gate``) and has no ``b_enc``; ``r_mag`` and ``b_mag`` agree (``RENAMES``).

``cfg.json`` follows SAELens 6: ``d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, architecture`` (+ ``k`` and
``rescale_acts_by_decoder_norm`` for TopK) and ``metadata`` with ``hook_name``, ``model_name``,
``context_size``, ``prepend_bos`` and ``objective`` (the training objective: ``local``, ``e2e``
or ``e2e_ds``).  Our full :class:`SAEConfig` rides along in
``metadata["compendium_cfg"]`` so a round trip here is exact.

Loading a SAELens folder folds what our modules do not have as options into the weights, exactly:
``apply_b_dec_to_input=False`` becomes ``b_enc += b_dec @ W_enc``; TopK's
``rescale_acts_by_decoder_norm=True`` scales each latent's encoder by its decoder norm and
normalises the decoder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lib.sae.base import SAE, SAEConfig, make_sae

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the SAELens on-disk format version these files follow

# our architecture name -> SAELens's
TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
              "gated_noaux": "gated",  # the no-aux ablation differs in training only
              "batchtopk": "jumprelu"}  # at inference a BatchTopK SAE is a JumpReLU SAE with one threshold
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# per SAELens architecture: {our parameter name: SAELens's}
RENAMES = {"gated": {"b_enc": "b_gate"}}


class SAEFormatError(ValueError):
    """An SAE folder whose cfg.json or weights cannot be read (truncated, not JSON, not safetensors)."""


def sae_cfg_dict(sae: SAE) -> dict:
    """The ``cfg.json`` content for ``sae``."""
    cfg = sae.cfg
    if cfg.architecture not in TO_SAELENS:
        raise ValueError(f"No SAELens architecture for {cfg.architecture!r}; add it to lib.sae.io.TO_SAELENS")
    d = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(next(sae.parameters()).dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
        "architecture": TO_SAELENS[cfg.architecture],
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": FORMAT_VERSION,
            "hook_name": cfg.hook_name,
            "model_name": cfg.model_name,
            "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos,
            "objective": cfg.objective,  # local | e2e | e2e_ds: what its training preserved
            "written_by": "interp-compendium lib.sae.io",
            "compendium_cfg": cfg.to_dict(),
        },
    }
    if cfg.architecture == "topk":
        d["k"] = cfg.k
        d["rescale_acts_by_decoder_norm"] = False
    return d


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` to the folder ``path`` (SAELens format), atomically: a temporary sibling folder
    is filled and renamed into place, so ``path`` never holds half an SAE."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        rename = RENAMES.get(TO_SAELENS.get(sae.cfg.architecture, ""), {})
        state = {rename.get(k, k): v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILENAME))
        (tmp / CFG_FILENAME).write_text(json.dumps(sae_cfg_dict(sae), indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _config_from_saelens(d: dict) -> SAEConfig:
    meta = d.get("metadata") or {}
    if "compendium_cfg" in meta:
        return SAEConfig.from_dict(meta["compendium_cfg"])
    arch = d.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise ValueError(f"SAELens architecture {arch!r} has no counterpart here (known: {sorted(FROM_SAELENS)})")
    if d.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"This SAE expects normalize_activations={d['normalize_activations']!r}, which lib.sae does not "
            "apply at run time; fold the normalisation into the weights in SAELens first "
            "(sae.fold_activation_norm_scaling_factor) and save again."
        )
    return SAEConfig(
        d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), architecture=FROM_SAELENS[arch],
        hook_name=meta.get("hook_name") or d.get("hook_name") or "",
        model_name=meta.get("model_name") or d.get("model_name") or "",
        k=int(d.get("k", 32)),
        context_size=meta.get("context_size", d.get("context_size")),
        prepend_bos=bool(meta.get("prepend_bos", d.get("prepend_bos", True))),
        objective=meta.get("objective") if meta.get("objective") in ("local", "e2e", "e2e_ds") else "local",
        normalize_decoder=False,  # decided from the weights below
        dtype=str(d.get("dtype", "float32")).replace("torch.", ""),
    )


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by :func:`save_sae` or by SAELens (``save_model`` / ``save_inference_model``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file; an SAE is a folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME} "
                                 "(pass the folder)")
    cfg_path, w_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"{path} is not an SAE folder: it needs {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{cfg_path} is not valid JSON ({err}): the file is truncated or damaged. Save the SAE "
                             "again (lib.sae.io.save_sae or SAELens's save_model).") from err
    if not isinstance(d, dict):
        raise SAEFormatError(f"{cfg_path} holds {type(d).__name__}, not an SAE config object")
    missing_keys = [k for k in ("d_in", "d_sae") if k not in d and "compendium_cfg" not in (d.get("metadata") or {})]
    if missing_keys:
        raise SAEFormatError(f"{cfg_path} lacks {missing_keys}: it is not an SAE config")
    cfg = _config_from_saelens(d)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as err:
        raise SAEFormatError(f"{w_path} is not a readable safetensors file ({err}): it is truncated or damaged. "
                             "Save the SAE again.") from err
    rename = RENAMES.get(TO_SAELENS.get(cfg.architecture, ""), {})
    state = {next((ours for ours, theirs in rename.items() if theirs == k), k): v for k, v in state.items()}
    ours = "compendium_cfg" in (d.get("metadata") or {})
    if not ours:
        state = _fold_saelens_options(d, cfg, state)
    sae = make_sae(cfg)
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise KeyError(f"{w_path} lacks {sorted(missing)} needed by a {cfg.architecture!r} SAE")
    sae.load_state_dict({k: v for k, v in state.items() if k in sae.state_dict()})
    return sae.to(device).eval()  # inference mode (BatchTopK then uses its threshold, not the batch)


def _fold_saelens_options(d: dict, cfg: SAEConfig, state: dict) -> dict:
    state = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}
    if not d.get("apply_b_dec_to_input", True) and "b_enc" in state:
        shift = state["b_dec"] @ state["W_enc"]
        state["b_enc"] = state["b_enc"] + shift
        if "b_mag" in state and "r_mag" in state:  # the gated magnitude path reads W_enc * exp(r_mag)
            state["b_mag"] = state["b_mag"] + shift * state["r_mag"].exp()
    norms = state["W_dec"].norm(dim=-1)
    if cfg.architecture == "topk" and d.get("rescale_acts_by_decoder_norm", False):
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
        norms = torch.ones_like(norms)
    cfg.normalize_decoder = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))
    return state
