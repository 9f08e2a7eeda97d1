"""What `notebooks/train.ipynb` calls: resolve and write the config, launch training, read and plot the run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wmtp_lib.config import (
    RESUME_FREE_KEYS,
    ConfigError,
    as_dict,
    check_same_run,
    project_path,
    read_yaml,
    resolve_config,
    write_config,
)
from wmtp_lib.registry import PROJECT_ROOT

STEP_LINE = re.compile(r"^step (\d+)/(\d+)")
RESUMED_LINE = re.compile(r"^resumed from \S+ \(stage mtp, step (\d+)\)")
# Overrides that leave what a run computes alone (where files live, when it logs or saves); any other override
# gives the run a name of its own, so a short trial never takes the default run's name (and its checkpoints).
# The default name already carries the seed; the accelerate file says how the processes start (DDP or FSDP2: the
# same steps up to bf16 rounding), their count is `launch.num_processes`, named; a run with checkpoints still
# refuses another file (`prepare_run`).
NAME_FREE_KEYS = ("seed", "launch.accelerate_config") + RESUME_FREE_KEYS
NAME_FREE_PREFIXES = ("paths.", "storage.")


class Stopped(KeyboardInterrupt):
    """The user interrupted a long cell: shown in the notebook as its one line, not as a traceback.

    IPython renders an exception through ``_render_traceback_`` when it has one; the cell still ends in
    error, so *Run All* stops there. A KeyboardInterrupt, so ``except Exception`` never swallows it.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def _render_traceback_(self) -> list[str]:
        return [self.message]


class RunBusy(RuntimeError):
    """The run is being trained by another process: shown as its one line, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def _busy(run_dir: Path, lock_file) -> RunBusy:
    lock_file.seek(0)
    holder = lock_file.read().strip() or "another process"
    return RunBusy(f"run {run_dir.name} is being trained by {holder}: wait for it, or stop it, or pass another "
                   "run_name")


def refuse_if_training(run_dir: Path) -> None:
    """Raise `RunBusy` when another process holds the run's lock (`run_lock`), before anything is written."""
    import fcntl

    path = run_dir / ".lock"
    if not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir, handle) from None
        except OSError:  # no file locks on this filesystem: `run_lock` says so
            return
        fcntl.flock(handle, fcntl.LOCK_UN)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _name_text(value: Any) -> str | None:
    """A value as run-name text that keeps what tells values apart (sign, exponent, list items), or None."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if math.isfinite(value) else None
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z0-9.+-]+", value) else None
    if isinstance(value, list) and value:
        items = [_name_text(v) for v in value]
        return "_".join(items) if all(i is not None and not isinstance(v, list) for i, v in zip(items, value)) \
            else None
    return None


def overrides_suffix(overrides: dict[str, Any]) -> str:
    """A run-name suffix for the overrides that change what a run computes (``""`` when none do).

    ``{"train.steps": 50, "weights.temperature": -0.5}`` → ``"steps50-temperature-0.5"`` (each key's last
    part, unique among the config's keys, then the value: sign, exponent and list items kept, ``[1, 0.5]`` →
    ``1_0.5``); a long set or a value with no such text becomes ``"ov"`` + 8 hex digits of the overrides' JSON.
    Keys of `NAME_FREE_KEYS`/`NAME_FREE_PREFIXES` are left out. Two sets that still met in one name could
    not share a run: a run with checkpoints refuses another config (`check_same_run`, naming the keys).
    """
    flat = {k: v for k, v in _flatten(overrides).items()
            if k not in NAME_FREE_KEYS and not k.startswith(NAME_FREE_PREFIXES)}
    if not flat:
        return ""
    texts = {k: _name_text(v) for k, v in flat.items()}
    suffix = "-".join(k.rsplit(".", 1)[-1] + texts[k] for k in sorted(flat)) \
        if all(t is not None for t in texts.values()) else ""
    if not suffix or len(suffix) > 40:
        suffix = "ov" + hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]
    return suffix


def prepare_run(recipe: str, env: str = "local", run_name: str | None = None,
                overrides: dict[str, Any] | None = None, log=print,
                num_processes: int | None = None) -> tuple[dict[str, Any], Path]:
    """Resolve recipe + environment + overrides and write ``runs/<run_name>/config.yaml``.

    ``num_processes`` (the notebook's parameter), where it differs from the environment's, is the override
    ``launch.num_processes``: the number of processes sets the global batch, so the config records it and a
    run with another count is another run.

    With no ``run_name``, overrides that change what the run computes extend the default name
    (``rho1-local-seed0-steps50``, `overrides_suffix`), and that is said in one line: the default run, which
    evaluate.ipynb and analysis.ipynb read, is never replaced by a variant. A run directory that already has
    checkpoints belongs to its config: another resolved config under the same run name is refused (naming
    the changed keys) before anything is written.
    """
    overrides = as_dict(overrides or {}, "overrides")
    if num_processes and num_processes != resolve_config(recipe, env, overrides)["launch"]["num_processes"]:
        overrides = {**overrides, "launch.num_processes": num_processes}
    suffix = "" if run_name else overrides_suffix(overrides)
    cfg = resolve_config(recipe, env, overrides, run_name=run_name or None)
    if suffix:
        named = f"{cfg['run_name']}-{suffix}"
        log(f"overrides {json.dumps(overrides)} change the run, so it is named {named}, not {cfg['run_name']} "
            "(pass run_name to choose the name)")
        cfg = resolve_config(recipe, env, overrides, run_name=named)
    check_launch(cfg)  # a launch that cannot start is refused before its run folder exists
    run_dir = project_path(cfg["paths"]["runs_dir"]) / cfg["run_name"]
    refuse_if_training(run_dir)  # its config.yaml belongs to the training that holds it
    existing = run_dir / "config.yaml"
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if existing.is_file() and has_checkpoints:
        # its config.yaml is the checkpoints' own: neither a fresh start nor another config may overwrite it
        if cfg["train"]["resume"] == "never":
            raise ConfigError(f"{run_dir / 'checkpoints'} has checkpoints and train.resume is 'never': "
                              "choose another run_name or remove the run directory")
        check_same_run(read_yaml(existing), cfg, run_dir)
        if (run_dir / "final").is_dir():
            log(f"run {cfg['run_name']} already finished with this config: launching it trains nothing "
                "(pass a new run_name to train again)")
    path = write_config(cfg, existing)
    return cfg, path


def ensure_tiny_models(cfg: dict[str, Any], log=print) -> None:
    """In the local environment, build the tiny default models this recipe needs and that are missing.

    Only those: the tiny reward model alone takes minutes to train, and `rho1` never reads it. A model
    built later reuses the staged models' tokenizer.model (`stage_tiny`), and training checks compatibility.
    """
    if cfg["storage"]["kind"] != "local" or not cfg["storage"]["stage_tiny_if_missing"]:
        return
    from wmtp_lib.checkpoints.tiny_builds import stale_or_missing
    from wmtp_lib.registry import load_registry

    reg = load_registry()
    needed = [m for m in required_models(cfg) if reg.model(m).format == "tiny"]
    models_dir = project_path(cfg["paths"]["models_dir"])
    missing = stale_or_missing(models_dir, needed)
    if missing:
        from transformers.utils import logging as hf_logging

        from wmtp_lib.checkpoints.tiny import stage_tiny

        log(f"building tiny models {missing} in {models_dir} (about a minute; each step is printed)")
        # transformers' "Writing model shards" bar says nothing here: a tiny model is one shard
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            stage_tiny(models_dir, ids=tuple(missing), log=log)
        except KeyboardInterrupt:
            # a model is complete once its manifest.json is written, so the next run rebuilds only what is missing
            raise Stopped(f"stopped while building the tiny models {missing} — run the cell again to build them") \
                from None
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()


def required_models(cfg: dict[str, Any]) -> list[str]:
    """Registry ids a resolved config needs: base, plus reference (rho1) or reward (critic with a model)."""
    ids = [cfg["models"]["base"]]
    if cfg["weights"]["scheme"] == "rho1":
        ids.append(cfg["models"]["reference"])
    if cfg["weights"]["scheme"] == "critic" and cfg["critic"]["reward_source"] == "model":
        ids.append(cfg["models"]["reward"])
    return ids


def check_launch(cfg: dict[str, Any], num_processes: int | None = None) -> bool:
    """Whether the config's accelerate file starts a single process; a ConfigError when more are asked of it."""
    n = num_processes or cfg["launch"]["num_processes"]
    acc = read_yaml(project_path(cfg["launch"]["accelerate_config"]))
    single = str(acc.get("distributed_type", "NO")).upper() == "NO"
    if n > 1 and single:
        raise ConfigError(f"{n} processes asked for, but {cfg['launch']['accelerate_config']} starts one process "
                          "(distributed_type NO): set launch.accelerate_config to a multi-process file, e.g. "
                          'overrides = {"launch.accelerate_config": "params/accelerate/cpu_2proc.yaml"} on a CPU')
    return single


def launch_command(cfg: dict[str, Any], config_path: Path, num_processes: int | None = None) -> list[str]:
    """The training command: plain python for one process, else ``accelerate launch`` with the env's config.

    ``train.mixed_precision`` is the one mixed-precision switch; it is passed to accelerate on the command
    line, so the accelerate files carry no second copy of it.
    """
    n = num_processes or cfg["launch"]["num_processes"]
    acc_cfg = project_path(cfg["launch"]["accelerate_config"])
    single = check_launch(cfg, n)
    if n == 1 and single:
        return [sys.executable, "-m", "wmtp_lib.train", "--config", str(config_path)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg),
            "--num_processes", str(n), "--mixed_precision", cfg["train"]["mixed_precision"],
            "-m", "wmtp_lib.train", "--config", str(config_path)]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the training: SIGTERM its process group, SIGKILL whatever of it, or of the processes it started,
    is left after ``grace_s``.

    ``accelerate launch`` starts each worker in a session of its own (torch elastic), so the group holds the
    launcher only: it passes the SIGTERM on and waits ``launch.stop_grace_s`` for its workers (`launch_training`
    sets it, and gives the launcher 15 s more). The workers are listed before anything is signalled, so none
    outlives a launcher that is killed first.
    """
    import psutil

    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            for child in started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
        _, alive = psutil.wait_procs(started, timeout=wait_s if sig == signal.SIGKILL else 0)
        if not _group_alive(proc.pid) and not alive:
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path, log=print):
    """Hold ``runs/<run>/.lock`` while the run trains: a second launch of it (another notebook, another
    papermill job on this machine) is refused at once instead of writing into the same checkpoints.

    Yields the open lock file: `launch_training` hands it to the training process, so the lock lasts as long
    as the training does even if the kernel that launched it dies. A lock is per machine on a network
    filesystem mounted without cluster-wide locks; where the filesystem has no locks at all, a line says so
    and training goes on without one.
    """
    import fcntl

    path = run_dir / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir, handle) from None
        except OSError as exc:  # e.g. Lustre mounted without flock: ENOSYS
            log(f"no run lock: {path.parent} does not support file locks ({exc.strerror}); do not launch "
                "this run twice")
            locked = False
        else:
            locked = True
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        try:
            yield handle
        finally:
            if locked:
                handle.seek(0)
                handle.truncate()


STOPPED_LINE = re.compile(r"^stopped on request \(SIGTERM\) after (value )?step (\d+)/")


def launch_training(cfg: dict[str, Any], config_path: Path, progress: bool = True) -> Path:
    """Run training as a subprocess (``launch.num_processes`` of them); its output goes to
    ``runs/<run>/train.log``, progress to a bar.

    A non-zero exit raises `RuntimeError` with the end of the log, so a failed run fails the notebook.
    An interrupt (Kernel → Interrupt, Ctrl+C) sends the training SIGTERM: every rank finishes its step and saves a
    checkpoint there (`wmtp_lib.train.loop.StopRequest`) within ``launch.stop_grace_s``, after which what is
    left is killed; the cell ends with `Stopped`: one line, also appended to train.log, saying where training
    stopped and that running the cell again resumes. A stop from outside (a preempted job signalling the
    training) ends the same way. After a resume the bar starts at the resumed step; its rate counts this
    session's steps from its first logged one (model loading, and steps done before a resume, are not training
    speed). The log is appended to, one header line per session.
    """
    run_dir = project_path(cfg["paths"]["runs_dir"]) / cfg["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    cmd = launch_command(cfg, config_path)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    grace = cfg["launch"]["stop_grace_s"]
    # accelerate's launcher (torch elastic) passes a SIGTERM on to its workers and waits this long for them
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(grace)
    grace_s = grace + 15.0 if cmd[1:3] == ["-m", "accelerate.commands.launch"] else float(grace)
    bar = None
    tail: list[str] = []
    step = 0
    stopped_at = None
    clock_started = False
    # appended: a resumed run's log keeps every session (and the line that said where the last one stopped)
    with run_lock(run_dir) as lock, open(log_path, "a", buffering=1) as log:  # line-buffered: `tail -f` works
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg["train"]["steps"], desc="training", unit="step")
        log.write(f"==== session started {datetime.now(UTC).isoformat(timespec='seconds')} ====\n")
        log.write("$ " + " ".join(cmd) + "\n")
        # its own process group: an interrupted or failed cell stops the launcher and every worker with it; it
        # holds the run lock too (an inherited descriptor), for as long as it runs
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True, pass_fds=(lock.fileno(),))
        assert proc.stdout is not None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {proc.pid} (launched by pid {os.getpid()}) on {socket.gethostname()}\n")
            lock.flush()
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                m = STEP_LINE.match(line)
                resumed = RESUMED_LINE.match(line)
                stop_line = STOPPED_LINE.match(line)
                if m:
                    step = int(m.group(1))
                if stop_line:  # stopped in the critic's stage 1: no training step yet
                    stopped_at = 0 if stop_line.group(1) else int(stop_line.group(2))
                if resumed:
                    step = int(resumed.group(1))
                    if bar is not None:
                        bar.n = step
                        bar.refresh()
                if m and bar is not None:
                    if not clock_started:
                        # the rate is this session's training speed: tqdm's rate is (n - initial)/elapsed, so
                        # model loading and the steps done before a resume are counted in neither
                        bar.initial = step
                        bar.start_t = bar.last_print_t = bar._time()
                        clock_started = True
                    bar.n = step
                    # short, so name, bar and stats fit one line; the printed step line carries the rest
                    bar.set_postfix_str(" ".join(line.split()[2:4]))
                    bar.refresh()
                # The bar is the live view only (a saved notebook, nbviewer or a job log keeps none of its
                # updates); the printed step lines are the record, so they are printed with or without a bar.
                if m or any(word in line for word in ("error", "Error", "resumed", "staged", "scoring", "[value]",
                                                        "data:", "rollouts:", "rewards:", "already finished",
                                                        "writing what its end did not", "final model in")):
                    print(line.rstrip())
            code = proc.wait()
        except KeyboardInterrupt:
            # the rest of its output (the checkpoint line) is read while it stops, so a full pipe never blocks it
            rest: list[str] = []
            reader = threading.Thread(target=lambda: rest.extend(proc.stdout), daemon=True)
            reader.start()
            stop_process_group(proc, grace_s)
            reader.join(timeout=5)
            log.write("".join(rest))
            for line in rest:  # the step it stopped after, past the last logged one: the bar shows it too
                stop_line = STOPPED_LINE.match(line)
                if stop_line and not stop_line.group(1) and bar is not None:
                    bar.n = int(stop_line.group(2))
                    bar.refresh()
            message = stopped_message(run_dir, step)
            log.write(message + "\n")
            if bar is not None:
                bar.close()
            raise Stopped(message) from None
        finally:
            stop_process_group(proc, grace_s)
        if stopped_at is not None:  # stopped from outside: a preempted job, a scheduler's SIGTERM
            message = stopped_message(run_dir, stopped_at)
            log.write(message + "\n")
    if bar is not None:
        bar.close()
    if stopped_at is not None:
        raise Stopped(message)
    if code != 0:
        raise RuntimeError(f"training exited with code {code}; log: {log_path}\n" + "\n".join(tail[-20:]))
    return run_dir


def stopped_message(run_dir: Path, step: int) -> str:
    """``stopped at step N — run the cell again to resume``, naming the checkpoint a resume starts from when
    it is an earlier step (checkpoints are written every ``save_every`` steps)."""
    from wmtp_lib.train.checkpointing import COMPLETE_MARKER

    # training checkpoints are checkpoints/mtp-<step, 7 digits>, complete once their marker is written
    saved = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob(f"mtp-*/{COMPLETE_MARKER}")]
    if saved and max(saved) > step:  # the step it stopped after (and saved), past the last logged one
        return f"stopped at step {max(saved)} — run the cell again to resume"
    where = f"stopped at step {step}" if step else "stopped before the first logged step"
    if saved and max(saved) < step:
        return f"{where} — run the cell again to resume (from the checkpoint at step {max(saved)})"
    if not saved and list((run_dir / "checkpoints").glob(f"value-*/{COMPLETE_MARKER}")):
        return f"{where} — run the cell again to resume (from the critic's value-head checkpoint)"
    if not saved:
        return f"{where} — run the cell again to start it again (no checkpoint was written yet)"
    return f"{where} — run the cell again to resume"


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a finished run; for one that stopped early (``train.stop_after``), where it stopped
    and its last logged loss, from ``metrics.jsonl``, and that relaunching it finishes it."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    mtp = [r for r in load_metrics(run_dir) if r.get("stage") == "mtp"] if (run_dir / "metrics.jsonl").is_file() else []
    last = mtp[-1] if mtp else {}
    return {"run_name": run_dir.name, "finished": False, "last_logged_step": last.get("step"),
            "last_logged_loss": last.get("loss"),
            "note": "stopped before its last step (train.stop_after): run the cell again without it to finish"}


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(records: list[dict[str, Any]], title: str = "", save_to: str | Path | None = None):
    """Loss, per-head loss, and token-weight statistics over training steps."""
    import matplotlib.pyplot as plt

    mtp = [r for r in records if r.get("stage") == "mtp"]
    value = [r for r in records if r.get("stage") == "value"]
    weighted = [r for r in mtp if "weight_mean" in r]
    ncols = 3 if weighted else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.6))
    steps = [r["step"] for r in mtp]
    axes[0].plot(steps, [r["loss"] for r in mtp], label=r"$\sum_k \alpha_k L_k$ (all heads)")
    if value:
        axes[0].plot([r["step"] for r in value], [r["value_loss"] for r in value], label="value loss (stage 1)")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    if mtp:
        for k in range(len(mtp[0]["head_loss"])):
            axes[1].plot(steps, [r["head_loss"][k] for r in mtp], label=f"head {k} (t+{k + 1})")
    axes[1].set_xlabel("step")
    axes[1].set_title("per-head loss")
    axes[1].legend()
    if weighted:
        ws = [r["step"] for r in weighted]
        mean = [r["weight_mean"] for r in weighted]
        std = [r["weight_std"] for r in weighted]
        axes[2].plot(ws, mean, label="mean")
        axes[2].fill_between(ws, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                             label="± std")
        axes[2].plot(ws, [r["weight_max"] for r in weighted], ":", label="max")
        axes[2].plot(ws, [r["frac_kept"] for r in weighted], "--", label="fraction kept")
        if "weight_noisy" in weighted[0]:
            axes[2].plot(ws, [r.get("weight_noisy") for r in weighted], label="noisy samples")
            axes[2].plot(ws, [r.get("weight_clean") for r in weighted], label="clean samples")
        axes[2].set_xlabel("step")
        axes[2].set_title("token weights")
        # beside the axes, not over the max line
        axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title)
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=100)
    return fig
