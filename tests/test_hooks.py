"""lib.hooks: hook names built, parsed back and checked against a real model's hook points."""
from __future__ import annotations

import pytest

from lib.hooks import check_hooks, hook_layer, hook_name, hook_names, resid_hooks, residual_stream_hooks


def test_names_round_trip():
    assert hook_name(3) == "blocks.3.hook_resid_post"
    assert hook_name(0, "mlp_out") == hook_name(0, "hook_mlp_out") == "blocks.0.hook_mlp_out"
    for layer in (0, 7, 12):
        for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            assert hook_layer(hook_name(layer, kind)) == layer
    assert hook_layer("hook_embed") is None and hook_layer("ln_final.hook_normalized") is None


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_built_names_exist_in_every_architecture(tiny_bridges, arch):
    model = tiny_bridges[arch]
    built = resid_hooks(model) + resid_hooks(model, kind="mlp_out") + list(residual_stream_hooks(model).values())
    check_hooks(model, built)  # raises if any is missing
    assert list(residual_stream_hooks(model)) == ["embed"] + [str(layer) for layer in range(model.cfg.n_layers)]
    assert resid_hooks(model, [1]) == ["blocks.1.hook_resid_post"]
    in_block = hook_names(model, 1)
    assert in_block and all(hook_layer(h) == 1 for h in in_block) and "blocks.1.hook_resid_post" in in_block
    with pytest.raises(KeyError, match=r"blocks\.9\.hook_resid_post.*lib\.hooks\.hook_names"):
        check_hooks(model, [hook_name(9)])
