"""Reward models as they are: ``score(prompts, responses) -> (N,) float tensor``.

Each reward model reads text in its own input template with its own tokenizer (DESIGN §5), truncated
on the registry's side (left keeps the end, where the score is read) and scored at the last token:

- ``sequence_classification``: a Hugging Face ``*ForSequenceClassification`` (``num_labels=1``), e.g.
  FsfairX-LLaMA3-RM with its chat template;
- ``starling``: Starling-RM-7B-alpha, a Llama trunk plus a linear ``v_head``, input
  ``<s>[INST] {prompt} </s> [/INST] {response}</s>`` with Llama-2's tokenizer, scored at the template's final
  ``</s>`` (the row's last token, which left truncation keeps), as reward-bench's and OpenRLHF's Starling
  classes read it. A ``</s>`` written inside the response is an EOS too (``literal_control_tokens: control``,
  as the card's tokenizer reads it) but is not where the score is read. The card's own code reads index
  ``c_ind - 1`` with ``PAD_ID = tokenizer("<unk>")["input_ids"][0]``, which is BOS (the tokenizer adds it),
  so ``c_ind = 0`` and it reads the last position of a row padded to 2048: a pad position for any shorter
  input; we do not copy that.

Scores are read at the last attended position of each row, computed here from the hidden states, so
the result does not depend on a pad id the tokenizer may not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from wmtp_lib.model.heads import load_safetensors_dir
from wmtp_lib.registry import LITERAL_CONTROL_TOKENS, REWARD_LAYOUTS

CHAT_TEMPLATE = "chat_template"  # input_template value: the tokenizer's own chat template


class StarlingRewardModel(nn.Module):
    """Llama trunk (``transformer``) + ``v_head``; the reward is ``v_head(h)`` at the last attended token."""

    def __init__(self, config, v_head_bias: bool = False):
        super().__init__()
        from transformers import LlamaModel

        self.transformer = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=v_head_bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        values = self.v_head(hidden).squeeze(-1)
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def starling_state(state: dict[str, torch.Tensor], src: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Starling's file → ``transformer.*`` + ``v_head.*``; returns the state and the keys dropped.

    Its authors' module holds ``model`` (a ``LlamaForCausalLM``), ``transformer`` (= ``model.model``) and
    ``v_head`` and was saved whole, so a file may hold ``model.model.*``, ``transformer.*`` or both (then
    they must be equal), and ``model.lm_head.weight`` (not used for the reward: dropped and listed).
    Any other key is an error naming it.
    """
    out: dict[str, torch.Tensor] = {}
    dropped, unplaced = [], []
    for name, tensor in state.items():
        if name.startswith("v_head.") or name.startswith("transformer."):
            target = name
        elif name.startswith("model.model."):
            target = "transformer." + name[len("model.model."):]
        elif name == "model.lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
            dropped.append(name)
            continue
        else:
            unplaced.append(name)
            continue
        if target in out and not torch.equal(out[target], tensor):
            raise ValueError(f"{src}: {name} and {target} hold different values; cannot tell which trunk scores")
        out[target] = tensor
    if unplaced:
        raise KeyError(f"{src}: keys that fit no Starling layout (model.model.*, transformer.*, "
                       f"model.lm_head.weight, v_head.*): {sorted(unplaced)[:8]} ({len(unplaced)} in all)")
    if not any(k.startswith("transformer.") for k in out):
        raise KeyError(f"{src}: a Starling file needs the Llama trunk under model.model.* or transformer.*")
    return out, sorted(dropped)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def _split_on(text: str, strings) -> list[str]:
    """``text`` cut around every occurrence of ``strings`` (longest first): odd items are the strings found."""
    if not strings:
        return [text]
    pattern = "|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True))
    return re.split(f"({pattern})", text)


def encode_reward_input(tokenizer, template: str, prompt: str, response: str,
                        literal_control_tokens: str) -> list[int]:
    """Token ids of one (prompt, response) in a reward model's input template, starting with BOS.

    A text template (``{prompt}``/``{response}`` placeholders) starts with BOS, as Llama's tokenizer adds
    it; the tokenizer's control-token strings written in the template (``<s>``, ``</s>``) are those tokens.
    Prompt and response are put in place of their placeholders as they are, with no marker that their own
    text could collide with. ``literal_control_tokens`` says how the same strings inside the prompt or the
    response are read (registry field, DESIGN §5): ``text`` keeps them as characters (SentencePiece's own
    reading); ``control`` reads them as the control tokens, as Llama-2's Hugging Face tokenizer in
    Starling's card does; ``control_bos_deleted`` first deletes the BOS string. Each run of text between
    control tokens is tokenized as one text, as Llama-2's tokenizer does.

    ``chat_template`` renders the tokenizer's own chat template (messages are data to it, so nothing is
    spliced) and reads every control-token string of the result as that token; ``control_bos_deleted``
    deletes the BOS string from the rendered text and puts one BOS in front, as FsfairX's card does
    (``apply_chat_template(...).replace(bos_token, "")``, then its pipeline's tokenizer adds BOS).
    """
    if literal_control_tokens not in LITERAL_CONTROL_TOKENS:
        raise ValueError(f"literal_control_tokens must be one of {LITERAL_CONTROL_TOKENS}, "
                         f"got {literal_control_tokens!r}")
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos_id is None:
        raise ValueError("a reward model's tokenizer needs a BOS token: its rows start with it")
    if template == CHAT_TEMPLATE:
        if literal_control_tokens == "text":
            raise ValueError("a chat template is read with its control tokens: literal_control_tokens 'text' "
                             "is only for text templates")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if literal_control_tokens == "control_bos_deleted":
            return [bos_id] + tokenizer(text.replace(bos, ""), add_special_tokens=False,
                                        split_special_tokens=False)["input_ids"]
        return tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    controls = list(tokenizer.get_added_vocab())
    fields = {"{prompt}": prompt, "{response}": response}
    # (is_control, string) pieces in order; adjacent text pieces form one run
    pieces: list[tuple[bool, str]] = []
    for i, part in enumerate(re.split(r"(\{prompt\}|\{response\})", template)):
        if i % 2 == 0:  # the template's own text: its control-token strings are control tokens
            pieces += [(j % 2 == 1, p) for j, p in enumerate(_split_on(part, controls))]
        elif literal_control_tokens == "text":
            pieces.append((False, fields[part]))
        else:
            value = fields[part].replace(bos, "") if literal_control_tokens == "control_bos_deleted" else fields[part]
            pieces += [(j % 2 == 1, p) for j, p in enumerate(_split_on(value, controls))]
    ids, run = [bos_id], ""
    for is_control, string in pieces:
        if not is_control:
            run += string
            continue
        if run:
            ids += tokenizer(run, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids(string))
        run = ""
    if run:  # a run holds control-token strings only as text ("text" fields): never matched as tokens
        ids += tokenizer(run, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def truncate_reward_input(ids: list[int], max_length: int, side: str) -> list[int]:
    """At most ``max_length`` ids; the first (BOS) is always kept.

    Hugging Face truncates the text's tokens and then adds BOS, so a left-truncated row is
    ``[BOS] + last (max_length − 1)`` tokens (the end, where the score is read, stays); a right-truncated
    row is the first ``max_length``.
    """
    if len(ids) <= max_length:
        return ids
    if side == "left":
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[:max_length]


class RewardModel:
    """Scores (prompt, response) pairs with a reward model of either layout."""

    def __init__(self, model: nn.Module, tokenizer, layout: str, input_template: str,
                 truncation_side: str = "left", max_length: int = 2048, device: str | torch.device = "cpu",
                 batch_size: int = 8, *, literal_control_tokens: str):
        if layout not in REWARD_LAYOUTS:
            raise ValueError(f"unknown reward layout {layout!r}; use one of {REWARD_LAYOUTS}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if literal_control_tokens not in LITERAL_CONTROL_TOKENS:
            raise ValueError(f"literal_control_tokens must be one of {LITERAL_CONTROL_TOKENS}, "
                             f"got {literal_control_tokens!r}")
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.layout = layout
        self.input_template = input_template
        self.truncation_side = truncation_side
        self.literal_control_tokens = literal_control_tokens
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, path: str | Path, layout: str, input_template: str, truncation_side: str = "left",
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 max_length: int = 2048, *, literal_control_tokens: str) -> "RewardModel":
        """A converted reward-model directory (weights, config and the tokenizer it reads text with);
        ``layout``, ``input_template``, ``truncation_side`` and ``literal_control_tokens`` are its registry
        entry's fields."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from wmtp_lib.checkpoints.tokenization import load_tokenizer

        path = Path(path)
        tokenizer = load_tokenizer(path)
        if layout == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                       **({"dtype": dtype} if dtype else {}))
        else:
            config = AutoConfig.from_pretrained(str(path))
            state = load_safetensors_dir(path)
            # built on the meta device and filled by assignment: no random 7B float32 init, no global RNG draws
            # (only rank 0 scores rewards, so a draw here would shift its RNG against the other ranks')
            with torch.device("meta"):
                model = StarlingRewardModel(config, v_head_bias="v_head.bias" in state)
            model.load_state_dict(state, strict=True, assign=True)
            if dtype is not None:
                model = model.to(dtype)
            # the RoPE buffer is not in the state dict: rebuild it, float32 in every dtype (DESIGN §5)
            model.transformer.rotary_emb = type(model.transformer.rotary_emb)(config=config)
        return cls(model, tokenizer, layout, input_template, truncation_side, max_length=max_length, device=device,
                   literal_control_tokens=literal_control_tokens)

    @property
    def backbone(self) -> nn.Module:
        """The decoder (``LlamaModel``) under the scoring head: its last hidden state at each prefix is what a
        critic's value head reads with ``critic.value_trunk: reward_model``."""
        return self.model.transformer if self.layout == "starling" else self.model.base_model

    def encode(self, prompt: str, response: str) -> list[int]:
        """Template, tokenize and truncate one pair (left truncation keeps BOS and the final token)."""
        ids = encode_reward_input(self.tokenizer, self.input_template, prompt, response, self.literal_control_tokens)
        return truncate_reward_input(ids, self.max_length, self.truncation_side)

    def _scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.layout == "starling":
            return self.model(ids, mask)
        # the classification head at the last attended token (what *ForSequenceClassification pools)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)]
        return self.model.score(last)[:, 0]

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """One float reward per (prompt, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [self.encode(p, r) for p, r in zip(prompts[start:start + self.batch_size],
                                                      responses[start:start + self.batch_size])]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding; masked out
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            out.append(self._scores(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)
