"""load_model on locally built GPT-2, GPT-NeoX and Llama models, and its offline error."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from lib.hooks import hook_names
from lib.models import ModelNotFoundError, choose_dtype, load_model, resolve_model, toy_model_names


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


def test_dtype_is_chosen_in_one_place(tiny_model_dirs):
    assert choose_dtype("toy", "cuda") == choose_dtype("hub", "cpu") == torch.float32
    assert choose_dtype("hub", "cuda") == choose_dtype("local", torch.device("cuda", 0)) == torch.bfloat16
    assert choose_dtype("toy", "cuda", "float64") == torch.float64
    assert choose_dtype("hub", "cuda", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        choose_dtype("toy", "cpu", "float99")
    assert next(load_model(tiny_model_dirs["gpt2"], device="cpu", dtype="float64").parameters()).dtype == torch.float64


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


def test_reset_models_keep_the_architecture_and_lose_the_training():
    import torch
    from transformers import AutoModelForCausalLM

    from lib.models import load_model, paths, reset_model

    trained = AutoModelForCausalLM.from_pretrained(paths.models_dir() / "toy-1l")
    named = dict(trained.named_parameters())
    tokens = torch.tensor([[0, 5, 6, 7, 8]])
    base = load_model("toy-1l", device="cpu")
    for mode in ("reinit", "shuffle"):
        bridge = reset_model("toy-1l", mode, seed=3, device="cpu")
        assert bridge.compendium_name == f"toy-1l@reset-{mode}-3"
        hf = bridge.original_model
        with torch.no_grad():  # the bridge runs the modified weights
            torch.testing.assert_close(bridge(tokens, return_type="logits"), hf(tokens).logits)
            assert (bridge(tokens, return_type="logits") - base(tokens, return_type="logits")).abs().max() > 1.0
        w_name = [n for n in named if n.endswith("dense_h_to_4h.weight")][0]
        w = [p for n, p in hf.named_parameters() if n.endswith("dense_h_to_4h._original_component.weight")
             or n.endswith("dense_h_to_4h.weight")][0]
        if mode == "shuffle":  # the same values in each row, in another order
            torch.testing.assert_close(w.sort(-1).values, named[w_name].sort(-1).values)
            assert not torch.equal(w, named[w_name])
        else:  # the architecture's initializer: std ~ initializer_range
            assert abs(float(w.detach().std()) - trained.config.initializer_range) < 0.005
    a = reset_model("toy-1l", "reinit", seed=3, device="cpu")(tokens, return_type="logits")
    b = reset_model("toy-1l", "reinit", seed=3, device="cpu")(tokens, return_type="logits")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mode"):
        reset_model("toy-1l", "zero")


def test_a_file_path_is_not_taken_for_a_hub_name(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really")
    with pytest.raises(ModelNotFoundError, match=rf"{weights} is a file, not a model directory.*{tmp_path}"):
        load_model(weights)
