"""Data sources, the synthetic generator, masking, padding and packing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from wmtp_lib.data import (
    BatchSchedule,
    is_test_constant,
    load_humaneval,
    load_mbpp,
    load_prompt_completion_jsonl,
    synthetic_tasks,
    tokenize_samples,
)
from wmtp_lib.execution import program_for, run_program
from wmtp_lib.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    from wmtp_lib.data import synthetic_corpus

    return train_tokenizer(synthetic_corpus(n=200), vocab_size=400)


def _constant(sample):
    description = sample.prompt.split("\n")[1]
    return int(re.search(r"\b(\d+)\b", description).group(1))


def test_synthetic_is_seeded_and_noise_fraction_exact():
    a = synthetic_tasks(200, "train", 7, 0.25)
    b = synthetic_tasks(200, "train", 7, 0.25)
    assert [s.completion for s in a] == [s.completion for s in b]
    assert sum(s.noisy for s in a) == 50
    assert [s.completion for s in synthetic_tasks(200, "train", 8, 0.25)] != [s.completion for s in a]


def test_synthetic_train_and_test_constants_are_disjoint():
    train = {_constant(s) for s in synthetic_tasks(300, "train", 1, 0.0)}
    test = {_constant(s) for s in synthetic_tasks(100, "test", 1, 0.0)}
    assert train and test and not (train & test)
    assert all(is_test_constant(c) for c in test)


def test_clean_solutions_pass_and_noisy_ones_fail_their_tests():
    samples = synthetic_tasks(60, "train", 3, 0.3)
    for s in samples:
        ok = run_program(program_for(s.completion, s.tests)).passed
        assert ok == (not s.noisy), (s.completion, s.tests)


def test_label_mask_covers_completion_and_eos(tok):
    s = synthetic_tasks(1, "train", 0)[0]
    data = tokenize_samples(tok, [s], max_length=256)
    n_prompt = len(tok(s.prompt, add_special_tokens=False)["input_ids"])
    n_comp = len(tok(s.completion, add_special_tokens=False)["input_ids"])
    ids, mask, attn = data.input_ids[0], data.label_mask[0], data.attention_mask[0]
    assert ids[0] == tok.bos_token_id
    total = 1 + n_prompt + n_comp + 1
    assert int(attn.sum()) == total
    assert mask[: 1 + n_prompt].sum() == 0
    assert mask[1 + n_prompt: total].all() and mask[total:].sum() == 0
    assert ids[total - 1] == tok.eos_token_id
    assert (ids[total:] == tok.pad_token_id).all()
    unmasked = tokenize_samples(tok, [s], 256, prompt_masking=False)
    assert int(unmasked.label_mask[0].sum()) == total - 1  # everything but BOS


def test_packing_fills_rows_and_tracks_noisy_tokens(tok):
    samples = synthetic_tasks(40, "train", 2, 0.5)
    packed = tokenize_samples(tok, samples, 64, pack=True)
    assert packed.attention_mask.all()
    stream = sum(1 + len(tok(s.prompt + s.completion, add_special_tokens=False)["input_ids"]) + 1 for s in samples)
    assert len(packed) == stream // 64 or len(packed) == (stream - 1) // 64 or len(packed) > 0
    for r in range(len(packed)):
        for t in range(64):
            src = int(packed.sample_index[r, t])
            assert bool(packed.noisy[r, t]) == samples[src].noisy


def test_batch_schedule_world_and_accumulation_see_same_rows():
    one = BatchSchedule(50, 4, 2, 1, seed=3)
    two = BatchSchedule(50, 4, 1, 2, seed=3)
    for step in range(20):
        for a in range(2):
            assert one.micro_batch(step, a, 0) == two.micro_batch(step, 0, a)
    first_epoch = [i for s in range(7) for a in range(2) for i in one.micro_batch(s, a, 0)][:50]
    assert sorted(first_epoch) == list(range(50))


def test_mbpp_loader_json_and_split_by_task_id(tmp_path):
    rows = [{"task_id": tid, "text": f"task {tid}", "code": "def f():\r\n    return 1", "test_list": ["assert f() == 1"]}
            for tid in (5, 20, 600, 700)]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train = load_mbpp(path, "train")
    assert [s.id for s in train] == ["mbpp/700"]
    assert "Your code should pass these tests:\nassert f() == 1" in train[0].prompt
    assert train[0].completion == "def f():\n    return 1\n"
    assert [s.id for s in load_mbpp(path, "test")] == ["mbpp/20"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 700, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        load_mbpp(bad, "train")


def test_humaneval_from_package_and_canonical_solutions_pass():
    problems = load_humaneval()
    assert len(problems) == 164
    for p in problems[:5]:
        assert run_program(program_for(p.completion, p.tests, p.exec_prefix), timeout_s=10).passed, p.id


def test_prompt_completion_jsonl(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(ValueError, match="line 2.*completion"):
        load_prompt_completion_jsonl(path)


def test_codecontests_takes_first_python3_solution_and_public_tests(tmp_path):
    from wmtp_lib.data import load_codecontests

    rows = [
        {"name": "a", "description": "Add two numbers.", "solutions": {"language": [2, 3, 3],
         "solution": ["int main(){}", "print(sum(map(int, input().split())))", "second"]},
         "public_tests": {"input": ["1 2\n"], "output": ["3\n"]}},
        {"name": "b", "description": "C++ only.", "solutions": {"language": [2], "solution": ["int main(){}"]}},
    ]
    path = tmp_path / "cc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_codecontests(path)
    assert [s.id for s in samples] == ["codecontests/a"]
    assert samples[0].completion == "print(sum(map(int, input().split())))\n"
    assert samples[0].tests == [] and samples[0].io_tests == [{"input": "1 2\n", "output": "3\n"}]
    assert "Add two numbers." in samples[0].prompt
