"""Reward models behind one interface: ``score(texts) -> (N,) float tensor``.

Two layouts: a Hugging Face sequence-classification model (``num_labels=1``, score at the last
non-pad token) and Starling's (a Llama trunk under ``transformer.*`` plus a linear ``v_head``). Reward
models score text, so their tokenizer may differ from the policy's: callers decode and pass strings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wmtp_lib.heads import load_safetensors_dir


class StarlingRewardModel(nn.Module):
    """Llama trunk + ``v_head``; the reward is ``v_head(h)`` at the last non-pad token."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.transformer = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        values = self.v_head(hidden).squeeze(-1)
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class RewardModel:
    """Scores texts with a reward model of either layout."""

    def __init__(self, model: nn.Module, tokenizer, layout: str, max_length: int = 2048,
                 device: str | torch.device = "cpu", batch_size: int = 8):
        if layout not in ("sequence_classification", "starling"):
            raise ValueError(f"unknown reward layout {layout!r}")
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.layout = layout
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, path: str | Path, layout: str, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", max_length: int = 2048) -> "RewardModel":
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if layout == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                       **({"dtype": dtype} if dtype else {}))
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                    else tokenizer.eos_token_id
        else:
            config = AutoConfig.from_pretrained(str(path))
            model = StarlingRewardModel(config)
            state = load_safetensors_dir(path)
            model.load_state_dict(state, strict=True)
            if dtype is not None:
                model = model.to(dtype)
        return cls(model, tokenizer, layout, max_length=max_length, device=device)

    @torch.no_grad()
    def score(self, texts: list[str]) -> torch.Tensor:
        """One float reward per text."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length)
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            if self.layout == "starling":
                scores = self.model(ids, mask)
            else:
                scores = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
            out.append(scores.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
