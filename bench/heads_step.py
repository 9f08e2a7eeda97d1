"""Sequential (memory-efficient) heads vs all heads at once: peak memory and step time, one run.

Each variant lives in its own persistent worker process, so that the peak memory of one does not hide the
other's (peak resident memory on the CPU, peak allocated memory on a GPU; measured on each worker's first
step). Both workers stay alive and the parent drives them over pipes in interleaved rounds (one step of
each, the order alternating), so a neighbour's load lands in both halves of a round; the time ratio is
the median of the per-round ratios, printed with its range (`bench_models.interleaved_rounds`).
Prints the ratios sequential / all-at-once (DESIGN §9 targets: memory ≤ 0.6×, time ≤ 1.05×).

On the CPU each worker also reports the CPU time of its step (one intra-op thread by default): on an idle
machine it equals the wall time; on a loaded one it leaves out the time the scheduler gave to other
processes, which varies from step to step when a step lasts seconds (six runs on the shared 2-core
machine, loaded to quiet: CPU-time ratios 0.85-0.92x, wall-time ratios 0.69-0.94x; README, Benchmarks). Two threads on a two-core machine that others use make every parallel region wait for a descheduled
thread (a cost per operation, not per FLOP), so their wall time is not comparable across loads.

    python bench/heads_step.py [--vocab 32000] [--hidden 128] [--length 256] [--batch 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

import torch  # noqa: E402
from bench_models import bench_header, interleaved_rounds, paired_ratio, spread_line  # noqa: E402

from wmtp_lib.model.heads import MTPModel, mtp_config  # noqa: E402
from wmtp_lib.data.rows import make_batch  # noqa: E402
from wmtp_lib.model.step import all_heads_step, sequential_mtp_step  # noqa: E402

VARIANTS = ("all_at_once", "sequential")


def serve_variant(args: argparse.Namespace) -> None:
    """The worker: build the model, report the first step's peak memory, then time one step per request.

    Protocol (one JSON line each way): the worker first writes ``{"peak_step_mib": ...}``; then for every
    ``step`` line on stdin it runs one step and writes ``{"seconds": ..., "cpu_seconds": ...}`` (wall time
    and this process's CPU time); it exits at end of input.
    """
    # the protocol keeps the real stdout; anything a library prints goes to stderr instead
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = mtp_config(4, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                     num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 128),
                     max_position_embeddings=args.length)
    with device:  # built where it runs: a 1B model's initialisation on the host would take a while
        model = MTPModel(cfg).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # gradients exist before the first step: its peak is a steady step's
    batch = make_batch(torch.randint(0, args.vocab, (args.batch, args.length), device=device))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            if args.worker == "sequential":
                sequential_mtp_step(model, batch, chunk_size=args.chunk)
            else:
                all_heads_step(model, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: the step ends when the device is done

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
    protocol.write(json.dumps({"peak_step_mib": peak}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        if line.strip() != "step":
            raise SystemExit(f"heads_step worker: unknown request {line.strip()!r} (expected 'step')")
        t0, cpu0 = time.perf_counter(), time.process_time()
        step()
        protocol.write(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0})
                       + "\n")
        protocol.flush()


class VariantWorker:
    """The parent's handle on one worker process: its first-step memory, then one timed step per call
    (returns the wall time; ``cpu_seconds`` keeps every step's CPU time, warm-up included)."""

    def __init__(self, variant: str, args: argparse.Namespace):
        self.variant = variant
        self.cpu_seconds: list[float] = []
        cmd = [sys.executable, __file__, "--worker", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "autocast") and v is not None]
        cmd += ["--autocast"] if args.autocast else []
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"heads_step worker {self.variant} exited (status {code}); its stderr is above")
        return json.loads(line)

    def peak_step_mib(self) -> float:
        return self._reply()["peak_step_mib"]

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        reply = self._reply()
        self.cpu_seconds.append(reply["cpu_seconds"])
        return reply["seconds"]

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()  # end of input: the worker returns
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6, help="trunk + 4 head blocks")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each variant)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (see above)")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak allocated)")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (fp32 master weights)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_variant(args)
        return
    workers = {v: VariantWorker(v, args) for v in VARIANTS}
    try:
        peaks = {v: w.peak_step_mib() for v, w in workers.items()}  # both alive from here on
        seconds = interleaved_rounds({v: w.step for v, w in workers.items()}, args.rounds)
    finally:
        for w in workers.values():
            w.close()
    print(bench_header(args.device, "bf16 autocast" if args.autocast else "fp32", threads=args.threads))
    print(f"config: device={args.device} vocab={args.vocab} hidden={args.hidden} layers={args.layers} heads=4 "
          f"batch={args.batch} length={args.length} chunk={args.chunk}; one warm-up round, {args.rounds} timed")
    cpu = {v: w.cpu_seconds[-args.rounds:] for v, w in workers.items()}  # the timed rounds' steps
    for v in VARIANTS:
        print(f"{v:>12}: peak step memory {peaks[v]:8.1f} MiB, step wall {spread_line(seconds[v])}"
              + (f", CPU {spread_line(cpu[v])}" if args.device == "cpu" else "") + " (median, range over rounds)")
    print(f"ratio sequential/all_at_once: memory {peaks['sequential'] / peaks['all_at_once']:.3f}x (target <= 0.6)")
    print(f"ratio sequential/all_at_once: time {paired_ratio(seconds['sequential'], seconds['all_at_once'])} wall "
          f"(target <= 1.05)")
    if args.device == "cpu":
        print(f"ratio sequential/all_at_once: time {paired_ratio(cpu['sequential'], cpu['all_at_once'])} CPU "
              f"(steadier than wall time under load, see the docstring; target <= 1.05)")


if __name__ == "__main__":
    main()
