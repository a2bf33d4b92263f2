"""Synthetic sequence "languages" for out-of-distribution capability decay (notebook 10).

Every example is a fixed-length token sequence: a prompt left-padded to ``PROMPT_LEN`` tokens and
an answer span of ``ANSWER_LEN`` = 2 tokens; a model is scored by exact match of the answer span
(both tokens right, which for greedy decoding equals the teacher-forced argmax being right at both
positions).  Every task has 100 examples, one per argument pair ``(x, y)`` with ``x, y`` in 0..9,
so the languages of conditions A and B are matched in size and format:

- **A** (``a0`` .. ``a9``): ten unrelated two-argument languages, each with its own private
  alphabet of ten symbols and its own operator tokens: ``f(x) = 2x + 1`` applied to both
  arguments, the successor in a repeated nonsense phrase ("brink bronk poot toot ..."), copy,
  reverse, sort, product, difference, a fixed random table, residues mod 3, double-and-square.
  No two share a token, a rule or a layout.
- **B** (``b0`` .. ``b9``): ten surface forms of one task, small-integer addition ``x + y``
  answered as (tens, units): digits, English, Spanish, German, French, Roman, letters, Greek,
  nonsense syllables, Cyrillic, in infix ("3 + 4 ="), word ("three plus four equals"), prefix
  ("add ( 3 , 4 ) ->") and postfix layouts; three forms answer units first ("digits reversed").
  Every form has private numeral and operator tokens, so what the forms share is the underlying
  function, not tokens.
- **translations** (``t{i}>{j}``): the operands of form ``i`` written in form ``j``
  (``three four <to-b0>`` -> ``3 4``), for conditions C and D.

``Universe`` holds every task of every condition over one shared vocabulary, so models of all
conditions can be trained side by side with identical initialisations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PROMPT_LEN = 7
ANSWER_LEN = 2
SEQ_LEN = PROMPT_LEN + ANSWER_LEN
N_FORMS = 10
PAD = "<pad>"

_PHRASE = ["brink", "bronk", "poot", "toot", "zib", "wug", "flim", "dax", "blick", "toma"]
_NUMERALS = [
    [str(i) for i in range(10)],
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
    ["null", "eins", "zwei", "drei", "vier", "funf", "sechs", "sieben", "acht", "neun"],
    ["zero_fr", "un", "deux", "trois", "quatre", "cinq", "six_fr", "sept", "huit", "neuf"],
    ["nulla", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"],
    list("abcdefghij"),
    ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"],
    ["ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "vu", "xe"],
    ["nol", "odin", "dva", "tri", "chetyre", "pyat", "shest", "sem", "vosem", "devyat"],
]
# layout of each addition form: operator words around the operands, and the answer order
_FORM_LAYOUTS = [
    (["{x}", "+", "{y}", "="], "tu"),
    (["{x}", "plus", "{y}", "equals"], "tu"),
    (["{x}", "mas", "{y}", "es"], "ut"),
    (["add", "(", "{x}", ",", "{y}", ")->"], "tu"),
    (["{x}", "{y}", "plus_fr", "="], "tu"),
    (["sum", "of", "{x}", "and", "{y}", "is"], "ut"),
    (["{x}", "&", "{y}", "->"], "tu"),
    (["{x}", "with", "{y}", "makes"], "tu"),
    (["{x}", "{y}", "sum", "?"], "ut"),
    (["{x}", "i", "{y}", "budet"], "tu"),
]


def _a_rule(k: int, x: int, y: int, table: np.ndarray) -> tuple[int, int]:
    if k == 0:
        return (2 * x + 1) % 10, (2 * y + 1) % 10  # f(x) = 2x + 1, mod 10
    if k == 1:
        return (x + 1) % 10, (y + 1) % 10  # successor in the repeated phrase
    if k == 2:
        return x, y  # copy
    if k == 3:
        return y, x  # reverse
    if k == 4:
        return min(x, y), max(x, y)  # sort
    if k == 5:
        return (x * y) // 10, (x * y) % 10  # product
    if k == 6:
        return abs(x - y), int(x > y)  # difference and which is larger
    if k == 7:
        return int(table[x, y, 0]), int(table[x, y, 1])  # a fixed random table
    if k == 8:
        return x % 3, y % 3  # residues mod 3
    return (2 * x) % 10, (y * y) % 10  # double and square
A_NAMES = ["affine 2x+1", "phrase successor", "copy", "reverse", "sort", "product", "difference",
           "random table", "mod 3", "double & square"]


@dataclass
class Task:
    """One language: its examples ``tokens`` [100, SEQ_LEN] (prompt left-padded, answer last) and the
    ids of the tokens its answers are written in (``alphabet``: for scoring restricted to them)."""
    name: str
    family: str  # "A", "B" or "T" (translation)
    tokens: torch.Tensor
    alphabet: list[int]
    source: int | None = None  # translations: form i of "t{i}>{j}"
    target: int | None = None


@dataclass
class Universe:
    """Every task of every condition over one vocabulary (``tokens[i]`` is the string of id ``i``)."""
    tokens: list[str] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)

    def id(self, token: str) -> int:
        if token not in self._index:
            self._index[token] = len(self.tokens)
            self.tokens.append(token)
        return self._index[token]

    def __post_init__(self):
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise KeyError(f"no task {name!r}; tasks are a0..a9, b0..b9 and t{{i}}>{{j}}")

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in ids if self.tokens[int(i)] != PAD)


def _sequence(u: Universe, prompt: list[str], answer: list[str]) -> list[int]:
    if len(prompt) > PROMPT_LEN or len(answer) != ANSWER_LEN:
        raise ValueError(f"prompt {prompt} longer than {PROMPT_LEN} or answer {answer} not {ANSWER_LEN} tokens")
    return [u.id(PAD)] * (PROMPT_LEN - len(prompt)) + [u.id(t) for t in prompt + answer]


def build_universe(n_values: int = 5, table_seed: int = 1234) -> Universe:
    """The ten A languages, the ten B forms and the 90 ordered translation pairs between B forms.

    Deterministic: ``table_seed`` fixes only the random table of language ``a7``.
    """
    u = Universe()
    u.id(PAD)
    table = np.random.default_rng(table_seed).integers(0, 10, size=(10, 10, 2))
    if not 2 <= n_values <= 10:
        raise ValueError(f"n_values must be in 2..10, got {n_values}")
    lo = (11 - n_values) // 2  # operands lo..lo+n-1: 3..7 for n = 5, so sums cross ten (both answer tokens vary)
    pairs = [(x, y) for x in range(lo, lo + n_values) for y in range(lo, lo + n_values)]
    for k in range(10):
        sym = [_PHRASE[i] if k == 1 else f"a{k}:{i}" for i in range(10)]
        seqs = []
        for x, y in pairs:
            p, q = _a_rule(k, x, y, table)
            seqs.append(_sequence(u, [f"a{k}:op", sym[x], sym[y], f"a{k}:="], [sym[p], sym[q]]))
        u.tasks.append(Task(f"a{k}", "A", torch.tensor(seqs), [u.id(s) for s in sym]))
    for k in range(N_FORMS):
        layout, order = _FORM_LAYOUTS[k]
        num = [f"b{k}:{w}" for w in _NUMERALS[k]]
        seqs = []
        for x, y in pairs:
            prompt = [num[x] if w == "{x}" else num[y] if w == "{y}" else f"b{k}:{w}" for w in layout]
            t, un = divmod(x + y, 10)
            seqs.append(_sequence(u, prompt, [num[t], num[un]] if order == "tu" else [num[un], num[t]]))
        u.tasks.append(Task(f"b{k}", "B", torch.tensor(seqs), [u.id(s) for s in num]))
    for i in range(N_FORMS):
        for j in range(N_FORMS):
            if i == j:
                continue
            seqs = [_sequence(u, [f"b{i}:{_NUMERALS[i][x]}", f"b{i}:{_NUMERALS[i][y]}", f"<to-b{j}>"],
                              [f"b{j}:{_NUMERALS[j][x]}", f"b{j}:{_NUMERALS[j][y]}"]) for x, y in pairs]
            u.tasks.append(Task(f"t{i}>{j}", "T", torch.tensor(seqs), u.tasks[10 + j].alphabet, i, j))
    return u


CONDITIONS = ("A", "B", "C", "C-all", "D")
CONDITION_TEXT = {
    "A": "ten unrelated languages",
    "B": "ten surface forms of addition",
    "C": "B + translations; the dropped form's translations stay in training",
    "C-all": "B + translations; the dropped form's translations are dropped with it",
    "D": "C with the pair (dropped form, its partner) never translated",
}


def partner(dropped: int) -> int:
    """The form whose translations with ``dropped`` condition D withholds (the next form)."""
    return (dropped + 1) % N_FORMS


def mixture(u: Universe, condition: str, dropped: int, phase: str, translation_share: float = 0.5) -> torch.Tensor:
    """Sampling weights over ``u.tasks`` (sum 1) for one model.

    ``phase``: ``"all"`` (the full mix), ``"drop"`` (the dropped language removed: for A the language
    ``a{dropped}``, else the addition form ``b{dropped}``; in C-all also every translation to or from
    it).  C and D spend ``translation_share`` of the samples on translations; D never trains the
    pair ``(dropped, partner(dropped))`` in either direction.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    if phase not in ("all", "drop"):
        raise ValueError(f"phase must be 'all' or 'drop', got {phase!r}")
    w = torch.zeros(len(u.tasks), dtype=torch.float64)
    fam = "A" if condition == "A" else "B"
    for i, t in enumerate(u.tasks):
        if t.family == fam:
            w[i] = 1.0
    if phase == "drop":
        w[u.task_index(f"{fam.lower()}{dropped}")] = 0.0
    if condition in ("C", "C-all", "D"):
        wt = torch.zeros_like(w)
        for i, t in enumerate(u.tasks):
            if t.family != "T":
                continue
            if condition == "D" and {t.source, t.target} == {dropped, partner(dropped)}:
                continue
            if condition == "C-all" and phase == "drop" and dropped in (t.source, t.target):
                continue
            wt[i] = 1.0
        w = (1 - translation_share) * w / w.sum() + translation_share * wt / wt.sum()
    return w / w.sum()


def exact_match(logits: torch.Tensor, answers: torch.Tensor, alphabet: torch.Tensor | None = None) -> torch.Tensor:
    """Exact match of the answer span: ``logits`` [..., ANSWER_LEN, V], ``answers`` [..., ANSWER_LEN].

    With ``alphabet`` (a boolean mask [..., V] or [V]) the argmax is taken over those tokens only:
    the answer read out through the model's own unembedding, with every other token suppressed
    (a skill that is gated at the output, not erased, survives this).  Returns a bool tensor [...].
    """
    if alphabet is not None:
        logits = logits.masked_fill(~alphabet.unsqueeze(-2), float("-inf"))
    return (logits.argmax(-1) == answers).all(-1)
