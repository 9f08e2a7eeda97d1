"""Sequential (memory-efficient) heads vs all heads at once: peak memory and step time, one run.

Each variant runs in its own process so that the peak memory of one does not hide the other's (peak
resident memory on the CPU, peak allocated memory on a GPU).
Prints the ratios sequential / all-at-once (DESIGN §9 targets: memory ≤ 0.6×, time ≤ 1.05×).

    python bench/heads_step.py [--vocab 32000] [--hidden 128] [--length 256] [--batch 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from wmtp_lib.heads import MTPModel, mtp_config
    from wmtp_lib.step import all_heads_step, sequential_mtp_step

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = mtp_config(4, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                     num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 128),
                     max_position_embeddings=args.length)
    model = MTPModel(cfg).to(device).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randint(0, args.vocab, (args.batch, args.length), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            if args.variant == "sequential":
                sequential_mtp_step(model, x, chunk_size=args.chunk)
            else:
                all_heads_step(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()  # the first step also sets the memory high-water mark
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"variant": args.variant, "peak_step_mib": peak, "step_s": times[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6, help="trunk + 4 head blocks")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak allocated)")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (fp32 master weights)")
    parser.add_argument("--variant", choices=["sequential", "all_at_once"])
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("all_at_once", "sequential"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "autocast") and v is not None]
        cmd += ["--autocast"] if args.autocast else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    base, seq = results["all_at_once"], results["sequential"]
    print(f"config: device={args.device} autocast_bf16={args.autocast} vocab={args.vocab} hidden={args.hidden} layers={args.layers} heads=4 "
          f"batch={args.batch} length={args.length} chunk={args.chunk} threads={args.threads}")
    for r in (base, seq):
        print(f"{r['variant']:>12}: peak step memory {r['peak_step_mib']:8.1f} MiB, median step {r['step_s']:.3f} s")
    print(f"ratio sequential/all_at_once: memory {seq['peak_step_mib'] / base['peak_step_mib']:.3f}x "
          f"(target <= 0.6), time {seq['step_s'] / base['step_s']:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
