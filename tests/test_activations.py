"""Harvesting on the tiny GPT-2 / GPT-NeoX / Llama models: agreement with TransformerLens's own
cache under either padding, positions and exclusions, early stopping, the on-disk cache,
whole-batch activations, log-probabilities."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lib.activations as A
from lib.hooks import resid_hooks

TEXTS = [
    "The city of Paris is in France.",
    "a banana",
    "The Spanish word 'gato' means 'cat'.",
    "Alice",
    "Fifty-one is larger than fifty-two.",
]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"]


def reference(model, text, hooks, position=slice(None)):
    """{hook: activations of ``text`` alone at ``position``}, from TransformerLens's own cache."""
    hooks = [hooks] if isinstance(hooks, str) else hooks
    _, cache = model.run_with_cache(model.to_tokens(text, prepend_bos=True), names_filter=hooks)
    return {h: cache[h][0, position] for h in hooks}


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_harvest_matches_unbatched_run_with_cache(arch, padding_side, tiny_bridges):
    model = tiny_bridges[arch]
    last = A.harvest(model, TEXTS, HOOKS, "last", padding_side=padding_side, batch_size=2, cache=False)
    every = A.harvest(model, TEXTS, HOOKS, "all", padding_side=padding_side, batch_size=3, cache=False)
    lengths = A.tokenize(model, TEXTS, prepend_bos=True).lengths.tolist()
    assert last.text_index.tolist() == list(range(len(TEXTS)))
    assert every[HOOKS[0]].shape == (sum(lengths), model.cfg.d_model)
    assert every.token_position.tolist() == [p for n in lengths for p in range(n)]
    for i, text in enumerate(TEXTS):
        ref = reference(model, text, HOOKS)
        for hook in HOOKS:
            assert torch.allclose(last[hook][i], ref[hook][-1], atol=1e-5)
            assert torch.allclose(every[hook][every.text_index == i], ref[hook], atol=1e-5)


def test_explicit_positions_and_their_errors(tiny_bridges):
    model = tiny_bridges["neox"]
    acts = A.harvest(model, TEXTS, HOOKS[0], position=[1, -2, 0, -1, 3], cache=False)
    for i, pos in enumerate([1, -2, 0, -1, 3]):
        assert torch.allclose(acts[HOOKS[0]][i], reference(model, TEXTS[i], HOOKS[0], pos)[HOOKS[0]], atol=1e-5)
    with pytest.raises(IndexError, match="outside text 3"):
        A.harvest(model, TEXTS, HOOKS[0], position=[0, 0, 0, 50, 0], cache=False)
    with pytest.raises(ValueError, match="one int per text"):
        A.harvest(model, TEXTS, HOOKS[0], position=[0, 0], cache=False)


def test_prepend_bos_is_explicit(tiny_bridges):
    model = tiny_bridges["neox"]  # GPT-NeoX does not prepend BOS by default
    with_bos = A.tokenize(model, ["a banana"], prepend_bos=True).sequences()[0]
    without = A.tokenize(model, ["a banana"], prepend_bos=False).sequences()[0]
    assert with_bos[0] == model.tokenizer.bos_token_id and np.array_equal(with_bos[1:], without)


def test_tokenize_lengths_when_pad_is_bos(tiny_bridges):
    """GPT-2's trap: its pad token is its BOS token; lengths must still count the BOS."""
    model = tiny_bridges["gpt2"]
    tok = model.tokenizer
    old = tok.pad_token
    try:
        tok.pad_token = tok.bos_token
        ids = A.tokenize(model, TEXTS, prepend_bos=True).sequences()
    finally:
        tok.pad_token = old
    for text, row in zip(TEXTS, ids):
        assert np.array_equal(row, model.to_tokens(text, prepend_bos=True)[0].numpy())


def test_forward_stops_after_the_last_needed_hook(tiny_bridges):
    model = tiny_bridges["gpt2"]
    fired = []
    point = model.hook_dict["blocks.1.hook_resid_post"]
    point.add_hook(lambda act, hook: fired.append(1))
    try:
        A.harvest(model, TEXTS, ["blocks.0.hook_resid_post"], cache=False)
        assert fired == []
        A.harvest(model, TEXTS, ["blocks.1.hook_resid_post"], cache=False, batch_size=2)
        assert len(fired) == 3
    finally:
        point.remove_hooks()


def test_unknown_hook_is_named(tiny_bridges):
    with pytest.raises(KeyError, match=r"blocks\.7\.hook_resid_post"):
        A.harvest(tiny_bridges["gpt2"], TEXTS, ["blocks.7.hook_resid_post"], cache=False)
    assert resid_hooks(tiny_bridges["gpt2"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_disk_cache_hits_misses_and_atomic_files(tiny_bridges, tmp_path, monkeypatch):
    model = tiny_bridges["llama"]
    store = A.ActivationCache(tmp_path)
    first = A.harvest(model, TEXTS, HOOKS[:2], dataset="demo", cache=store)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(A, "_harvest_uncached", boom)
        again = A.harvest(model, TEXTS, HOOKS[:2], dataset="demo", cache=store)
        one = A.harvest(model, TEXTS, HOOKS[1], dataset="demo", cache=store)  # a subset hits too
    for h in HOOKS[:2]:
        assert torch.equal(first[h], again[h])
    assert torch.equal(one[HOOKS[1]], first[HOOKS[1]])

    # a changed dataset (one word) misses
    changed = A.harvest(model, TEXTS[:-1] + ["Fifty-one is larger than fifty-three."], HOOKS[:1],
                        dataset="demo", cache=store)
    assert not torch.equal(changed[HOOKS[0]][-1], first[HOOKS[0]][-1])

    # changed weights miss (same name, same texts)
    param = next(model.parameters())
    with torch.no_grad():
        param.add_(0.01)
    try:
        edited = A.harvest(model, TEXTS, HOOKS[:1], dataset="demo", cache=store)
    finally:
        with torch.no_grad():
            param.sub_(0.01)
    assert not torch.allclose(edited[HOOKS[0]], first[HOOKS[0]])

    # a truncated file is recomputed, not trusted
    files[0].write_bytes(b"not a tensor")
    fixed = A.harvest(model, TEXTS, HOOKS[:2], dataset="demo", cache=store)
    for h in HOOKS[:2]:
        assert torch.allclose(fixed[h], first[h])


def test_tokenize_cuts_pads_and_masks(tiny_bridges):
    model = tiny_bridges["neox"]
    tok = model.tokenizer
    batch = A.tokenize(model, ["Alice went to the shed.", "Paris"], 64)
    ids0 = tok("Alice went to the shed.", add_special_tokens=False)["input_ids"]
    ids1 = tok("Paris", add_special_tokens=False)["input_ids"]
    assert batch.tokens[0, : len(ids0) + 1].tolist() == [tok.bos_token_id] + ids0
    assert (batch.tokens[1, len(ids1) + 1:] == tok.pad_token_id).all()
    assert batch.lengths.tolist() == [len(ids0) + 1, len(ids1) + 1]
    counted = batch.counted_mask()  # neither BOS nor padding
    assert not counted[:, 0].any() and counted.sum() == len(ids0) + len(ids1)
    assert batch.counted_mask({"pad"}).sum() == len(ids0) + len(ids1) + 2
    assert batch.counted_mask(()).all()
    assert A.tokenize(model, ["Alice went to the shed."], 4).tokens.shape == (1, 4)
    assert A.tokenize(model, ["Paris"], pad_to=9).tokens.shape == (1, 9)
    with pytest.raises(TypeError, match="list of texts"):
        A.tokenize(model, "Alice")
    with pytest.raises(ValueError, match="exclude"):
        batch.counted_mask({"eos"})
    # left padding: the BOS column moves, the counted tokens do not
    left = A.pad(batch.sequences(), 2, "left")
    assert left.counted_mask().sum() == counted.sum() and not left.counted_mask()[1, -len(ids1) - 1]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_all_positions_without_bos_and_cut_to_context(tiny_bridges, padding_side):
    model = tiny_bridges["gpt2"]
    every = A.harvest(model, TEXTS, HOOKS[0], "all", cache=False)
    no_bos = A.harvest(model, TEXTS, HOOKS[0], "all", exclude={"bos", "pad"}, padding_side=padding_side,
                       batch_size=2, cache=False)
    assert torch.equal(no_bos.text_index, every.text_index[every.token_position > 0])
    assert torch.allclose(no_bos[HOOKS[0]], every[HOOKS[0]][every.token_position > 0], atol=1e-5)
    short = A.harvest(model, TEXTS, HOOKS[0], "all", exclude={"bos"}, context_size=4, cache=False)
    assert short.token_position.max() == 3 and len(short.token_position) == sum(min(n, 4) - 1 for n in
                                                                               A.tokenize(model, TEXTS).lengths.tolist())
    # one text at a time (no padding at all) gives the same activations
    alone = torch.cat([A.harvest(model, [t], HOOKS[0], "all", exclude={"bos"}, cache=False)[HOOKS[0]] for t in TEXTS])
    torch.testing.assert_close(no_bos[HOOKS[0]], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exclude"):
        A.harvest(model, TEXTS, HOOKS[0], "all", exclude={"eos"}, cache=False)


def test_batch_activations_are_the_cache_and_stop_early(tiny_bridges):
    model = tiny_bridges["llama"]
    batch = A.tokenize(model, TEXTS)
    acts = A.batch_activations(model, batch, HOOKS[:2])
    logits, with_logits = A.batch_activations(model, batch, HOOKS[0], logits=True)
    for i, text in enumerate(TEXTS):
        ref = reference(model, text, HOOKS[:2])
        n = int(batch.lengths[i])
        for h in HOOKS[:2]:
            torch.testing.assert_close(acts[h][i, :n], ref[h], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(with_logits[HOOKS[0]][i, :n], ref[HOOKS[0]], atol=1e-5, rtol=1e-5)
    assert logits.shape == (*batch.tokens.shape, model.cfg.d_vocab)
    with pytest.raises(KeyError, match="blocks.9"):
        A.batch_activations(model, batch, "blocks.9.hook_resid_post")


def test_sequence_logprobs_and_next_token_logits(tiny_bridges):
    model = tiny_bridges["neox"]
    ours = A.sequence_logprobs(model, TEXTS, batch_size=2, padding_side="left")
    mean = A.sequence_logprobs(model, TEXTS, batch_size=2, reduction="mean")
    ids = [5, 17]
    nxt = A.next_token_logits(model, TEXTS, ids, batch_size=2, padding_side="left")
    for i, text in enumerate(TEXTS):
        tokens = model.to_tokens(text, prepend_bos=True)
        with torch.no_grad():
            logits = model(tokens)
        logp = logits.log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]
        assert ours[i] == pytest.approx(logp.sum().item(), abs=1e-4)
        assert mean[i] == pytest.approx(logp.mean().item(), abs=1e-5)
        assert np.allclose(nxt[i], logits[0, -1, ids].numpy(), atol=1e-4)


def test_fingerprint_sees_every_weight_and_buffer(tiny_bridges):
    """Swapping two weights keeps every sum and most strided samples: it must still change the key."""
    model = tiny_bridges["gpt2"]
    before = A.model_fingerprint(model)
    assert A.model_fingerprint(model) == before
    name, param = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    flat = param.data.view(-1)
    i, j = 1, flat.numel() - 2  # not on a stride of the old sampler, and a swap keeps the sum
    with torch.no_grad():
        flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    try:
        assert A.model_fingerprint(model) != before, name
    finally:
        with torch.no_grad():
            flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    assert A.model_fingerprint(model) == before
    extra = torch.nn.Module()
    extra.register_buffer("table", torch.zeros(4))
    model.add_module("compendium_test_extra", extra)
    try:
        with_buffer = A.model_fingerprint(model)
        extra.table[2] = 1.0
        assert A.model_fingerprint(model) != with_buffer  # a buffer is part of the model
    finally:
        delattr(model, "compendium_test_extra")


def test_no_caching_while_hooks_are_attached(tiny_bridges, tmp_path):
    model = tiny_bridges["neox"]
    store = A.ActivationCache(tmp_path)
    clean = A.harvest(model, TEXTS, HOOKS[1], dataset="hooked", cache=store)
    model.hook_dict[HOOKS[0]].add_hook(lambda act, hook: act * 2)  # a persistent hook upstream
    try:
        with pytest.raises(RuntimeError, match="hooks attached.*cache=False"):
            A.harvest(model, TEXTS, HOOKS[1], dataset="hooked", cache=store)
        hooked = A.harvest(model, TEXTS, HOOKS[1], cache=False)
    finally:
        model.reset_hooks()
    assert not torch.allclose(hooked[HOOKS[1]], clean[HOOKS[1]])  # it would have served stale activations
    again = A.harvest(model, TEXTS, HOOKS[1], dataset="hooked", cache=store)
    assert torch.equal(again[HOOKS[1]], clean[HOOKS[1]])
