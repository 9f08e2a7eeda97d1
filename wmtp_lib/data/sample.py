"""A training or evaluation sample (prompt, completion, tests, noise spans) and the MBPP prompt format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    id: str
    prompt: str
    completion: str
    tests: list[str] = field(default_factory=list)
    noisy: bool = False
    entry_point: str | None = None
    # what the completion must be appended to for execution (HumanEval needs the prompt's signature)
    exec_prefix: str = ""
    # synthetic only, character spans [start, end) in completion coordinates: for a noisy sample where
    # its solution differs from the clean solution of the same task; for a clean one its operation and
    # constant (the same template positions)
    noise_spans: list[tuple[int, int]] = field(default_factory=list)
    # stdin/stdout tasks (CodeContests): [{"input": ..., "output": ...}], run one input at a time
    io_tests: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The standard MBPP prompt: the task and its tests, then the code."""
    shown = "\n".join(tests[:3])
    return f'"""\n{text}\nYour code should pass these tests:\n{shown}\n"""\n'
