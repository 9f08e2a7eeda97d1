"""Generated code stays in its box: escape probes as root and as an unprivileged user, the weak-level opt-in,
stdin/stdout (CodeContests) tests, and HumanEval's canonical solutions still passing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sandbox_probes import (
    FORGE_COMPLETIONS,
    FORGE_TESTS,
    HUMAN_EVAL_DATA,
    LIMITS,
    SECRET,
    VICTIMS,
    outside_state,
    prepare_outside,
    probe_programs,
    run_probes,
    victim_state,
)

from wmtp_lib.eval import execution
from wmtp_lib.eval.execution import (
    Isolation,
    WeakSandboxError,
    check_completion,
    fraction_of_tests_passed,
    isolation_info,
    run_io_test,
    run_program,
    sandbox_record,
)

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


# Attacks on the harness itself: passing them is fine, the harness must return and clean up.
HARNESS_ATTACKS = ("deep_tree",)


def assert_probes_held(results: dict, outside: Path, before: dict, reached: dict) -> None:
    names = [n for n in probe_programs(outside, 0, dict.fromkeys(VICTIMS, 0)) if n not in HARNESS_ATTACKS]
    escaped = [name for name in names + list(FORGE_COMPLETIONS) if results[name]["passed"]]
    assert not escaped, {name: results[name] for name in escaped}
    assert {name: results[name]["fraction"] for name in FORGE_COMPLETIONS} == dict.fromkeys(FORGE_COMPLETIONS, 0.0)
    assert results["endless_loop"]["status"] == "timeout"
    assert "MemoryError" in results["memory_bomb"]["detail"]
    assert results["process_flood"]["detail"] == "started 0 processes", results["process_flood"]
    assert results["forge_reward"]["fraction"] == 0.0
    assert not results["stdio_reads_secret"]["passed"]
    assert all(results["victims"].values()), results["victims"]  # alive and unchanged
    assert outside_state(outside) == before, "the outside directory changed (content or metadata)"
    assert not TMP_WRITE.exists()
    assert reached == {"tcp": 0, "udp": 0}
    for blocked in ("read_credentials", "read_checkpoint", "write_outside", "delete_outside", "read_benchmark_data"):
        assert "PermissionError" in results[blocked]["detail"], results[blocked]
    for bounded in ("directory_bytes", "directory_files"):
        assert "No space left on device" in results[bounded]["detail"], results[bounded]
    assert "can't start new thread" in results["threads"]["detail"]
    assert "Too many open files" in results["file_descriptors"]["detail"]
    assert results["isolation"]["sample_uid"] != 0 and results["isolation"]["dir_limit"] == "tmpfs"


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
    programs = probe_programs(outside, port)
    for name in ("write_outside", "read_credentials", "connect_tcp", "read_benchmark_data"):
        assert check_completion(programs[name], [], allow_weak=True).passed, name
    assert (outside / "written.txt").exists()
    for _ in range(50):  # the listener thread counts within its 0.1 s poll
        if reached["tcp"]:
            break
        threading.Event().wait(0.1)
    assert reached["tcp"] == 1


def _weak_check(program: str, **limits) -> execution.ExecResult:
    return check_completion(program, [], allow_weak=True, **limits)


@pytest.mark.skipif(os.geteuid() != 0, reason="the controls of root's reach need root")
def test_attacks_get_through_without_the_layers(outside, monkeypatch):
    """Control for every attack class: with no layers (and the limits they set raised) each one works, as root."""
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    monkeypatch.setattr(execution, "FDS", 4096)
    victims = {name: subprocess.Popen(["sleep", "60"]) for name in VICTIMS}
    try:
        before = {name: victim_state(proc.pid) for name, proc in victims.items()}
        programs = probe_programs(outside, 0, {name: proc.pid for name, proc in victims.items()})
        names = [n for n in programs if n not in ("endless_loop", "memory_bomb", "process_flood", "spawn_subprocess",
                                                  "write_outside", "write_tmp", "delete_outside", "rename_outside",
                                                  "read_credentials", "read_checkpoint", "list_outside",
                                                  "read_env_secret", "connect_tcp", "send_udp", "forge_marker",
                                                  "forge_report_fds", "exit_zero_early", "clock_set")]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(names, pool.map(lambda n: _weak_check(programs[n], **LIMITS.get(n, {})), names)))
        failed = {n: r for n, r in results.items() if not r.passed}
        assert not failed, failed  # clock_set is left out: it would set this machine's clock
        changed = {name: victim_state(proc.pid) != before[name] for name, proc in victims.items()}
        assert all(changed.values()), changed
    finally:
        for proc in victims.values():
            proc.kill()
            proc.wait()
    victim = (outside / "victim.txt").stat()
    assert (victim.st_mode & 0o777, victim.st_uid, victim.st_mtime) == (0o600, 4321, 0)
    assert os.listxattr(outside / "victim.txt") == ["user.probe"]


def in_process_judge(completion: str, tests: list[str]) -> str:
    """The old design in miniature: a secret in the harness's frame, the tests exec'd in the program's
    interpreter, ``<token> <passed>`` printed at the end."""
    return ("import os, sys\ntoken = os.urandom(16).hex()\nnamespace = {'__name__': '__main__'}\n"
            f"exec(compile({completion!r}, 'program.py', 'exec'), namespace)\npassed = 0\n"
            f"for test in {tests!r}:\n    try:\n        exec(compile(test, 'test.py', 'exec'), namespace)\n"
            "        passed += 1\n    except Exception:\n        pass\n"
            "sys.stdout.write(f'{token} {passed}')\n")


def test_forged_passes_get_through_an_in_process_judge(monkeypatch):
    """Control for the forge classes: each completion fools a judge living in the program's interpreter
    (reading the tests: any judge whose test file it can read), so the judge process is what stops them."""
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    for name, completion in FORGE_COMPLETIONS.items():
        if name == "read_the_tests":  # with the layers off the program reads the judge's own copy
            assert check_completion(completion, FORGE_TESTS, allow_weak=True).passed
            continue
        out = execution._execute(in_process_judge(completion, FORGE_TESTS), None, 10.0, 1024, True).stdout
        counts = [int(c) for c in re.findall(rb"[0-9a-f]{32} (\d{1,5})(?!\d)", out)]
        assert counts and max(counts) >= len(FORGE_TESTS), (name, out[-300:])
    honest = execution._execute(in_process_judge("def f(x):\n    return x\n", FORGE_TESTS), None, 10.0, 1024, True)
    assert re.fullmatch(rb"[0-9a-f]{32} 0", honest.stdout), honest.stdout  # the wrong solution itself scores 0


def test_forged_reports_are_failed_samples_never_errors():
    """A judge result the program wrote, a huge count, a forged sandbox error: a failed sample each."""
    strong_or_skip()
    for name in ("forge_from_frames", "replace_exec_compile"):
        result = check_completion(FORGE_COMPLETIONS[name], FORGE_TESTS)
        assert not result.passed and result.status in ("failed", "error"), result
    assert execution._valid_results(b'[{"passed": true, "error": ""}]', 3)[0]["passed"] is False
    assert execution._valid_results(b"9" * 4000, 1) == [{"passed": False, "error": "no valid result from the judge"}]


def test_samples_run_unprivileged(monkeypatch):
    """As root the sample is uid 65534 with no groups and no capabilities; the record names the uid."""
    strong_or_skip()
    info = isolation_info()
    expected = 65534 if os.geteuid() == 0 else os.getuid()
    assert info.sample_uid == expected and sandbox_record()["sample_uid"] == expected
    probe = ("import os\nassert os.getuid() == os.geteuid() == %d and os.getgroups() == []\n"
             "import ctypes\nassert ctypes.CDLL(None).prctl(39, 0, 0, 0, 0) == 1\n") % expected  # no_new_privs
    assert run_program(probe).passed
    if os.geteuid() == 0:  # control: with the layers off the program is root
        monkeypatch.setattr(execution, "_ISOLATION", WEAK)
        assert run_program("import os\nassert os.getuid() == 0\n", allow_weak=True).passed


def test_output_is_bounded(monkeypatch):
    """Past OUTPUT_BYTES the sample fails as "output limit"; control: under a larger cap the same program passes."""
    strong_or_skip()
    flood = "import sys\nfor _ in range(12):\n    sys.stdout.write('x' * (1 << 20))\n"
    result = run_io_test(flood, "", "x")
    assert result.status == "output limit" and not result.passed
    monkeypatch.setattr(execution, "OUTPUT_BYTES", 64 << 20)
    assert run_program(flood).passed


def test_directory_is_polled_where_no_tmpfs_can_be_mounted(monkeypatch, outside):
    """Without a private tmpfs the harness counts the directory and fails the sample past the limit."""
    strong_or_skip()
    import dataclasses

    monkeypatch.setattr(execution, "_ISOLATION", dataclasses.replace(isolation_info(), dir_limit="polled"))
    monkeypatch.setattr(execution, "DIR_BYTES", 8 << 20)  # lower limits: the attacks cross them sooner
    monkeypatch.setattr(execution, "DIR_FILES", 500)
    programs = probe_programs(outside, 0)
    for name in ("directory_files", "directory_bytes"):
        result = check_completion(programs[name], [], timeout_s=20.0)
        assert result.status == "disk limit", (name, result)
    assert check_completion("open('small', 'w').write('x')\n", []).passed


def _deep_chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        next_fd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as fh:
        fh.write("x")
    os.close(fd)


def test_cleanup_survives_deep_trees_odd_permissions_and_immutable_files(tmp_path):
    """Control: the standard library's removal fails on the same tree."""
    tree = tmp_path / "tree"
    tree.mkdir()
    _deep_chain(tree, 1200)
    with pytest.raises(RecursionError):
        shutil.rmtree(tree)
    (tree / "locked").mkdir()
    (tree / "locked" / "file").write_text("x")
    os.chmod(tree / "locked", 0)
    if os.geteuid() == 0 and shutil.which("chattr"):
        (tree / "pinned").write_text("x")
        chattr = subprocess.run(["chattr", "+i", str(tree / "pinned")], capture_output=True)
        assert chattr.returncode == 0, chattr.stderr
        with pytest.raises(PermissionError):
            os.unlink(tree / "pinned")
    assert execution.remove_tree(str(tree)) == []
    assert not tree.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs a private mount namespace")
def test_cleanup_reports_what_it_cannot_remove(tmp_path):
    (tmp_path / "tree" / "busy").mkdir(parents=True)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from wmtp_lib.eval.execution import remove_tree; "
            f"print(remove_tree({str(tmp_path / 'tree')!r}))")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {tmp_path}/tree/busy && "
                           f"{sys.executable} -c \"{code}\""], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "tree/busy (not removable)" in proc.stdout, proc.stdout


def test_orphan_holding_the_pipes_does_not_hang_the_harness(monkeypatch, tmp_path):
    """With the layers off a program leaves a process in another session holding its output pipes; the
    harness still returns. Control: an untimed read of those pipes would wait for the orphan."""
    monkeypatch.setattr(execution, "_ISOLATION", WEAK)
    pid_file = tmp_path / "orphan.pid"
    os.chmod(tmp_path, 0o777)
    program = ("import ctypes, os, time\nlibc = ctypes.CDLL(None)\npid = libc.fork()\nif pid == 0:\n"
               f"    os.setsid()\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n    time.sleep(30)\n"
               "    os._exit(0)\ntime.sleep(0.3)\n")
    try:
        start = time.monotonic()
        assert run_program(program, timeout_s=5.0, allow_weak=True).passed
        assert time.monotonic() - start < 4.0
        with pytest.raises(subprocess.TimeoutExpired):  # the control: the orphan keeps the pipe open
            subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=2.0)
    finally:
        for pid in pid_file.read_text().split() if pid_file.exists() else []:
            os.kill(int(pid), signal.SIGKILL)


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
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "WMTP_HUMAN_EVAL_DATA": HUMAN_EVAL_DATA}
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
    from wmtp_lib.data.sample import Sample
    from wmtp_lib.eval.evaluation import evaluate_pass_at_k
    from wmtp_lib.train.rollouts import execution_rewards

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
    proc = subprocess.run([sys.executable, "-m", "wmtp_lib.eval.execution", "--check"], capture_output=True, text=True,
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
    from wmtp_lib.data.sources import load_codecontests
    from wmtp_lib.train.rollouts import execution_rewards

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
    from wmtp_lib.data.sources import load_codecontests

    row = {"name": "bad", "description": "d", "solutions": {"language": [3], "solution": [ADD]},
           "public_tests": {"input": ["1 2\n", "3 4\n"], "output": ["3\n"]}}
    path = tmp_path / "cc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        load_codecontests(path)


def test_humaneval_canonical_solutions_all_pass():
    """Through the evaluation's own path: the judge runs each problem's tests against the canonical solution."""
    from concurrent.futures import ThreadPoolExecutor

    from wmtp_lib.data.sources import load_humaneval

    problems = load_humaneval()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: check_completion(p.completion, p.tests, p.io_tests, p.exec_prefix, 20.0),
                                problems))
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


def test_a_completion_cannot_redefine_the_prompts_helpers():
    """HumanEval/32 and /38 define helpers (``poly``, ``encode_cyclic``) in the prompt that the tests call. A
    completion redefining them passed when the judge took every name from the program (control: judged without
    the prompt, as before); the judge now runs the prompt itself and takes only the function to complete."""
    from wmtp_lib.data.sources import load_humaneval
    from wmtp_lib.eval.execution import _judged

    problems = {p.id: p for p in load_humaneval()}
    attacks = {"HumanEval/32": "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n",
               "HumanEval/38": "    return s\n\ndef encode_cyclic(s):\n    return s\n"}
    for pid, attack in attacks.items():
        p = problems[pid]
        control = _judged(p.exec_prefix + attack, p.tests, 20.0, 1024, False)[1]  # the judge without the prompt
        assert control.passed, (pid, control)
        assert not check_completion(attack, p.tests, p.io_tests, p.exec_prefix, 20.0).passed, pid
        assert fraction_of_tests_passed(attack, p.tests, p.exec_prefix, 20.0) == 0.0, pid


def test_stop_iteration_from_the_program_fails_the_test_instead_of_ending_its_loop():
    tests = ["for r, want in zip(map(add1, [1, 2, 3]), [2, 3, 4]):\n    assert r == want",
             "assert all(map(lambda x: add1(x) == x + 1, range(5)))", "assert add1(1) == 2"]
    assert fraction_of_tests_passed("def add1(x):\n    raise StopIteration('nope')\n", tests) == 0.0
    assert fraction_of_tests_passed("def add1(x):\n    return x + 1\n", tests) == 1.0
    # control: raised as itself inside the same loops, StopIteration ends them and the asserts pass
    def add1(x):
        raise StopIteration("nope")
    for test in tests[:2]:
        exec(test, {"add1": add1})
