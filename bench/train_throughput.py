"""Training throughput (tokens/s) and MFU of `mtp_baseline` steps, plainly and under FSDP2 in one process.

A step is the trainer's (`wmtp_lib.train.loop.Trainer.train_step` for `mtp_baseline`, minus logging): the
sequential MTP step over one micro-batch with uniform weights (`forward_backward`), gradient clipping,
AdamW, zeroed gradients. ``plain`` runs it under bf16 autocast with float32 weights (the trainer on one
GPU); ``fsdp`` shards the model with FSDP2 and bf16 parameters, float32 reduction, in a one-process group
(the trainer under accelerate's FSDP config). Both models live in this process and are timed in
interleaved rounds (`bench_models.interleaved_rounds`); the FSDP2/plain ratio is the median of the paired
per-round ratios.

MFU is model FLOPs per token × tokens per second / the device's dense bf16 peak. Model FLOPs per
training token (`flops_per_token`; forward 2 FLOPs per multiply-add, backward twice the forward, so 6 per
weight a token meets; the count of PaLM's appendix B, as torchtitan's):

    flops_per_token = 6·N_dense + 6·H·D·V + 12·L·n_heads·d_head·T

- ``N_dense = L · (D·n_heads·d_head + 2·D·n_kv·d_head + n_heads·d_head·D + 3·D·I)``: the matrices of the
  ``L`` = trunk + ``H`` decoder blocks (q, k, v, o; gate, up, down); every token passes through every
  trunk block and every head block once.
- ``6·H·D·V``: the ``H`` heads' unembeddings (the one ``D × V`` matrix, applied once per head). The
  embedding is a lookup (no FLOPs).
- ``12·L·n_heads·d_head·T``: attention's scores (QKᵀ) and weighted sum of values, ``2·T·n_heads·d_head``
  multiply-adds per token per block in forward; ``T`` is the whole sequence (the causal mask's zeros
  counted, as PaLM and torchtitan count them).
- Not counted: norms, RoPE, softmax, the cross-entropy, and recomputation (the chunked cross-entropy's
  recomputed logits in backward are hardware FLOPs, not model FLOPs).

The peak comes from `PEAK_BF16_TFLOPS` by device name (dense, without sparsity) or ``--peak-tflops``.

    python bench/train_throughput.py --device cuda                  # ≈1B parameters, sequence 2048, bf16
    python bench/train_throughput.py --preset tiny --rounds 2       # the same code path at CPU size
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_models import (  # noqa: E402
    bench_header,
    interleaved_rounds,
    machine_name,
    paired_ratio,
    timed,
)
from transformers import LlamaConfig  # noqa: E402

from wmtp_lib.model.heads import MTPModel, mtp_config  # noqa: E402
from wmtp_lib.train.distributed import Dist, clip_grad_norm, shard_fsdp  # noqa: E402
from wmtp_lib.train.loop import forward_backward  # noqa: E402
from wmtp_lib.train.weighting import UniformWeighting  # noqa: E402

PRESETS = {
    # 14 trunk + 4 head blocks of Llama's shape at hidden 2048 (MLP 8/3·D rounded up to 256): 1.06B parameters
    "1b": dict(hidden=2048, layers=18, heads=16, kv_heads=16, intermediate=5632, vocab=32000, length=2048, batch=4),
    # the same code path at a size the 2-core CPU runs in seconds
    "tiny": dict(hidden=64, layers=6, heads=4, kv_heads=4, intermediate=176, vocab=512, length=128, batch=2),
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so a variant is listed before its family.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

MODES = ("plain", "fsdp")


def flops_per_token(config: LlamaConfig, length: int) -> dict[str, int]:
    """Model FLOPs of one training token (forward + backward) of an MTP model, by part, and their ``total``.

    ``config`` is an `MTPConfig` (``num_hidden_layers`` counts trunk + head blocks); ``length`` is the
    sequence length ``T``. The formula is in this module's docstring.
    """
    D, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    L, H = config.num_hidden_layers, config.n_future_tokens
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = getattr(config, "head_dim", None) or D // n_heads
    block = D * n_heads * d_head + 2 * D * n_kv * d_head + n_heads * d_head * D + 3 * D * I
    parts = {"dense": 6 * L * block, "unembedding": 6 * H * D * V, "attention": 12 * L * n_heads * d_head * length}
    parts["total"] = sum(parts.values())
    return parts


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak for ``device_name`` (``override`` when given), or None when the table has none."""
    if override is not None:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_token: int, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak ``peak`` in TFLOP/s."""
    return flops_per_token * tokens_per_second / (peak * 1e12)


def build_model(args: argparse.Namespace, device: torch.device) -> MTPModel:
    """The seeded 4-head model of the chosen size, built on ``device`` (1B parameters: no CPU detour)."""
    config = mtp_config(4, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, max_position_embeddings=args.length)
    torch.manual_seed(0)
    with device:
        return MTPModel(config).train()


class TrainStep:
    """One mode's model, optimizer and batch; calling it runs one optimizer step and waits for the device."""

    def __init__(self, mode: str, args: argparse.Namespace, device: torch.device):
        self.model = build_model(args, device)
        self.autocast = mode == "plain"
        if mode == "fsdp":
            self.model = shard_fsdp(self.model, "bf16")
        self.dist = Dist(device, fsdp=mode == "fsdp")
        self.device = device
        self.chunk = args.chunk
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=generator)
        self.batches = [{"input_ids": ids.to(device),
                         "attention_mask": torch.ones_like(ids).to(device),
                         "label_mask": torch.ones_like(ids, dtype=torch.bool).to(device)}]
        self.weighting = UniformWeighting()

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            forward_backward(self.model, self.batches, self.weighting, self.dist, "micro_batch", None, self.chunk)
        clip_grad_norm(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: the step ends when they do


def one_process_group(device: torch.device) -> None:
    """A world of one (FSDP2 needs a process group; nothing to launch)."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="1b")
    for key in PRESETS["1b"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help="overrides the preset")
    parser.add_argument("--chunk", type=int, default=512, help="cross-entropy chunk (train.chunk_size)")
    parser.add_argument("--modes", default=",".join(MODES), help="plain,fsdp or one of them (GPU memory)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each mode)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak in TFLOP/s (overrides the table)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise SystemExit(f"--modes: {','.join(unknown) or 'nothing'} is not a mode; use plain, fsdp or plain,fsdp")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if "fsdp" in modes:
        one_process_group(device)
    steps = {m: TrainStep(m, args, device) for m in modes}
    n_params = sum(p.numel() for p in build_model(args, torch.device("meta")).parameters())
    seconds = interleaved_rounds({m: timed(s) for m, s in steps.items()}, args.rounds)

    print(bench_header(device, "bf16 (plain: autocast, fp32 weights; fsdp: FSDP2 bf16 params, fp32 reduce)"))
    config = steps[modes[0]].model.config
    flops = flops_per_token(config, args.length)
    tokens = args.batch * args.length
    print(f"model: mtp_baseline, {n_params / 1e6:,.1f}M parameters ({args.layers - 4} trunk + 4 head blocks, "
          f"hidden {args.hidden}, {args.heads} attention heads, MLP {args.intermediate}, vocab {args.vocab}); "
          f"batch {args.batch} x {args.length} = {tokens} tokens a step, chunk {args.chunk}; "
          f"one warm-up round, {args.rounds} timed")
    print(f"model FLOPs per token: {flops['total'] / 1e9:.4g} G = dense 6N {flops['dense'] / 1e9:.4g} G + "
          f"{config.n_future_tokens} unembeddings {flops['unembedding'] / 1e9:.4g} G + "
          f"attention {flops['attention'] / 1e9:.4g} G")
    name = machine_name(device)
    peak = peak_tflops(name, args.peak_tflops)
    peak_note = (f"peak {peak:g} TFLOP/s ({'--peak-tflops' if args.peak_tflops is not None else 'table'})"
                 if peak is not None else f"no bf16 peak known for {name!r}; --peak-tflops sets one")
    for m in modes:
        per_round = [tokens / s for s in seconds[m]]
        median = statistics.median(per_round)
        mfu_text = f"MFU {100 * mfu(flops['total'], median, peak):.3g}%" if peak is not None else "MFU n/a"
        print(f"{m:>6}: {median:,.0f} tokens/s (per-round {min(per_round):,.0f}-{max(per_round):,.0f}), "
              f"step {statistics.median(seconds[m]):.4g} s, {mfu_text}; {peak_note}")
    if len(modes) == 2:
        print(f"ratio fsdp/plain step time: {paired_ratio(seconds['fsdp'], seconds['plain'])}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
