"""Training that stays right at cluster scale: split-invariant gradients and weights, resume refusal,
non-finite steps, checkpoint pruning, config numbers, the launcher's process group and process count."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

from wmtp_lib.config import (
    ConfigError,
    check_same_run,
    config_hash,
    read_yaml,
    resolve_config,
)
from wmtp_lib.model.heads import MTPModel
from wmtp_lib.train.distributed import Dist

H, T, ROWS = 4, 24, 8


def _world_batch():
    """8 rows of unequal length (padding and prompt masks differ), as the training data looks."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (ROWS, T), generator=g)
    attention = torch.zeros(ROWS, T, dtype=torch.long)
    label = torch.zeros(ROWS, T, dtype=torch.bool)
    for r, (length, prompt) in enumerate([(24, 4), (9, 3), (17, 8), (6, 2), (24, 20), (12, 1), (20, 5), (8, 6)]):
        attention[r, :length] = 1
        label[r, prompt:length] = True
    return {"input_ids": ids, "attention_mask": attention, "label_mask": label,
            "noisy": torch.zeros(ROWS, T, dtype=torch.bool), "row_index": torch.arange(ROWS)}


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _weighting(kind: str):
    from wmtp_lib.train.weighting import Rho1Weighting, UniformWeighting

    if kind == "uniform":
        return UniformWeighting()
    cfg = {"weights": {"mode": "tokenskip" if kind == "tokenskip" else "weighted", "temperature": 0.5,
                       "keep_ratio": 0.7, "max_weight": 3.0, "standardize": True}, "train": {"chunk_size": 8}}
    ref_rows = torch.rand(ROWS, T, generator=torch.Generator().manual_seed(4)) * 3
    return Rho1Weighting(cfg, H, ref_rows, None, torch.device("cpu"))


def _split_gradients(kind: str, group: str, micro: int, accum: int, rank: int = 0, world: int = 1):
    """Gradients of one optimizer step on the 8 rows, split as ``world`` processes × ``accum`` × ``micro``
    (slots numbered as `BatchSchedule` does), and this rank's global-group weights."""
    from wmtp_lib.train.loop import forward_backward
    from wmtp_lib.train.weighting import group_weights

    torch.manual_seed(0)
    model = MTPModel(tiny_config(n_future=H, layers=6)).train()
    dist = Dist(torch.device("cpu"))
    batch = _world_batch()
    batches = [_rows(batch, list(range((a * world + rank) * micro, (a * world + rank + 1) * micro)))
               for a in range(accum)]
    weighting = _weighting(kind)
    weights = group_weights(weighting, model, batches, dist, H) if weighting.needs_scores else None
    forward_backward(model, batches, weighting, dist, group, [1.0, 0.5, 0.3, 0.3], chunk_size=8)
    dist.average_grads(list(model.parameters()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, (torch.cat(weights) if weights is not None else None)


CASES = [("uniform", "micro_batch"), ("rho1", "global"), ("tokenskip", "global")]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        result = {}
        for kind, group in CASES:
            grads, weights = _split_gradients(kind, group, micro=2, accum=2, rank=rank, world=world)
            result[kind] = {"grads": grads, "weights": weights}
        torch.save(result, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _assert_same_grads(a, b, what):
    for name in a:
        rel = (a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)
        assert rel < 1e-5, (what, name, float(rel))


@pytest.mark.slow
def test_gradients_and_global_weights_do_not_depend_on_the_split(tmp_path):
    """micro 8×1, 4×2 and 2 gloo processes × 2×2 on rows of unequal length: the same gradients (rel 1e-5)
    for uniform weights and for rho1 / token skip with weight_group global, whose weights are the same too.
    Per-micro-batch normalisation fails this by ~0.9 relative (see the next test)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "ranks")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for kind, group in CASES:
        g8, w8 = _split_gradients(kind, group, micro=8, accum=1)
        g4, w4 = _split_gradients(kind, group, micro=4, accum=2)
        _assert_same_grads(g8, g4, f"{kind}: 4x2")
        _assert_same_grads(g8, ranks[0][kind]["grads"], f"{kind}: 2 processes x 2x2")
        _assert_same_grads(ranks[0][kind]["grads"], ranks[1][kind]["grads"], f"{kind}: rank 1")
        if w8 is not None:
            torch.testing.assert_close(w4, w8, rtol=1e-5, atol=1e-6)
            # rank r holds slots a·2 + r: rows [0,1] + [4,5] on rank 0, [2,3] + [6,7] on rank 1
            w0, w1 = ranks[0][kind]["weights"], ranks[1][kind]["weights"]
            torch.testing.assert_close(torch.cat([w0[:2], w1[:2], w0[2:], w1[2:]]), w8, rtol=1e-5, atol=1e-6)
            assert not torch.equal(w8, (w8 > 0).float())  # weights that are not all one: the test sees them


def test_global_count_changes_the_gradient_of_unequal_rows():
    """The step's N_k is what makes the split invariant: per-micro-batch counts give other gradients."""
    from wmtp_lib.model.step import StepCounts, sequential_mtp_step, valid_counts

    torch.manual_seed(0)
    model = MTPModel(tiny_config(n_future=H, layers=6)).train()
    batch = _world_batch()
    halves = [_rows(batch, list(range(0, 4))), _rows(batch, list(range(4, 8)))]
    n_valid = valid_counts(halves, H).float()
    for b in halves:
        sequential_mtp_step(model, b, counts=StepCounts(n_valid=n_valid), chunk_size=8)
    global_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    for b in halves:
        sequential_mtp_step(model, b, counts=StepCounts(loss_scale=0.5), chunk_size=8)
    local_grad = model.lm_head.weight.grad.clone()
    assert (global_grad - local_grad).norm() / global_grad.norm() > 0.05


# ------------------------------------------------------------------------------------------ config


def test_yaml_exponent_numbers_and_ints_for_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-4\n  min_lr_ratio: 0\nweights:\n  temperature: 2\n")
    data = read_yaml(path)
    assert data["train"]["lr"] == 1e-4 and isinstance(data["train"]["lr"], float)
    cfg = resolve_config("rho1", "local", {"train.lr": 1, "weights.temperature": 2})
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert isinstance(cfg["weights"]["temperature"], float)
    with pytest.raises(ConfigError, match="train.lr must be float/int"):
        resolve_config("rho1", "local", {"train.lr": "fast"})


def test_config_hash_ignores_where_a_run_stops_and_names_changed_keys():
    base = resolve_config("rho1", "local", {"train.steps": 20})
    assert config_hash(base) == config_hash(resolve_config("rho1", "local", {"train.steps": 20, "train.stop_after": 5}))
    other = resolve_config("rho1", "local", {"train.steps": 20, "train.lr": 5e-4, "weights.weight_group": "global"})
    assert config_hash(base) != config_hash(other)
    with pytest.raises(ConfigError, match=r"train.lr: 0.002 -> 0.0005; weights.weight_group: 'micro_batch' -> 'global'.*"
                                          r"new run with another run_name"):
        check_same_run(base, other, "runs/x")


def test_rerun_with_other_overrides_is_refused_before_config_is_written(tmp_path):
    from wmtp_lib.launch import prepare_run

    over = {"paths.runs_dir": str(tmp_path), "train.steps": 20}
    cfg, path = prepare_run("rho1", "local", "r", over)
    (path.parent / "checkpoints" / "mtp-0000010").mkdir(parents=True)  # the run has saved
    before = path.read_text()
    with pytest.raises(ConfigError, match=r"train.steps: 20 -> 30.*run_name"):
        prepare_run("rho1", "local", "r", {**over, "train.steps": 30})
    assert path.read_text() == before
    prepare_run("rho1", "local", "r", {**over, "train.stop_after": 10})  # where it stops may change
    prepare_run("rho1", "local", "r2", {**over, "train.steps": 30})  # a new run name is a new run


def test_reference_cache_key_includes_dtype(tmp_path, monkeypatch):
    import wmtp_lib.train.reference as reference

    monkeypatch.setattr(reference, "tokenizer_fingerprint", lambda tokenizer: "llama-2 pieces")
    data = {"dataset": "synthetic"}
    bf16 = reference.cache_key(data, None, tmp_path, 64, torch.bfloat16)
    assert bf16 != reference.cache_key(data, None, tmp_path, 64, torch.float32)
    assert reference.cache_key(data, None, tmp_path, 64) == reference.cache_key(data, None, tmp_path, 64, torch.float32)


def test_schedule_is_transformers_cosine_with_min_lr():
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=10, num_training_steps=100,
                          scheduler_specific_kwargs={"min_lr_rate": 0.1})
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-4)
    assert min(lrs[10:]) >= 1e-4 - 1e-12 and lrs[-1] == pytest.approx(1e-4, rel=0.01)


# ------------------------------------------------------------------------------------------ checkpoints


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    from wmtp_lib.train.checkpointing import COMPLETE_MARKER, TRAINER_FILE, Checkpointer

    cfg = resolve_config("mtp_baseline", "local", {"train.save_every": 2})
    ckpt = Checkpointer(tmp_path, cfg, Dist(torch.device("cpu")), None, None, {}, keep=2)
    for step, finite in [(2, True), (4, True), (6, False), (8, False)]:
        path = tmp_path / "checkpoints" / f"mtp-{step:07d}"
        path.mkdir(parents=True)
        torch.save({"finite": finite}, path / TRAINER_FILE)
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
        ckpt.prune()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["mtp-0000004", "mtp-0000006", "mtp-0000008"]
    assert ckpt.latest().name == "mtp-0000004"


# ------------------------------------------------------------------------------------------ launcher


def test_more_processes_than_the_accelerate_config_starts_is_an_error(tmp_path):
    from wmtp_lib.launch import launch_command

    cfg = resolve_config("rho1", "local")
    with pytest.raises(ConfigError, match="2 processes asked for, but params/accelerate/cpu_1proc.yaml starts one"):
        launch_command(cfg, tmp_path / "c.yaml", num_processes=2)
    cfg = resolve_config("rho1", "local", {"launch.accelerate_config": "params/accelerate/cpu_2proc.yaml"})
    cmd = launch_command(cfg, tmp_path / "c.yaml", num_processes=2)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--mixed_precision") + 1] == "no"


def test_the_notebook_refuses_two_processes_on_a_one_process_file_before_writing_anything(tmp_path):
    from wmtp_lib.launch import prepare_run

    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match='overrides = {"launch.accelerate_config": "params/accelerate/cpu_2proc'):
        prepare_run("rho1", "local", overrides={"paths.runs_dir": str(runs)}, num_processes=2, log=lambda m: None)
    assert not runs.exists()
    cfg, path = prepare_run("rho1", "local", num_processes=2, log=lambda m: None, overrides={
        "paths.runs_dir": str(runs), "launch.accelerate_config": "params/accelerate/cpu_2proc.yaml"})
    assert cfg["launch"]["num_processes"] == 2 and path.is_file()
    assert cfg["run_name"] == "rho1-local-seed0-num_processes2"
    # the accelerate file is not in the name, yet a run with checkpoints refuses another one, naming it
    (path.parent / "checkpoints" / "mtp-0000005").mkdir(parents=True)
    written = path.read_text()
    with pytest.raises(ConfigError, match="launch.accelerate_config"):
        prepare_run("rho1", "local", num_processes=2, log=lambda m: None, overrides={
            "paths.runs_dir": str(runs), "launch.accelerate_config": "params/accelerate/fsdp_4gpu.yaml"})
    with pytest.raises(ConfigError, match="has checkpoints and train.resume is 'never'"):
        prepare_run("rho1", "local", num_processes=2, log=lambda m: None, overrides={
            "paths.runs_dir": str(runs), "launch.accelerate_config": "params/accelerate/fsdp_4gpu.yaml",
            "train.resume": "never"})
    assert path.read_text() == written, "the checkpoints' config is never overwritten"


def test_interrupting_the_train_cell_stops_the_whole_process_group(tmp_path, monkeypatch):
    """KeyboardInterrupt while training streams: the launcher and the worker it started are both gone."""
    from wmtp_lib import launch

    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
              "print('step 1/10 loss 1.0', flush=True)\n"
              "time.sleep(120)\n")
    monkeypatch.setattr(launch, "launch_command", lambda cfg, path, n=None: [sys.executable, "-c", script])
    cfg = resolve_config("mtp_baseline", "local", {"paths.runs_dir": str(tmp_path)}, run_name="interrupt")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(4)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.launch_training(cfg, tmp_path / "c.yaml", progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    launcher, worker = (int(x) for x in pids.read_text().split())
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in (launcher, worker)):
        time.sleep(0.1)
    assert not _alive(launcher) and not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent's wait is missing
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_metrics_records_are_strict_json(tmp_path):
    """A window whose steps were all skipped logs null losses (never 0, never NaN)."""
    from wmtp_lib.train.metrics import TrainMetrics

    metrics = TrainMetrics(tmp_path, Dist(torch.device("cpu")), 2, log_every=2, total_steps=4)
    batch = {"attention_mask": torch.ones(2, 5)}
    for _ in range(2):
        metrics.add_micro_batch(batch, None, torch.full((2, 5, 2), float("nan")), torch.ones(2, 5, 2, dtype=torch.bool))
        metrics.add_step(torch.tensor(float("nan")), torch.full((2,), float("nan")), torch.tensor(float("inf")), False)
    record = metrics.log(2, 1e-3, 0.1)
    assert record["loss"] is None and record["head_loss"] is None and record["skipped_steps"] == 2
    assert "weight_mean" not in record
    json.loads((tmp_path / "metrics.jsonl").read_text())


def test_first_run_builds_only_the_tiny_models_its_recipe_needs(tmp_path, monkeypatch):
    from wmtp_lib import launch
    from wmtp_lib.checkpoints import tiny

    built: list[tuple[str, ...]] = []
    monkeypatch.setattr(tiny, "stage_tiny", lambda models_dir, ids, log: built.append(tuple(ids)))
    (tmp_path / "tiny-mtp").mkdir()
    (tmp_path / "tiny-mtp" / "manifest.json").write_text("{}")
    tiny.record_build(tmp_path, "tiny-mtp", tiny.tiny_build_id("tiny-mtp", 0, tiny.PRETRAIN["steps"]))
    for recipe, expected in (("mtp_baseline", []), ("rho1", [("tiny-ref",)]), ("critic", [("tiny-rm",)])):
        built.clear()
        cfg = resolve_config(recipe, "local", {"paths.models_dir": str(tmp_path)})
        launch.ensure_tiny_models(cfg, log=lambda m: None)
        assert built == expected, recipe
    # a tiny-mtp built by other code or settings (another build id) is stale: rebuilt
    tiny.record_build(tmp_path, "tiny-mtp", "another-build")
    built.clear()
    launch.ensure_tiny_models(resolve_config("mtp_baseline", "local", {"paths.models_dir": str(tmp_path)}),
                              log=lambda m: None)
    assert built == [("tiny-mtp",)]


def test_a_tiny_model_built_later_reuses_the_staged_tokenizer(tmp_path, monkeypatch):
    from wmtp_lib.checkpoints import tiny

    tiny.stage_tiny(tmp_path, ids=("tiny-mtp",), log=lambda m: None, base_steps=2)
    train_tokenizer = tiny.build_tokenizer

    def no_retraining(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again instead of reused")

    monkeypatch.setattr(tiny, "build_tokenizer", no_retraining)
    tiny.stage_tiny(tmp_path, ids=("tiny-mtp", "tiny-ref"), log=lambda m: None, base_steps=2, ref_steps=2)
    base = (tmp_path / "tiny-mtp" / "tokenizer.json").read_text()
    assert (tmp_path / "tiny-ref" / "tokenizer.json").read_text() == base
    # a stale model (built by other code) lends its tokenizer to nothing, even when it is not rebuilt itself
    monkeypatch.setattr(tiny, "build_tokenizer", train_tokenizer)
    for model_id in ("tiny-mtp", "tiny-ref"):
        tiny.record_build(tmp_path, model_id, "built-by-other-code")
    lines: list[str] = []
    tiny.stage_tiny(tmp_path, ids=("tiny-ref",), log=lines.append, base_steps=2, ref_steps=2)
    assert any(line.startswith("trained tokenizer") for line in lines), lines
    assert not any("reused" in line for line in lines), lines


def test_stop_request_takes_two_sigterms_at_once_as_one_stop():
    """A scheduler's SIGTERM and the launcher's forwarded one arrive together: one stop, not a kill mid-step."""
    from wmtp_lib.train.loop import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is back after training"
