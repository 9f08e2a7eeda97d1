"""Token-level noise marks: corrupted character spans per family, spans -> token masks, the per-head weight
statistics on corrupted / other / clean-slot tokens, and the noise-imitation read-out."""

from __future__ import annotations

import pytest
import torch

from wmtp_lib.checkpoints.tiny import train_tokenizer
from wmtp_lib.data.rows import spans_to_token_mask, tokenize_samples
from wmtp_lib.data.synthetic import (
    _FAMILIES,
    corruption_spans,
    family_of,
    synthetic_tasks,
    uses_corrupted_operation,
)
from wmtp_lib.eval.evaluation import noise_imitation
from wmtp_lib.train.weight_stats import (
    NOISE_KEYS,
    add_sums,
    noise_token_sums,
    noisy_targets,
    pack_sums,
    summarize,
    unpack_sums,
    weight_sums,
)

# Worked by hand: clean constant 12, corrupted constant 14; spans in completion coordinates, whitespace
# around an operator is not part of the span.
#   add_const:   "def add_const(x):\n" is 18 chars, "    return x" 12 more -> " - " at 30, "-" at 31, "14" at 33
#   times_const: 20 + 12 -> "+" at 33, "14" at 35
#   sub_const:   18 + 12 -> "*" at 31, "14" at 33
#   keep_above:  20 + len("    return [x for x in xs if x") = 50 -> "<" at 51, "14" at 53
#   repeat_text: 20 + 12 = 32 -> "[:" at 32, "14" at 34, "]" at 36
#   divisible:   18 + len("    return x % ") = 33 -> "14" at 33, " != " at 35, "!=" at 36
HAND = {
    "add_const": ("def add_const(x):\n    return x - 14\n", [(31, 32), (33, 35)], ["-", "14"]),
    "times_const": ("def times_const(x):\n    return x + 14\n", [(33, 34), (35, 37)], ["+", "14"]),
    "sub_const": ("def sub_const(x):\n    return x * 14\n", [(31, 32), (33, 35)], ["*", "14"]),
    "keep_above": ("def keep_above(xs):\n    return [x for x in xs if x < 14]\n", [(51, 52), (53, 55)],
                   ["<", "14"]),
    "repeat_text": ("def repeat_text(s):\n    return s[:14]\n", [(32, 34), (34, 36), (36, 37)], ["[:", "14", "]"]),
    "divisible": ("def divisible(x):\n    return x % 14 != 0\n", [(36, 38), (33, 35)], ["!=", "14"]),
}


@pytest.mark.parametrize("name", list(HAND))
def test_corruption_spans_hand_worked_per_family(name):
    _, _, template, clean, corrupted, _, _ = _FAMILIES[family_of(name)]
    text, spans = corruption_spans(template, {**clean, "c": "12"}, {**corrupted, "c": "14"})
    want_text, want_spans, pieces = HAND[name]
    assert text == want_text
    assert sorted(spans) == sorted(want_spans)
    assert sorted(text[a:b] for a, b in spans) == sorted(pieces)


def test_generated_samples_carry_their_spans():
    samples = synthetic_tasks(300, "train", 4, 0.3)
    assert {s.entry_point for s in samples if s.noisy} == set(HAND)
    for s in samples:
        pieces = [s.completion[a:b] for a, b in s.noise_spans]
        _, _, template, clean, corrupted, _, _ = _FAMILIES[family_of(s.entry_point)]
        ops = {clean["op"].strip(), corrupted["op"].strip()}
        assert any(p in ops for p in pieces) and any(p.isdigit() for p in pieces), (s.completion, pieces)
        # a clean sample's marks are its own operation; a noisy one's the corrupted operation
        assert (corrupted["op"].strip() in pieces) == s.noisy


def test_spans_to_token_mask_overlap_rule():
    # text "ab cd-ef": tokens "ab", " cd", "-", "ef", and a special token with empty offsets
    offsets = [(0, 2), (2, 5), (5, 6), (6, 8), (0, 0)]
    assert spans_to_token_mask([(5, 6)], offsets) == [False, False, True, False, False]
    assert spans_to_token_mask([(4, 7)], offsets) == [False, True, True, True, False]
    assert spans_to_token_mask([(2, 3)], offsets) == [False, True, False, False, False]
    assert spans_to_token_mask([], offsets) == [False] * 5
    # completion spans inside prompt+completion offsets: shifted by the prompt length
    assert spans_to_token_mask([(1, 2)], offsets, shift=4) == [False, False, True, False, False]


@pytest.fixture(scope="module")
def tok():
    from wmtp_lib.data.synthetic import synthetic_corpus

    return train_tokenizer(synthetic_corpus(n=200), vocab_size=400)


def test_token_marks_decode_to_the_corrupted_pieces(tok):
    samples = synthetic_tasks(40, "train", 11, 0.5)
    data = tokenize_samples(tok, samples, max_length=192)
    assert int(data.attention_mask.sum(1).max()) < 192  # nothing truncated
    for i, s in enumerate(samples):
        marked = data.input_ids[i][data.noise_marks[i]].tolist()
        decoded = tok.decode(marked)
        # every marked character is in a marked token, and the marked tokens hold nothing else (but spaces)
        for a, b in s.noise_spans:
            assert s.completion[a:b] in decoded, (s.completion, decoded)
        assert decoded.replace(" ", "") == "".join(s.completion[a:b] for a, b in sorted(s.noise_spans)), decoded
        assert not (data.noise_marks[i] & ~data.label_mask[i]).any()
    # packed rows (whole documents, positions restarting at 0) carry the same marks as the samples' own rows
    packed = tokenize_samples(tok, samples, max_length=512, pack=True)
    assert len(packed) < len(samples)
    real = packed.sample_index >= 0
    own = data.noise_marks[packed.sample_index[real], packed.position_ids[real]]
    assert torch.equal(packed.noise_marks[real], own)
    assert not packed.noise_marks[~real].any()
    assert int(packed.noise_marks.sum()) == int(data.noise_marks.sum())
    assert sum(s.noisy for s in samples) == 20


def _brute_noise_stats(weights, valid, noisy_tok, mark_tok):
    B, T, H = weights.shape
    out = {k: torch.zeros(H) for k in NOISE_KEYS}
    for b in range(B):
        for t in range(T):
            for k in range(H):
                j = t + k + 1
                if not valid[b, t, k] or j >= T:
                    continue
                group = ("corrupt" if mark_tok[b, j] else "corrupt_rest") if noisy_tok[b, j] else \
                    ("clean_slot" if mark_tok[b, j] else None)
                if group:
                    out[f"w_{group}_sum"][k] += weights[b, t, k]
                    out[f"n_{group}"][k] += 1
    return out


def test_noise_token_sums_match_brute_force():
    g = torch.Generator().manual_seed(0)
    B, T, H = 3, 13, 4
    weights = torch.rand(B, T, H, generator=g) * 2
    valid = torch.rand(B, T, H, generator=g) > 0.2
    for k in range(H):
        valid[:, T - k - 1:, k] = False
    noisy_tok = torch.zeros(B, T, dtype=torch.bool)
    noisy_tok[0] = True
    noisy_tok[2, :6] = True  # a packed row: a noisy document, then a clean one
    mark_tok = torch.rand(B, T, generator=g) > 0.6
    got = noise_token_sums(weights, valid, noisy_targets(noisy_tok, H), noisy_targets(mark_tok, H))
    want = _brute_noise_stats(weights, valid, noisy_tok, mark_tok)
    for key in NOISE_KEYS:
        torch.testing.assert_close(got[key], want[key], msg=key)
    # through the accumulate -> pack -> reduce -> unpack -> summarize path of the trainer
    sums = {}
    for half in (slice(0, 2), slice(2, 3)):
        sums = add_sums(sums, weight_sums(weights[half], valid[half], noisy_targets(noisy_tok[half], H),
                                          noisy_targets(mark_tok[half], H)))
    merged = unpack_sums(pack_sums(sums).tolist(), H)
    merged["w_max"] = float(sums["w_max"])  # reduced by max, apart from the sums
    summary = summarize(merged)
    for name in ("corrupt", "corrupt_rest", "clean_slot"):
        n = want[f"n_{name}"]
        expect = [float(w / c) if c > 0 else None for w, c in zip(want[f"w_{name}_sum"], n)]
        assert summary[f"weight_{name}"] == pytest.approx(expect), name


def test_unpack_rejects_wrong_head_count():
    w = torch.ones(1, 4, 2)
    flat = pack_sums(weight_sums(w, w.bool())).tolist()
    with pytest.raises(ValueError, match="expected"):
        unpack_sums(flat, 3)


@pytest.mark.parametrize("name", list(HAND))
def test_noise_imitation_reads_the_corrupted_operation(name):
    _, _, template, clean, corrupted, _, _ = _FAMILIES[family_of(name)]
    from wmtp_lib.data.synthetic import render_solution

    good = render_solution(template, {**clean, "c": "21"})[0]
    bad = render_solution(template, {**corrupted, "c": "35"})[0]
    assert not uses_corrupted_operation(name, good)
    assert uses_corrupted_operation(name, bad)
    # free spacing still counts; the same operation with a missing constant does not
    assert uses_corrupted_operation(name, bad.replace(" ", "  ").replace("def  ", "def "))
    assert not uses_corrupted_operation(name, bad.replace("35", "c"))
    sample = next(s for s in synthetic_tasks(60, "test", 0) if s.entry_point == name)
    assert noise_imitation("synthetic", sample, [good, bad, bad, good]) == {"noise_imitation": 0.5}
    assert noise_imitation("mbpp", sample, [bad]) == {}


def test_noise_imitation_rejects_unknown_function():
    with pytest.raises(ValueError, match="not a synthetic task function"):
        uses_corrupted_operation("fizzbuzz", "return 1")
