"""Hook point names: the one place they are built, parsed and checked.

TransformerLens names every activation with one string, ``blocks.{layer}.hook_{kind}`` inside the
blocks (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ...) and
``hook_embed`` / ``ln_final.hook_normalized`` outside them.  Everything in ``lib`` and in the
notebooks that names a hook goes through these functions.

>>> hook_name(1)                      # 'blocks.1.hook_resid_post'
>>> hook_name(0, "mlp_out")           # 'blocks.0.hook_mlp_out'
>>> hook_layer("blocks.3.hook_attn_out")  # 3
>>> downstream_resid_hooks(model, "blocks.1.hook_resid_post")  # ['blocks.2.hook_resid_post', 'blocks.3...']
>>> check_hooks(model, ["blocks.9.hook_resid_post"])  # KeyError naming the hook and valid ones
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def hook_name(layer: int, kind: str = "resid_post") -> str:
    """``blocks.{layer}.hook_{kind}``, e.g. ``hook_name(2, "mlp_out")``."""
    return f"blocks.{int(layer)}.hook_{kind.removeprefix('hook_')}"


def resid_hooks(model, layers: Sequence[int] | None = None, kind: str = "resid_post") -> list[str]:
    """``hook_name(l, kind)`` for each layer in ``layers`` (every block of ``model`` when None)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [hook_name(layer, kind) for layer in layers]


def residual_stream_hooks(model) -> dict[str, str]:
    """``{"embed": "blocks.0.hook_resid_pre", "0": "blocks.0.hook_resid_post", ...}``: the residual
    stream before the first block and after each block, labelled by layer."""
    hooks = {"embed": hook_name(0, "resid_pre")}
    hooks.update({str(layer): hook_name(layer) for layer in range(model.cfg.n_layers)})
    return hooks


def downstream_resid_hooks(model, hook: str) -> list[str]:
    """The residual stream after every block that runs after ``hook``: ``blocks.{k}.hook_resid_post``
    for ``k > l`` when ``hook`` is ``blocks.{l}.hook_resid_post``, and for ``k >= l`` when it is any
    other hook of block ``l`` (``resid_pre``, ``attn_out``, ...), which that block still processes."""
    layer = hook_layer(hook)
    if layer is None:
        raise ValueError(f"{hook!r} is not inside a block (blocks.{{l}}.hook_...): no downstream blocks to read")
    first = layer + 1 if hook == hook_name(layer) else layer
    return [hook_name(k) for k in range(first, model.cfg.n_layers)]


def hook_layer(hook: str) -> int | None:
    """The block index of ``blocks.{l}.…`` (None for a hook outside the blocks)."""
    m = _BLOCK.match(hook)
    return int(m.group(1)) if m else None


def hook_names(model, layer: int | None = None) -> list[str]:
    """The hook point names of ``model``, sorted (only those of block ``layer`` when given)."""
    names = sorted(getattr(model, "hook_dict", {}))
    return names if layer is None else [n for n in names if hook_layer(n) == layer]


def check_hooks(model, hooks: Sequence[str] | str) -> None:
    """Raise ``KeyError`` naming the hooks ``model`` does not have, with examples of valid names."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    known = getattr(model, "hook_dict", {})
    unknown = [h for h in hooks if h not in known]
    if unknown:
        examples = [n for n in hook_names(model, 0) if re.fullmatch(r"blocks\.0\.hook_\w+", n)][:8]
        raise KeyError(f"unknown hook point(s) {unknown}; valid names look like {examples} "
                       f"(all of them: lib.hooks.hook_names(model))")
