"""lib.sae.buffer: tokenisation, which positions count, streaming and cached activation sources."""
from __future__ import annotations

import pytest
import torch

from lib.sae.buffer import (
    ActivationBuffer,
    BufferConfig,
    TensorSource,
    harvest_activations,
    load_activations,
    save_activations,
    tokenize,
)
from tests.tiny_models import TEXT

HOOK = "blocks.0.hook_resid_post"
TEXTS = [t[: 8 + 7 * i] for i, t in enumerate(TEXT * 3)]  # twelve texts of different lengths


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order, to compare sets of activation vectors."""
    keys = x @ torch.linspace(1, 2, x.shape[1]).double().to(x.dtype)
    return x[keys.argsort()]


def test_tokenize_prepends_bos_pads_right_and_masks(tiny_bridges):
    model = tiny_bridges["neox"]
    tok = model.tokenizer
    batch = tokenize(model, ["Alice went to the shed.", "Paris"], context_size=64)
    ids0 = tok("Alice went to the shed.", add_special_tokens=False)["input_ids"]
    ids1 = tok("Paris", add_special_tokens=False)["input_ids"]
    assert batch.tokens[0, : len(ids0) + 1].tolist() == [tok.bos_token_id] + ids0
    assert batch.tokens[1, : len(ids1) + 1].tolist() == [tok.bos_token_id] + ids1
    assert (batch.tokens[1, len(ids1) + 1:] == tok.pad_token_id).all()
    assert batch.attention_mask.sum(1).tolist() == [len(ids0) + 1, len(ids1) + 1]
    counted = batch.counted_mask()
    assert not counted[:, 0].any() and counted.sum() == len(ids0) + len(ids1)
    assert batch.counted_mask(exclude_bos=False).sum() == len(ids0) + len(ids1) + 2
    short = tokenize(model, ["Alice went to the shed."], context_size=4)
    assert short.tokens.shape == (1, 4)
    with pytest.raises(TypeError, match="list of texts"):
        tokenize(model, "Alice", context_size=8)


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_harvest_excludes_pad_and_bos(tiny_bridges, arch):
    model = tiny_bridges[arch]
    acts = harvest_activations(model, TEXTS, [HOOK], context_size=32, prompts_per_forward=5)[HOOK]
    batch = tokenize(model, TEXTS, 32)
    assert len(acts) == batch.n_real - len(TEXTS)  # every real token but the BOS of each text
    with_bos = harvest_activations(model, TEXTS, HOOK, context_size=32, exclude_bos=False)[HOOK]
    assert len(with_bos) == len(acts) + len(TEXTS)
    # one text at a time (no padding at all) gives the same activations
    alone = torch.cat([harvest_activations(model, [t], HOOK, context_size=32)[HOOK] for t in TEXTS])
    torch.testing.assert_close(acts, alone, atol=1e-5, rtol=1e-5)


def test_buffer_serves_every_counted_activation_once_shuffled(tiny_bridges):
    model = tiny_bridges["neox"]
    ref = harvest_activations(model, TEXTS, HOOK, context_size=32)[HOOK]
    cfg = BufferConfig(hook_name=HOOK, context_size=32, batch_size=16, buffer_tokens=64,
                       prompts_per_forward=3, loop=False, seed=1)
    served = torch.cat(list(ActivationBuffer(model, TEXTS, cfg)))
    assert len(served) == (len(ref) // 16) * 16 and len(ref) - len(served) < 16
    assert not torch.equal(served, ref[: len(served)])  # shuffled
    # batch size 1 serves them all: the same multiset of rows as the reference
    cfg1 = BufferConfig(hook_name=HOOK, context_size=32, batch_size=1, buffer_tokens=64,
                        prompts_per_forward=3, loop=False, seed=1)
    every = torch.cat(list(ActivationBuffer(model, TEXTS, cfg1)))
    torch.testing.assert_close(_sorted_rows(every), _sorted_rows(ref), atol=1e-4, rtol=1e-4)


def test_buffer_is_deterministic_and_resumes(tiny_bridges):
    model = tiny_bridges["neox"]
    cfg = BufferConfig(hook_name=HOOK, context_size=32, batch_size=8, buffer_tokens=32, prompts_per_forward=4, seed=3)
    a = ActivationBuffer(model, TEXTS, cfg)
    first = [next(a) for _ in range(12)]
    b = ActivationBuffer(model, TEXTS, cfg)
    b.load_state_dict({"n_served": 7})
    for i in range(7, 12):
        torch.testing.assert_close(next(b), first[i])
    with pytest.raises(ValueError, match="buffer_tokens"):
        ActivationBuffer(model, TEXTS, BufferConfig(hook_name=HOOK, batch_size=64, buffer_tokens=64))


def test_tensor_source_epochs_and_resume():
    acts = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    src = TensorSource(acts, batch_size=5, seed=0)
    epoch = torch.cat([next(src) for _ in range(4)])
    torch.testing.assert_close(_sorted_rows(epoch), acts)
    batches = [next(src) for _ in range(6)]
    other = TensorSource(acts, batch_size=5, seed=0)
    other.load_state_dict({"epoch": 1, "pos": 10})
    for want in batches[2:]:
        torch.testing.assert_close(next(other), want)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TensorSource(acts, batch_size=50)


def test_activation_cache_round_trip(tmp_path):
    acts = {HOOK: torch.randn(30, 4), "blocks.1.hook_mlp_out": torch.randn(30, 4)}
    path = save_activations(tmp_path / "acts.safetensors", acts, metadata={"model": "tiny"})
    back = load_activations(path)
    for k in acts:
        torch.testing.assert_close(back[k], acts[k])
    assert list(load_activations(path, [HOOK])) == [HOOK]
    assert [p.name for p in tmp_path.iterdir()] == ["acts.safetensors"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="harvest_activations"):
        load_activations(tmp_path / "missing.safetensors")


def test_a_truncated_activation_file_is_named(tmp_path):
    path = save_activations(tmp_path / "acts.safetensors", {HOOK: torch.randn(30, 4)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="acts.safetensors is not a readable safetensors file"):
        load_activations(path)


def test_sources_fingerprint_what_they_serve(tiny_bridges):
    acts = torch.randn(20, 3)
    fp = TensorSource(acts, 5, seed=0).fingerprint()
    assert fp == TensorSource(acts.clone(), 5, seed=0).fingerprint()
    swapped = acts.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    for other in (TensorSource(swapped, 5), TensorSource(acts, 4), TensorSource(acts, 5, seed=1),
                  TensorSource(acts, 5, scale=2.0)):
        assert other.fingerprint() != fp
    model = tiny_bridges["neox"]
    cfg = BufferConfig(hook_name=HOOK, context_size=32, batch_size=8, buffer_tokens=32)
    fp = ActivationBuffer(model, TEXTS, cfg).fingerprint()
    assert ActivationBuffer(model, list(TEXTS), cfg).fingerprint() == fp
    assert ActivationBuffer(model, TEXTS[:-1], cfg).fingerprint() != fp
    assert ActivationBuffer(model, TEXTS, BufferConfig(hook_name=HOOK, context_size=16, batch_size=8,
                                                       buffer_tokens=32)).fingerprint() != fp
