"""lib.sae.buffer: the shuffled training sources, fed by lib.activations.harvest."""
from __future__ import annotations

import pytest
import torch

import lib.sae.buffer as buffer
from lib.activations import harvest
from lib.sae.buffer import ActivationBuffer, BufferConfig, TensorSource
from tests.tiny_models import TEXT

HOOK = "blocks.0.hook_resid_post"
TEXTS = [t[: 8 + 7 * i] for i, t in enumerate(TEXT * 3)]  # twelve texts of different lengths


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order, to compare sets of activation vectors."""
    keys = x @ torch.linspace(1, 2, x.shape[1]).double().to(x.dtype)
    return x[keys.argsort()]


def counted(model, texts=TEXTS):
    """Every real token but BOS of each text, cut to 32 tokens: what the buffer serves."""
    return harvest(model, texts, HOOK, "all", exclude={"bos"}, context_size=32, cache=False)[HOOK]


def test_buffer_serves_every_counted_activation_once_shuffled(tiny_bridges):
    model = tiny_bridges["neox"]
    ref = counted(model)
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


def test_buffer_reads_through_harvest(tiny_bridges, monkeypatch):
    """The buffer has no model-running code of its own: every activation it serves was harvested."""
    model = tiny_bridges["gpt2"]
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return harvest(*args, **kwargs)

    monkeypatch.setattr(buffer, "harvest", spy)
    cfg = BufferConfig(hook_name=HOOK, context_size=32, batch_size=4, buffer_tokens=16, prompts_per_forward=5, loop=False)
    served = torch.cat(list(ActivationBuffer(model, TEXTS, cfg)))
    assert len(calls) == 3 and all(c["exclude"] == ("bos",) and c["context_size"] == 32 for c in calls)
    ref = counted(model)
    assert len(ref) - len(served) < 4
    with_bos = BufferConfig(hook_name=HOOK, context_size=32, batch_size=1, buffer_tokens=16, exclude=(), loop=False)
    assert len(list(ActivationBuffer(model, TEXTS, with_bos))) == len(ref) + len(TEXTS)
