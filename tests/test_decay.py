"""Notebook 10's library: the languages, the batched transformer and the decay protocol."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.toys import batched_transformer as bt
from lib.toys import decay as dc
from lib.toys import languages as lang


@pytest.fixture(scope="module")
def u():
    return lang.build_universe()


def _numeral_values(u, task):
    """token id -> digit for one B form's numerals."""
    return {tok: d for d, tok in enumerate(task.alphabet)}


def test_every_b_form_is_addition_and_translations_translate(u):
    for k in range(lang.N_FORMS):
        task = u.tasks[u.task_index(f"b{k}")]
        val = _numeral_values(u, task)
        assert task.tokens.shape == (25, lang.SEQ_LEN)
        for seq in task.tokens.tolist():
            operands = [val[t] for t in seq[:lang.PROMPT_LEN] if t in val]
            a, b = [val[t] for t in seq[lang.PROMPT_LEN:]]
            tens, units = (a, b) if lang._FORM_LAYOUTS[k][1] == "tu" else (b, a)
            assert 10 * tens + units == sum(operands)
    src, dst = u.tasks[u.task_index("b1")], u.tasks[u.task_index("b6")]
    vs, vd = _numeral_values(u, src), _numeral_values(u, dst)
    for seq in u.tasks[u.task_index("t1>6")].tokens.tolist():
        assert [vs[t] for t in seq[4:6]] == [vd[t] for t in seq[7:9]]


def test_a_languages_are_unrelated_and_deterministic(u):
    alphabets = [set(u.tasks[u.task_index(f"a{k}")].alphabet) for k in range(10)]
    forms = [set(u.tasks[u.task_index(f"b{k}")].alphabet) for k in range(10)]
    for i in range(10):  # private alphabets: no token shared between any two languages
        for j in range(10):
            if i != j:
                assert not alphabets[i] & alphabets[j] and not forms[i] & forms[j]
            assert not alphabets[i] & forms[j]
    for task in u.tasks:  # one answer per prompt
        prompts = [tuple(s[:lang.PROMPT_LEN]) for s in task.tokens.tolist()]
        assert len(set(prompts)) == len(prompts)
    copy = u.tasks[u.task_index("a2")].tokens
    assert torch.equal(copy[:, [4, 5]], copy[:, [7, 8]])  # a2 copies its two arguments
    assert lang.build_universe().tokens == u.tokens


def test_mixtures_drop_what_each_condition_says(u):
    k, p = 4, lang.partner(4)
    for cond in lang.CONDITIONS:
        for phase in ("all", "drop"):
            w = lang.mixture(u, cond, k, phase)
            assert math.isclose(float(w.sum()), 1.0)
            fam = "a" if cond == "A" else "b"
            assert (float(w[u.task_index(f"{fam}{k}")]) == 0) == (phase == "drop")
    c_drop, call_drop, d_all = (lang.mixture(u, "C", k, "drop"), lang.mixture(u, "C-all", k, "drop"),
                                lang.mixture(u, "D", k, "all"))
    assert c_drop[u.task_index(f"t{k}>0")] > 0 and call_drop[u.task_index(f"t{k}>0")] == 0
    assert call_drop[u.task_index("t0>1")] > 0
    assert d_all[u.task_index(f"t{k}>{p}")] == 0 and d_all[u.task_index(f"t{p}>{k}")] == 0
    assert d_all[u.task_index(f"t{k}>0")] > 0
    assert math.isclose(float(c_drop[[t.family == "T" for t in u.tasks]].sum()), 0.5)
    with pytest.raises(ValueError, match="unknown condition"):
        lang.mixture(u, "E", 0, "all")


def test_exact_match_needs_both_tokens_and_restricts_to_an_alphabet():
    logits = torch.zeros(3, 2, 5)
    logits[:, 0, 1] = 1  # first token: 1 for all
    logits[0, 1, 2] = 1
    logits[1, 1, 3], logits[1, 1, 2] = 1, 0.5  # token 3 wins, the answer 2 second
    logits[2, 1, 4], logits[2, 1, 2] = 2, 1  # token 4 wins, token 2 second
    answers = torch.tensor([[1, 2], [1, 2], [1, 2]])
    assert lang.exact_match(logits, answers).tolist() == [True, False, False]
    allowed = torch.tensor([True, True, True, False, False])
    assert lang.exact_match(logits, answers, allowed).tolist() == [True, True, True]


def test_stacked_models_are_independent():
    """A model trained inside a stack ends where it ends trained alone (same seed, same data)."""
    size, V, T = bt.Size(1, 8, 2), 12, 5
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(V, (3, 4, T), generator=gen)

    def train(seeds, data, wd):
        params = bt.init_params(size, V, T, seeds)
        opt = bt.AdamW(params, 1e-2, torch.tensor(wd))
        for _ in range(5):
            logits = bt.forward(params, size, data[:, :, :-1], 2)
            F.cross_entropy(logits.reshape(-1, V), data[:, :, -2:].reshape(-1), reduction="sum").backward()
            opt.step()
        return params

    stack = train([3, 7, 9], tok, [0.0, 1.0, 0.1])
    alone = train([7], tok[1:2], [1.0])
    for k in stack:
        torch.testing.assert_close(stack[k][1:2], alone[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stack["emb"][0], stack["emb"][1])


def test_weight_decay_only_shrinks_matrices():
    size = bt.Size(1, 8, 2)
    params = bt.init_params(size, 10, 4, [0, 0])
    before = {k: v.detach().clone() for k, v in params.items()}
    for v in params.values():
        v.grad = torch.zeros_like(v)
    bt.AdamW(params, 0.1, torch.tensor([0.0, 1.0])).step()
    torch.testing.assert_close(params["emb"][0], before["emb"][0])
    torch.testing.assert_close(params["emb"][1], 0.9 * before["emb"][1])
    torch.testing.assert_close(params["0.ln1_g"][1], before["0.ln1_g"][1])


def test_half_life_interpolates_and_censors():
    steps = np.array([0, 10, 20, 30])
    assert dc.half_life(steps, np.array([1.0, 0.8, 0.4, 0.0]), 1.0) == pytest.approx(17.5)
    assert math.isnan(dc.half_life(steps, np.array([1.0, 0.9, 0.8, 0.7]), 1.0))
    assert dc._steps_to(steps, np.array([0.0, 0.5, 0.95, 1.0]), 0.9) == 20


def test_error_analysis_finds_right_answers_in_another_notation(u):
    b1, b0 = u.tasks[u.task_index("b1")], u.tasks[u.task_index("b0")]
    answer = b1.tokens[:2, -2:]  # two b1 answers (tens, units)
    ones = {d: t for d, t in enumerate(b0.alphabet)}
    back = {t: d for d, t in enumerate(b1.alphabet)}
    pred = torch.tensor([[ones[back[int(t)]] for t in row] for row in answer])  # same digits in b0's numerals
    pred[1, 1] = b1.alphabet[0] if int(answer[1, 1]) != b1.alphabet[0] else b1.alphabet[1]  # mixed: not one language
    out = dc.error_analysis(u, pred, answer, u.task_index("b1"))
    assert out == {"n_wrong": 2, "wrong_in_other_language": 0.5, "right_in_other_language": 0.5}


def test_run_stack_smoke_and_statistics():
    proto = dc.PROFILES["quick"]["proto"]
    specs = dc.stack_specs((0, 1), conditions=("A", "D"), never_saw=("A",))
    run = dc.run_stack(specs, bt.Size(1, 8, 2), proto)
    assert run["acc"].shape == (6, len(dc.GROUPS), proto.pretrain_steps // proto.eval_every + proto.decay_steps // proto.eval_every + 1)
    assert run["steps"][0] == -proto.pretrain_steps and run["steps"][-1] == proto.decay_steps
    never = run["acc"][4:, 0, run["steps"] <= proto.decay_steps]
    assert never.max() <= 0.2  # never-saw models are not trained on the language before phase 3
    stats = dc.condition_stats(dc.compact(run)["summary"], proto)
    assert set(stats) == {"A", "D"} and stats["A"]["n_seeds"] == 2 and "never_saw_steps" in stats["A"]
    assert "zero_shot_at_drop" in stats["D"]


def test_grid_command_writes_and_merges_parts(tmp_path):
    import json

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "grid.json"
    dc.main(["--profile", "quick", "--only", "0", "--out", str(a)])
    b.write_text(a.read_text())
    dc.main(["--merge", str(a), str(b), "--out", str(out)])
    grid = json.loads(out.read_text())
    assert len(grid["runs"]) == 2 and grid["meta"]["profile"] == "quick"
    assert "--only 0" in grid["meta"]["command"] and "--merge" in grid["meta"]["command"]
    rows = dc.rows_of(grid["runs"])
    assert len(rows) == 2 * (3 * len(lang.CONDITIONS) + 3) and {r["weight_decay"] for r in rows} == {0.0}
