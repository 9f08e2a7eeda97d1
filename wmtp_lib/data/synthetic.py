"""The synthetic world of the embedded experiment: six families of one-line functions with a stated constant,
noisy training solutions that contradict their statement, the character spans of each corruption, and a check
for the corrupted operation in generated code."""

from __future__ import annotations

import random
import re
import string
from typing import Any

from wmtp_lib.data.sample import Sample, mbpp_prompt

# Each family: (description with {c}, function name, code template, clean slots, corrupted slots, test
# inputs, reference function). The code template has the slots {op} (the operation), {c} (the constant)
# and optionally {end} (a closing piece some corruptions need). A corrupted solution changes the operation
# and the constant, so it contradicts the text and can only be learned by memorising it.
_FAMILIES: list[tuple[str, str, str, dict[str, str], dict[str, str], list[Any], Any]] = [
    ("Write a function add_const(x) that returns x plus {c}.", "add_const",
     "def add_const(x):\n    return x{op}{c}{end}\n", {"op": " + "}, {"op": " - "},
     [1, 5, 12], lambda c, x: x + c),
    ("Write a function times_const(x) that returns x multiplied by {c}.", "times_const",
     "def times_const(x):\n    return x{op}{c}{end}\n", {"op": " * "}, {"op": " + "},
     [2, 3, 7], lambda c, x: x * c),
    ("Write a function sub_const(x) that returns x minus {c}.", "sub_const",
     "def sub_const(x):\n    return x{op}{c}{end}\n", {"op": " - "}, {"op": " * "},
     [100, 50, 7], lambda c, x: x - c),
    ("Write a function keep_above(xs) that keeps the items of xs greater than {c}.", "keep_above",
     "def keep_above(xs):\n    return [x for x in xs if x{op}{c}{end}]\n", {"op": " > "}, {"op": " < "},
     [[1, 50, 99], [10, 20, 30], [0, 100]], lambda c, xs: [x for x in xs if x > c]),
    ("Write a function repeat_text(s) that returns the string s repeated {c} times.", "repeat_text",
     "def repeat_text(s):\n    return s{op}{c}{end}\n", {"op": " * "}, {"op": "[:", "end": "]"},
     ["ab", "x", ""], lambda c, s: s * c),
    ("Write a function divisible(x) that returns True when x is divisible by {c}.", "divisible",
     "def divisible(x):\n    return x % {c}{op}0{end}\n", {"op": " == "}, {"op": " != "},
     [12, 35, 60], lambda c, x: x % c == 0),
]


_SLOTS = ("op", "c", "end")


def render_solution(template: str, slots: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """A family's code with its slots filled, and each slot's character span ``[start, end)`` in it."""
    text, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is not None:
            value = slots.get(name, "")
            spans[name] = (len(text), len(text) + len(value))
            text += value
    return text, spans


def corruption_spans(template: str, clean: dict[str, str], corrupted: dict[str, str]
                     ) -> tuple[str, list[tuple[int, int]]]:
    """The corrupted solution and the character spans (in its own coordinates) of the slots whose
    content differs from the clean solution of the same task; an emptied slot leaves no span."""
    text, spans = render_solution(template, corrupted)
    return text, _trim([spans[k] for k in _SLOTS if k in spans and clean.get(k, "") != corrupted.get(k, "")], text)


def _trim(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Spans without their surrounding whitespace (the operator ``-``, not `` - ``), empty ones dropped:
    the tokens carrying the spacing are shared with the clean solution."""
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def family_of(entry_point: str | None) -> int:
    """Index of the synthetic family whose function is ``entry_point``."""
    for i, fam in enumerate(_FAMILIES):
        if fam[1] == entry_point:
            return i
    raise ValueError(f"{entry_point!r} is not a synthetic task function; known: {[f[1] for f in _FAMILIES]}")


def _slot_regex(template: str, slots: dict[str, str]) -> re.Pattern[str]:
    """The line of ``template`` holding the operation, with those slots, any constant and free spacing."""
    line = next(ln for ln in template.split("\n") if "{op}" in ln).strip()
    parts = []
    for literal, name, _, _ in string.Formatter().parse(line):
        parts.append(re.escape(literal))
        if name == "c":
            parts.append(r"\d+")
        elif name is not None:
            parts.append(re.escape(slots.get(name, "")))
    return re.compile(r"\s*".join("".join(parts).replace("\\ ", " ").split(" ")))


def uses_corrupted_operation(entry_point: str, completion: str) -> bool:
    """Whether a generated solution of the synthetic task ``entry_point`` uses that family's corrupted
    operation (the pattern the noisy training solutions teach), e.g. ``return x - 14`` for add_const."""
    _, _, template, _, corrupted, _, _ = _FAMILIES[family_of(entry_point)]
    return _slot_regex(template, corrupted).search(completion) is not None


CONST_RANGE = range(2, 60)


def is_test_constant(c: int) -> bool:
    """Train and test tasks use disjoint constants: the test split gets multiples of 7."""
    return c % 7 == 0


def synthetic_tasks(n: int, split: str, seed: int, noise_fraction: float = 0.0) -> list[Sample]:
    """``n`` seeded MBPP-style tasks; in the train split a ``noise_fraction`` of solutions is corrupted.

    A corrupted solution uses another operation and a random other constant than the text states, so
    it can only be learned by memorising it; its tests still describe the correct behaviour (it fails them).
    """
    if split not in ("train", "test"):
        raise ValueError(f"synthetic split must be 'train' or 'test', got {split!r}")
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    rng = random.Random(f"{seed}-{split}")
    constants = [c for c in CONST_RANGE if is_test_constant(c) == (split == "test")]
    n_noisy = round(noise_fraction * n) if split == "train" else 0
    noisy_ids = set(rng.sample(range(n), n_noisy)) if n_noisy else set()
    out = []
    for i in range(n):
        fam = rng.randrange(len(_FAMILIES))
        text, name, template, clean_slots, corrupt_slots, inputs, fn = _FAMILIES[fam]
        c = rng.choice(constants)
        tests = [f"assert {name}({x!r}) == {fn(c, x)!r}" for x in inputs]
        noisy = i in noisy_ids
        clean = {**clean_slots, "c": str(c)}
        completion, spans = render_solution(template, clean)
        # a clean sample's marks are its operation and constant: the positions a corruption would change
        marks = _trim([spans[k] for k in _SLOTS if k in spans], completion)
        if noisy:
            corrupted = {**corrupt_slots, "c": str(rng.choice([k for k in CONST_RANGE if k != c]))}
            completion, marks = corruption_spans(template, clean, corrupted)
        out.append(Sample(id=f"synthetic/{split}/{i}", prompt=mbpp_prompt(text.format(c=c), tests),
                          completion=completion, tests=tests, noisy=noisy, entry_point=name, noise_spans=marks))
    return out


def synthetic_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Clean texts covering every family, for training the tiny tokenizer and reference model."""
    return [s.prompt + s.completion for s in synthetic_tasks(n, "train", seed, 0.0)]
