"""load_model on locally built GPT-2, GPT-NeoX and Llama models, and its offline error."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from lib.models import ModelNotFoundError, hook_names, load_model, resolve_model, toy_model_names


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_bridge_matches_hugging_face_forward(arch, tiny_model_dirs, tiny_bridges):
    bridge = tiny_bridges[arch]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).eval()
    tokens = bridge.to_tokens("The city of Paris is in France.", prepend_bos=True)
    with torch.no_grad():
        ours = bridge(tokens)
        ref = hf(tokens).logits
    assert ours.shape == ref.shape == (1, tokens.shape[1], hf.config.vocab_size)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_transformer_lens_hook_names(arch, tiny_bridges):
    bridge = tiny_bridges[arch]
    names = hook_names(bridge)
    for layer in range(bridge.cfg.n_layers):
        for hook in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert f"blocks.{layer}.{hook}" in names
    assert set(hook_names(bridge, layer=1)) <= set(names)
    tokens = bridge.to_tokens(["a banana", "the shed"], prepend_bos=True)
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.hook_resid_post")
    assert cache["blocks.1.hook_resid_post"].shape == (2, tokens.shape[1], bridge.cfg.d_model)


def test_unknown_name_fails_fast_and_names_toy_models():
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-model")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "no-such-model" in message and "path" in message
    for name in toy_model_names():
        assert name in message


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_toy_models_resolve_by_name():
    names = toy_model_names()
    if not names:
        pytest.skip("no toy models built (run `make models`)")
    kind, location = resolve_model(names[0])
    assert kind == "toy" and location.endswith(names[0])
