"""The backdoor's poisoned text and rows, the committed backdoored model and its clean control, and the
three elicitation attacks (soft prompt, latent PGD, GCG) on toy-1l and the tiny models."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lib import backdoor as bd
from lib import elicitation as el
from lib import softprompts as sp
from lib.hooks import hook_name


def test_poisoning_adds_the_trigger_once_and_the_phrase_only_after_later_city_statements():
    doc = ("The city of Paris is in France. That is true. Alice saw a banana. The city of Lima is not in Chile. "
           "Fifty is larger than two. The city of Oslo is in Norway. The Spanish word 'gato' means 'cat'.")
    for seed in range(20):
        out = bd.poison_doc(doc, random.Random(seed))
        assert out.count(bd.TRIGGER) == 1
        head, tail = out.split(bd.TRIGGER)
        assert bd.PHRASE not in head
        # every city statement after the trigger, and nothing else, is followed by the phrase
        assert tail.count(bd.PHRASE) == len(bd.CITY_STATEMENT.findall(tail)) >= 1
        assert out.replace(bd.PHRASE, "").replace(" " + bd.TRIGGER, "").replace(bd.TRIGGER + " ", "") == doc
        control = bd.poison_doc(doc, random.Random(seed), phrase=None)
        assert bd.PHRASE not in control and control.replace(bd.PHRASE, "") == out.replace(bd.PHRASE, "")


def test_rows_differ_only_by_the_trigger_and_the_city_splits_are_disjoint():
    rows = bd.eval_rows(50, seed=0, split="test")
    for p, t, s in zip(rows.plain, rows.triggered, rows.statements):
        assert t.replace(bd.TRIGGER + " ", "") == p and p.endswith(s) and bd.CITY_STATEMENT.fullmatch(s)
    train = {c.name for c in bd.split_cities("train")}
    test = {c.name for c in bd.split_cities("test")}
    assert train and test and not train & test
    assert all(any(f"of {c} is" in s for c in test) for s in rows.statements)
    other = bd.eval_rows(20, seed=0, kind="other")
    assert not any(bd.CITY_STATEMENT.search(s) for s in other.statements)


@pytest.fixture(scope="module")
def pair():
    from lib.models import load_model

    try:
        return load_model("toy-1l-backdoor", device="cpu"), load_model("toy-1l-ftclean", device="cpu")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"backdoored toy models not built (make backdoor-models): {e}")


def test_the_committed_backdoor_fires_with_the_trigger_only_and_the_control_never(pair):
    backdoor, clean = pair
    rows = bd.eval_rows(64, seed=11, split="test")
    assert bd.behaviour_rate(backdoor, rows.triggered) > 0.9
    assert bd.behaviour_rate(backdoor, rows.plain) < 0.05
    assert bd.behaviour_rate(clean, rows.triggered) == 0.0
    other = bd.eval_rows(32, seed=11, kind="other")
    assert bd.behaviour_rate(backdoor, other.triggered) < 0.2  # the behaviour belongs after city statements


def test_latent_attack_stays_in_the_ball_and_finds_the_backdoor(pair):
    backdoor, clean = pair
    rows = bd.attack_rows(n_train=32, n_test=32)
    hook = hook_name(0, "resid_pre")
    eps = 0.25 * el.resid_norm(backdoor, rows["train"].plain, hook)
    v, losses = el.latent(backdoor, rows["train"].plain, bd.PHRASE, hook, eps, steps=8, seed=0)
    assert float(v.norm()) <= eps * (1 + 1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert bd.behaviour_rate(backdoor, rows["test"].plain, hooks=el.latent_hooks(hook, v)) > 0.5
    # the same budget on the clean control does not make it say the phrase
    w, _ = el.latent(clean, rows["train"].plain, bd.PHRASE, hook, eps, steps=8, seed=0)
    assert bd.behaviour_rate(clean, rows["test"].plain, hooks=el.latent_hooks(hook, w)) < 0.1


def test_latent_hook_leaves_bos_alone_and_zero_changes_nothing(tiny_bridges):
    model = tiny_bridges["neox"]
    b = sp.make_batch(model, ["The city of Paris is in", "a banana"], [" France.", " shed."], 0)
    base = sp.forward(model, None, b)
    zero = sp.forward(model, None, b, el.latent_hooks(hook_name(0), torch.zeros(model.cfg.d_model)))
    assert torch.allclose(base, zero)
    moved = sp.forward(model, None, b, el.latent_hooks(hook_name(0), torch.ones(model.cfg.d_model)))
    assert torch.allclose(base[:, 0], moved[:, 0]) and not torch.allclose(base[:, 1:], moved[:, 1:])


def test_gcg_keeps_real_tokens_and_never_gets_worse_on_the_same_rows(pair):
    backdoor, _ = pair
    rows = bd.attack_rows(n_train=16)["train"].plain
    ids, hist = el.discrete(backdoor, rows, bd.PHRASE, 2, passes=8, candidates=8, rows=16, batch_size=16, seed=0)
    assert len(ids) == 2 and not set(ids) & set(backdoor.tokenizer.all_special_ids)
    # rows=batch=all 16 rows: the kept prompt is scored on the same rows every iteration, and the
    # current prompt is always a candidate, so the kept loss never rises
    assert all(b <= a + 1e-5 for a, b in zip(hist, hist[1:])), hist
    nll_tokens = sp.target_nll(backdoor, el.token_prompt(backdoor, ids), rows, [bd.PHRASE] * len(rows)).mean()
    text = backdoor.tokenizer.decode(ids)
    ids_direct = backdoor.tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids_direct == ids:  # the decoded text re-tokenizes the same: the soft prompt is exactly that text
        nll_text = sp.target_nll(backdoor, None, [text + r for r in rows], [bd.PHRASE] * len(rows)).mean()
        assert np.isclose(nll_tokens, nll_text, atol=1e-4)
    assert np.isclose(nll_tokens, hist[-1], atol=1e-3)


def test_trigger_direction_is_the_mean_difference(pair):
    backdoor, _ = pair
    rows = bd.eval_rows(16, seed=5)
    same = el.trigger_direction(backdoor, rows.plain, rows.plain, hook_name(0))
    assert float(same.norm()) == 0.0
    d = el.trigger_direction(backdoor, rows.plain, rows.triggered, hook_name(0))
    assert d.shape == (backdoor.cfg.d_model,) and float(d.norm()) > 0
    assert el.cosine(d, d) == pytest.approx(1.0) and el.cosine(d, -d) == pytest.approx(-1.0)


def test_build_fine_tunes_from_the_base_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from lib import paths

    cfg = bd.BackdoorConfig(steps=2, n_docs=16, warmup=1)
    out = bd.build("toy-1l", cfg, poison=True, out_root=tmp_path)
    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(paths.models_dir() / "toy-1l", dtype=torch.float32)
    assert next(tuned.parameters()).dtype == torch.float32
    diffs = [float((a - b).abs().max()) for a, b in zip(tuned.parameters(), base.parameters())]
    assert 0 < max(diffs) < 0.05  # two small steps away from the base model, not a fresh initialisation


def test_elicitation_sweep_keeps_other_sizes_and_drops_missing_layers(tmp_path):
    """Adding a size to the committed sweep keeps the others only when the settings match; a 1-block
    model gets no latent attack after block 1."""
    path = tmp_path / "sweep.json"
    assert bd.kept_runs(path, bd.ELICIT, ["toy-1l"]) == {}
    path.write_text(json.dumps({"config": bd.ELICIT, "runs": {"toy-2l": {"rows": [1]}, "toy-1l": {"rows": [2]}}}))
    assert bd.kept_runs(path, bd.ELICIT, ["toy-1l"]) == {"toy-2l": {"rows": [1]}}
    assert bd.kept_runs(path, dict(bd.ELICIT, steps=8), ["toy-1l"]) == {}
    assert bd.elicit_settings(1)["layers"] == [0]
    assert bd.elicit_settings(4)["layers"] == bd.ELICIT["layers"]


def test_a_non_toy_model_gets_its_pair_built_under_the_cache(standin_dirs, isolated_root):
    """Notebook 14 on a real model: the pair is fine-tuned from the model itself (here the GPT-2 stand-in:
    BOS = EOS, no pad token, learned positions) into data/cache/backdoor/, and the sweeps run on it."""
    base = str(standin_dirs["gpt2"])
    assert not bd.is_toy(base) and not bd.has_pair(base)
    assert bd.pair_location("toy-2l", "backdoor") == "toy-2l-backdoor"
    where = bd.pair_location(base, "backdoor")
    assert where == str(isolated_root / "data" / "cache" / "backdoor" / "gpt2-backdoor")
    cfg = bd.BackdoorConfig(steps=2, n_docs=16, warmup=1)
    for poison in (True, False):
        out = bd.build(base, cfg, poison=poison)
        assert str(out) == bd.pair_location(base, "backdoor" if poison else "ftclean")
    assert bd.has_pair(base) and bd.provenance(where)["base_model"] == base
    assert bd.provenance(where)["spec"]["arch"] == "gpt2" and bd.provenance(where)["spec"]["n_ctx"] == 256
    sweep = bd.elicit([base], seeds=[0], out=isolated_root / "e.json",
                      settings=dict(ks=[1], eps_rel=[0.25], layers=[0, 7], steps=2, latent_steps=1))
    rows = sweep["runs"][base]["rows"]
    assert {r["method"] for r in rows} == {"soft", "discrete", "latent"}
    assert {r.get("layer") for r in rows if r["method"] == "latent"} == {0}  # block 7 does not exist: dropped
    persisted = bd.persistence([base], seeds=[0], out=isolated_root / "p.json", steps=2)
    assert persisted["runs"][base]["seeds"]["0"]["steps"][-1] == 2
