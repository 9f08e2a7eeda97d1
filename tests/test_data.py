"""Data sources, the synthetic generator, masking, padding and packing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from wmtp_lib.checkpoints.tiny import train_tokenizer
from wmtp_lib.data.rows import (
    char_spans_to_token_positions,
    encode_with_offsets,
    tokenize_samples,
)
from wmtp_lib.data.sample import Sample
from wmtp_lib.data.schedule import BatchSchedule
from wmtp_lib.data.sources import (
    load_humaneval,
    load_mbpp,
    load_prompt_completion_jsonl,
)
from wmtp_lib.data.synthetic import is_test_constant, synthetic_tasks
from wmtp_lib.eval.execution import program_for, run_program


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from wmtp_lib.data.synthetic import synthetic_corpus

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(synthetic_corpus(n=200), vocab_size=400, workdir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from wmtp_lib.checkpoints.tokenization import load_tokenizer

    return load_tokenizer(tok_dir)


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


def test_rows_are_one_sentencepiece_tokenization_with_completion_mask(tok, tok_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    samples = synthetic_tasks(20, "train", 0) + [
        Sample(id="boundary", prompt='x = "ab', completion='cd"\n    return  x\n'),  # a token straddles it
        Sample(id="literal", prompt="# <s> is text\n", completion="y = '</s>'\n")]
    data = tokenize_samples(tok, samples, max_length=256)
    for row, s in enumerate(samples):
        text = s.prompt + s.completion
        expected = [tok.bos_token_id] + sp.encode(text) + [tok.eos_token_id]
        n = len(expected)
        assert data.input_ids[row, :n].tolist() == expected  # no spurious "▁" at the boundary
        assert int(data.attention_mask[row].sum()) == n
        assert (data.input_ids[row, n:] == tok.eos_token_id).all()  # Llama has no pad: EOS pads
        # targets: exactly the tokens carrying completion characters (SentencePiece's own byte spans), then EOS
        prompt_bytes = len(s.prompt.encode())
        proto = sp.encode(text, out_type="proto")
        want = [False] + [piece.end > prompt_bytes for piece in proto.pieces] + [True]
        assert data.label_mask[row, :n].tolist() == want, s.id
    unmasked = tokenize_samples(tok, samples[:1], 256, prompt_masking=False)
    assert int(unmasked.label_mask[0].sum()) == int(unmasked.attention_mask[0].sum()) - 1  # all but BOS


def test_char_spans_map_to_the_tokens_that_carry_them(tok):
    text = "def f(x):\n    return x + 42  # é\n"
    ids, offsets = encode_with_offsets(tok, text)
    assert len(ids) == len(offsets) and offsets[-1][1] == len(text)
    start = text.index("42")
    positions = char_spans_to_token_positions(offsets, [(start, start + 2)])
    assert [tok.convert_ids_to_tokens(ids[i]) for i in positions] == ["4", "2"]  # split_digits
    e = text.index("é")  # two byte-fallback tokens, both carry the character
    assert [tok.convert_ids_to_tokens(ids[i]) for i in char_spans_to_token_positions(offsets, [(e, e + 1)])] == \
        ["<0xC3>", "<0xA9>"]
    assert char_spans_to_token_positions(offsets, []) == []


def test_packing_keeps_whole_documents_with_restarting_positions(tok):
    samples = synthetic_tasks(40, "train", 2, 0.5)
    max_length = 256
    padded = tokenize_samples(tok, samples, max_length)
    packed = tokenize_samples(tok, samples, max_length, pack=True)
    assert padded.position_ids is None and "position_ids" not in padded.rows([0])
    lengths = padded.attention_mask.sum(1)
    assert int(lengths.max()) < max_length  # no sample is truncated here, so each must appear whole
    # first fit: fewer rows than samples, and no two rows that could have been one
    used = packed.attention_mask.sum(1)
    assert len(packed) < len(samples) and int(used.sum()) == int(lengths.sum())
    assert int(used.sort().values[:2].sum()) > max_length
    seen = set()
    for r in range(len(packed)):
        src, pos = packed.sample_index[r], packed.position_ids[r]
        n = int(used[r])
        for i in src[:n].unique_consecutive().tolist():
            assert i not in seen  # a document never continues in another row
            seen.add(i)
            where = (src == i).nonzero().flatten()
            assert pos[where].tolist() == list(range(len(where)))
            assert torch.equal(packed.input_ids[r, where], padded.input_ids[i, : int(lengths[i])])
            assert torch.equal(packed.label_mask[r, where], padded.label_mask[i, : int(lengths[i])])
            assert not packed.noisy[r, where].logical_xor(torch.tensor(samples[i].noisy)).any()
        assert pos[n:].tolist() == list(range(max_length - n))  # the padding tail restarts too
        assert (src[n:] == -1).all() and not packed.label_mask[r, n:].any() and not packed.noisy[r, n:].any()
    assert seen == set(range(len(samples)))
    assert torch.equal(packed.rows([1, 0])["position_ids"], packed.position_ids[[1, 0]])
    rewards = torch.arange(len(samples), dtype=torch.float32) + 1
    per_token = packed.token_map(rewards)
    assert torch.equal(per_token, torch.where(packed.sample_index >= 0, packed.sample_index.float() + 1,
                                              torch.zeros(())))
    docs = packed.document_tokens()
    assert [d.tolist() for d in docs] == [padded.input_ids[i, : int(lengths[i])].tolist() for i in range(len(samples))]


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
    from wmtp_lib.data.sources import load_codecontests

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
