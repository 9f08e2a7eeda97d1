"""Execution rewards for the critic: unit-test pass fractions of gold solutions and of sampled rollouts."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from wmtp_lib.data import Sample, TokenizedData, tokenize_samples
from wmtp_lib.evaluation import extract_completion
from wmtp_lib.execution import fraction_of_tests_passed, require_isolation, sandbox_record
from wmtp_lib.generation import sample as sample_tokens
from wmtp_lib.tokenization import decode_continuation


def execution_rewards(samples: list[Sample], workers: int = 2, timeout_s: float = 5.0,
                      allow_weak_sandbox: bool = False) -> torch.Tensor:
    """Reward of each sample's own completion: the fraction of its unit tests (or stdin/stdout pairs) that pass.

    Refuses a sandbox without filesystem and network isolation unless ``allow_weak_sandbox`` (`WeakSandboxError`).
    """
    for s in samples:
        if not s.tests and not s.io_tests:
            raise ValueError(f"sample {s.id} has no unit tests: execution rewards need them "
                             "(use critic.reward_source: model for this dataset)")
    require_isolation(allow_weak_sandbox)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        values = list(pool.map(lambda s: fraction_of_tests_passed(s.completion, s.tests, s.exec_prefix, timeout_s,
                                                                  io_tests=s.io_tests, allow_weak=allow_weak_sandbox),
                               samples))
    return torch.tensor(values, dtype=torch.float32)


def row_rewards(data: TokenizedData, sample_rewards: torch.Tensor) -> torch.Tensor:
    """One reward per row: the reward of the sample that row ends with (rows hold one sample when not packed)."""
    out = torch.zeros(len(data), dtype=torch.float32)
    for r in range(len(data)):
        idx = data.sample_index[r][data.sample_index[r] >= 0]
        out[r] = sample_rewards[int(idx[-1])] if idx.numel() else 0.0
    return out


def sample_rollouts(model, tokenizer, prompts: list[Sample], rollouts: int, max_new_tokens: int, temperature: float,
                    seed: int, benchmark: str = "synthetic", log: Callable[[str], None] = print) -> list[Sample]:
    """``rollouts`` sampled completions per prompt (head 0), as samples carrying the prompt's tests."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    was_training = model.training
    for i, p in enumerate(prompts):
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
            tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        for j, toks in enumerate(sample_tokens(model, ids, rollouts, max_new_tokens, temperature, 1.0,
                                               tokenizer.eos_token_id, gen)):
            text = extract_completion(decode_continuation(tokenizer, ids, toks), benchmark)
            out.append(Sample(id=f"{p.id}/rollout{j}", prompt=p.prompt, completion=text, tests=p.tests,
                              exec_prefix=p.exec_prefix, entry_point=p.entry_point, io_tests=p.io_tests))
        if (i + 1) % 16 == 0:
            log(f"rollouts: {i + 1}/{len(prompts)} prompts")
    model.train(was_training)
    return out


def build_rollout_data(model, tokenizer, samples: list[Sample], cfg: dict[str, Any], cache: Path,
                       log: Callable[[str], None] = print) -> tuple[TokenizedData, torch.Tensor]:
    """Stage-1 data for the execution reward: rollouts of the current model and their pass fractions.

    Stored in ``cache`` (a run-directory file) so a resumed run fits on the same rollouts.
    """
    ccfg, t = cfg["critic"], cfg["train"]
    if cache.is_file():
        stored = json.loads(cache.read_text())
        rollouts = [Sample(**s) for s in stored["samples"]]
        rewards = torch.tensor(stored["rewards"], dtype=torch.float32)
    else:
        n_prompts = min(len(samples), max(1, ccfg["stage1_steps"] * t["micro_batch_size"] // ccfg["rollouts"]), 256)
        seen, prompts = set(), []
        for s in samples:
            if s.prompt not in seen:
                seen.add(s.prompt)
                prompts.append(s)
            if len(prompts) == n_prompts:
                break
        rollouts = sample_rollouts(model, tokenizer, prompts, ccfg["rollouts"], ccfg["rollout_max_new_tokens"],
                                   ccfg["rollout_temperature"], cfg["seed"], log=log)
        allow_weak = cfg["allow_weak_sandbox"]
        rewards = execution_rewards(rollouts, allow_weak_sandbox=allow_weak)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"samples": [s.to_json() for s in rollouts], "rewards": rewards.tolist(),
                                   "sandbox": sandbox_record(allow_weak)}))
        tmp.replace(cache)
        log(f"rollouts: {len(rollouts)} sampled, mean test pass fraction {rewards.mean():.3f} "
            f"(sandbox {sandbox_record(allow_weak)['level']})")
    data = tokenize_samples(tokenizer, rollouts, cfg["data"]["max_length"], cfg["data"]["prompt_masking"], pack=False)
    return data, row_rewards(data, rewards)
