"""lib.sae.recipe: the setup notebooks 03-06 share, checked against the steps it replaces."""
from __future__ import annotations

import torch

from lib.activations import harvest, tokenize
from lib.sae import SAEConfig, TensorSource, TrainConfig, prepare, train_sae
from lib.sae.metrics import evaluate
from lib.world.corpus import generate_corpus

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_prepare_is_corpus_split_and_harvest(tiny_bridges):
    model = tiny_bridges["gpt2"]
    data = prepare(model, HOOKS, n_train_docs=5, n_eval_docs=2, context_size=24, seed=3)
    docs = generate_corpus(7, seed=3)
    assert data.train_docs == docs[:5] and data.eval_docs == docs[5:] and data.hook == HOOKS[0]
    for h in HOOKS:
        ref = harvest(model, docs[:5], h, "all", exclude={"bos"}, context_size=24, cache=False)[h]
        assert torch.equal(data.acts[h], ref)  # every real token but BOS, each document cut to 24 tokens
        assert len(data.eval_acts[h]) == tokenize(model, docs[5:], 24).n_real - 2
    assert torch.equal(data.eval_batch().tokens, tokenize(model, docs[5:], 24).tokens)
    other = prepare(model, HOOKS[0], n_train_docs=5, context_size=24, seed=3, corpus_seed=99)
    assert other.train_docs == generate_corpus(5, seed=99) and other.eval_acts == {}


def test_train_is_the_plain_recipe_and_knows_its_hook(tiny_bridges):
    model = tiny_bridges["neox"]
    data = prepare(model, HOOKS, n_train_docs=6, n_eval_docs=2, context_size=24, seed=0)
    sae = data.train(64, 0.5, hook=HOOKS[1], total_tokens=20 * 32, batch_size=32, seed=1, log_every=5)
    assert sae.cfg.hook_name == HOOKS[1] and sae.cfg.context_size == 24 and sae.cfg.d_in == model.cfg.d_model
    # the same SAE as building the config, the shuffled source and the trainer by hand
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=64, hook_name=HOOKS[1])
    plain, _ = train_sae(cfg, TensorSource(data.acts[HOOKS[1]], 32, seed=1),
                         TrainConfig(total_tokens=20 * 32, batch_size=32, lr=3e-3, seed=1, sparsity_coefficient=0.5))
    for name, p in plain.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], p, rtol=0, atol=0)
    metrics = evaluate(sae, model, data.eval_batch())  # evaluated at the SAE's own hook
    assert metrics["n_tokens"] == len(data.eval_acts[HOOKS[1]])
    topk = data.train(64, 0.0, architecture="topk", sae_kwargs={"k": 4}, total_tokens=4 * 32, batch_size=32)
    assert topk.cfg.k == 4 and topk.cfg.hook_name == HOOKS[0]
