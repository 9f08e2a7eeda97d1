"""Running generated code: one locked-down process per program, limits, a secret pass report.

Each program runs in a fresh temporary directory with a scrubbed environment (no credentials), a wall and
CPU time limit, an address-space limit, a file-size limit and its own session (the whole process group is
killed on timeout). Inside, `wmtp_lib.sandbox` applies the isolation layers this machine offers, probed
once (`isolation()`): Landlock (no reads outside Python's own files, no writes or deletes outside the
sample's directory, root included) and seccomp (no sockets, no new processes, no signals to other
processes); a non-root user also gets a process cap. Levels without filesystem and network isolation are
refused unless the caller passes ``allow_weak=True`` (``allow_weak_sandbox: true`` in a run's config).

A sample passes only when the sandbox reports this run's secret token after the program's tests ran; the
token travels on a pipe the program never sees, so printing a marker and exiting 0 passes nothing.
stdin/stdout tasks (CodeContests) run once per input and their stdout is compared here, in the harness.
A crash, hang, ``exit()`` or kill attempt is a failed sample, never a failed evaluation.

``python -m wmtp_lib.execution --check`` prints the level in force and why.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}
SANDBOX = str(Path(__file__).with_name("sandbox.py"))
STRONG_LAYERS = ("landlock", "seccomp")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the sample): the evaluation must stop, not count a failure."""


class WeakSandboxError(RuntimeError):
    """Only a level without filesystem and network isolation is available and the run did not opt in."""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""


@dataclass(frozen=True)
class Isolation:
    """The isolation level in force on this machine, as probed once by running the sandbox."""

    level: str  # the layers joined by "+", e.g. "landlock+seccomp+rlimits"
    layers: tuple[str, ...]  # what every sample gets: subset of ("landlock", "seccomp")
    filesystem: bool  # no reads outside Python's files, no writes/deletes outside the sample's directory
    network: bool  # no sockets at all
    processes: bool  # no new processes (seccomp) or a per-user cap (non-root)
    landlock_abi: int
    user: str  # "root" or "non-root"
    notes: tuple[str, ...]  # why a layer is missing

    @property
    def strong(self) -> bool:
        return self.filesystem and self.network


@functools.lru_cache(maxsize=1)
def _layer_paths() -> str:
    """Directories holding landlock and pyseccomp, handed to the sandbox (its ``-I`` may not see them)."""
    dirs = []
    for name in ("landlock", "pyseccomp"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            origin = Path(spec.origin)
            dirs.append(str(origin.parent.parent if origin.name == "__init__.py" else origin.parent))
    return os.pathsep.join(dict.fromkeys(dirs))


_ISOLATION: Isolation | None = None
_PROBE_LOCK = threading.Lock()  # worker threads ask at once on first use: probe once


def probe_isolation() -> Isolation:
    """Run the sandbox's self-test in a child process: which layers apply and hold on this machine."""
    with tempfile.TemporaryDirectory(prefix="wmtp-probe-") as tmp:
        proc = subprocess.run([sys.executable, "-I", "-B", SANDBOX, "--probe", _layer_paths()], cwd=tmp,
                              env=dict(SAFE_ENV, HOME=tmp, TMPDIR=tmp), capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise SandboxError(f"the sandbox probe failed ({proc.stderr.decode(errors='replace').strip()[-300:]})")
    found = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    layers = tuple(layer for layer in STRONG_LAYERS if found[layer])
    root = found["euid"] == 0
    notes = tuple(f"{layer}: {found[layer + '_error']}" for layer in STRONG_LAYERS if not found[layer])
    return Isolation(level="+".join(layers + ("rlimits",)), layers=layers, filesystem="landlock" in layers,
                     network="seccomp" in layers, processes="seccomp" in layers or not root,
                     landlock_abi=int(found["landlock_abi"]), user="root" if root else "non-root", notes=notes)


def isolation_info() -> Isolation:
    """The level in force (probed on first use, then cached for the process)."""
    global _ISOLATION
    with _PROBE_LOCK:
        if _ISOLATION is None:
            _ISOLATION = probe_isolation()
    return _ISOLATION


def isolation() -> str:
    """The name of the isolation level in force, e.g. ``"landlock+seccomp+rlimits"`` or ``"rlimits"``."""
    return isolation_info().level


def sandbox_record(allow_weak: bool = False) -> dict:
    """What evaluations and execution rewards store: the level, what it isolates, and the opt-in."""
    info = isolation_info()
    return {**asdict(info), "strong": info.strong, "allow_weak_sandbox": bool(allow_weak)}


def require_isolation(allow_weak: bool = False) -> Isolation:
    """The level in force; raises `WeakSandboxError` below filesystem + network isolation without the opt-in."""
    info = isolation_info()
    if not info.strong and not allow_weak:
        missing = "; ".join(info.notes) or "no filesystem/network isolation"
        raise WeakSandboxError(
            f"generated code would run with sandbox level {info.level!r} only ({missing}); it needs Landlock "
            "(kernel >= 5.13 with landlock in its LSM list) and seccomp (libseccomp) to keep programs off files "
            "and the network: run on such a node, or set allow_weak_sandbox: true to accept the risk "
            "(see docs/cluster.md; check with python -m wmtp_lib.execution --check)")
    return info


# ------------------------------------------------------------------------------------------ one process


@dataclass
class _Outcome:
    exit_code: int | None  # None: killed at the time limit
    stdout: bytes
    stderr: bytes
    tests_passed: int | None  # from the sandbox's report carrying this run's token; None: no valid report


def _execute(code: str, tests: list[str], timeout_s: float, memory_mb: int, allow_weak: bool,
             stdin: bytes | None = None) -> _Outcome:
    """Run ``code`` then each of ``tests`` in the sandbox; the token-checked report says how many passed."""
    info = require_isolation(allow_weak)
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="wmtp-exec-") as tmp:
        with open(os.path.join(tmp, "job.json"), "w") as fh:
            json.dump({"code": code, "tests": tests, "memory_mb": memory_mb, "cpu_s": int(timeout_s) + 1}, fh)
        token_r, token_w = os.pipe()
        report_r, report_w = os.pipe()
        os.write(token_w, token)
        os.close(token_w)
        cmd = [sys.executable, "-I", "-B", SANDBOX, "run", str(token_r), str(report_w), ",".join(info.layers),
               _layer_paths()]
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env=dict(SAFE_ENV, HOME=tmp, TMPDIR=tmp),
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(token_r, report_w),
                                    start_new_session=True)
        finally:
            os.close(token_r)
            os.close(report_w)
        try:
            try:
                out, err = proc.communicate(input=stdin, timeout=timeout_s)
                exit_code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out, err = proc.communicate()
                exit_code = None
            finally:
                _kill_group(proc)
            report = _read_all(report_r)
        finally:
            os.close(report_r)
    if report.startswith(token + b" sandbox-error"):  # with the token: written before the program ran
        detail = report[len(token) + 1:].decode(errors="replace")
        raise SandboxError(f"the sandbox could not apply level {info.level!r}: {detail}")
    return _Outcome(exit_code, out, err, _parse_report(report, token) if exit_code == 0 else None)


def _read_all(fd: int) -> bytes:
    """What the pipe holds now; never waits (a stray process could keep its write end open)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_report(report: bytes, token: bytes) -> int | None:
    """Tests passed, when the report is exactly ``<token> <count>``; anything else was written by the program."""
    head, _, count = report.partition(b" ")
    if head != token or not count.isdigit():
        return None
    return int(count)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return  # the group already exited: nothing left to kill


def _last_line(err: bytes, exit_code: int | None) -> str:
    lines = err.decode(errors="replace").strip().splitlines()
    return (lines[-1] if lines else f"exit code {exit_code}")[:300]


# ------------------------------------------------------------------------------------------ entry points


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 1024, allow_weak: bool = False
                ) -> ExecResult:
    """Run ``program`` (the solution followed by its tests); passed iff it ran to its end without an error."""
    outcome = _execute(program, [], timeout_s, memory_mb, allow_weak)
    if outcome.exit_code is None:
        return ExecResult(False, "timeout", f"exceeded {timeout_s}s")
    if outcome.tests_passed is not None:
        return ExecResult(True, "passed")
    tail = _last_line(outcome.stderr, outcome.exit_code)
    return ExecResult(False, "failed" if "AssertionError" in tail else "error", tail)


def run_many(programs: list[str], timeout_s: float = 5.0, memory_mb: int = 1024, workers: int = 2,
             allow_weak: bool = False) -> list[ExecResult]:
    """`run_program` over many programs in parallel processes (order kept)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s, memory_mb, allow_weak), programs))


def program_for(completion_code: str, tests: list[str], exec_prefix: str = "") -> str:
    """The program that checks one completion: (prompt prefix +) code, then every test."""
    return exec_prefix + completion_code + "\n\n" + "\n".join(tests) + "\n"


def normalise_output(text: str) -> list[str]:
    """Whitespace-normalised output: its whitespace-separated tokens (line breaks and trailing spaces ignored)."""
    return text.split()


def run_io_test(code: str, stdin: str, expected: str, timeout_s: float = 5.0, memory_mb: int = 1024,
                allow_weak: bool = False) -> ExecResult:
    """Run ``code`` with ``stdin`` as its input; passed iff it exits 0 and its stdout matches ``expected``.

    As a contest judge: ``exit()`` after printing the answer is fine; the harness, not the program, compares.
    """
    outcome = _execute(code, [], timeout_s, memory_mb, allow_weak, stdin=stdin.encode())
    if outcome.exit_code is None:
        return ExecResult(False, "timeout", f"exceeded {timeout_s}s")
    if outcome.exit_code != 0:
        return ExecResult(False, "error", _last_line(outcome.stderr, outcome.exit_code))
    if normalise_output(outcome.stdout.decode(errors="replace")) != normalise_output(expected):
        return ExecResult(False, "failed", "wrong output")
    return ExecResult(True, "passed")


def check_completion(code: str, tests: list[str], io_tests: list[dict[str, str]] | None = None,
                     exec_prefix: str = "", timeout_s: float = 5.0, memory_mb: int = 1024,
                     allow_weak: bool = False) -> ExecResult:
    """One sample: passed iff every test passes (assert tests in one program, or every stdin/stdout pair)."""
    if io_tests:
        for case in io_tests:
            result = run_io_test(exec_prefix + code, case["input"], case["output"], timeout_s, memory_mb,
                                 allow_weak)
            if not result.passed:
                return result
        return ExecResult(True, "passed")
    return run_program(program_for(code, tests, exec_prefix), timeout_s, memory_mb, allow_weak)


def fraction_of_tests_passed(code: str, tests: list[str], exec_prefix: str = "", timeout_s: float = 5.0,
                             memory_mb: int = 1024, io_tests: list[dict[str, str]] | None = None,
                             allow_weak: bool = False) -> float:
    """Fraction of the tests that pass against ``code`` (each test on its own; 0 if the code itself crashes).

    ``tests`` are assert snippets run after the code in one process; ``io_tests`` are stdin/stdout pairs,
    one process each.
    """
    if io_tests:
        passed = sum(run_io_test(exec_prefix + code, case["input"], case["output"], timeout_s, memory_mb,
                                 allow_weak).passed for case in io_tests)
        return passed / len(io_tests)
    if not tests:
        raise ValueError("no tests to run")
    outcome = _execute(exec_prefix + code, list(tests), timeout_s, memory_mb, allow_weak)
    return (outcome.tests_passed or 0) / len(tests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Report the sandbox level generated code gets on this machine.")
    parser.add_argument("--check", action="store_true", help="probe the isolation layers and print the level")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2
    info = isolation_info()
    print(f"sandbox level: {info.level} ({'strong' if info.strong else 'WEAK'}; user {info.user}, "
          f"Landlock ABI {info.landlock_abi})")
    print(f"  filesystem isolation: {'yes' if info.filesystem else 'no'}")
    print(f"  network isolation:    {'yes' if info.network else 'no'}")
    print(f"  process limit:        {'yes' if info.processes else 'no (root ignores RLIMIT_NPROC)'}")
    for note in info.notes:
        print(f"  missing {note}")
    if not info.strong:
        print("  runs that execute generated code need allow_weak_sandbox: true here (see docs/cluster.md)")
    return 0 if info.strong else 1


if __name__ == "__main__":
    sys.exit(main())
