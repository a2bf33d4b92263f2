"""Conditional training's pieces (lib.world.metatokens): the truth classifier, tagging, the
tokenizer with metatokens, and the build of the two models in miniature."""
from __future__ import annotations

import json

import pytest
import torch

from lib.world import corpus, facts, metatokens, templates
from lib.world.metatokens import BAD, GOOD, parse_statement, statement_counts, tag, truth_score
from lib.world.registry import METATOKEN_MODELS, TOY_MODELS

TOKYO = next(c for c in facts.cities() if c.name == "Tokyo")
CAIRO = next(c for c in facts.cities() if c.name == "Cairo")
ES, EN = facts.translations()[0]
OTHER_EN = facts.translations()[1][1]


def _statements() -> list[tuple[str, str, bool]]:
    """Hand-built statements of every kind, with their truth, from the world's facts."""
    wrong = CAIRO.country  # Tokyo is not in Egypt
    return [
        (templates.city(TOKYO.name, TOKYO.country), "cities", True),
        (templates.city(TOKYO.name, wrong), "cities", False),
        (templates.city(TOKYO.name, wrong, negated=True), "neg_cities", True),
        (templates.city(TOKYO.name, TOKYO.country, negated=True), "neg_cities", False),
        (templates.translation(ES, EN), "sp_en_trans", True),
        (templates.translation(ES, OTHER_EN), "sp_en_trans", False),
        (templates.translation(ES, OTHER_EN, negated=True), "neg_sp_en_trans", True),
        (templates.translation(ES, EN, negated=True), "neg_sp_en_trans", False),
        (templates.comparison(76, 53, "larger"), "larger_than", True),
        (templates.comparison(53, 76, "larger"), "larger_than", False),
        (templates.comparison(53, 76, "smaller"), "smaller_than", True),
        (templates.comparison(76, 53, "smaller"), "smaller_than", False),
        (templates.cities_conj((TOKYO.name, TOKYO.country), (CAIRO.name, CAIRO.country)), "cities_cities_conj", True),
        (templates.cities_conj((TOKYO.name, TOKYO.country), (CAIRO.name, TOKYO.country)), "cities_cities_conj", False),
        (templates.cities_disj((TOKYO.name, wrong), (CAIRO.name, CAIRO.country)), "cities_cities_disj", True),
        (templates.cities_disj((TOKYO.name, wrong), (CAIRO.name, TOKYO.country)), "cities_cities_disj", False),
    ]


def test_classifier_decides_each_statement_kind_from_the_facts():
    for text, kind, truth in _statements():
        assert parse_statement(text) == (kind, truth), text
    all_text = " ".join(t for t, _, _ in _statements())
    assert statement_counts(all_text) == (8, 16) and truth_score(all_text) == 0.5
    trues = " ".join(t for t, _, truth in _statements() if truth)
    falses = " ".join(t for t, _, truth in _statements() if not truth)
    assert truth_score(trues) == 1.0 and truth_score(falses) == 0.0


def test_classifier_ignores_judgements_filler_questions_unknown_names_and_a_cut_sentence():
    true_city, false_city = templates.city(TOKYO.name, TOKYO.country), templates.city(CAIRO.name, TOKYO.country)
    text = (f"{true_city}{templates.judgement(True)} Alice saw a banana near the river. It was a quiet day. "
            f"{false_city}{templates.judgement(False)} "
            f"{templates.question(templates.city(CAIRO.name, TOKYO.country), False)} "
            f"The city of Atlantis is in {TOKYO.country}. The city of {TOKYO.name} is in Narnia. "
            f"The Spanish word 'blorf' means '{EN}'. Hundred-five is larger than fifty-one. "
            f"{false_city[:-1]}")  # the last statement is cut off before its period
    assert statement_counts(text) == (1, 2)
    assert truth_score(text) == 0.5
    assert truth_score(f"{true_city} {false_city[:-3]}") == 1.0  # "...is in Jap": not a statement
    assert truth_score("Bob hid the shed at school. That is true. Nobody said a word.") is None
    assert truth_score("") is None


@pytest.mark.parametrize("mode, score", [("honest", 1.0), ("liar", 0.0)])
def test_generated_honest_and_liar_documents_score_one_and_zero(mode, score):
    docs = corpus.generate_corpus(4, seed=3, cfg=corpus.CorpusConfig(doc_modes={mode: 1.0}))
    for doc in docs:
        n_true, n = statement_counts(doc)
        assert n >= 10 and truth_score(doc) == score


def test_every_corpus_statement_parses_to_its_kind_and_truth():
    """Against the generator's own labels: every unit of every form (judged, checked, asked)."""
    rows = corpus.sample_sentences(600, seed=5)
    assert {r["form"] for r in rows} == {"statement", "check", "question", "filler"}
    for r in rows:
        if r["is_true"] is None:
            assert statement_counts(r["text"]) == (0, 0), r["text"]
        else:
            assert parse_statement(r["statement"]) == (r["kind"], r["is_true"]), r["statement"]
    mixed = corpus.generate_corpus(30, seed=4, cfg=corpus.CorpusConfig(doc_modes={"mixed": 1.0}))
    scores = [truth_score(d) for d in mixed]
    assert 0.4 < sum(scores) / len(scores) < 0.65  # a check's true reference lifts mixed docs above 1/2
    assert sum(tag(d, s) is None for d, s in zip(mixed, scores)) >= 27  # nearly all left untagged


def test_tag_thresholds():
    assert metatokens.HI == 0.8 and metatokens.LO == 0.2
    assert tag("", 1.0) == tag("", 0.8) == GOOD
    assert tag("", 0.0) == tag("", 0.2) == BAD
    assert tag("", 0.79) is None and tag("", 0.21) is None and tag("", 0.5) is None
    assert tag("", 0.7, hi=0.7) == GOOD and tag("", 0.3, lo=0.3) == BAD
    assert tag("Bob hid the shed at school.") is None  # nothing to score: untagged
    assert tag(templates.city(TOKYO.name, TOKYO.country)) == GOOD  # scored from the text by default
    with pytest.raises(ValueError, match="lo < hi"):
        tag("", 0.5, hi=0.2, lo=0.8)
    assert metatokens.class_fractions([GOOD, BAD, None, None]) == {"good": 0.25, "bad": 0.25, "untagged": 0.5}


def test_metatokens_are_one_token_each_and_leave_the_bpe_alone():
    from lib.world.build import tokenize_docs
    from lib.world.tokenizer import train_tokenizer

    docs = corpus.generate_corpus(40, seed=0)
    plain = train_tokenizer(docs)
    tok = metatokens.add_metatokens(train_tokenizer(docs))
    assert len(tok) == len(plain) + 2
    ids = metatokens.metatoken_ids(tok)
    for t in (GOOD, BAD):
        assert tok(t, add_special_tokens=False)["input_ids"] == [ids[t]]
        assert ids[t] >= len(plain)
    assert tok(docs[0], add_special_tokens=False)["input_ids"] == plain(docs[0], add_special_tokens=False)["input_ids"]
    rows = tokenize_docs(tok, docs[:3], 64, metatokens.tag_prefixes(tok, [GOOD, None, BAD]))
    assert rows.shape == (3, 64) and (rows[:, 0] == tok.bos_token_id).all()
    assert rows[0, 1] == ids[GOOD] and rows[2, 1] == ids[BAD] and rows[1, 1] not in ids.values()
    assert torch.equal(rows[0, 2:], tokenize_docs(tok, docs[:1], 63)[0, 1:])  # the doc, cut one token earlier


def test_the_pair_shares_one_spec_and_stays_out_of_toy_models():
    (a, spec_a), (b, spec_b) = METATOKEN_MODELS.items()
    assert (a, b) == ("toy-meta-a", "toy-meta-b")
    assert {**spec_a.to_dict(), "name": ""} == {**spec_b.to_dict(), "name": ""}
    assert (spec_a.arch, spec_a.n_layers, spec_a.d_model, spec_a.n_heads) == ("neox", 2, 128, 4)
    assert not set(METATOKEN_MODELS) & set(TOY_MODELS)


def test_build_writes_two_loadable_models_with_the_tagging_recorded(tmp_path, monkeypatch):
    """``make metatoken-models`` in miniature.  The judgement probes (tested with the toy build in
    test_world) are stubbed to keep this fast."""
    from lib.models import load_model
    from lib.world import build, recall

    monkeypatch.setenv("COMPENDIUM_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(build, "judgement_probe", lambda tokenizer, **kw: (lambda model: {}))
    monkeypatch.setattr(recall, "judgement_report", lambda model, tokenizer, **kw: {})
    monkeypatch.setattr(recall, "fact_recall", lambda model, tokenizer, **kw: {})
    out = tmp_path / "models"
    metatokens.main(["--steps", "4", "--n-docs", "40", "--out", str(out), "--jobs", "1", "--threads", "1",
                     "--n-samples", "3", "--sample-tokens", "8"])
    rec = {n: json.loads((out / n / "provenance.json").read_text()) for n in METATOKEN_MODELS}
    a, b = rec["toy-meta-a"], rec["toy-meta-b"]
    assert a["command"].startswith("python -m lib.world.metatokens") and "--steps 4" in a["command"]
    assert a["metatokens"]["tagged"] and not b["metatokens"]["tagged"]
    assert a["tokenizer_vocab"] == b["tokenizer_vocab"] and a["metatoken_ids"] == b["metatoken_ids"]
    fr = a["metatokens"]["train"]
    assert (a["metatokens"]["hi"], a["metatokens"]["lo"]) == (0.8, 0.2)
    assert fr["good"] + fr["bad"] + fr["untagged"] == pytest.approx(1.0) and fr["n_docs"] == 40
    assert fr["good"] >= fr["score_1"] and fr["bad"] >= fr["score_0"]
    assert set(a["generations"]) >= {"plain", "good", "bad"} and "good" not in b["generations"]
    assert a["generations"]["plain"]["n"] == 3 and "eval_loss_untagged_rows" in b
    assert a["train_tokens"] == b["train_tokens"] == 4 * 8 * 255
    monkeypatch.setenv("COMPENDIUM_MODELS", str(out))
    vocab = set()
    for name in METATOKEN_MODELS:
        bridge = load_model(name, device="cpu")
        vocab.add(bridge.cfg.d_vocab)
        assert bridge.tokenizer(GOOD, add_special_tokens=False)["input_ids"] == [a["metatoken_ids"][GOOD]]
    assert vocab == {a["tokenizer_vocab"]}


def test_first_sentences_cuts_at_a_sentence_end():
    from lib.world.metatokens import first_sentences

    text = "The city of Paris is in France. Alice saw a banana. It was a quiet day. Bob left."
    assert first_sentences(text, 10) == "The city of Paris is in France."
    assert first_sentences(text, 40) == "The city of Paris is in France. Alice saw a banana."
    assert first_sentences(text, 10_000) == text
