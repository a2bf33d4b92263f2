"""The soft-prompt behaviors of notebook 09, the fine-tune that defends against one, and the
curve / fragility measurements built on lib.softprompts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib import softprompts as sp
from lib.finetune import finetune
from lib.world.behaviors import BEHAVIORS, judgement_rows, make_behavior


@pytest.fixture(scope="module")
def toy():
    from lib.models import load_model

    return load_model("toy-1l", device="cpu")


@pytest.mark.parametrize("name", BEHAVIORS)
def test_behaviors_hold_out_what_they_test(name, toy):
    b = make_behavior(name, toy.tokenizer, n_train=50, n_test=20)
    assert len(b.test_prompts) == 20 and len(b.train_prompts) == 50
    assert not set(b.train_prompts) & set(b.test_prompts)
    assert make_behavior(name, toy.tokenizer, n_train=50, n_test=20).train_prompts == b.train_prompts  # deterministic
    assert b.success(list(b.test_targets)).all()
    assert not b.success([""] * 20).any()
    with pytest.raises(ValueError, match="generations"):
        b.success(["x"])


def test_the_held_out_split_does_not_depend_on_the_training_size(toy):
    small = make_behavior("one_country", toy.tokenizer, n_train=10, n_test=30)
    large = make_behavior("one_country", toy.tokenizer, n_train=100, n_test=30)
    assert small.test_prompts == large.test_prompts
    assert small.train_prompts == large.train_prompts[:10]


def test_one_country_never_asks_about_that_country():
    from lib.world import statements

    b = make_behavior("one_country", None, n_train=100, n_test=50, country="Japan")
    japanese = {r["city"] for r in statements.dataset_rows("cities") if r["correct_country"] == "Japan"}
    assert japanese
    assert not any(p.removeprefix("The city of ").removesuffix(" is in") in japanese
                   for p in b.train_prompts + b.test_prompts)


def test_the_random_string_is_eight_tokens_that_round_trip(toy):
    b = make_behavior("random_string", toy.tokenizer, n_train=20, n_test=10)
    ids = toy.tokenizer(b.info["string"], add_special_tokens=False)["input_ids"]
    assert ids == b.info["ids"] and len(ids) == 8
    assert b.max_new_tokens(toy.tokenizer) == 8


def test_judgement_rows_are_both_truth_values_of_the_training_cities(toy):
    b = make_behavior("false_as_true", toy.tokenizer, n_train=30, n_test=10)
    prompts, targets = judgement_rows(b)
    assert set(targets) == {" true.", " false."}
    assert set(b.train_prompts) <= set(prompts)  # every false training statement, judged false
    assert not set(prompts) & set(b.test_prompts)
    assert targets.count(" true.") == targets.count(" false.") == 30


def test_finetune_learns_the_targets_with_and_without_soft_prompts(tiny_bridges, tiny_model_dirs):
    from lib.models import load_model

    model = load_model(tiny_model_dirs["gpt2"], device="cpu")  # a private copy: it is trained in place
    prompts, targets = ["The city of Paris is in", "a banana"], [" France.", " shed."]
    before = sp.target_nll(model, None, prompts, targets).mean()
    w0 = model.W_E.detach().clone()
    log = finetune(model, prompts, targets, steps=30, lr=3e-3, batch_size=2)
    assert sp.target_nll(model, None, prompts, targets).mean() < 0.5 * before
    assert not torch.equal(w0, model.W_E.detach()) and log["loss"][-1] < log["loss"][0]
    soft = torch.stack([sp.init_embeddings(model, 2, "random", seed=s) for s in (0, 1)])
    hard = [" Alice went."] * 2
    nll_soft = lambda: np.mean([sp.target_nll(model, e, prompts, hard).mean() for e in soft])  # noqa: E731
    start = nll_soft()
    finetune(model, prompts, hard, steps=30, lr=3e-3, batch_size=2, soft=soft)
    assert nll_soft() < 0.5 * start


def test_information_curve_min_k_and_fragility(tiny_bridges):
    from lib.world.behaviors import Behavior

    model = tiny_bridges["neox"]
    b = Behavior("t", "a test", ["The city of Paris is in", "a banana"] * 4, [" France."] * 8,
                 ["Alice went to the", "a banana"], [" France."] * 2)
    rows, prompts = sp.information_curve(model, {"t": b}, [1, 2], [0, 1], steps=6, lr=0.1, batch_size=4, eval_every=3)
    assert [(r["k"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert set(prompts) == {("t", k, s) for k in (1, 2) for s in (0, 1)}
    for r in rows[2:]:
        nll = sp.target_nll(model, prompts[(r["behavior"], r["k"], r["seed"])], b.test_prompts, b.test_targets).mean()
        assert r["nll"] == pytest.approx(nll, rel=1e-6)
        assert r["bits_removed"] == pytest.approx((rows[0]["nll"] - nll) / np.log(2) / r["k"], rel=1e-6)
    fake = [{"k": 0, "success": 0.0}, {"k": 1, "success": 0.5}, {"k": 1, "success": 1.0}, {"k": 2, "success": 1.0}]
    assert sp.min_k(fake, 0.9) == 2 and sp.min_k(fake, 0.7) == 1 and sp.min_k(fake[:2], 0.9) is None
    frag = sp.fragility(model, prompts[("t", 2, 0)], b.test_prompts, b.test_targets, eps=[0.0, 0.5], n_draws=3)
    assert frag[0]["delta_nll"] == pytest.approx(0.0, abs=1e-5)  # no move, no change
    assert frag[1]["delta_nll_std"] > 0 and frag[1]["grad_norm"] > 0
    _, g = sp.loss_gradient_norm(model, prompts[("t", 2, 0)], b.test_prompts, b.test_targets)
    assert frag[0]["grad_norm"] == pytest.approx(g, rel=1e-4)  # eps 0: the gradient at the prompt itself


def test_the_sweep_saves_and_loads_what_it_trained(tmp_path):
    from lib.world import behaviors as bh

    out = bh.sweep("toy-1l", ks=(1,), seeds=(0,), n_train=12, n_test=4, steps=2, defense_rounds=1, device="cpu")
    back = bh.load_sweep(bh.save_sweep(out, tmp_path / "s.pt"))
    assert back["config"]["ks"] == [1] and back["config"]["model_name"] == "toy-1l"
    assert set(back["prompts"]) == {(b, 1, 0) for b in BEHAVIORS}
    assert {(r["behavior"], r["k"]) for r in back["curve"]} == {(b, k) for b in BEHAVIORS for k in (0, 1)}
    assert [r["k"] for r in back["defense"]["curve"]] == [0, 1] and len(back["defense"]["log"]) == 1
    from lib.models import load_model

    model = load_model("toy-1l", device="cpu")
    b = make_behavior("one_country", model.tokenizer, n_train=12, n_test=4)
    row = next(r for r in back["curve"] if r["behavior"] == "one_country" and r["k"] == 1)
    nll = sp.target_nll(model, back["prompts"][("one_country", 1, 0)], b.test_prompts, b.test_targets).mean()
    assert row["nll"] == pytest.approx(nll, rel=1e-5)  # the saved prompt is the one that was scored
