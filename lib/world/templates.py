"""The statement templates of the Geometry of Truth datasets (Marks & Tegmark 2023), shared by the
corpus generator (which teaches the toy models) and ``lib.datasets`` (which probes them).

Each function returns one sentence ending in a period; the last token of the statement, where
probes read the residual stream, is that period.
"""
from __future__ import annotations

from lib.world.facts import number_word

JUDGEMENT_PREFIX = " That is"
JUDGEMENT_TRUE = " true"
JUDGEMENT_FALSE = " false"


def city(name: str, country: str, negated: bool = False) -> str:
    return f"The city of {name} is {'not ' if negated else ''}in {country}."


def city_clause(name: str, country: str) -> str:
    return f"the city of {name} is in {country}"


def cities_conj(a: tuple[str, str], b: tuple[str, str]) -> str:
    return f"It is the case both that {city_clause(*a)} and that {city_clause(*b)}."


def cities_disj(a: tuple[str, str], b: tuple[str, str]) -> str:
    return f"It is the case either that {city_clause(*a)} or that {city_clause(*b)}."


def translation(spanish: str, english: str, negated: bool = False) -> str:
    verb = "does not mean" if negated else "means"
    return f"The Spanish word '{spanish}' {verb} '{english}'."


def comparison(n1: int, n2: int, relation: str) -> str:
    """``relation`` is "larger" or "smaller": "Fifty-one is larger than fifty-two."."""
    if relation not in ("larger", "smaller"):
        raise ValueError(f"relation must be 'larger' or 'smaller', got {relation!r}")
    return f"{number_word(n1).capitalize()} is {relation} than {number_word(n2)}."


def judgement(is_true: bool) -> str:
    """The sentence the corpus appends after some statements: " That is true." / " That is false."."""
    return f"{JUDGEMENT_PREFIX}{JUDGEMENT_TRUE if is_true else JUDGEMENT_FALSE}."


def question(statement: str, is_true: bool) -> str:
    """A statement asked as a question and answered: "Is the city of Paris in France? Yes.".

    "S is P." -> "Is s P?"; "S means / does not mean O." -> "Does s (not) mean O?"; the answer is
    " Yes." when the statement is true, else " No.".
    """
    if not statement.endswith("."):
        raise ValueError(f"a statement ends with a period: {statement!r}")
    body = statement[:-1]
    for verb, rewrite in ((" does not mean ", " not mean "), (" means ", " mean ")):
        if verb in body:
            subject, rest = body.split(verb, 1)
            asked = f"Does {subject[0].lower()}{subject[1:]}{rewrite}{rest}?"
            break
    else:
        if " is " not in body:
            raise ValueError(f"no ' is ' or ' means ' to ask about in {statement!r}")
        subject, rest = body.split(" is ", 1)
        asked = f"Is {subject[0].lower()}{subject[1:]} {rest}?"
    return f"{asked} {'Yes' if is_true else 'No'}."
