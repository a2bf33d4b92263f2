"""Adding a direction at a hook point and positions, and the judgement read-out of the causal check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.activations import tokenize
from lib.interventions import (
    add_direction_hook,
    judgement_logit_diff,
    judgement_token_ids,
    statement_end_positions,
)
from lib.hooks import hook_name
from lib.world.templates import JUDGEMENT_PREFIX

STATEMENTS = ["The city of Paris is in France.", "The Spanish word 'gato' means 'cat'.", "a banana."]


def test_hook_changes_only_the_chosen_position(tiny_bridges):
    model = tiny_bridges["gpt2"]
    tokens = model.to_tokens(["The city of Paris is in France.", "a banana"], prepend_bos=True, padding_side="right")
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(act, hook):
        seen[hook.name] = act.clone()

    cols = torch.tensor([3, 1])
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", grab)])
        base = seen.popitem()[1]
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", add_direction_hook(direction, 2.0, cols)),
                                                ("blocks.0.hook_resid_post", grab)])
        steered = seen.popitem()[1]
    delta = steered - base
    assert torch.allclose(delta[0, 3], 2.0 * direction, atol=1e-5)
    assert torch.allclose(delta[1, 1], 2.0 * direction, atol=1e-5)
    mask = torch.ones(delta.shape[:2], dtype=torch.bool)
    mask[0, 3] = mask[1, 1] = False
    assert delta[mask].abs().max() == 0
    # per-row scales and every position
    every = add_direction_hook(direction, torch.tensor([1.0, -1.0]))
    out = every(base.clone(), hook=None)
    assert torch.allclose(out[1] - base[1], -direction.expand_as(base[1]), atol=1e-5)


def test_statement_end_is_the_period(tiny_bridges):
    model = tiny_bridges["llama"]
    ends = statement_end_positions(model, STATEMENTS)
    for s, end in zip(STATEMENTS, ends):
        ids = tokenize(model, [s + JUDGEMENT_PREFIX], prepend_bos=True).sequences()[0]
        assert end == len(tokenize(model, [s], prepend_bos=True).sequences()[0]) - 1
        assert model.tokenizer.decode(ids[end]).endswith(".")
    t, f = judgement_token_ids(model)
    # the first tokens where " That is true" and " That is false" part ways (the tiny vocabulary
    # splits " false" into " f" + "alse": the first piece is what is read)
    assert t != f and " true".startswith(model.tokenizer.decode([t])) and " false".startswith(model.tokenizer.decode([f]))


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_judgement_logit_diff_matches_a_manual_run(arch, tiny_bridges):
    model = tiny_bridges[arch]
    hook = "blocks.0.hook_resid_post"
    direction = np.random.default_rng(0).normal(size=model.cfg.d_model)
    t, f = judgement_token_ids(model)
    ours0 = judgement_logit_diff(model, STATEMENTS)
    ours = judgement_logit_diff(model, STATEMENTS, hook, direction, alpha=3.0, batch_size=2)
    ends = statement_end_positions(model, STATEMENTS)
    for i, s in enumerate(STATEMENTS):
        tokens = model.to_tokens(s + JUDGEMENT_PREFIX, prepend_bos=True)

        def add(act, hook, i=i):
            act = act.clone()
            act[0, ends[i]] += 3.0 * torch.tensor(direction, dtype=act.dtype)
            return act

        with torch.no_grad():
            plain = model(tokens)[0, -1]
            steered = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])[0, -1]
        assert ours0[i] == pytest.approx((plain[t] - plain[f]).item(), abs=1e-4)
        assert ours[i] == pytest.approx((steered[t] - steered[f]).item(), abs=1e-4)
    assert not np.allclose(ours, ours0)


def test_last_layer_at_the_period_cannot_reach_the_judgement(tiny_bridges):
    """Causality: the final residual at an earlier position is read by no later position."""
    model = tiny_bridges["neox"]
    last = hook_name(model.cfg.n_layers - 1)
    direction = np.ones(model.cfg.d_model)
    base = judgement_logit_diff(model, STATEMENTS)
    assert np.allclose(judgement_logit_diff(model, STATEMENTS, last, direction, alpha=10.0), base, atol=1e-5)


def test_causal_sweep_and_nie(tiny_bridges):
    model = tiny_bridges["neox"]
    from lib.interventions import causal_sweep, normalized_indirect_effect

    labels = [1, 0, 1]
    d = model.cfg.d_model
    sweep, base = causal_sweep(model, STATEMENTS, labels, "blocks.0.hook_resid_post", {"e0": np.eye(d)[0]}, [-3.0, 0.0, 3.0])
    up = judgement_logit_diff(model, STATEMENTS, "blocks.0.hook_resid_post", np.eye(d)[0], 3.0)
    down = judgement_logit_diff(model, STATEMENTS, "blocks.0.hook_resid_post", np.eye(d)[0], -3.0)
    row = sweep.set_index("alpha").loc[3.0]
    assert row["mean_delta"] == pytest.approx((up - base).mean())
    assert row["mean_delta_false"] == pytest.approx(up[1] - base[1])
    nie = normalized_indirect_effect(sweep, base, labels, 3.0)
    gap = base[[0, 2]].mean() - base[1]
    assert nie.loc["e0", "false_to_true"] == pytest.approx((up[1] - base[1]) / gap)
    assert nie.loc["e0", "true_to_false"] == pytest.approx(-((down - base)[[0, 2]].mean()) / gap)
    assert sweep.set_index("alpha").loc[0.0, "mean_delta"] == 0


def test_answer_position_steers_the_last_token(tiny_bridges):
    """``position="answer"`` adds the vector at the prefix's last token: at the last block it moves
    the judgement by exactly the unembedding's reading of the vector (after the final norm), while
    the period at the last block moves nothing."""
    model = tiny_bridges["neox"]
    last = hook_name(model.cfg.n_layers - 1)
    direction = np.random.default_rng(1).normal(size=model.cfg.d_model)
    base = judgement_logit_diff(model, STATEMENTS)
    steered = judgement_logit_diff(model, STATEMENTS, last, direction, alpha=2.0, position="answer")
    t, f = judgement_token_ids(model)
    for i, s in enumerate(STATEMENTS):
        tokens = model.to_tokens(s + JUDGEMENT_PREFIX, prepend_bos=True)

        def add(act, hook):
            act = act.clone()
            act[0, -1] += 2.0 * torch.tensor(direction, dtype=act.dtype)
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(last, add)])[0, -1]
        assert steered[i] == pytest.approx((logits[t] - logits[f]).item(), abs=1e-4)
    assert not np.allclose(steered, base)
    with pytest.raises(ValueError, match="position must be one of"):
        judgement_logit_diff(model, STATEMENTS, last, direction, alpha=2.0, position="bos")
