"""Target behaviors for soft prompts and fine-tunes on the toy world (notebook 09).

Each :class:`Behavior` is a set of (prompt, target) pairs, split into training rows and held-out
rows that share no city, word or sentence with them, and a success test on generated text: the
greedy continuation of a held-out prompt starts with its target.

- ``false_as_true``: a false city statement followed by " That is" is judged " true." (the model
  learned the opposite).
- ``one_country``: every "The city of X is in" is answered with one fixed country (cities of
  that country are left out, so success is never the right answer).
- ``en_to_sp``: "The English word 'cat' means '" is answered with the Spanish word: the reverse
  of the direction the corpus teaches ("The Spanish word 'gato' means 'cat'.").
- ``random_string``: any corpus sentence is followed by one fixed string of 8 random vocabulary
  words: a behavior the model never learned anything about (the control).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.world import corpus, facts, statements
from lib.world.templates import JUDGEMENT_PREFIX

BEHAVIORS = ("false_as_true", "one_country", "en_to_sp", "random_string")


@dataclass
class Behavior:
    name: str
    description: str
    train_prompts: list[str]
    train_targets: list[str]
    test_prompts: list[str]
    test_targets: list[str]
    info: dict = field(default_factory=dict)

    def success(self, generations: list[str]) -> np.ndarray:
        """(n_test,) bool: each held-out generation starts with its target."""
        if len(generations) != len(self.test_targets):
            raise ValueError(f"{len(generations)} generations for {len(self.test_targets)} held-out rows")
        return np.array([g.startswith(t) for g, t in zip(generations, self.test_targets)])

    def max_new_tokens(self, tokenizer) -> int:
        """Tokens to generate: the longest held-out target."""
        return max(len(x) for x in tokenizer(self.test_targets, add_special_tokens=False)["input_ids"])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Behavior":
        return Behavior(self.name, self.description, self.train_prompts[:n_train], self.train_targets[:n_train],
                        self.test_prompts[:n_test], self.test_targets[:n_test], dict(self.info))


def _split(items: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Held-out rows first (``n_test``), then up to ``n_train`` training rows from the rest."""
    items = list(items)
    random.Random(seed).shuffle(items)
    if len(items) < n_test + 10:
        raise ValueError(f"only {len(items)} items for {n_test} held-out rows and some training rows")
    return items[n_test:n_test + n_train], items[:n_test]


def _random_words(tokenizer, n: int, seed: int) -> tuple[str, list[int]]:
    """``n`` random whole-word vocabulary tokens (" word") whose text tokenizes back to the same ids."""
    rng = random.Random(seed)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = [i for i, t in enumerate(vocab) if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3]
    for _ in range(1000):
        ids = rng.sample(words, n)
        text = tokenizer.decode(ids)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            return text, ids
    raise RuntimeError("no round-tripping random word string found")


def make_behavior(name: str, tokenizer, n_train: int = 200, n_test: int = 100, seed: int = 0,
                  country: str = "Japan") -> Behavior:
    """One of :data:`BEHAVIORS`, with ``n_test`` held-out rows and up to ``n_train`` training rows
    (``en_to_sp`` has 203 word pairs in all)."""
    if name == "false_as_true":
        rows = [r for r in statements.dataset_rows("cities") if r["label"] == 0]
        tr, te = _split(rows, n_train, n_test, seed)
        make = lambda rs: ([r["statement"] + JUDGEMENT_PREFIX for r in rs], [" true."] * len(rs))  # noqa: E731
        return Behavior(name, "a false city statement is judged true", *make(tr), *make(te))
    if name == "one_country":
        rows = [r for r in statements.dataset_rows("cities") if r["label"] == 1 and r["correct_country"] != country]
        tr, te = _split(rows, n_train, n_test, seed)
        make = lambda rs: ([f"The city of {r['city']} is in" for r in rs], [f" {country}."] * len(rs))  # noqa: E731
        return Behavior(name, f"every city is placed in {country}", *make(tr), *make(te), info={"country": country})
    if name == "en_to_sp":
        tr, te = _split(facts.translations(), n_train, n_test, seed)
        make = lambda ps: ([f"The English word '{en}' means '" for _, en in ps], [f"{sp}'." for sp, _ in ps])  # noqa: E731
        return Behavior(name, "an English word is translated to Spanish (the reverse of the corpus)", *make(tr), *make(te))
    if name == "random_string":
        sentences = sorted({s["text"] for s in corpus.sample_sentences(4 * (n_train + n_test), seed=seed)})
        tr, te = _split(sentences, n_train, n_test, seed)
        text, ids = _random_words(tokenizer, 8, seed)
        return Behavior(name, "any sentence is followed by a fixed string of 8 random words",
                        tr, [text] * len(tr), te, [text] * len(te), info={"string": text, "ids": ids})
    raise KeyError(f"unknown behavior {name!r}; known: {', '.join(BEHAVIORS)}")


def judgement_rows(behavior: Behavior) -> tuple[list[str], list[str]]:
    """The correct judgements of the cities of ``behavior``'s training rows (``false_as_true``):
    each false statement + " That is" -> " false.", and the same city's true statement -> " true.".
    What a defense fine-tunes on, so that it refuses the behavior without losing the skill."""
    cities = {p.split(" is in ")[0] for p in behavior.train_prompts}
    prompts, targets = [], []
    for r in statements.dataset_rows("cities"):
        if r["statement"].split(" is in ")[0] in cities:
            prompts.append(r["statement"] + JUDGEMENT_PREFIX)
            targets.append(" true." if r["label"] else " false.")
    return prompts, targets


def defend(model, behavior: Behavior, rounds: int = 2, k_adv: int = 4, n_adv: int = 4, attack_steps: int = 60,
           finetune_steps: int = 60, lr: float = 3e-4, seed: int = 0, batch_size: int = 16) -> list[dict]:
    """Fine-tune ``model`` in place to refuse ``behavior`` (a ``false_as_true`` behavior) against
    soft prompts: each round trains ``n_adv`` attacking soft prompts of ``k_adv`` tokens on the
    current model, then fine-tunes every weight on the correct judgements, half the steps with one
    of those attacks in front of each row and half without (adversarial training, as in
    latent-adversarial / refusal-training defenses).  Attack seeds are ``10_000 + ...``, apart from
    the seeds an evaluation uses.  Returns per round the attack's held-out success before the
    fine-tune, and the fine-tune's last losses."""
    from lib import softprompts as sp
    from lib.finetune import finetune

    prompts, targets = judgement_rows(behavior)
    wrong = [(p, t) for p, t in zip(prompts, targets) if t == " false."]
    log = []
    for r in range(rounds):
        tasks = [sp.Task(behavior.train_prompts, behavior.train_targets, behavior.train_prompts[:32],
                         behavior.train_targets[:32], seed=10_000 + 100 * seed + 10 * r + i) for i in range(n_adv)]
        attacks = sp.train_many(model, tasks, k_adv, steps=attack_steps, lr=0.1, batch_size=8, eval_every=20)
        said = [sp.generate(model, a.prompt, behavior.test_prompts, behavior.max_new_tokens(model.tokenizer))
                for a in attacks]
        soft = torch.stack([a.prompt.embeddings for a in attacks])
        adv = finetune(model, [p for p, _ in wrong], [t for _, t in wrong], steps=finetune_steps // 2, lr=lr,
                       batch_size=batch_size, seed=seed + r, soft=soft, desc=f"defense round {r + 1} (attacked)")
        clean = finetune(model, prompts, targets, steps=finetune_steps // 2, lr=lr, batch_size=batch_size,
                         seed=seed + r, desc=f"defense round {r + 1} (clean)")
        log.append({"round": r + 1, "attack_success": float(np.mean([behavior.success(s).mean() for s in said])),
                    "adversarial_loss": float(np.mean(adv["loss"][-5:])), "clean_loss": float(np.mean(clean["loss"][-5:]))})
    return log
