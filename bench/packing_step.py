"""Cost of the packing mask: a packed training step with per-document attention vs the same packed rows
under a plain causal mask (what leaked across documents), and vs padded rows of the same documents.

All variants run the sequential MTP step (uniform weights) on the same model and the same documents,
of unequal lengths, packed whole (first fit) into rows of ``--length``. Prints step times and ratios.

Timed in interleaved rounds (one step of each variant, the order alternating); each ratio is the median of
the paired per-round ratios, printed with its range (`bench_models.interleaved_rounds`).

    python bench/packing_step.py [--vocab 32000] [--hidden 128] [--length 1024] [--device cpu] [--rounds 7]
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
    parser.add_argument("--length", type=int, default=1024, help="packed row length")
    parser.add_argument("--docs", type=int, default=16, help="documents in the batch")
    parser.add_argument("--min-doc", type=int, default=48)
    parser.add_argument("--max-doc", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (one step of each variant)")
    parser.add_argument("--threads", type=int, default=2)
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

    from wmtp_lib.data.packing import pack_documents
    from wmtp_lib.data.rows import make_batch
    from wmtp_lib.model.step import sequential_mtp_step

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = bench_mtp_model(args.vocab, args.hidden, args.layers, max(args.length, args.max_doc), device)
    lengths = torch.randint(args.min_doc, args.max_doc + 1, (args.docs,)).tolist()
    docs = [torch.randint(3, args.vocab, (n,)) for n in lengths]

    rows = pack_documents(lengths, args.length)
    packed_ids = torch.zeros(len(rows), args.length, dtype=torch.long)
    packed_attn = torch.zeros_like(packed_ids)
    positions = torch.arange(args.length).repeat(len(rows), 1)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            packed_ids[r, at:at + lengths[i]] = docs[i]
            positions[r, at:at + lengths[i]] = torch.arange(lengths[i])
            at += lengths[i]
        packed_attn[r, :at] = 1
        positions[r, at:] = torch.arange(args.length - at)
    longest = max(lengths)
    padded_ids = torch.zeros(args.docs, longest, dtype=torch.long)
    padded_attn = torch.zeros_like(padded_ids)
    for i, d in enumerate(docs):
        padded_ids[i, :len(d)] = d
        padded_attn[i, :len(d)] = 1
    batches = {
        "packed, per-document mask": (packed_ids, packed_attn, positions),
        "packed, plain causal (leaks)": (packed_ids, packed_attn, None),
        "padded rows": (padded_ids, padded_attn, None),
    }
    batches = {k: tuple(None if t is None else t.to(device) for t in v) for k, v in batches.items()}

    def step_of(kind: str):
        ids, attn, pos = batches[kind]

        def step():
            sequential_mtp_step(model, make_batch(ids, attn, attn.bool(), pos), chunk_size=args.chunk)
            model.zero_grad(set_to_none=False)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return step

    seconds = interleaved_rounds({k: timed(step_of(k)) for k in batches}, args.rounds)
    print(bench_header(device, "fp32"))
    print(f"config: device={args.device} vocab={args.vocab} hidden={args.hidden} layers={args.layers} "
          f"docs={args.docs} lengths {args.min_doc}..{args.max_doc} (sum {sum(lengths)}); "
          f"one warm-up round, {args.rounds} timed")
    print(f"packed: {len(rows)} rows x {args.length} = {packed_ids.numel()} tokens "
          f"({sum(lengths) / packed_ids.numel():.0%} real); padded: {args.docs} rows x {longest} = "
          f"{padded_ids.numel()} tokens ({sum(lengths) / padded_ids.numel():.0%} real)")
    for k, v in seconds.items():
        print(f"{k:30s} {spread_line(v, 1e-3, 'ms')}")
    masked = seconds["packed, per-document mask"]
    print(f"packing mask cost: {paired_ratio(masked, seconds['packed, plain causal (leaks)'])} the plain causal step "
          f"on the same packed rows")
    print(f"packed (with mask) vs padded, same documents: {paired_ratio(masked, seconds['padded rows'])}")


if __name__ == "__main__":
    main()
