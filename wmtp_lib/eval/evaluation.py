"""Evaluation (DESIGN §8): pass@k with sandboxed execution, per-head metrics, self-speculative decoding."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from wmtp_lib.checkpoints.tokenization import decode_continuation
from wmtp_lib.data.rows import TokenizedData
from wmtp_lib.data.sample import Sample
from wmtp_lib.data.synthetic import uses_corrupted_operation
from wmtp_lib.eval.bootstrap import bootstrap_ci  # noqa: F401  (evaluation's public name)
from wmtp_lib.eval.execution import check_completion, require_isolation, sandbox_record
from wmtp_lib.model.generation import sample, speculative_benchmark
from wmtp_lib.model.heads import MTPModel
from wmtp_lib.model.losses import mtp_token_ce
from wmtp_lib.provenance import code_provenance

# Where a completion ends. HumanEval completes a function body; MBPP-style prompts ask for a whole
# function after the task's docstring.
STOP_SEQUENCES = {
    "humaneval": ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "],
    "mbpp": ['\n"""', "\nassert ", "\nif __name__", "\nprint(", "\n\n\n"],
    "synthetic": ['\n"""', "\nassert ", "\nif __name__", "\nprint(", "\n\n\n"],
    # a whole program that reads stdin: only the end of the code block or a long gap ends it
    "codecontests": ['\n"""', "\n\n\n\n"],
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k ``1 − C(n−c, k) / C(n, k)``, as a stable product; requires ``k ≤ n``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def extract_completion(text: str, benchmark: str) -> str:
    """Cut generated text at the first stop sequence of the benchmark."""
    cut = len(text)
    for stop in STOP_SEQUENCES[benchmark]:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut].rstrip() + "\n"


def evaluate_pass_at_k(model: MTPModel, tokenizer, samples: list[Sample], benchmark: str, n_samples: int,
                       ks: list[int], temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 128,
                       seed: int = 0, timeout_s: float = 5.0, workers: int = 2, progress=None,
                       allow_weak_sandbox: bool = False) -> dict[str, Any]:
    """Sample ``n_samples`` completions per problem, execute each against its tests, report pass@k.

    Refuses to start (`WeakSandboxError`) when the machine's sandbox has no filesystem and network isolation,
    unless ``allow_weak_sandbox``; the result records the level and the opt-in under ``"sandbox"``.
    """
    ks = [k for k in ks if k <= n_samples]
    if not ks:
        raise ValueError(f"no k <= n_samples={n_samples}: pass@k is only reported for k <= n")
    require_isolation(allow_weak_sandbox)  # before any sampling: a refused run costs nothing
    gen = torch.Generator(device=model.device).manual_seed(seed)
    problems = []
    for i, s in enumerate(samples):
        prompt_ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
            tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        outs = sample(model, prompt_ids, n_samples, max_new_tokens, temperature, top_p, tokenizer.eos_token_id, gen)
        completions = [extract_completion(decode_continuation(tokenizer, prompt_ids, o), benchmark) for o in outs]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda c: check_completion(c, s.tests, s.io_tests, s.exec_prefix, timeout_s,
                                                               allow_weak=allow_weak_sandbox), completions))
        c = sum(r.passed for r in results)
        problems.append({"id": s.id, "n": n_samples, "correct": c, "noisy": s.noisy,
                         "pass_at_k": {str(k): pass_at_k(n_samples, c, k) for k in ks},
                         **noise_imitation(benchmark, s, completions),
                         "samples": [{"completion": comp, "status": r.status, "detail": r.detail}
                                     for comp, r in zip(completions, results)]})
        if progress is not None:
            progress(i + 1, len(samples))
    summary = {f"pass@{k}": sum(p["pass_at_k"][str(k)] for p in problems) / len(problems) for k in ks}
    if benchmark == "synthetic":
        summary["noise_imitation"] = sum(p["noise_imitation"] for p in problems) / len(problems)
    return {"benchmark": benchmark, "n_samples": n_samples, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new_tokens, "problems": len(problems), "summary": summary,
            "sandbox": sandbox_record(allow_weak_sandbox), "per_problem": problems}


def noise_imitation(benchmark: str, sample: Sample, completions: list[str]) -> dict[str, float]:
    """For a synthetic task: the fraction of its sampled solutions that use the family's corrupted
    operation (what the noisy training solutions teach); nothing for other benchmarks."""
    if benchmark != "synthetic":
        return {}
    hits = sum(uses_corrupted_operation(sample.entry_point, c) for c in completions)
    return {"noise_imitation": hits / max(1, len(completions))}


def head_metric_sums(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per head: summed CE, correct top-1 count and target count over valid targets (``(H,)`` each)."""
    ce, valid = mtp_token_ce(logits, input_ids, label_mask, position_ids)
    B, T, H, _ = logits.shape
    pred = logits.argmax(-1)
    correct = torch.zeros(B, T, H, dtype=torch.bool, device=logits.device)
    for k in range(H):
        if k + 1 < T:
            correct[:, : T - k - 1, k] = pred[:, : T - k - 1, k] == input_ids[:, k + 1:]
    return {"ce_sum": (ce * valid).sum((0, 1)).double(), "correct": (correct & valid).sum((0, 1)).double(),
            "count": valid.sum((0, 1)).double()}


@torch.no_grad()
def head_metrics(model: torch.nn.Module, data: TokenizedData, batch_size: int = 8,
                 progress=None) -> dict[str, list[float]]:
    """Loss and top-1 accuracy of head k for token t+k+1 on held-out rows (targets = label mask).

    ``progress(done_rows, total_rows)`` is called after each batch when given."""
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, torch.Tensor] | None = None
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(len(data), start + batch_size)))
        b = data.rows(idx)
        # packed rows carry position_ids: documents stay apart in attention and targets
        positions = b["position_ids"].to(device) if "position_ids" in b else None
        packed = {} if positions is None else {"position_ids": positions}
        logits = model(b["input_ids"].to(device), b["attention_mask"].to(device), **packed)
        sums = head_metric_sums(logits.float(), b["input_ids"].to(device), b["label_mask"].to(device), positions)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
        if progress is not None:
            progress(idx[-1] + 1, len(data))
    assert totals is not None, "no held-out rows"
    count = totals["count"].clamp(min=1)
    return {"loss": (totals["ce_sum"] / count).tolist(), "accuracy": (totals["correct"] / count).tolist(),
            "targets": totals["count"].tolist()}


def speculative_report(model: MTPModel, tokenizer, samples: list[Sample], max_new_tokens: int = 64,
                       repeats: int = 3) -> dict[str, Any]:
    """Self-speculative vs greedy decoding on the prompts of ``samples``: each decoder runs ``repeats``
    times, the order alternating (see `speculative_benchmark`). The speed-up is the median of the paired
    ratios: with the default 3 one disturbed repeat cannot move it (of 2, the median is their mean: a repeat
    slowed by a neighbour's load read 7.66x where the undisturbed one read 1.56x)."""
    prompts = [([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
               + tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in samples]
    return speculative_benchmark(model, prompts, max_new_tokens, tokenizer.eos_token_id, repeats=repeats)


def save_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


class _PhaseBar:
    """A tqdm bar with its total for one evaluation phase, called as ``bar(done, total)``; a no-op when off."""

    def __init__(self, on: bool, total: int, desc: str, unit: str):
        self.tqdm = None
        if on:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, desc=desc, unit=unit)

    def __call__(self, done: int, total: int) -> None:
        if self.tqdm is not None:
            self.tqdm.total = total
            self.tqdm.update(done - self.tqdm.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def resolve_model_dir(run: str, runs_dir: str | Path = "runs") -> tuple[Path, Path | None]:
    """``run`` is a run name under ``runs_dir`` (its ``final/``) or a model directory; returns (model, run dir)."""
    from wmtp_lib.config import project_path

    candidate = project_path(runs_dir) / run
    if (candidate / "final" / "config.json").is_file():
        return candidate / "final", candidate
    path = Path(run)
    if (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(f"{run!r} is neither a finished run under {project_path(runs_dir)} (with final/) "
                            "nor a model directory; train it with notebooks/train.ipynb first")


def benchmark_samples(benchmark: str, limit: int | None, data_cfg: dict[str, Any] | None = None,
                      datasets_dir: str | Path = "datasets") -> list[Sample]:
    from wmtp_lib.data.sources import load_humaneval, load_samples

    if benchmark == "humaneval":
        samples = load_humaneval()
    elif benchmark == "mbpp":
        samples = load_samples({"dataset": "mbpp"}, "test", datasets_dir)
    elif benchmark == "codecontests":
        samples = load_samples({"dataset": "codecontests"}, "test", datasets_dir)
    elif benchmark == "synthetic":
        cfg = dict(data_cfg or {})
        cfg.setdefault("n_train", 0)
        cfg.setdefault("n_test", 100)
        cfg.setdefault("noise_fraction", 0.0)
        cfg.setdefault("data_seed", 1234)
        cfg["dataset"] = "synthetic"
        samples = load_samples(cfg, "test")
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose humaneval, mbpp, codecontests or synthetic")
    return samples[:limit] if limit else samples


def run_evaluation(run: str, benchmarks: list[str], n_samples: int = 5, ks: list[int] | None = None,
                   temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 96, limit: int | None = 50,
                   speculative_prompts: int = 20, seed: int = 0, runs_dir: str | Path | None = None,
                   datasets_dir: str | Path = "datasets", progress: bool = False, log=print,
                   allow_weak_sandbox: bool = False) -> dict[str, Any]:
    """Everything `notebooks/evaluate.ipynb` reports; results saved to ``<run>/eval/<benchmark>.json``.

    ``runs_dir`` defaults to `default_runs_dir`; under ``WMTP_CI=1`` the sizes are capped by ``params/ci.yaml``.
    With ``progress``, every phase shows itself: a bar with its total for sampling and executing the problems
    and for the held-out head metrics, a line before and after loading the model and the speculative-decoding
    benchmark (timed as a whole, so it gets no per-prompt updates that would sit inside its clock).
    """
    from wmtp_lib.checkpoints.tokenization import load_tokenizer
    from wmtp_lib.config import as_list, ci_sizing, default_runs_dir
    from wmtp_lib.data.rows import tokenize_samples

    benchmarks = [str(b) for b in as_list(benchmarks, "benchmarks")]
    ks = [int(k) for k in as_list(ks, "k")] if ks is not None else None
    require_isolation(allow_weak_sandbox)  # before the model loads
    runs_dir = runs_dir or default_runs_dir()
    ci = ci_sizing()
    if ci is not None:
        caps = ci["evaluate"]
        n_samples = min(n_samples, caps["n_samples"])
        limit = min(limit or caps["limit"], caps["limit"])
        speculative_prompts = min(speculative_prompts, caps["speculative_prompts"])
        max_new_tokens = min(max_new_tokens, caps["max_new_tokens"])
        ks = [k for k in (ks or []) if k <= n_samples] or list(caps["k"])
        log(f"WMTP_CI=1: evaluation capped by params/ci.yaml to n_samples={n_samples}, k={ks}, limit={limit}, "
            f"speculative_prompts={speculative_prompts}, max_new_tokens={max_new_tokens}")
    model_dir, run_dir = resolve_model_dir(run, runs_dir)
    out_dir = (run_dir or model_dir) / "eval"
    code = code_provenance()  # the code that evaluates, read before the minutes it takes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say = log if progress else (lambda line: None)
    t0 = time.perf_counter()
    say(f"loading {model_dir} on {device}")
    model = MTPModel.from_pretrained(model_dir, device=device).eval()
    tokenizer = load_tokenizer(model_dir)
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    data_cfg = None
    max_length = 256
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        data_cfg, max_length = cfg["data"], cfg["data"]["max_length"]
    results: dict[str, Any] = {}
    for bench in benchmarks:
        samples = benchmark_samples(bench, limit, data_cfg, datasets_dir)
        torch.manual_seed(seed)
        with _PhaseBar(progress, len(samples), f"{bench}: problems", "problem") as bar:
            res = evaluate_pass_at_k(model, tokenizer, samples, bench, n_samples, ks or [1, n_samples], temperature,
                                     top_p, max_new_tokens, seed, progress=bar,
                                     allow_weak_sandbox=allow_weak_sandbox)
        held_out = tokenize_samples(tokenizer, samples, max_length)
        with _PhaseBar(progress, len(held_out), f"{bench}: head metrics", "row") as bar:
            res["head_metrics"] = head_metrics(model, held_out, progress=bar)
        res["speculative"] = None
        if speculative_prompts > 0:
            prompts = samples[:speculative_prompts]
            t0 = time.perf_counter()
            say(f"{bench}: self-speculative vs greedy decoding on {len(prompts)} prompts (each decoder 3 times, up to "
                f"{max_new_tokens} tokens a prompt)…")
            res["speculative"] = speculative_report(model, tokenizer, prompts, max_new_tokens)
            say(f"{bench}: speculative decoding done in {time.perf_counter() - t0:.1f} s")
        res["sandbox_isolation"] = res["sandbox"]["level"]
        res["model_dir"] = str(model_dir)
        res["evaluated_by"] = code
        save_json(res, out_dir / f"{bench}.json")
        results[bench] = res
    return results
