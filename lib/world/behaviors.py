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


def judgement_accuracy(model, n_test: int = 64, seed: int = 0) -> tuple[float, int]:
    """Greedy " true"/" false" accuracy on both truth values of ``false_as_true``'s held-out cities
    (no soft prompt): the skill a defense must keep.  Returns (accuracy, number of statements)."""
    from lib import softprompts as sp

    held = make_behavior("false_as_true", model.tokenizer, n_train=0, n_test=n_test, seed=seed)
    held.train_prompts = held.test_prompts  # judgement_rows reads the cities of train_prompts
    prompts, targets = judgement_rows(held)
    said = sp.generate(model, None, prompts, 2)
    return float(np.mean([s.startswith(t[:-1]) for s, t in zip(said, targets)])), len(prompts)


SWEEP_DEFAULTS = dict(model_name="toy-4l", ks=(1, 2, 4, 8, 16, 32), seeds=(0, 1, 2), n_train=200, n_test=64,
                      steps=80, lr=0.1, batch_size=8, defense_rounds=3, seed=0)


def sweep(model_name: str = "toy-4l", ks=(1, 2, 4, 8, 16, 32), seeds=(0, 1, 2), n_train: int = 200,
          n_test: int = 64, steps: int = 80, lr: float = 0.1, batch_size: int = 8, defense_rounds: int = 3,
          seed: int = 0, device=None) -> dict:
    """Notebook 09's expensive part: the information curve of every behavior x k x seed, and the
    same attack on a copy of the model defended against ``false_as_true`` (:func:`defend`).
    Returns plain data (rows, the trained prompts' vectors, the defense log) for :func:`save_sweep`."""
    from lib import softprompts as sp
    from lib.models import load_model
    from lib.utils import set_seed

    config = {"model_name": model_name, "ks": list(ks), "seeds": list(seeds), "n_train": n_train, "n_test": n_test,
              "steps": steps, "lr": lr, "batch_size": batch_size, "defense_rounds": defense_rounds, "seed": seed}
    opts = dict(steps=steps, lr=lr, batch_size=batch_size, eval_every=20, patience=3, target_loss=0.02)
    set_seed(seed, threads=1)
    model = load_model(model_name, device=device)
    behaviors = {n: make_behavior(n, model.tokenizer, n_train=n_train, n_test=n_test) for n in BEHAVIORS}
    rows, prompts = sp.information_curve(model, behaviors, ks, seeds, **opts)
    defended = load_model(model_name, device=device)
    set_seed(seed, threads=1)
    log = defend(defended, behaviors["false_as_true"], rounds=defense_rounds, seed=seed)
    d_rows, _ = sp.information_curve(defended, {"false_as_true": behaviors["false_as_true"]}, ks, seeds, **opts)
    return {"config": config, "curve": rows,
            "prompts": {f"{b}|{k}|{s}": p.embeddings.detach().cpu() for (b, k, s), p in prompts.items()},
            "defense": {"log": log, "curve": d_rows,
                        "judgement_accuracy": {"plain": judgement_accuracy(model, n_test)[0],
                                               "defended": judgement_accuracy(defended, n_test)[0]}}}


def save_sweep(result: dict, path) -> "Path":
    from pathlib import Path

    from lib.results import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(result, tmp)
    return path


def load_sweep(path) -> dict:
    """The saved sweep, with ``prompts`` as ``{(behavior, k, seed): SoftPrompt}``."""
    from lib import softprompts as sp

    blob = torch.load(path, weights_only=True)
    blob["prompts"] = {(b, int(k), int(s)): sp.SoftPrompt(e, {"k": int(k), "seed": int(s), "task": b})
                       for key, e in blob["prompts"].items() for b, k, s in [key.split("|")]}
    return blob


def main(argv=None) -> int:
    """``python -m lib.world.behaviors --out data/sweeps/09_soft_prompt_sweep.pt``: run :func:`sweep`."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="two ks, one seed, 10 steps: a smoke run")
    args = ap.parse_args(argv)
    cfg = dict(SWEEP_DEFAULTS)
    if args.quick:
        cfg.update(ks=(1, 2), seeds=(0,), steps=10, n_train=20, n_test=8, defense_rounds=1)
    t0 = time.perf_counter()
    path = save_sweep(sweep(**cfg), args.out)
    print(json.dumps({"out": str(path), "seconds": round(time.perf_counter() - t0, 1), "config": cfg}, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
