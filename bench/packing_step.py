"""Cost of the packing mask: a packed training step with per-document attention vs the same packed rows
under a plain causal mask (what leaked across documents), and vs padded rows of the same documents.

All variants run the sequential MTP step (uniform weights) on the same model and the same documents,
of unequal lengths, packed whole (first fit) into rows of ``--length``. Prints step times and ratios.

    python bench/packing_step.py [--vocab 32000] [--hidden 128] [--length 1024] [--device cpu]
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
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from bench_models import bench_mtp_model, interleaved_best, median_seconds

    from wmtp_lib.packing import pack_documents
    from wmtp_lib.step import sequential_mtp_step

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

    def run(kind: str) -> float:
        ids, attn, pos = batches[kind]

        def step():
            sequential_mtp_step(model, ids, attn, attn.bool(), chunk_size=args.chunk, position_ids=pos)
            model.zero_grad(set_to_none=False)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return median_seconds(step, args.steps)

    best = interleaved_best({k: (lambda k=k: run(k)) for k in batches})
    print(f"config: device={args.device} vocab={args.vocab} hidden={args.hidden} layers={args.layers} "
          f"docs={args.docs} lengths {args.min_doc}..{args.max_doc} (sum {sum(lengths)})")
    print(f"packed: {len(rows)} rows x {args.length} = {packed_ids.numel()} tokens "
          f"({sum(lengths) / packed_ids.numel():.0%} real); padded: {args.docs} rows x {longest} = "
          f"{padded_ids.numel()} tokens ({sum(lengths) / padded_ids.numel():.0%} real)")
    for k, v in best.items():
        print(f"{k:30s} {v * 1000:9.1f} ms")
    mask = best["packed, per-document mask"] / best["packed, plain causal (leaks)"]
    padded = best["packed, per-document mask"] / best["padded rows"]
    print(f"packing mask cost: {mask:.3f}x the plain causal step on the same packed rows")
    print(f"packed (with mask) vs padded, same documents: {padded:.3f}x")


if __name__ == "__main__":
    main()
