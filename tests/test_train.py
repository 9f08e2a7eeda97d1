"""End-to-end training on the embedded default: resume, distributed equivalence, recipes' behaviour."""

from __future__ import annotations

import json
import re
import shutil
import socket

import pytest
import torch
from train_helpers import ROOT, final_weights, make_config, metrics, run_training

from wmtp_lib.config import ConfigError, resolve_config

pytestmark = pytest.mark.slow


def _free_port_config(tmp_path, template: str, **changes) -> str:
    """A copy of an accelerate config on a free port (tests may run while another job holds one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = (ROOT / template).read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("main_process_port"))
    text += f"\nmain_process_port: {port}\n"
    for key, value in changes.items():
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines())
    path = tmp_path / f"accelerate-{port}.yaml"
    path.write_text(text + "\n")
    return str(path)


def test_kill_and_resume_gives_identical_weights(tmp_path, tiny_models, monkeypatch):
    """Stopped at step 10 and resumed (under edited code): the same weights and losses as one run; the summary
    lists both sessions' code and says it was mixed. Stopped again after the last checkpoint, before the final
    model and summary were written: a relaunch writes them without training."""
    from wmtp_lib.train import loop as train_loop

    over = {"train.steps": 20, "train.save_every": 10, "train.micro_batch_size": 4}
    _, straight = make_config(tmp_path, "rho1", tiny_models, "straight", over)
    run_training(straight)
    _, split = make_config(tmp_path, "rho1", tiny_models, "split", {**over, "train.stop_after": 10})
    run_training(split)
    assert not (tmp_path / "runs" / "split" / "final").exists()
    _, resumed = make_config(tmp_path, "rho1", tiny_models, "split", over)
    edited = {"git_commit": "f" * 40 + "-dirty", "code_dirty": True, "code_diff_sha256": "e" * 64}
    with monkeypatch.context() as m:  # the forked training process inherits it
        m.setattr(train_loop, "code_provenance", lambda: edited)
        proc = run_training(resumed)
    assert "resumed from" in proc.stdout
    a, b = final_weights(tmp_path / "runs" / "straight"), final_weights(tmp_path / "runs" / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in metrics(tmp_path / "runs" / "straight")]
    lb = [r["loss"] for r in metrics(tmp_path / "runs" / "split")]
    assert la == lb

    one = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert one["code_mixed"] is False and [s["step"] for s in one["code_sessions"]] == [0]
    split_dir = tmp_path / "runs" / "split"
    two = json.loads((split_dir / "summary.json").read_text())
    assert two["code_mixed"] is True and two["git_commit"] == edited["git_commit"]
    assert [(s["step"], s["code_diff_sha256"]) for s in two["code_sessions"]] == \
        [(0, one["code_diff_sha256"]), (10, "e" * 64)]

    shutil.rmtree(split_dir / "final")
    (split_dir / "summary.json").unlink()
    partial = split_dir / "checkpoints" / "mtp-0000015"  # a save killed halfway: no completion marker
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "__0_0.distcp").write_bytes(b"\0" * 64)
    proc = run_training(resumed)
    assert f"removed {partial}: a checkpoint that was stopped while it was written" in proc.stdout
    assert not partial.exists()
    assert "trained all 20 steps; writing what its end did not" in proc.stdout
    assert not re.search(r"^step \d+/", proc.stdout, re.MULTILINE)
    again = final_weights(split_dir)
    assert all(torch.equal(a[k], again[k]) for k in a)
    three = json.loads((split_dir / "summary.json").read_text())
    assert three["final_loss"] == two["final_loss"] and [s["step"] for s in three["code_sessions"]] == [0, 10, 20]
    sessions = (split_dir / "provenance.jsonl").read_text()
    proc = run_training(resumed)
    assert "already finished at step 20" in proc.stdout
    assert (split_dir / "provenance.jsonl").read_text() == sessions, "a launch that trains nothing is no session"


def test_two_processes_match_one_process_on_same_global_batch(tmp_path, tiny_models):
    """1 process x grad_accum 2 vs 2 processes x grad_accum 1, micro-batch 4: same arithmetic.

    Tolerance: loss curves within 1e-5 relative, final weights within 1e-5 (float32 reduction order).
    """
    common = {"train.steps": 10, "train.micro_batch_size": 4}
    _, one = make_config(tmp_path, "rho1_tokenskip", tiny_models, "one", {**common, "train.grad_accum": 2})
    run_training(one)
    _, two = make_config(tmp_path, "rho1_tokenskip", tiny_models, "two", {**common, "train.grad_accum": 1})
    run_training(two, processes=2, accelerate_config=_free_port_config(tmp_path, "params/accelerate/cpu_2proc.yaml"))
    m1, m2 = metrics(tmp_path / "runs" / "one"), metrics(tmp_path / "runs" / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["frac_kept"] == pytest.approx(r1["frac_kept"], rel=1e-6)
    w1, w2 = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["world_size"] == 2


def test_fsdp2_two_processes_match_one_process(tmp_path, tiny_models):
    common = {"train.steps": 10, "train.micro_batch_size": 4, "train.save_every": 5}
    _, one = make_config(tmp_path, "mtp_baseline", tiny_models, "one", {**common, "train.grad_accum": 2})
    run_training(one)
    fsdp_cfg = _free_port_config(tmp_path, "params/accelerate/fsdp_4gpu.yaml", num_processes=2,
                                 mixed_precision='"no"')
    _, two = make_config(tmp_path, "mtp_baseline", tiny_models, "fsdp", {**common, "train.grad_accum": 1})
    run_training(two, processes=2, accelerate_config=fsdp_cfg)
    shards = sorted(p.name for p in (tmp_path / "runs" / "fsdp" / "checkpoints").glob("mtp-*/state/*.distcp"))
    assert len(shards) >= 2  # sharded checkpoint: one file per process
    m1, m2 = metrics(tmp_path / "runs" / "one"), metrics(tmp_path / "runs" / "fsdp")
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    w1, w2 = final_weights(tmp_path / "runs" / "one"), final_weights(tmp_path / "runs" / "fsdp")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_with_one_checkpoint(tmp_path, tiny_models):
    """A SIGTERM that reaches one rank only (a preempted node, a scheduler's signal): both ranks agree in the
    step's all-reduce, stop after the same step, write one complete checkpoint there (each its RNG state) and
    exit; the notebook's cell ends with the one line naming it, as for an interrupt."""
    import signal
    import threading
    import time

    import psutil

    from wmtp_lib import launch

    acc = _free_port_config(tmp_path, "params/accelerate/cpu_2proc.yaml")
    over = {"train.steps": 400, "train.save_every": 1000, "train.micro_batch_size": 2,
            "launch.num_processes": 2, "launch.accelerate_config": acc}
    cfg, path = make_config(tmp_path, "mtp_baseline", tiny_models, "stop", over)
    log = tmp_path / "runs" / "stop" / "train.log"
    signalled: list[int] = []

    def sigterm_one_rank_after_a_logged_step():
        end = time.monotonic() + 240
        while time.monotonic() < end and not (log.is_file() and re.search(r"^step \d+/400", log.read_text(), re.M)):
            time.sleep(0.1)
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "wmtp_lib.train" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline())]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        signalled.append(rank1.pid)
        rank1.send_signal(signal.SIGTERM)

    timer = threading.Thread(target=sigterm_one_rank_after_a_logged_step)
    timer.start()
    try:
        with pytest.raises(launch.Stopped) as stopped:
            launch.launch_training(cfg, path, progress=False)
    finally:
        timer.join()
    assert signalled, "rank 1 was found and signalled"
    ckpts = sorted((tmp_path / "runs" / "stop" / "checkpoints").glob("mtp-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file(), ckpts
    n = int(ckpts[0].name.split("-")[1])
    assert 5 <= n < 400
    assert sorted(p.name for p in ckpts[0].glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert stopped.value.message == f"stopped at step {n} — run the cell again to resume"
    assert f"stopped on request (SIGTERM) after step {n}/400" in log.read_text()


def test_cached_and_online_reference_give_same_training(tmp_path, tiny_models):
    common = {"train.steps": 10, "train.micro_batch_size": 4}
    _, cached = make_config(tmp_path, "rho1", tiny_models, "cached", common)
    run_training(cached)
    _, online = make_config(tmp_path, "rho1", tiny_models, "online", {**common, "rho1.ref_cache": False})
    proc = run_training(online)
    assert "online scoring" in proc.stdout
    for r1, r2 in zip(metrics(tmp_path / "runs" / "cached"), metrics(tmp_path / "runs" / "online")):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["weight_mean"] == pytest.approx(r1["weight_mean"], rel=1e-5)


def test_rho1_gives_noisy_samples_lower_weight(tmp_path, tiny_models):
    _, cfg = make_config(tmp_path, "rho1", tiny_models, "noise", {"train.steps": 12, "data.n_train": 300})
    run_training(cfg)
    recs = metrics(tmp_path / "runs" / "noise")
    noisy = sum(r["weight_noisy"] for r in recs) / len(recs)
    clean = sum(r["weight_clean"] for r in recs) / len(recs)
    assert noisy < clean, (noisy, clean)


def test_critic_stage1_lowers_value_loss_and_is_reused_on_resume(tmp_path, tiny_models):
    over = {"train.steps": 10, "critic.stage1_max_steps": 30, "train.micro_batch_size": 4}
    _, cfg = make_config(tmp_path, "critic", tiny_models, "critic", over)
    run_training(cfg)
    recs = metrics(tmp_path / "runs" / "critic")
    value = [r["value_loss"] for r in recs if r["stage"] == "value"]
    assert len(value) >= 3 and value[-1] < value[0]
    mtp = [r for r in recs if r["stage"] == "mtp"]
    assert all("value_loss" in r and "weight_mean" in r for r in mtp)
    # the logged loss is the MTP loss alone (the heads' losses, α_k = 1), not the value loss added to it
    for r in mtp:
        assert r["value_loss"] > 1e-3 and r["loss"] == pytest.approx(sum(r["head_loss"]), rel=1e-6), r
    assert (tmp_path / "runs" / "critic" / "final" / "value_head.safetensors").is_file()
    # a second launch of the finished run resumes after stage 1 and does not refit the value head
    proc = run_training(cfg)
    assert "[value]" not in proc.stdout


def test_bad_config_errors_name_the_key_and_file():
    with pytest.raises(ConfigError, match="unknown recipe 'rho2'.*mtp_baseline, rho1, rho1_tokenskip, critic"):
        resolve_config("rho2")
    with pytest.raises(ConfigError, match="overrides: unknown key 'train.lrr'"):
        resolve_config("rho1", "local", {"train.lrr": 1.0})
    with pytest.raises(ConfigError, match="train.steps must be int"):
        resolve_config("rho1", "local", {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="unknown environment 'mars'"):
        resolve_config("rho1", "mars")


def test_a_config_written_before_a_resume_free_key_existed_still_loads(tmp_path):
    """An older run's config.yaml lacks ``launch.stop_grace_s``: it loads with the default, and its checkpoints'
    config hash is unchanged (the key leaves what a run computes alone)."""
    import yaml

    from wmtp_lib.config import config_hash, load_resolved

    cfg = resolve_config("rho1", "local")
    old = {**cfg, "launch": {k: v for k, v in cfg["launch"].items() if k != "stop_grace_s"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    loaded = load_resolved(path)
    assert loaded["launch"]["stop_grace_s"] == 60 and config_hash(old) == config_hash(cfg)


def test_unknown_key_in_recipe_file_is_reported(tmp_path, monkeypatch):
    from wmtp_lib import config as config_mod

    (tmp_path / "recipes").mkdir()
    (tmp_path / "envs").mkdir()
    (tmp_path / "recipes" / "rho1.yaml").write_text("recipe: rho1\nweights:\n  tempreature: 2.0\n")
    (tmp_path / "envs" / "local.yaml").write_text("name: local\n")
    monkeypatch.setattr(config_mod, "PARAMS_DIR", tmp_path)
    monkeypatch.setattr(config_mod, "PROJECT_ROOT", tmp_path)
    with pytest.raises(ConfigError, match=r"recipes/rho1.yaml: unknown key 'weights.tempreature'"):
        config_mod.resolve_config("rho1")


def test_missing_model_error_names_path_and_staging_command(tmp_path, tiny_models):
    _, cfg = make_config(tmp_path, "rho1", tmp_path / "empty_models", "missing",
                         {"storage.stage_tiny_if_missing": False})
    proc = run_training(cfg, check=False)
    assert proc.returncode != 0
    assert "not staged at" in proc.stderr and "stage_models.ipynb" in proc.stderr


def test_critic_with_execution_rewards_fits_on_rollouts_and_fsdp_equals_one_process(tmp_path, tiny_models):
    """1 process × accum 2 vs 2 gloo processes under FSDP2 × accum 1 (the cluster's setup): rollouts are
    sampled on every rank through the sharded model, gathered, and equal; so are the losses and weights."""
    over = {"train.steps": 4, "critic.stage1_max_steps": 4, "critic.reward_source": "execution", "critic.rollouts": 2,
            "critic.rollout_max_new_tokens": 16, "train.micro_batch_size": 4, "data.n_train": 40,
            "data.noise_fraction": 0.5, "train.log_every": 2}
    _, cfg = make_config(tmp_path, "critic", tiny_models, "exec", {**over, "train.grad_accum": 2})
    proc = run_training(cfg)
    run = tmp_path / "runs" / "exec"
    from safetensors.torch import load_file

    rewards = load_file(str(run / "rewards.safetensors"))["rewards"]
    # gold completions: clean ones pass all their tests, corrupted ones fail at least one
    from wmtp_lib.data.synthetic import synthetic_tasks

    samples = synthetic_tasks(40, "train", 1234, 0.5)
    for s, r in zip(samples, rewards.tolist()):
        assert (r < 1.0) if s.noisy else (r == 1.0), (s.completion, r)
    rollouts = json.loads((run / "rollouts.json").read_text())
    assert len(rollouts["samples"]) == 2 * 8 and all(0.0 <= r <= 1.0 for r in rollouts["rewards"])
    assert "rollouts:" in proc.stdout
    assert any(r["stage"] == "value" for r in metrics(run))

    fsdp_cfg = _free_port_config(tmp_path, "params/accelerate/fsdp_4gpu.yaml", num_processes=2)
    _, two = make_config(tmp_path, "critic", tiny_models, "exec-fsdp", {**over, "train.grad_accum": 1})
    run_training(two, processes=2, accelerate_config=fsdp_cfg)
    fsdp_run = tmp_path / "runs" / "exec-fsdp"
    assert json.loads((fsdp_run / "rollouts.json").read_text()) == rollouts
    m1, m2 = metrics(run), metrics(fsdp_run)
    assert [(r["stage"], r["step"]) for r in m1] == [(r["stage"], r["step"]) for r in m2]
    for r1, r2 in zip(m1, m2):
        assert r2["value_loss"] == pytest.approx(r1["value_loss"], rel=1e-4)
        if r1["stage"] == "mtp":
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
            assert r2["weight_std"] == pytest.approx(r1["weight_std"], rel=1e-4)
    w1, w2 = final_weights(run), final_weights(fsdp_run)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_critic_resume_after_stage1_and_mid_stage2_equals_uninterrupted(tmp_path, tiny_models):
    """Stopped right after stage 1, then mid stage 2: same weights, value head and value-head lr as one run;
    a relaunch under another config is refused and names the changed key."""
    over = {"train.steps": 6, "critic.stage1_max_steps": 4, "train.micro_batch_size": 4, "train.save_every": 2,
            "train.log_every": 2, "data.n_train": 80, "critic.stage1_lr": 1e-3, "train.lr": 2e-3}
    _, straight = make_config(tmp_path, "critic", tiny_models, "straight", over)
    run_training(straight)
    for stop in (0, 4, None):  # mid stage 2 at a log boundary, so the logged windows match too
        _, cfg = make_config(tmp_path, "critic", tiny_models, "split", {**over, "train.stop_after": stop})
        proc = run_training(cfg)
        if stop != 0:
            assert "resumed from" in proc.stdout
    a, b = tmp_path / "runs" / "straight", tmp_path / "runs" / "split"
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    from safetensors.torch import load_file

    va, vb = load_file(str(a / "final" / "value_head.safetensors")), load_file(str(b / "final" / "value_head.safetensors"))
    for k in va:
        assert torch.equal(va[k], vb[k]), k
    ma, mb = metrics(a), metrics(b)
    def strip(records):  # wall-clock throughput is the one field that may differ
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert strip(ma) == strip(mb)
    assert [r["value_lr"] for r in mb if r["stage"] == "mtp"] == [2e-3] * 3  # stage-2 lr, not stage 1's 1e-3
    summary = json.loads((b / "summary.json").read_text())
    import accelerate
    import transformers

    assert (summary["torch"], summary["transformers"], summary["accelerate"]) == \
        (torch.__version__, transformers.__version__, accelerate.__version__)
    assert summary["git_commit"] is None or len(summary["git_commit"].split("-")[0]) == 40
    _, changed = make_config(tmp_path, "critic", tiny_models, "split", {**over, "train.lr": 1e-3})
    proc = run_training(changed, check=False)
    assert proc.returncode != 0 and "train.lr: 0.002 -> 0.001" in proc.stderr and "run_name" in proc.stderr


def test_critic_resume_mid_stage1_keeps_early_stopping_state_and_equals_uninterrupted(tmp_path, tiny_models,
                                                                                     monkeypatch):
    """Stage 1 evaluated every step with patience 2: a run interrupted after stage 1's checkpoint at step 2
    (before stage 2 starts) resumes from ``value-0000002`` with its early-stopping state (best explained
    variance, best head, evaluations without improvement) and ends with the same value head, weights, metrics
    and summary as an uninterrupted run."""
    from safetensors.torch import load_file

    from wmtp_lib.train import loop as train_mod
    from wmtp_lib.train.critic_weighting import CriticWeighting

    over = {"train.steps": 2, "critic.stage1_max_steps": 6, "critic.stage1_eval_every": 1, "critic.stage1_patience": 2,
            "critic.stage1_heldout_rows": 8, "train.micro_batch_size": 4, "train.save_every": 2,
            "train.log_every": 2, "data.n_train": 60, "critic.stage1_lr": 3e-3}
    _, straight = make_config(tmp_path, "critic", tiny_models, "s1-straight", over)
    run_training(straight)

    class Interrupted(Exception):
        pass

    def interrupt(self, lr):
        raise Interrupted

    cfg, path = make_config(tmp_path, "critic", tiny_models, "s1-split", over)
    with monkeypatch.context() as m:
        m.setattr(CriticWeighting, "enter_stage2", interrupt)
        with pytest.raises(Interrupted):
            train_mod.Trainer(cfg).train()
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "s1-split" / "checkpoints").iterdir())
    assert ckpts[-1].startswith("value-"), ckpts
    proc = run_training(path)
    assert "resumed from" in proc.stdout and "stage value" in proc.stdout
    a, b = tmp_path / "runs" / "s1-straight", tmp_path / "runs" / "s1-split"
    for f in ("final/model.safetensors", "final/value_head.safetensors", "value_head_stage1.safetensors"):
        wa, wb = load_file(str(a / f)), load_file(str(b / f))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    keys = ("stage1_best_step", "stage1_explained_variance", "stage1_last_state_auc", "stage1_steps_run")
    assert [sa[k] for k in keys] == [sb[k] for k in keys]
    evs = [r["explained_variance"] for r in metrics(a) if r["stage"] == "value" and r.get("explained_variance") is not None]
    assert len(evs) >= 3 and sa["stage1_explained_variance"] == pytest.approx(max(evs))

    # a SIGTERM during stage 1's second step: it ends, is checkpointed, the process exits 75; a relaunch resumes
    real_agree, calls = train_mod.Trainer.agree, []

    def sigterm_in_second_step(self, bad):
        calls.append(1)
        if len(calls) == 2:
            self.stop.requested = True
        return real_agree(self, bad)

    _, stopping = make_config(tmp_path, "critic", tiny_models, "s1-stop", over)
    with monkeypatch.context() as m:  # the forked training process inherits it
        m.setattr(train_mod.Trainer, "agree", sigterm_in_second_step)
        proc = run_training(stopping, check=False)
    assert proc.returncode == train_mod.STOPPED_EXIT, proc.stderr[-2000:]
    assert "stopped on request (SIGTERM) after value step 2/6" in proc.stdout
    c = tmp_path / "runs" / "s1-stop"
    assert sorted(p.name for p in (c / "checkpoints").iterdir()) == ["value-0000002"] and not (c / "final").exists()
    assert "stage value, step 2" in run_training(stopping).stdout
    for f in ("final/model.safetensors", "final/value_head.safetensors", "value_head_stage1.safetensors"):
        wa, wc = load_file(str(a / f)), load_file(str(c / f))
        assert all(torch.equal(wa[k], wc[k]) for k in wa), f
    assert strip(metrics(a)) == strip(metrics(c))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_models, monkeypatch):
    """NaN weights on chosen steps (what an overflowing exp did): the step is skipped and counted, weights
    and checkpoints stay finite; three in a row stop the run with the step named, checkpoints kept."""
    from wmtp_lib.model.step import BatchWeights
    from wmtp_lib.train import loop as train_mod

    calls = {"n": 0}
    real_step = train_mod.sequential_mtp_step
    bad_steps: set[int] = set()

    def nan_on_bad_steps(model, batch, weights, *args, **kwargs):
        calls["n"] += 1  # grad_accum 1: one call per optimizer step
        if calls["n"] in bad_steps:
            good = weights.weight_fn
            weights = BatchWeights(weight_fn=lambda trunk: (lambda k, ce, valid: good(trunk)(k, ce, valid) * float("nan")),
                                   trunk_loss=weights.trunk_loss)
        return real_step(model, batch, weights, *args, **kwargs)

    monkeypatch.setattr(train_mod, "sequential_mtp_step", nan_on_bad_steps)
    over = {"train.steps": 8, "train.save_every": 2, "train.log_every": 2, "train.micro_batch_size": 4,
            "data.n_train": 80}
    cfg, _ = make_config(tmp_path, "mtp_baseline", tiny_models, "skip", over)
    bad_steps.update({3, 4})
    assert train_mod.run(cfg)["finished"]
    recs = metrics(tmp_path / "runs" / "skip")
    assert [r["skipped_steps"] for r in recs] == [0, 2, 0, 0]
    assert recs[1]["loss"] is None and all(r["loss"] > 0 for r in recs if r["step"] != 4)
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "runs" / "skip").values())

    calls["n"] = 0
    bad_steps.clear()
    bad_steps.update(range(5, 100))
    cfg, _ = make_config(tmp_path, "mtp_baseline", tiny_models, "stop", over)
    with pytest.raises(train_mod.NonFiniteStop, match=r"steps 5-7: non-finite .* stopped at step 7"):
        train_mod.run(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "stop" / "checkpoints").iterdir())
    assert ckpts == ["mtp-0000004", "mtp-0000006"]
    from wmtp_lib.train.checkpointing import read_trainer_state

    assert all(read_trainer_state(tmp_path / "runs" / "stop" / "checkpoints" / c)["finite"] for c in ckpts)


def test_notebook_list_and_dict_parameters_from_text():
    from wmtp_lib.config import as_dict, as_list

    assert as_list('["a", "b"]', "x") == ["a", "b"]
    assert as_list("mbpp, humaneval", "x") == ["mbpp", "humaneval"]
    assert as_list([1, 5], "k") == [1, 5]
    assert as_dict('{"train.steps": 5}', "overrides") == {"train.steps": 5}
    with pytest.raises(ConfigError, match="parameter overrides: not a JSON object"):
        as_dict("{train.steps: 5", "overrides")
    assert as_list(3, "k") == [3]  # `-p k 3`
    with pytest.raises(ConfigError, match="parameter k must be a list"):
        as_list(None, "k")


def test_process_group_timeout_comes_from_config_and_is_validated():
    from datetime import timedelta

    from wmtp_lib.train.loop import accelerator_kwargs

    cfg = resolve_config("critic", "vessl")
    (handler,) = accelerator_kwargs(cfg["train"])
    assert handler.to_kwargs() == {"timeout": timedelta(minutes=120)}  # not NCCL's 10-minute default
    assert accelerator_kwargs(resolve_config("rho1", "local", {"train.dist_timeout_minutes": 5})["train"])[0].timeout \
        == timedelta(minutes=5)
    with pytest.raises(ConfigError, match="train.dist_timeout_minutes must be > 0"):
        resolve_config("rho1", "local", {"train.dist_timeout_minutes": 0})


def test_critic_stage1_skips_non_finite_value_steps_and_checkpoints_check_the_value_head(tmp_path, tiny_models,
                                                                                        monkeypatch):
    """A NaN value loss in stage 1 skips that step (counted, value head stays finite); a checkpoint whose value
    head is non-finite is marked non-finite even when every model weight is finite."""
    from safetensors.torch import load_file

    from wmtp_lib.train import loop as train_mod
    from wmtp_lib.train.critic_weighting import CriticWeighting

    calls = {"n": 0}
    real_loss = CriticWeighting.value_loss

    def nan_on_second_stage1_step(self, trunk, batch, row_rewards=None, n_states=None, row_cut=None):
        loss = real_loss(self, trunk, batch, row_rewards, n_states, row_cut)
        if row_rewards is not None:  # stage 1 passes its table; grad_accum 1: one call per step
            calls["n"] += 1
            if calls["n"] == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(CriticWeighting, "value_loss", nan_on_second_stage1_step)
    over = {"train.steps": 2, "critic.stage1_max_steps": 4, "train.log_every": 2, "train.save_every": 100,
            "train.micro_batch_size": 4, "data.n_train": 40}
    cfg, _ = make_config(tmp_path, "critic", tiny_models, "vnan", over)
    trainer = train_mod.Trainer(cfg)
    assert trainer.train()["finished"]
    value_recs = [r for r in metrics(tmp_path / "runs" / "vnan") if r["stage"] == "value"]
    assert [r["skipped_steps"] for r in value_recs] == [1, 0]
    assert value_recs[0]["value_loss"] is not None and value_recs[0]["value_loss"] > 0
    stage1_head = load_file(str(tmp_path / "runs" / "vnan" / "value_head_stage1.safetensors"))
    assert all(torch.isfinite(t).all() for t in stage1_head.values())

    from wmtp_lib.train.checkpointing import read_trainer_state

    assert read_trainer_state(trainer.checkpointer.save(2, "mtp"))["finite"]
    with torch.no_grad():
        trainer.weighting.value_head.fc2.bias.fill_(float("nan"))
    assert not read_trainer_state(trainer.checkpointer.save(3, "mtp"))["finite"]


def test_prune_keeps_a_finite_value_checkpoint_when_no_training_checkpoint_is_finite(tmp_path):
    from wmtp_lib.train.checkpointing import COMPLETE_MARKER, TRAINER_FILE, Checkpointer
    from wmtp_lib.train.distributed import Dist

    ckpts = tmp_path / "checkpoints"
    for name, finite in [("value-0000002", True), ("value-0000004", False), ("mtp-0000000", False),
                         ("mtp-0000002", False), ("mtp-0000004", False)]:
        (ckpts / name).mkdir(parents=True)
        torch.save({"finite": finite}, ckpts / name / TRAINER_FILE)
        (ckpts / name / COMPLETE_MARKER).write_text("done\n")
    checkpointer = Checkpointer(tmp_path, {"train": {"save_every": 2}}, Dist(torch.device("cpu")), None, None, {})
    checkpointer.prune()
    assert sorted(p.name for p in ckpts.iterdir()) == ["mtp-0000002", "mtp-0000004", "value-0000002"]
    assert checkpointer.latest().name == "value-0000002"


def test_non_finite_stop_message_points_to_a_new_run_not_a_resume():
    from types import SimpleNamespace

    from wmtp_lib.train import loop as train_mod

    fake = SimpleNamespace(cfg={"train": {"max_nonfinite_steps": 1}}, nonfinite_in_row=0,
                           checkpointer=SimpleNamespace(latest=lambda: None), dist=SimpleNamespace(print=print))
    with pytest.raises(train_mod.NonFiniteStop, match="in a new run_name") as err:
        train_mod.Trainer.check_finite(fake, 5, False)
    assert "then resume" not in str(err.value)


def test_saving_before_the_first_step_leaves_the_optimizer_fresh(tmp_path):
    """A save before any optimizer step (the critic's after stage 1) neither initialises AdamW's state nor
    restores an initialised one: the first update equals a fresh optimizer's; a stepped state round-trips."""
    from wmtp_lib.train.checkpointing import Checkpointer
    from wmtp_lib.train.distributed import Dist

    def parts():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(model, opt):
        model(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    cfg = {"train": {"save_every": 1}}
    model, opt = parts()
    ck = Checkpointer(tmp_path, cfg, Dist(torch.device("cpu")), model, opt, {})
    path = ck.save(0, "mtp")
    assert not opt.state
    ref_model, ref_opt = parts()
    step(model, opt)
    step(ref_model, ref_opt)
    assert torch.equal(model.weight, ref_model.weight)
    assert all(int(s["step"]) == 1 for s in opt.state.values())

    resumed, resumed_opt = parts()
    Checkpointer(tmp_path, cfg, Dist(torch.device("cpu")), resumed, resumed_opt, {}).load(path)
    assert not resumed_opt.state
    path = ck.save(1, "mtp")
    resumed, resumed_opt = parts()
    Checkpointer(tmp_path, cfg, Dist(torch.device("cpu")), resumed, resumed_opt, {}).load(path)
    assert torch.equal(resumed.weight, model.weight)
    assert [int(s["step"]) for s in resumed_opt.state.values()] == [1, 1]
    assert torch.equal(resumed_opt.state[resumed.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
