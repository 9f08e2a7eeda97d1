"""Self-speculative decoding vs greedy head-0 decoding, on an MTP model where the forward dominates.

Trains an MTP model briefly on the synthetic tasks (every head, the memory-efficient step), then decodes
held-out prompts both ways with a KV cache and reports accepted tokens per forward, wall-clock speed-up
(DESIGN §9 target: ≥ 1.5× where the forward dominates) and whether every output equals greedy.

    python bench/speculative.py                          # hidden 1024, 6 trunk + 4 head blocks
    python bench/speculative.py --preset tiny             # the embedded default's dimensions
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import bench_header, paired_ratio  # noqa: E402

from wmtp_lib.checkpoints.tiny import TINY_DIMS, train_tokenizer  # noqa: E402
from wmtp_lib.data.rows import tokenize_samples
from wmtp_lib.data.schedule import BatchSchedule  # noqa: E402
from wmtp_lib.data.synthetic import synthetic_corpus, synthetic_tasks
from wmtp_lib.model.generation import (  # noqa: E402
    every_head_argmax,
    new_cache,
    speculative_benchmark,
)
from wmtp_lib.model.heads import MTPModel, mtp_config  # noqa: E402
from wmtp_lib.model.step import sequential_mtp_step  # noqa: E402

PRESETS = {
    # long enough for the heads to learn the templates they draft (30 steps x 4 left head losses near 3 and
    # greedy decoding stopping at once: nothing to draft)
    "large": dict(hidden=1024, trunk=6, steps=120, lr=1e-3, batch=8),
    # the embedded default: tiny-mtp's dimensions (4 trunk + 4 head blocks, hidden 64)
    "tiny": dict(hidden=TINY_DIMS["hidden_size"], trunk=4, steps=300, lr=2e-3, batch=8),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_cost_ratio(model: MTPModel, prompt: list[int], rounds: int = 20) -> tuple[list[float], list[float]]:
    """Seconds of a greedy forward (1 token, trunk + head 0, last-position unembedding) and of a
    speculative forward (H tokens, trunk + every head, one batched unembedding), after the same prompt, per
    round (one of each, alternating: round ``i``'s two times are a pair).

    Self-speculative decoding pays off only when verifying H tokens costs about what one token costs (a
    forward bound by reading the weights, as on a GPU at batch 1); their ratio bounds the wall-clock gain
    at ``tokens_per_forward / ratio``.
    """
    H = model.n_future
    device = model.device
    ids = torch.tensor([prompt], device=device)
    caches = {}
    for kind, heads in (("greedy", 1), ("speculative", H)):  # each decoder's own cache, as it would have it
        caches[kind] = new_cache(model)
        state = model.forward_trunk(ids, cache=caches[kind])
        for k in range(heads):
            model.forward_head(k, state)
    greedy_s, spec_s = [], []
    for i in range(2 * rounds + 2):  # alternating, the first pair a warm-up; the caches grow as in decoding
        kind = "greedy" if i % 2 == 0 else "speculative"
        x = torch.randint(3, model.config.vocab_size, (1, 1 if kind == "greedy" else H), device=device)
        _sync(device)
        t0 = time.perf_counter()
        state = model.forward_trunk(x, cache=caches[kind])
        if kind == "greedy":
            model.lm_head(model.forward_head(0, state)[:, -1]).argmax(-1)
        else:
            every_head_argmax(model, state)
        _sync(device)  # CUDA kernels run asynchronously: wait for them before reading the clock
        elapsed = time.perf_counter() - t0
        if i >= 2:
            (greedy_s if kind == "greedy" else spec_s).append(elapsed)
    return greedy_s, spec_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="large")
    p.add_argument("--steps", type=int)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (decoding syncs the host every step, so its "
                                                      "wall clock is the GPU's)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of both decoders, order alternating")
    p.add_argument("--forward-cost-only", action="store_true",
                   help="only the forward-cost ratio, on the untrained model (its cost does not depend on the weights)")
    args = p.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.steps is not None:
        cfg["steps"] = args.steps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(synthetic_corpus(seed=0, n=600))
    hidden = cfg["hidden"]
    heads_n = max(4, hidden // 64)
    config = mtp_config(4, vocab_size=len(tokenizer), hidden_size=hidden,
                        intermediate_size=hidden * 8 // 3 // 16 * 16, num_hidden_layers=cfg["trunk"] + 4,
                        num_attention_heads=heads_n, num_key_value_heads=heads_n,
                        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = torch.device(args.device)
    model = MTPModel(config).to(device).train()
    if args.forward_cost_only:
        args.prompts, cfg["steps"] = 1, 0
    data = tokenize_samples(tokenizer, synthetic_tasks(600, "train", 1, 0.0), args.length)
    schedule = BatchSchedule(len(data), cfg["batch"], 1, 1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    t0 = time.perf_counter()
    for step in range(cfg["steps"]):
        b = {k: v.to(device) for k, v in data.rows(schedule.micro_batch(step, 0, 0)).items()}
        out = sequential_mtp_step(model, b, chunk_size=128)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg["steps"] - 1:
            print(f"train step {step}: head losses {' '.join(f'{x:.3f}' for x in out.head_losses.tolist())}",
                  flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    prompts = [[tokenizer.bos_token_id] + tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
               for s in synthetic_tasks(args.prompts, "test", 1)]
    greedy_times, spec_times = forward_cost_ratio(model, prompts[0])
    greedy_fwd, spec_fwd = statistics.median(greedy_times), statistics.median(spec_times)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(bench_header(device, "fp32"))
    print(f"model: preset={args.preset} hidden={hidden} blocks={cfg['trunk']} trunk + 4 heads, {params:.1f}M params, "
          f"trained {cfg['steps']} steps x {cfg['batch']} sequences ({train_s:.0f} s)")
    forward_ratio = paired_ratio(spec_times, greedy_times)
    ratio = forward_ratio.median
    print(f"forward: greedy (1 token, head 0) {greedy_fwd * 1e3:.1f} ms, speculative ({model.n_future} tokens, every "
          f"head) {spec_fwd * 1e3:.1f} ms (medians of {len(greedy_times)}): speculative/greedy {forward_ratio}")
    if args.forward_cost_only:
        return
    res = speculative_benchmark(model, prompts, args.max_new_tokens, tokenizer.eos_token_id, repeats=args.repeats)
    print(f"{res['prompts']} held-out prompts, up to {args.max_new_tokens} new tokens: identical to greedy "
          f"{res['identical_to_greedy']}/{res['prompts']}, {res['tokens']} tokens")
    print(f"accepted tokens per forward {res['tokens_per_forward']:.2f} (ceiling on the speed-up here: "
          f"{res['tokens_per_forward']:.2f} / {ratio:.2f} = {res['tokens_per_forward'] / ratio:.2f}x); greedy "
          f"{res['greedy_seconds']:.2f} s, speculative {res['speculative_seconds']:.2f} s (medians of {res['repeats']}): "
          f"speed-up {res['speedup']:.2f}x (target >= 1.5; per repeat "
          f"{' '.join(f'{x:.2f}' for x in res['speedup_per_repeat'])})")

if __name__ == "__main__":
    main()
