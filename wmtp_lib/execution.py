"""Running generated code: one separate process per program, with limits and nothing inherited.

Each program runs in a fresh temporary directory with a scrubbed environment (no credentials), a wall
and CPU time limit, an address-space limit, a file-size limit and its own session (the whole process
group is killed on timeout). Where the machine allows it (root and ``unshare``), the program also runs
in its own PID and mount namespace, so it can neither see nor signal the evaluator nor read its
``/proc`` entry; `isolation()` says which level is in force and evaluations record it. A crash, hang,
``exit()`` or kill attempt is a failed sample, never a failed evaluation.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}
PASS_MARKER = "__WMTP_ALL_TESTS_PASSED__"

# Runs before the program: turn off the calls that reach outside the sample's own process.
_GUARD = """
import os as _os, signal as _signal, subprocess as _subprocess, shutil as _shutil
for _name in ("kill", "killpg", "fork", "forkpty", "setuid", "system", "putenv", "unsetenv", "rmdir",
              "removedirs", "chroot", "execv", "execve", "execvp"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
_signal.pthread_kill = None
_subprocess.Popen = None
_shutil.rmtree = None
del _os, _signal, _subprocess, _shutil, _name
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        os.setsid()
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


_ISOLATION: str | None = None


def isolation() -> str:
    """``"pid-namespace"`` when programs run in their own PID/mount namespace, else ``"process"``."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = "process"
        unshare = shutil.which("unshare")
        if unshare and os.geteuid() == 0:
            probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                                   capture_output=True, timeout=10)
            if probe.returncode == 0:
                _ISOLATION = "pid-namespace"
    return _ISOLATION


def _command(path: str) -> list[str]:
    cmd = [sys.executable, "-I", "-B", path]
    if isolation() == "pid-namespace":
        return [shutil.which("unshare") or "unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] + cmd
    return cmd


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` (the solution followed by its tests); passed iff it exits 0 after the last test."""
    code, out, err = _execute(program + f"\nprint({PASS_MARKER!r})\n", timeout_s, memory_mb)
    if code is None:
        return ExecResult(False, "timeout", f"exceeded {timeout_s}s")
    stdout = out.decode(errors="replace")
    if code == 0 and stdout.rstrip().endswith(PASS_MARKER):
        return ExecResult(True, "passed")
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {code}"]
    status = "failed" if "AssertionError" in tail[0] else "error"
    return ExecResult(False, status, tail[0][:300])


def _execute(program: str, timeout_s: float, memory_mb: int) -> tuple[int | None, bytes, bytes]:
    """Run one program in the sandbox; returns (exit code or None on timeout, stdout, stderr)."""
    with tempfile.TemporaryDirectory(prefix="wmtp-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as fh:
            fh.write(_GUARD + "\n" + program)
        env = dict(SAFE_ENV, HOME=tmp, TMPDIR=tmp)
        proc = subprocess.Popen(_command(path), cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_mb, int(timeout_s) + 1), close_fds=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return None, b"", b""
        finally:
            _kill_group(proc)
    return proc.returncode, out, err


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return  # the group already exited: nothing left to kill


def run_many(programs: list[str], timeout_s: float = 5.0, memory_mb: int = 1024, workers: int = 2
             ) -> list[ExecResult]:
    """`run_program` over many programs in parallel processes (order kept)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s, memory_mb), programs))


def program_for(completion_code: str, tests: list[str], exec_prefix: str = "") -> str:
    """The program that checks one completion: (prompt prefix +) code, then every test."""
    return exec_prefix + completion_code + "\n\n" + "\n".join(tests) + "\n"


COUNT_MARKER = "__WMTP_TESTS_PASSED__"


def fraction_of_tests_passed(code: str, tests: list[str], exec_prefix: str = "", timeout_s: float = 5.0,
                             memory_mb: int = 1024) -> float:
    """Fraction of ``tests`` that pass against ``code`` (each test runs on its own; 0 if the code crashes)."""
    if not tests:
        raise ValueError("no tests to run")
    body = [exec_prefix + code, "_wmtp_passed = 0"]
    for test in tests:
        body.append("try:\n" + "\n".join("    " + line for line in test.splitlines())
                    + "\n    _wmtp_passed += 1\nexcept Exception:\n    _wmtp_passed += 0")
    body.append(f"print({COUNT_MARKER!r}, _wmtp_passed)")
    exit_code, out, _ = _execute("\n".join(body) + "\n", timeout_s, memory_mb)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith(COUNT_MARKER)]
    if exit_code != 0 or not lines:
        return 0.0
    return int(lines[-1].split()[-1]) / len(tests)
