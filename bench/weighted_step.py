"""Cost of the token weighting: rho1 step (cached or online reference, weight_group micro_batch or global)
vs the mtp_baseline step.

All run the same sequential MTP step on the same model and batch; only the weights differ.
Prints the ratios against mtp_baseline (DESIGN §9 target: cached rho1 ≤ 1.05×; online and the exact
``weight_group: global`` statistics, which add a no-grad scoring pass over the window, are reported).

Timed in interleaved rounds (one step of each variant, the order alternating); each ratio is the median of
the paired per-round ratios, printed with its range (`bench_models.interleaved_rounds`).

    python bench/weighted_step.py [--vocab 32000] [--hidden 128] [--device cpu] [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each variant)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (global group)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from bench_models import (
        bench_header,
        bench_mtp_model,
        interleaved_rounds,
        paired_ratio,
        spread_line,
        timed,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmtp_lib.model.losses import align_reference, rho1_weights
    from wmtp_lib.data.rows import make_batch
    from wmtp_lib.model.step import BatchWeights, sequential_mtp_step, uniform_weights
    from wmtp_lib.train.distributed import Dist
    from wmtp_lib.train.loop import forward_backward
    from wmtp_lib.train.reference import reference_token_ce
    from wmtp_lib.train.weighting import Rho1Weighting

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = bench_mtp_model(args.vocab, args.hidden, args.layers, args.length, device)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                       intermediate_size=args.hidden * 3, num_hidden_layers=args.layers - 3,
                                       num_attention_heads=model.config.num_attention_heads)).to(device).eval()
    x = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    cached = reference_token_ce(ref, x)

    def rho1_fn(ref_ce):
        aligned = align_reference(ref_ce, 4)
        return lambda k, ce_k, valid_k: rho1_weights(ce_k.unsqueeze(-1), aligned[:, :, k:k + 1],
                                                     valid_k.unsqueeze(-1)).squeeze(-1)

    # one optimizer step of `accum` micro-batches through the trainer's window, micro_batch vs global group
    rows = torch.randint(0, args.vocab, (args.batch * args.accum, args.length), device=device)
    window = [{"input_ids": rows[i * args.batch:(i + 1) * args.batch],
               "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long, device=device),
               "label_mask": torch.ones(args.batch, args.length, dtype=torch.bool, device=device),
               "row_index": torch.arange(i * args.batch, (i + 1) * args.batch)} for i in range(args.accum)]
    ref_rows = torch.cat([reference_token_ce(ref, b["input_ids"]).cpu() for b in window])
    weighting = Rho1Weighting({"weights": {"mode": "weighted", "temperature": 1.0, "keep_ratio": 0.7, "max_weight": 3.0,
                                           "standardize": True},
                               "train": {"chunk_size": args.chunk}}, 4, ref_rows, None, device)
    dist = Dist(device)

    def step_of(kind: str):
        def step():
            if kind.startswith("window_"):
                forward_backward(model, window, weighting, dist, kind.removeprefix("window_"), None, args.chunk)
                model.zero_grad(set_to_none=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return
            if kind == "mtp_baseline":
                fn = uniform_weights
            elif kind == "rho1_cached":
                fn = rho1_fn(cached)
            else:
                fn = rho1_fn(reference_token_ce(ref, x))
            sequential_mtp_step(model, make_batch(x), BatchWeights.fixed(fn), chunk_size=args.chunk)
            model.zero_grad(set_to_none=False)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return step

    seconds = interleaved_rounds({k: timed(step_of(k)) for k in
                                  ("mtp_baseline", "rho1_cached", "rho1_online", "window_micro_batch", "window_global")},
                                 args.rounds)
    print(bench_header(device, "fp32"))
    print(f"config: device={args.device} vocab={args.vocab} hidden={args.hidden} layers={args.layers} "
          f"batch={args.batch} length={args.length}; one warm-up round, {args.rounds} timed")
    for k in ("mtp_baseline", "rho1_cached", "rho1_online"):
        print(f"{k:>13}: step {spread_line(seconds[k])}")
    for k in ("rho1_cached", "rho1_online"):
        print(f"ratio {k}/mtp_baseline: {paired_ratio(seconds[k], seconds['mtp_baseline'])}")
    print(f"rho1 cached, optimizer step of {args.accum} micro-batches: weight_group micro_batch "
          f"{spread_line(seconds['window_micro_batch'])}, global {spread_line(seconds['window_global'])}")
    print(f"ratio global/micro_batch: {paired_ratio(seconds['window_global'], seconds['window_micro_batch'])}")


if __name__ == "__main__":
    main()
