"""Rows: samples tokenised into fixed-length rows (padded, or packed whole), their masks and noise marks, and
the `Batch` of rows that travels from here to the training step.

A sample is ``prompt + completion + EOS``; the loss mask covers the completion (and EOS) when prompt
masking is on. Rows of noisy samples (``noisy``) and the tokens of their corruption (``noise_marks``) are
marked, so training can report the weight given to noisy vs clean tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Required, TypedDict

import torch

from wmtp_lib.data.packing import pack_documents
from wmtp_lib.data.sample import Sample


class Batch(TypedDict, total=False):
    """Rows on their way to the step, all ``(B, T)`` but ``row_index`` ``(B,)``: what `TokenizedData.rows`
    returns and every consumer reads (the step, the weightings, the critic, evaluation). ``position_ids`` is
    there for packed rows only (positions restart at 0 per document)."""

    input_ids: Required[torch.Tensor]
    attention_mask: Required[torch.Tensor]
    label_mask: Required[torch.Tensor]
    noisy: torch.Tensor  # bool: the token's sample is a corrupted one
    noise_marks: torch.Tensor  # bool: the corrupted tokens of a noisy sample, the same slots of a clean one
    row_index: torch.Tensor  # which rows of the `TokenizedData` these are (per-row tables: rewards, cut documents)
    position_ids: torch.Tensor


def make_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               label_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> Batch:
    """A `Batch` of bare rows ``(B, T)``: every token attended to and a target unless the masks say otherwise."""
    batch: Batch = {"input_ids": input_ids,
                    "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                    "label_mask": torch.ones_like(input_ids, dtype=torch.bool) if label_mask is None else label_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


def move_batch(batch: Batch, device) -> Batch:
    """A micro-batch on the device; ``row_index`` stays on the host (it indexes host tables: reference losses,
    rewards), so looking rows up costs no device sync."""
    return {k: v if k == "row_index" else v.to(device) for k, v in batch.items()}


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
    # is what keeps documents apart in the model and the losses (wmtp_lib.model.packing); None = one a row
    position_ids: torch.Tensor | None = None
    # (N, T) tokens overlapping their sample's noise_spans: the corrupted tokens of a noisy sample, the
    # operation and constant of a clean one (``noisy`` tells which); default: none marked
    noise_marks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.noise_marks is None:
            self.noise_marks = torch.zeros_like(self.label_mask, dtype=torch.bool)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | list[int]) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        out: Batch = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
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

    Packed rows hold whole samples (first fit, see `wmtp_lib.data.packing.pack_documents`), right-padded,
    with ``position_ids`` restarting at 0 at each sample so that none attends to or predicts another.
    """
    encoded = [encode_sample(tokenizer, s, prompt_masking) for s in samples]
    marks = [sample_token_marks(tokenizer, s, len(ids)) if s.noise_spans else [False] * len(ids)
             for s, (ids, _) in zip(samples, encoded)]
    pid = pad_id(tokenizer)
    rows_ids, rows_tgt, rows_src, rows_pos, rows_mark = [], [], [], [], []
    if pack:
        # whole documents, first fit; each restarts its positions at 0 (wmtp_lib.model.packing)
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
