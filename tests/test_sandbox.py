"""Generated code stays in its box: escape probes as root and as an unprivileged user, the weak-level opt-in,
stdin/stdout (CodeContests) tests, and HumanEval's canonical solutions still passing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from sandbox_probes import SECRET, outside_state, prepare_outside, probe_programs, run_probes
from wmtp_lib import execution
from wmtp_lib.execution import (Isolation, WeakSandboxError, check_completion, fraction_of_tests_passed,
                                isolation_info, run_io_test, run_program, sandbox_record)

ROOT = Path(__file__).resolve().parents[1]
TMP_WRITE = Path("/tmp/wmtp-probe-written.txt")


@pytest.fixture
def outside():
    # Not under pytest's tmp_path (mode 0700 for root): the unprivileged run must be stopped by the
    # sandbox, not by the directory's permission bits.
    path = Path(tempfile.mkdtemp(prefix="wmtp-outside-", dir="/tmp")) / "evaluator"
    os.chmod(path.parent, 0o777)
    prepare_outside(path)
    TMP_WRITE.unlink(missing_ok=True)
    yield path
    shutil.rmtree(path.parent)
    TMP_WRITE.unlink(missing_ok=True)


@pytest.fixture
def listener():
    """TCP and UDP on one 127.0.0.1 port; counts what reaches them."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.1)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    udp.settimeout(0.1)
    reached = {"tcp": 0, "udp": 0}
    polls = {"tcp": 0, "udp": 0}  # listener timeouts, the one expected error
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            # Only the polling timeout is expected here; any other socket error fails the listener loudly.
            try:
                tcp.accept()[0].close()
                reached["tcp"] += 1
            except TimeoutError:
                polls["tcp"] += 1  # polling timeout: check the stop flag again
            try:
                udp.recvfrom(64)
                reached["udp"] += 1
            except TimeoutError:
                polls["udp"] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, reached
    stop.set()
    thread.join()
    tcp.close()
    udp.close()


def assert_probes_held(results: dict, outside: Path, before: dict, reached: dict) -> None:
    names = probe_programs(outside, 0, 0)
    escaped = [name for name in names if results[name]["passed"]]
    assert not escaped, {name: results[name] for name in escaped}
    assert results["endless_loop"]["status"] == "timeout"
    assert "MemoryError" in results["memory_bomb"]["detail"]
    assert results["process_flood"]["detail"] == "started 0 processes", results["process_flood"]
    assert results["forge_reward"]["fraction"] == 0.0
    assert not results["stdio_reads_secret"]["passed"]
    assert results["victim_alive"], "a sample killed another process of the evaluator's user"
    assert outside_state(outside) == before, "the outside directory changed"
    assert not TMP_WRITE.exists()
    assert reached == {"tcp": 0, "udp": 0}
    for blocked in ("read_credentials", "read_checkpoint", "write_outside", "delete_outside"):
        assert "PermissionError" in results[blocked]["detail"], results[blocked]


def strong_or_skip() -> None:
    info = isolation_info()
    if not info.strong:
        pytest.skip(f"this machine offers sandbox level {info.level!r} only: {info.notes}")


def test_probes_hold_as_this_user(outside, listener, monkeypatch):
    strong_or_skip()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    port, reached = listener
    before = outside_state(outside)
    results = run_probes(outside, port)
    assert_probes_held(results, outside, before, reached)


def test_probes_escape_without_the_layers(outside, listener, monkeypatch):
    """Control: the same probes do get out of a plain process, so the tests above can fail."""
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    port, reached = listener
    programs = probe_programs(outside, port, 0)
    for name in ("write_outside", "read_credentials", "connect_tcp"):
        assert check_completion(programs[name], [], allow_weak=True).passed, name
    assert (outside / "written.txt").exists()
    for _ in range(50):  # the listener thread counts within its 0.1 s poll
        if reached["tcp"]:
            break
        threading.Event().wait(0.1)
    assert reached["tcp"] == 1


def _python_for(uid: int) -> str | None:
    """An interpreter of this version that ``uid`` may run and spawn (the venv's may sit below root's 0700 home)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c",
                                "import subprocess, sys; assert sys.version_info[:2] == %r; "
                                "subprocess.run([sys.executable, '-c', ''], check=True)" % (sys.version_info[:2],)],
                               capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="already unprivileged: test_probes_hold_as_this_user covers it")
def test_probes_hold_as_unprivileged_user(outside, listener):
    strong_or_skip()
    nobody = 65534
    python = _python_for(nobody)
    if python is None or shutil.which("setpriv") is None:
        pytest.skip("no interpreter of this Python version that the user nobody may run")
    port, reached = listener
    before = outside_state(outside)
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "TMPDIR": "/tmp", "AWS_SECRET_ACCESS_KEY": SECRET,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), execution._layer_paths()])}
    proc = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", python,
                           str(ROOT / "tests" / "sandbox_probes.py"), str(outside), str(port)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["isolation"]["user"] == "non-root" and results["isolation"]["strong"], results["isolation"]
    assert_probes_held(results, outside, before, reached)


# ------------------------------------------------------------------------------------------ weak level


WEAK = Isolation(level="rlimits", layers=(), filesystem=False, network=False, processes=False, landlock_abi=0,
                 user="root", notes=("landlock: not in this kernel", "seccomp: libseccomp missing"))


def test_weak_level_needs_the_opt_in(monkeypatch):
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    with pytest.raises(WeakSandboxError, match="allow_weak_sandbox: true"):
        run_program("assert True\n")
    with pytest.raises(WeakSandboxError, match="landlock: not in this kernel"):
        fraction_of_tests_passed("x = 1\n", ["assert x == 1"])
    assert run_program("assert True\n", allow_weak=True).passed
    record = sandbox_record(allow_weak=True)
    assert record["level"] == "rlimits" and not record["strong"] and record["allow_weak_sandbox"]


def test_evaluation_refuses_weak_level_before_sampling(monkeypatch):
    from wmtp_lib.evaluation import evaluate_pass_at_k
    from wmtp_lib.rollouts import execution_rewards
    from wmtp_lib.data import Sample

    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    with pytest.raises(WeakSandboxError):
        evaluate_pass_at_k(None, None, [], "synthetic", n_samples=1, ks=[1])  # no model is touched
    sample = Sample(id="s", prompt="", completion="x = 1\n", tests=["assert x == 1"])
    with pytest.raises(WeakSandboxError):
        execution_rewards([sample])
    assert execution_rewards([sample], allow_weak_sandbox=True).tolist() == [1.0]


def test_allow_weak_sandbox_is_a_validated_config_key():
    from wmtp_lib.config import ConfigError, resolve_config

    assert resolve_config("critic", "local")["allow_weak_sandbox"] is False
    assert resolve_config("critic", "local", {"allow_weak_sandbox": True})["allow_weak_sandbox"] is True
    with pytest.raises(ConfigError, match="allow_weak_sandbox"):
        resolve_config("critic", "local", {"allow_weak_sandbox": "yes"})


def test_check_command_names_the_level():
    proc = subprocess.run([sys.executable, "-m", "wmtp_lib.execution", "--check"], capture_output=True, text=True,
                          cwd=ROOT)
    info = isolation_info()
    assert f"sandbox level: {info.level}" in proc.stdout
    assert proc.returncode == (0 if info.strong else 1)


# ------------------------------------------------------------------------------------------ stdin/stdout


ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_stdio_program_passes_when_right_and_fails_when_wrong():
    assert run_io_test(ADD, "1 2\n", "3\n").passed
    assert run_io_test(ADD, "1 2\n", "3").passed  # whitespace-normalised: no final newline needed
    assert run_io_test("print(' 3  ')\nexit()\n", "", "3\n").passed  # exit() after the answer is fine
    wrong = run_io_test("a, b = map(int, input().split())\nprint(a - b)\n", "1 2\n", "3\n")
    assert not wrong.passed and wrong.status == "failed"
    crash = run_io_test("print(3)\nraise ValueError('late')\n", "", "3\n")
    assert not crash.passed and "ValueError" in crash.detail
    assert not run_io_test("print(1)\nprint(2)\n", "", "12\n").passed  # tokens, not characters


def test_codecontests_samples_execute_for_evaluation_and_rewards(tmp_path):
    from wmtp_lib.data import load_codecontests
    from wmtp_lib.rollouts import execution_rewards

    rows = [{"name": "add", "description": "Add two numbers.", "solutions": {"language": [3], "solution": [ADD]},
             "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
             "private_tests": {"input": ["5 5\n", "-1 1\n"], "output": ["10\n", "0\n"]}},
            {"name": "off", "description": "Add two numbers.",
             "solutions": {"language": [3], "solution": ["print(sum(map(int, input().split())) % 10)\n"]},
             "public_tests": {"input": ["1 2\n", "5 5\n"], "output": ["3\n", "10\n"]}}]
    path = tmp_path / "cc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    right, off = load_codecontests(path)
    assert right.io_tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"},
                              {"input": "-1 1\n", "output": "0\n"}] and right.tests == []
    assert check_completion(right.completion, right.tests, right.io_tests).passed
    assert not check_completion(off.completion, off.tests, off.io_tests).passed
    assert execution_rewards([right, off]).tolist() == [1.0, 0.5]


def test_codecontests_unequal_test_lists_are_refused(tmp_path):
    from wmtp_lib.data import load_codecontests

    row = {"name": "bad", "description": "d", "solutions": {"language": [3], "solution": [ADD]},
           "public_tests": {"input": ["1 2\n", "3 4\n"], "output": ["3\n"]}}
    path = tmp_path / "cc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        load_codecontests(path)


def test_humaneval_canonical_solutions_all_pass():
    from wmtp_lib.data import load_humaneval
    from wmtp_lib.execution import program_for, run_many

    problems = load_humaneval()
    results = run_many([program_for(p.completion, p.tests, p.exec_prefix) for p in problems], timeout_s=20,
                       workers=2)
    failed = [(p.id, r.detail) for p, r in zip(problems, results) if not r.passed]
    assert len(problems) == 164 and not failed, failed


def test_preflight_reports_the_level_and_blocks_execution_rewards_below_it(monkeypatch, tmp_path):
    from wmtp_lib import preflight

    assert preflight.environment_report(tmp_path)["sandbox"]["level"] == isolation_info().level
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    env_info = preflight.environment_report(tmp_path)
    real = preflight.resolve_config
    for allow in (False, True):
        over = {"critic.reward_source": "execution", "allow_weak_sandbox": allow}
        monkeypatch.setattr(preflight, "resolve_config", lambda r, e, over=over: real(r, e, over))
        report = preflight.recipe_report("critic", "local", env_info, check_s3=False, check_hub=False)
        blocked = [b for b in report["blockers"] if "sandbox" in b]
        assert bool(blocked) != allow, report["blockers"]
