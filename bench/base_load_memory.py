"""Host memory of the base model's load under FSDP2, before and after the meta-device load (DESIGN §7).

Builds (once, under ``--dir``) a random MTP base of about 300M parameters the way the tiny default is built
(`wmtp_lib.checkpoints.tiny.build_base`: Meta's layout, then `convert_checkpoint`), at a larger size. Then, for each
load, starts 2 gloo processes under FSDP2 and reports each rank's host peak while loading (``VmHWM`` after the
load minus ``VmRSS`` just before it, ``/proc/self/status``) against the full float32 model, and the loss of
a first training step (the sequential MTP step on a fixed batch) to every digit:

- ``before``: what the trainer did until this change (commit a40a7af): every rank reads the whole model in
  float32 (`MTPModel.from_pretrained`), moves it to its device and shards it (`shard_fsdp`);
- ``after``: `wmtp_lib.train.run_models.load_base`: built on the meta device, sharded, rank 0 reads and scatters.

    python bench/base_load_memory.py [--dir /tmp/wmtp-base-300m] [--loads before after]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

import torch  # noqa: E402

N_FUTURE = 4
# 16 trunk + 4 head blocks of a 1024-wide Llama with grouped KV heads and Llama's 32000-token vocabulary
DIMS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16 + N_FUTURE, num_attention_heads=16,
            num_key_value_heads=8)
VOCAB = 32000


def build(path: Path) -> None:
    from wmtp_lib.checkpoints.tiny import build_base, build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp), seed=0)
        build_base(path, tokenizer, Path(tmp), seed=0, n_future=N_FUTURE, steps=0, dims=DIMS, vocab=VOCAB)


def status() -> dict[str, int]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def first_step_loss(model) -> str:
    from wmtp_lib.data.rows import make_batch
    from wmtp_lib.model.step import sequential_mtp_step

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 32), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 20:] = 0
    label = attention.bool().clone()
    label[:, :4] = False
    return repr(float(sequential_mtp_step(model.train(), make_batch(ids, attention, label), chunk_size=16).loss))


def worker(rank: int, world: int, port: int, path: str, load: str, out: str) -> None:
    from torch.distributed import fsdp  # noqa: F401  (imported before the measurement: code, not weights)

    from wmtp_lib.model.heads import MTPModel
    from wmtp_lib.train.distributed import Dist, shard_fsdp
    from wmtp_lib.train.run_models import load_base

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dist = Dist(torch.device("cpu"), fsdp=True)
        with open("/proc/self/clear_refs", "w") as fh:  # restart the high-water mark here
            fh.write("5")
        before = status()["VmRSS"]
        if load == "before":
            model = shard_fsdp(MTPModel.from_pretrained(path, dtype=torch.float32).to(dist.device), "no")
        else:
            model = load_base(Path(path), N_FUTURE, dist, "no")
        dist.barrier()
        peak = status()["VmHWM"] - before
        result = {"rank": rank, "rss_before": before, "peak_delta": peak, "loss": first_step_loss(model)}
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/wmtp-base-300m", help="where the base is built (once)")
    parser.add_argument("--loads", nargs="+", default=["before", "after"], choices=["before", "after"])
    args = parser.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        print(f"building the base under {path} ...", flush=True)
        build(path)
    from wmtp_lib.model.heads import SafetensorsReader

    reader = SafetensorsReader(path)
    n_params = sum(torch.Size(loc.shape).numel() for loc in reader.locations.values())
    full = 4 * n_params
    print(f"base: {n_params / 1e6:.1f}M parameters, float32 {full / 2**20:.0f} MiB; 2 gloo processes, FSDP2")
    print(f"{'load':7} {'rank':>4} {'RSS before MiB':>15} {'peak delta MiB':>15} {'x full fp32':>12}  first-step loss")
    for load in args.loads:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(2, port, str(path), load, f"{tmp}/rank"), nprocs=2, join=True)
            for rank in range(2):
                r = json.loads(Path(f"{tmp}/rank.{rank}").read_text())
                print(f"{load:7} {rank:>4} {r['rss_before'] / 2**20:>15.0f} {r['peak_delta'] / 2**20:>15.0f} "
                      f"{r['peak_delta'] / full:>12.2f}  {r['loss']}", flush=True)


if __name__ == "__main__":
    main()
