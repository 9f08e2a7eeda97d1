"""The embedded default: tiny models built on the spot, deterministically, on a CPU. On 2 idle cores the first
run builds all three in 112 s (wall, `/usr/bin/time`, 179 CPU-seconds; the base pretrains in a second process
while this one trains the reference and the reward model, one thread each); the weights are the same to the bit
as when each is built alone on every thread.

What each was trained on (all text comes from `wmtp_lib.data.synthetic.synthetic_tasks`, ``seed`` = `stage_tiny`'s, 0 by
default; the fine-tuning data is seeded by ``data.data_seed``, 1234 by default; every corpus below is the
train split, whose constants are never a multiple of 7, so a test-split constant is never seen):

- ``tokenizer.model``: SentencePiece trained with Llama-2's settings on 600 clean tasks of corpus seed
  ``seed`` (every digit its own piece, so held-out test constants are spelled like training constants);
- ``tiny-mtp``: an MTP base *pretrained* like the 7B, so fine-tuning starts from a model that already writes
  such code: the multi-token objective on every head (`mtp_token_ce` + `weighted_mtp_loss`, uniform weights)
  over the full text (prompt and solution) of 1200 clean tasks of corpus seed ``seed + 3``, ``PRETRAIN``
  steps (120 x 16 rows of at most 144 tokens, AdamW lr 3e-3 with cosine decay); then written in Meta's
  layout (``tokenizer.model`` at the repo root, weights in a subfolder, as in Meta's repo) and converted, so
  the converter runs every time the default is staged. The synthetic tasks have only 6 families x 50
  training constants, so this corpus holds 286 of the 293 distinct task texts of the default fine-tuning
  data (clean, in other proportions and order) and none of the test split's: what fine-tuning adds is the
  noise, and the test asks whether it is learned;
- ``tiny-ref``: a next-token Llama trained briefly (300 steps x 16) on 800 clean tasks of corpus seed
  ``seed + 1`` (the Rho-1 reference);
- ``tiny-rm``: a sequence-classification reward model trained (600 steps x 16) to score the 600 tasks of
  corpus seed ``seed + 2`` 1 when correct, 0 when corrupted (half of them).
Each ends up as a converted directory with a manifest, exactly like a staged 7B model.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from wmtp_lib.checkpoints.convert import convert_checkpoint, save_meta_checkpoint
from wmtp_lib.checkpoints.tiny_builds import (PRETRAIN, REF_STEPS, RM_STEPS, TINY_BUILDS, TINY_IDS,  # noqa: F401
                                              record_build, stale_or_missing, tiny_build_id)
from wmtp_lib.checkpoints.tokenization import (
    convert_sentencepiece,
    train_llama_sentencepiece,
)
from wmtp_lib.data.rows import encode_sample
from wmtp_lib.data.sample import Sample
from wmtp_lib.data.synthetic import synthetic_corpus, synthetic_tasks
from wmtp_lib.model.heads import MTPModel, mtp_config

TINY_VOCAB = 512
TINY_DIMS = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)


def tiny_config_dict(model_id: str, n_future: int = 4) -> dict:
    """The architecture each tiny model is built with (what preflight sizes before they exist)."""
    # tiny-mtp: 4 trunk blocks + one per head (the trunk/head cost ratio matters for self-speculative decoding)
    layers = {"tiny-mtp": 4 + n_future, "tiny-ref": 3, "tiny-rm": 2}
    if model_id not in layers:
        raise ValueError(f"not a tiny model id: {model_id!r}")
    return {"vocab_size": TINY_VOCAB, "num_hidden_layers": layers[model_id], **TINY_DIMS}


def train_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB, workdir: str | Path | None = None):
    """A Llama-2-style SentencePiece tokenizer trained on ``texts``, converted exactly (ids 0/1/2 are
    ``<unk>``/``<s>``/``</s>``); ``tokenizer.model`` and the fast files are written to ``workdir`` when given."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        model_file = train_llama_sentencepiece(texts, Path(tmp) / "spm" / "tokenizer.model", vocab_size)
        return convert_sentencepiece(model_file, out)


def _batches(rows: list[list[int]], batch: int, length: int, pad: int, rng: random.Random):
    while True:
        picks = [rows[rng.randrange(len(rows))][:length] for _ in range(batch)]
        ids = torch.full((batch, length), pad, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, r in enumerate(picks):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        yield ids, mask


def build_tokenizer(workdir: Path, seed: int):
    return train_tokenizer(synthetic_corpus(seed=seed, n=600), workdir=workdir)


PRETRAIN_SEED_OFFSET = 3  # the tokenizer's corpus is seed, the reference's seed + 1, the reward model's seed + 2


def pretraining_corpus(seed: int, n_tasks: int = PRETRAIN["n_tasks"]) -> list[Sample]:
    """The base's pretraining text: clean training-split synthetic tasks of corpus seed ``seed + 3`` (no
    test-split constant, i.e. no multiple of 7; not the fine-tuning data, which is seeded by ``data_seed``)."""
    return synthetic_tasks(n_tasks, "train", seed + PRETRAIN_SEED_OFFSET, noise_fraction=0.0)


def pretrain_base(model: MTPModel, tokenizer, seed: int, steps: int = PRETRAIN["steps"],
                  batch: int = PRETRAIN["batch"], length: int = PRETRAIN["length"], lr: float = PRETRAIN["lr"],
                  n_tasks: int = PRETRAIN["n_tasks"], log: Callable[[str], None] = print) -> MTPModel:
    """Pretrain ``model`` in place with the multi-token objective, every head (`mtp_token_ce` and
    `weighted_mtp_loss` with uniform weights, as the ``mtp_baseline`` recipe; AdamW, cosine decay from ``lr``
    to 0, gradients clipped at 1), on the full text (prompt and
    solution, BOS to EOS) of `pretraining_corpus`: a base that already writes such code, as the 7B does."""
    from wmtp_lib.model.losses import mtp_token_ce, weighted_mtp_loss

    rows = [encode_sample(tokenizer, s, prompt_masking=False)[0] for s in pretraining_corpus(seed, n_tasks)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    rng = random.Random(f"pretrain-{seed}")
    batches = _batches(rows, batch, length, tokenizer.pad_token_id or 0, rng)
    model.train()
    for step in range(steps):
        ids, mask = next(batches)
        width = int(mask.sum(dim=1).max())  # padding past the longest row carries no target
        ids, mask = ids[:, :width], mask[:, :width]
        ce, valid = mtp_token_ce(model(ids, attention_mask=mask), ids, label_mask=mask)
        loss = weighted_mtp_loss(ce, torch.ones_like(ce), valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"tiny-mtp pretraining step {step}: loss {loss.item():.3f} (sum over {ce.shape[-1]} heads)")
    return model.eval()


def build_base(dst: Path, tokenizer, tokenizer_dir: Path, seed: int, n_future: int = 4,
               steps: int = PRETRAIN["steps"], log: Callable[[str], None] = print, dims: dict | None = None,
               vocab: int | None = None) -> Path:
    """An MTP base pretrained with `pretrain_base` (``steps``; 0 leaves it random), written in Meta's repo
    layout (weights in ``7B_1T_4/``, ``tokenizer.model`` at the root), then converted with `convert_checkpoint`.
    ``dims`` and ``vocab`` replace tiny-mtp's architecture (a larger random base built the same way, e.g. for
    memory measurements; default vocabulary: the tokenizer's)."""
    torch.manual_seed(seed)
    dims = {**tiny_config_dict("tiny-mtp", n_future), **(dims or {}), "vocab_size": vocab or len(tokenizer)}
    config = mtp_config(n_future, bos_token_id=1, eos_token_id=2, **dims)
    model = MTPModel(config)
    if steps > 0:
        pretrain_base(model, tokenizer, seed, steps=steps, log=log)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        meta_dir = save_meta_checkpoint(model, repo / "7B_1T_4")
        shutil.copy(tokenizer_dir / "tokenizer.model", repo / "tokenizer.model")
        convert_checkpoint(meta_dir, dst)
    return dst


def _save_and_convert(model, tokenizer_dir: Path, dst: Path) -> Path:
    """Save a Hugging Face model with the tokenizer, then run it through `convert_checkpoint`."""
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        model.eval().save_pretrained(str(hf))
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, hf / f.name)
        convert_checkpoint(hf, dst)
    return dst


def build_reference(dst: Path, tokenizer, tokenizer_dir: Path, seed: int, steps: int = 300,
                    log: Callable[[str], None] = print) -> Path:
    """A next-token Llama trained briefly on clean synthetic data, converted with a manifest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**tiny_config_dict("tiny-ref"), "vocab_size": len(tokenizer)}, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).train()
    samples = synthetic_tasks(800, "train", seed + 1, noise_fraction=0.0)
    rows = [encode_sample(tokenizer, s, prompt_masking=False)[0] for s in samples]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    batches = _batches(rows, 16, 128, 0, rng)
    for step in range(steps):
        ids, mask = next(batches)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"tiny-ref step {step}: loss {loss.item():.3f}")
    return _save_and_convert(model, tokenizer_dir, dst)


def build_reward(dst: Path, tokenizer, tokenizer_dir: Path, seed: int, steps: int = 600,
                 log: Callable[[str], None] = print) -> Path:
    """A sequence-classification reward model trained to score correct solutions 1 and corrupted 0."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(**{**tiny_config_dict("tiny-rm"), "vocab_size": len(tokenizer)}, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, num_labels=1)
    model = LlamaForSequenceClassification(config).train()
    samples: list[Sample] = synthetic_tasks(600, "train", seed + 2, noise_fraction=0.5)
    rows = [encode_sample(tokenizer, s, prompt_masking=False)[0][:-1] for s in samples]  # text, no EOS
    targets = torch.tensor([0.0 if s.noisy else 1.0 for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(seed)
    for step in range(steps):
        idx = [rng.randrange(len(rows)) for _ in range(16)]
        ids = torch.zeros(16, 128, dtype=torch.long)
        mask = torch.zeros(16, 128, dtype=torch.long)
        for i, j in enumerate(idx):
            r = rows[j][:128]
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        score = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = torch.nn.functional.mse_loss(score, targets[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"tiny-rm step {step}: mse {loss.item():.3f}")
    return _save_and_convert(model, tokenizer_dir, dst)


def stage_tiny(models_dir: str | Path, ids: tuple[str, ...] = TINY_IDS, seed: int = 0, force: bool = False,
               log: Callable[[str], None] = print, base_steps: int = PRETRAIN["steps"], ref_steps: int = REF_STEPS,
               rm_steps: int = RM_STEPS) -> dict[str, Path]:
    """Build the tiny models that are missing under ``models_dir``, or stale (built with another `tiny_build_id`:
    other code or settings), or all of ``ids`` when ``force``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    unknown = [i for i in ids if i not in TINY_IDS]
    if unknown:
        raise ValueError(f"not tiny model ids: {unknown}; tiny ids are {TINY_IDS}")
    # one builder at a time per directory (two notebooks, two test workers): the second waits, then finds the
    # models current
    with open(models_dir / ".tiny-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _stage_tiny_locked(models_dir, ids, seed, force, log, base_steps, ref_steps, rm_steps)


def _stage_tiny_locked(models_dir: Path, ids: tuple[str, ...], seed: int, force: bool, log: Callable[[str], None],
                       base_steps: int, ref_steps: int, rm_steps: int) -> dict[str, Path]:
    out = {}
    steps = {"tiny-mtp": base_steps, "tiny-ref": ref_steps, "tiny-rm": rm_steps}
    build = {i: tiny_build_id(i, seed, steps[i]) for i in TINY_IDS}
    todo = list(ids) if force else stale_or_missing(models_dir, ids, seed, steps)
    for i in ids:
        out[i] = models_dir / i
    if not todo:
        log(f"{', '.join(ids)} already staged and current under {models_dir}")
        return out
    stale = [i for i in todo if (models_dir / i / "manifest.json").is_file() and not force]
    if stale:
        log(f"rebuilding {stale}: built by other code or settings than this version's ({TINY_BUILDS} differs)")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tok_dir.mkdir()
        # a model built later shares the tokenizer of those already staged and current (never a retrained one
        # that a change to the synthetic corpus could have moved, nor a stale model's that such a change left)
        stale_anywhere = set(stale_or_missing(models_dir, TINY_IDS, seed, steps))
        staged = [models_dir / i for i in TINY_IDS if i not in todo and i not in stale_anywhere
                  and (models_dir / i / "tokenizer.model").is_file()]
        if staged:
            tokenizer = convert_sentencepiece(staged[0] / "tokenizer.model", tok_dir)
            log(f"tokenizer of {staged[0].name} reused: {len(tokenizer)} tokens")
        else:
            tokenizer = build_tokenizer(tok_dir, seed)
            log(f"trained tokenizer: {len(tokenizer)} tokens")
        for model_id in todo:
            if (models_dir / model_id).exists():
                shutil.rmtree(models_dir / model_id)
        # The base's pretraining and the other two models are independent: with a second core the base is built
        # in its own process meanwhile (one thread each, the same numbers either way; its log lines follow).
        others = [i for i in todo if i != "tiny-mtp"]
        side = None
        if "tiny-mtp" in todo and others and (os.cpu_count() or 1) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            side = pool.submit(_build_base_logged, models_dir / "tiny-mtp", tok_dir, seed, base_steps)
            log("building tiny-mtp (pretraining) in a second process")
        try:
            for model_id in todo:
                dst = models_dir / model_id
                if model_id == "tiny-mtp":
                    if side is not None:
                        continue
                    with _one_thread():
                        build_base(dst, tokenizer, tok_dir, seed, steps=base_steps, log=log)
                else:
                    # while the base pretrains on the other core this process keeps to one thread (two made three
                    # threads on two cores: 130 s in all on 2 idle cores); the weights are the same to the bit either way
                    with _one_thread() if side is not None and not side.done() else contextlib.nullcontext():
                        if model_id == "tiny-ref":
                            build_reference(dst, tokenizer, tok_dir, seed, steps=ref_steps, log=log)
                        else:
                            build_reward(dst, tokenizer, tok_dir, seed, steps=rm_steps, log=log)
                record_build(models_dir, model_id, build[model_id])
                log(f"staged {model_id} -> {dst}")
            if side is not None:
                for line in side.result():
                    log(line)
                record_build(models_dir, "tiny-mtp", build["tiny-mtp"])
                log(f"staged tiny-mtp -> {models_dir / 'tiny-mtp'}")
        finally:
            if side is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return out


class _one_thread:
    """The base is always pretrained on one intra-op thread, so the same seed gives the same weights to the
    last bit whether it is built in this process or in the second one."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _build_base_logged(dst: Path, tokenizer_dir: Path, seed: int, steps: int) -> list[str]:
    """`build_base` in a worker process; returns its log lines (a worker cannot write into a notebook)."""
    from wmtp_lib.checkpoints.tokenization import load_tokenizer

    lines: list[str] = []
    with _one_thread():
        build_base(dst, load_tokenizer(tokenizer_dir), tokenizer_dir, seed, steps=steps, log=lines.append)
    return lines
