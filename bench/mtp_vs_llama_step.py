"""An `mtp_baseline` training step (4 heads, sequential backward) vs a plain next-token `LlamaForCausalLM`
step of the same total depth (DESIGN §9 target: ≤ 1.15×), one run, same data, same thread count.

Both models have ``--layers`` Llama blocks (MTP: ``layers − 4`` trunk blocks + 4 head blocks). The MTP
step also pays 3 more unembeddings and cross-entropies, so the ratio depends on how large the
unembedding is against the blocks: ``--preset 7b`` keeps the 7B model's proportion (vocab·4 / (hidden·layers)
of 32000·4 / (4096·32)) at CPU size; ``--preset vocab32k`` uses the real vocabulary with a small hidden
size, where the unembedding dominates.

Timed in interleaved rounds (one step of each, the order alternating); the ratio is the median of the
paired per-round ratios, printed with its range (`bench_models.interleaved_rounds`).

    python bench/mtp_vs_llama_step.py [--preset 7b|vocab32k] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from bench_models import (  # noqa: E402
    bench_header,
    interleaved_rounds,
    paired_ratio,
    spread_line,
    timed,
)

from wmtp_lib.model.heads import MTPModel, mtp_config  # noqa: E402
from wmtp_lib.data.rows import make_batch  # noqa: E402
from wmtp_lib.model.step import sequential_mtp_step  # noqa: E402

PRESETS = {
    # 7B: hidden 4096, 32 blocks, vocab 32000; here hidden 512, 8 blocks: vocab 32000·(512·8)/(4096·32) = 1000
    "7b": dict(hidden=512, layers=8, vocab=1000, batch=4, length=256),
    "vocab32k": dict(hidden=256, layers=6, vocab=32000, batch=4, length=256),
}


def dims(args: argparse.Namespace) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 16 * 16,
                num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 64),
                num_key_value_heads=max(4, args.hidden // 64), max_position_embeddings=args.length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="7b")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--length", type=int)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(3, args.vocab, (args.batch, args.length))

    mtp = MTPModel(mtp_config(4, **dims(args))).train()
    llama = LlamaForCausalLM(LlamaConfig(**dims(args))).train()

    def mtp_step():
        sequential_mtp_step(mtp, make_batch(x), chunk_size=args.chunk)
        mtp.zero_grad(set_to_none=True)

    def llama_step():
        llama(input_ids=x, labels=x).loss.backward()
        llama.zero_grad(set_to_none=True)

    seconds = interleaved_rounds({"llama": timed(llama_step), "mtp": timed(mtp_step)}, args.rounds)
    print(bench_header("cpu", "fp32"))
    print(f"config: preset={args.preset} hidden={args.hidden} blocks={args.layers} (MTP: {args.layers - 4} trunk + 4 heads) "
          f"vocab={args.vocab} batch={args.batch} length={args.length} chunk={args.chunk}; "
          f"one warm-up round, {args.rounds} timed")
    print(f"LlamaForCausalLM step {spread_line(seconds['llama'])}, mtp_baseline step {spread_line(seconds['mtp'])} "
          f"(median, range over rounds)")
    print(f"ratio mtp_baseline/LlamaForCausalLM: {paired_ratio(seconds['mtp'], seconds['llama'])} (target <= 1.15)")


if __name__ == "__main__":
    main()
