"""Soft prompts on tiny models of the real architectures: they learn, the model stays frozen, and a
prompt of real token embeddings is the same as those tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib import softprompts as sp

PROMPTS = ["The city of Paris is in", "Alice went to the", "The Spanish word 'gato' means", "a banana"]
TARGET = " shed with a banana."


@pytest.fixture(scope="module")
def toy():
    from lib.models import load_model

    return load_model("toy-1l", device="cpu")


def test_a_soft_prompt_teaches_a_trained_model_a_new_answer(toy):
    """On the smallest toy-world model: 4 soft tokens make it name one country for every city,
    also for cities it did not train on."""
    from lib.world import statements

    cities = sorted({r["city"] for r in statements.dataset_rows("cities")})
    prompts = [f"The city of {c} is in" for c in cities]
    train, held = prompts[:120], prompts[120:180]
    target = " Japan."
    plain = sp.target_nll(toy, None, held, [target] * len(held)).mean()
    result = sp.train(toy, train, [target] * len(train), k=4, steps=60, lr=0.1, eval_every=20, seed=1)
    trained = sp.target_nll(toy, result.prompt, held, [target] * len(held)).mean()
    assert trained < 0.5 * plain, (plain, trained)
    assert sp.bits_removed(plain, trained, 4) > 0.5
    said = sp.generate(toy, result.prompt, held[:20], max_new_tokens=2)
    assert np.mean([s.startswith(" Japan") for s in said]) > 0.5, said


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_a_soft_prompt_lowers_the_target_nll(arch, tiny_bridges):
    """Every architecture's embedding hook takes the soft vectors and passes their gradient (the
    random tiny models barely read their input, so the drop is small but must be there)."""
    model = tiny_bridges[arch]
    targets = [TARGET] * len(PROMPTS)
    plain = sp.target_nll(model, None, PROMPTS, targets).mean()
    result = sp.train(model, PROMPTS, targets, k=3, steps=40, lr=0.2, eval_every=10, patience=10, seed=1)
    trained = sp.target_nll(model, result.prompt, PROMPTS, targets).mean()
    assert result.prompt.embeddings.shape == (3, model.cfg.d_model)
    assert trained < plain - 0.05, (plain, trained)
    assert min(result.log["eval_loss"]) < result.log["eval_loss"][0]


def test_gradients_never_reach_the_frozen_weights(tiny_bridges):
    model = tiny_bridges["neox"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sp.train(model, PROMPTS, [TARGET] * len(PROMPTS), k=2, steps=5, eval_every=5)
    sp.loss_gradient_norm(model, sp.SoftPrompt(sp.init_embeddings(model, 2)), PROMPTS, [TARGET] * len(PROMPTS))
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == flags[n], n  # frozen() restores what it found


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_a_prompt_of_token_embeddings_is_those_tokens(arch, tiny_bridges):
    model = tiny_bridges[arch]
    words = " the shed with"
    ids = model.tokenizer(words, add_special_tokens=False)["input_ids"]
    prompt = sp.SoftPrompt(sp.token_embeddings(model, ids))
    soft = sp.target_nll(model, prompt, PROMPTS, [TARGET] * len(PROMPTS))
    as_text = sp.target_nll(model, None, [words + p for p in PROMPTS], [TARGET] * len(PROMPTS))
    # tokenizing words + prompt could merge across the boundary; check it does not here
    for p in PROMPTS:
        assert model.tokenizer(words + p, add_special_tokens=False)["input_ids"][:len(ids)] == ids
    np.testing.assert_allclose(soft, as_text, rtol=1e-5, atol=1e-5)
    # the text initialisation is the same prompt
    assert torch.equal(sp.init_embeddings(model, len(ids), "text", text=words), prompt.embeddings)
    # greedy generation agrees too
    assert sp.generate(model, prompt, PROMPTS[:2], max_new_tokens=4) == \
        sp.generate(model, None, [words + p for p in PROMPTS[:2]], max_new_tokens=4)


def test_per_row_prompts_match_one_prompt_at_a_time(tiny_bridges):
    model = tiny_bridges["gpt2"]
    a, b = (sp.init_embeddings(model, 2, "random", seed=s) for s in (0, 1))
    batch = sp.make_batch(model, PROMPTS[:2], [TARGET] * 2, 2)
    both = sp.token_nll(sp.forward(model, torch.stack([a, b]), batch), batch)
    one = [sp.token_nll(sp.forward(model, e, batch.rows([i])), batch.rows([i]))[0] for i, e in enumerate((a, b))]
    torch.testing.assert_close(both, torch.stack(one), rtol=1e-5, atol=1e-5)


def test_batch_layout_and_padding(tiny_bridges):
    model = tiny_bridges["llama"]
    b = sp.make_batch(model, ["a banana", "The city of Paris is in"], [" shed.", " France."], k=3)
    assert b.soft_start == 1 and b.k == 3
    assert (b.tokens[:, 0] == model.tokenizer.bos_token_id).all()
    for row in range(2):
        real = b.attention_mask[row]
        target = b.target_mask[row]
        assert target.any() and not (target & ~real).any()
        last = int(real.sum()) - 1
        assert target[last]  # targets end the row
    # padding and the target mask do not change a row's NLL
    alone = sp.target_nll(model, None, ["a banana"], [" shed."])
    padded = sp.target_nll(model, None, ["a banana", "The city of Paris is in"], [" shed.", " France."])
    np.testing.assert_allclose(alone, padded[:1], rtol=1e-5, atol=1e-6)


def test_init_modes_and_errors(tiny_bridges):
    model = tiny_bridges["neox"]
    W = model.W_E.detach()
    vocab = sp.init_embeddings(model, 5, "vocab", seed=3)
    assert all(any(torch.equal(v, w) for w in W) for v in vocab)
    torch.testing.assert_close(sp.init_embeddings(model, 5, "vocab", seed=3), vocab)
    rand = sp.init_embeddings(model, 400, "random", seed=0)
    assert abs(float(rand.std() / W.std()) - 1) < 0.2
    with pytest.raises(ValueError, match="k >= 1"):
        sp.init_embeddings(model, 0)
    with pytest.raises(ValueError, match="needs the text"):
        sp.init_embeddings(model, 2, "text")
    with pytest.raises(ValueError, match="k=2"):
        sp.forward(model, vocab, sp.make_batch(model, PROMPTS, None, 2))
    with pytest.raises(ValueError, match="n_ctx"):
        sp.make_batch(model, ["a " * 200], None, 4)


def test_save_load_and_perturbation(tiny_bridges, tmp_path):
    model = tiny_bridges["gpt2"]
    prompt = sp.SoftPrompt(sp.init_embeddings(model, 4, "random", seed=2), {"k": 4, "behavior": "x"})
    back = sp.SoftPrompt.load(prompt.save(tmp_path / "p.pt"))
    assert torch.equal(back.embeddings, prompt.embeddings) and back.meta == prompt.meta
    moved = prompt.perturbed(0.1, torch.Generator().manual_seed(0))
    ratio = (moved.embeddings - prompt.embeddings).norm(dim=-1) / prompt.embeddings.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full((4,), 0.1), rtol=1e-4, atol=1e-6)


def test_sampling_is_seeded_and_stops(tiny_bridges):
    model = tiny_bridges["neox"]
    prompt = sp.SoftPrompt(sp.init_embeddings(model, 2, seed=0))
    a = sp.generate(model, prompt, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    b = sp.generate(model, prompt, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5)
    assert a == b and len(a) == len(PROMPTS)
    greedy = sp.generate(model, prompt, PROMPTS, max_new_tokens=6)
    assert greedy == sp.generate(model, prompt, PROMPTS, max_new_tokens=6)
    stopped = sp.generate(model, prompt, PROMPTS, max_new_tokens=6, stop_at=greedy[0][:1])
    assert stopped[0] == greedy[0][:1]


def test_early_stopping_returns_the_best_prompt(tiny_bridges):
    model = tiny_bridges["gpt2"]
    targets = [TARGET] * len(PROMPTS)
    result = sp.train(model, PROMPTS, targets, k=2, steps=200, lr=0.1, eval_every=5, target_loss=1e9)
    assert result.stopped_early and result.steps_run == 5
    best = sp.target_nll(model, result.prompt, PROMPTS, targets).mean()
    assert best == pytest.approx(min(result.log["eval_loss"]), rel=1e-5)


def test_training_prompts_together_is_training_them_apart(tiny_bridges):
    """train_many: each prompt ends where it would alone (same seed, rows, schedule), also when
    one task stops early and leaves the batch."""
    model = tiny_bridges["neox"]
    a = sp.Task(PROMPTS, [TARGET] * 4, seed=0, name="a")
    b = sp.Task(PROMPTS[:3], [" France."] * 3, seed=7, name="b")
    opts = dict(steps=12, lr=0.1, batch_size=2, eval_every=4, patience=1)
    together = sp.train_many(model, [a, b], k=2, **opts)
    for task, joint in zip((a, b), together):
        alone = sp.train_many(model, [task], k=2, **opts)[0]
        torch.testing.assert_close(joint.prompt.embeddings, alone.prompt.embeddings, rtol=1e-4, atol=1e-5)
        assert joint.steps_run == alone.steps_run and joint.prompt.meta["task"] == task.name
        np.testing.assert_allclose(joint.log["loss"], alone.log["loss"], rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_cached_generation_is_the_bridges(arch, tiny_bridges):
    """The KV-cache path (the HF model under the bridge, soft vectors as input embeddings) says
    what rerunning the bridge says, with and without a soft prompt, for prompts of several lengths."""
    model = tiny_bridges[arch]
    prompt = sp.SoftPrompt(sp.init_embeddings(model, 3, "random", seed=4) * 20)  # large: it must steer
    for p in (None, prompt):
        fast = sp.generate(model, p, PROMPTS, max_new_tokens=5)
        slow = sp.generate(model, p, PROMPTS, max_new_tokens=5, use_cache=False)
        assert fast == slow
