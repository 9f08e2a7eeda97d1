"""Execution rewards for the critic: unit-test pass fractions of gold solutions and of sampled rollouts."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from wmtp_lib.checkpoints.tokenization import decode_continuation
from wmtp_lib.data.rows import TokenizedData, tokenize_samples
from wmtp_lib.data.sample import Sample
from wmtp_lib.eval.evaluation import extract_completion
from wmtp_lib.eval.execution import (
    fraction_of_tests_passed,
    require_isolation,
    sandbox_record,
)
from wmtp_lib.model.generation import sample as sample_tokens
from wmtp_lib.train.distributed import Dist


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
                    seed: int, benchmark: str = "synthetic", dist: Dist | None = None,
                    log: Callable[[str], None] = print) -> list[Sample]:
    """``rollouts`` sampled completions per prompt (head 0), as samples carrying the prompt's tests.

    With ``dist``, each process samples a shard of the prompts (every ``world``-th) through the sharded
    model and the shards are gathered back in prompt order. Prompt ``i`` draws from its own generator
    (seed, ``i``), so the rollouts do not depend on the number of processes. Every process runs the same
    number of forwards (FSDP gathers weights in each): a process whose shard is shorter samples its last
    prompt again and drops the result.
    """
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    mine = list(range(rank, len(prompts), world))
    rounds = -(-len(prompts) // world)
    was_training = model.training
    local: list[tuple[int, list[dict]]] = []
    for r in range(rounds):
        i = mine[r] if r < len(mine) else mine[-1] if mine else 0
        p = prompts[i]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
            tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        gen = torch.Generator(device=model.device).manual_seed(seed * 1_000_003 + i)
        outs = sample_tokens(model, ids, rollouts, max_new_tokens, temperature, 1.0, tokenizer.eos_token_id, gen,
                             fixed_steps=world > 1)
        if r < len(mine):
            local.append((i, [Sample(id=f"{p.id}/rollout{j}", prompt=p.prompt,
                                     completion=extract_completion(decode_continuation(tokenizer, ids, toks),
                                                                   benchmark),
                                     tests=p.tests, exec_prefix=p.exec_prefix, entry_point=p.entry_point,
                                     io_tests=p.io_tests).to_json()
                              for j, toks in enumerate(outs)]))
        if (r + 1) % 16 == 0:
            log(f"rollouts: {min(len(prompts), (r + 1) * world)}/{len(prompts)} prompts")
    model.train(was_training)
    gathered = dist.gather_objects(local) if dist is not None else [local]
    by_prompt = dict(item for shard in gathered for item in shard)
    return [Sample(**s) for i in range(len(prompts)) for s in by_prompt[i]]


def rollout_cache_key(samples: list[Sample], cfg: dict[str, Any]) -> str:
    """sha256 of what cached rollouts depend on: every training sample's prompt and completion (the prompts
    are drawn from them) and the rollout settings."""
    ccfg = cfg["critic"]
    digest = hashlib.sha256(json.dumps(["execution", ccfg["rollouts"], ccfg["rollout_max_new_tokens"],
                                        ccfg["rollout_temperature"], cfg["seed"]]).encode())
    for sample in samples:
        digest.update(json.dumps([sample.prompt, sample.completion]).encode())
    return digest.hexdigest()


def build_rollout_data(model, tokenizer, samples: list[Sample], cfg: dict[str, Any], cache: Path, dist: Dist,
                       ) -> tuple[TokenizedData, torch.Tensor, list[Sample]]:
    """Stage-1 data for the execution reward: rollouts of the current model and their pass fractions.

    Every process samples and runs the tests of its shard of the prompts; the main process stores the
    gathered result in ``cache`` (a run-directory file) so a resumed run fits on the same rollouts.
    """
    ccfg, t = cfg["critic"], cfg["train"]
    key = rollout_cache_key(samples, cfg)
    if dist.broadcast_object(cache.is_file()):  # one decision for all processes: they sample together or not
        stored = json.loads(cache.read_text())
        if stored.get("key") != key:
            raise RuntimeError(f"{cache} holds rollouts of other samples or other rollout settings than this run's: "
                               "the data changed under this run name: use a new run_name")
        rollouts = [Sample(**s) for s in stored["samples"]]
        rewards = torch.tensor(stored["rewards"], dtype=torch.float32)
    else:
        n_prompts = min(len(samples), max(1, ccfg["stage1_max_steps"] * t["micro_batch_size"] // ccfg["rollouts"]), 256)
        seen, prompts = set(), []
        for s in samples:
            if s.prompt not in seen:
                seen.add(s.prompt)
                prompts.append(s)
            if len(prompts) == n_prompts:
                break
        rollouts = sample_rollouts(model, tokenizer, prompts, ccfg["rollouts"], ccfg["rollout_max_new_tokens"],
                                   ccfg["rollout_temperature"], cfg["seed"], dist=dist, log=dist.print)
        allow_weak = cfg["allow_weak_sandbox"]
        # each process runs the unit tests of every world-th rollout; results are gathered in order
        mine = list(range(dist.rank, len(rollouts), dist.world))
        scores = execution_rewards([rollouts[i] for i in mine], allow_weak_sandbox=allow_weak).tolist() if mine else []
        by_index = dict(item for shard in dist.gather_objects(list(zip(mine, scores))) for item in shard)
        rewards = torch.tensor([by_index[i] for i in range(len(rollouts))], dtype=torch.float32)
        if dist.is_main:
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "samples": [s.to_json() for s in rollouts],
                                       "rewards": rewards.tolist(),
                                       "sandbox": sandbox_record(allow_weak)}))
            tmp.replace(cache)
        dist.barrier()
        dist.print(f"rollouts: {len(rollouts)} sampled, mean test pass fraction {rewards.mean():.3f} "
                   f"(sandbox {sandbox_record(allow_weak)['level']})")
    data = tokenize_samples(tokenizer, rollouts, cfg["data"]["max_length"], cfg["data"]["prompt_masking"], pack=False)
    return data, row_rewards(data, rewards), rollouts
