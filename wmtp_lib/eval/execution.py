"""Running generated code: the program in one locked-down process, its tests in a judge it cannot reach.

Each program runs in a fresh directory (its own size- and inode-limited tmpfs where the machine allows a
private mount, else polled), with a scrubbed environment, wall and CPU time limits, address-space, file-size,
file-descriptor and task limits and its own session; when the harness is root it runs as `SAMPLE_UID` with no
capabilities. Inside, `wmtp_lib.eval.sandbox` applies the isolation layers this machine offers, probed once
(`isolation()`): Landlock (no reads outside the interpreter's stdlib and libraries, no writes or deletes
outside the sample's directory, no device nodes, no signals out) and seccomp (no sockets, new processes,
signals, F_SETOWN or scheduling calls on other processes, metadata changes, SysV IPC, memfd, mount API,
fanotify/inotify, clock or hostname). Levels without filesystem and network isolation are refused unless the
caller passes ``allow_weak=True`` (``allow_weak_sandbox: true`` in a run's config).

The verdict comes from data the program cannot reach. Assert tests run in a second process, the judge,
started by the harness: names the tests use become calls into the program with plain-data arguments and
results (exact builtin types), and the judge's per-test results go to the harness on its own pipe; they are
checked here (exactly one well-formed entry per test, else every test failed). The program holds no secret:
there is nothing to find in its frames or memory, and no report it could write counts. Neither the tests nor
the benchmark's files are readable to it. stdin/stdout tasks (CodeContests) run once per input and their
stdout (at most `OUTPUT_BYTES`, read in bounded chunks) is compared here, in the harness. A crash, hang,
``exit()``, kill attempt, forged report or limit is a failed sample, never a failed evaluation; only a
sandbox that could not apply its layers, said on a pipe closed before the program runs, is a `SandboxError`.
Cleanup (`remove_tree`) never raises and logs what it could not remove.

``python -m wmtp_lib.eval.execution --check`` prints the level in force and why.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}
SANDBOX = str(Path(__file__).with_name("sandbox.py"))
STRONG_LAYERS = ("landlock", "seccomp")
SAMPLE_UID = SAMPLE_GID = 65534  # nobody/nogroup: who programs run as when the harness is root
DIR_BYTES, DIR_FILES = 64 * 1024 * 1024, 4096  # a sample's directory: total bytes and files
FILE_MB, FDS, TASKS = 16, 256, 32  # one file's size, open descriptors, tasks above what its user runs
OUTPUT_BYTES = 4 * 1024 * 1024  # captured stdout, and stderr, each: past it the sample fails ("output limit")
logger = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the sample): the evaluation must stop, not count a failure."""


class WeakSandboxError(RuntimeError):
    """Only a level without filesystem and network isolation is available and the run did not opt in."""


@dataclass
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error | output limit | disk limit
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
    user: str  # "root" or "non-root": the harness's user
    notes: tuple[str, ...]  # why a layer is missing
    sample_uid: int | None = None  # the uid programs run as; None: the harness's own (no drop)
    dir_limit: str = "none"  # "tmpfs": bytes and files of a sample's directory bounded by its own tmpfs
    interpreter: str = ""  # the program's Python (one the unprivileged uid can read); "": the harness's

    @property
    def strong(self) -> bool:
        return self.filesystem and self.network


_ISOLATION: Isolation | None = None
_PROBE_LOCK = threading.Lock()  # worker threads ask at once on first use: probe once


def _probe_with(python: str, drop: bool, uid: int, gid: int) -> dict:
    config = json.dumps({"drop": drop, "uid": uid, "gid": gid})
    with tempfile.TemporaryDirectory(prefix="wmtp-probe-") as tmp:
        os.chmod(tmp, 0o755)
        proc = subprocess.run([python, "-I", "-S", "-B", SANDBOX, "--probe", config], cwd=tmp,
                              env=dict(SAFE_ENV, HOME=tmp, TMPDIR=tmp), capture_output=True, timeout=60)
    if proc.returncode != 0:
        return {"drop_error": proc.stderr.decode(errors="replace").strip()[-300:]}
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def _interpreters() -> list[str]:
    """This Python, then the same version elsewhere (the harness's may sit below a home only root can enter)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable] + [p for p in (f"/usr/bin/{version}", f"/usr/local/bin/{version}") if os.path.exists(p)]
    return list(dict.fromkeys(found))


def probe_isolation() -> Isolation:
    """Run the sandbox's self-test in a child process: which layers apply and hold on this machine.

    As root, programs run as `SAMPLE_UID`: the probe drops to it and imports the stdlib, trying this
    Python and then the same version in /usr/bin and /usr/local/bin; none that works is a `SandboxError`.
    """
    root = os.geteuid() == 0
    uid, gid = (SAMPLE_UID, SAMPLE_GID) if root else (os.getuid(), os.getgid())
    errors = []
    for python in _interpreters():
        found = _probe_with(python, root, uid, gid)
        if "drop_error" not in found:
            break
        errors.append(f"{python}: {found['drop_error']}")
    else:
        raise SandboxError(f"no Python the sample's user {uid} can run: {'; '.join(errors)}")
    layers = tuple(layer for layer in STRONG_LAYERS if found[layer])
    notes = tuple(f"{layer}: {found[layer + '_error']}" for layer in STRONG_LAYERS if not found[layer])
    if not found["tmpfs"]:
        notes += (f"tmpfs: {found.get('tmpfs_error')} (the directory is polled instead)",)
    return Isolation(level="+".join(layers + ("rlimits",)), layers=layers, filesystem="landlock" in layers,
                     network="seccomp" in layers, processes="seccomp" in layers or not root,
                     landlock_abi=int(found["landlock_abi"]), user="root" if root else "non-root", notes=notes,
                     sample_uid=int(found["uid"]), dir_limit="tmpfs" if found["tmpfs"] else "polled",
                     interpreter="" if python == sys.executable else python)


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
    """What evaluations and execution rewards store: the level, what it isolates, the uid, and the opt-in."""
    info = isolation_info()
    return {**asdict(info), "strong": info.strong, "allow_weak_sandbox": bool(allow_weak)}


def require_isolation(allow_weak: bool = False) -> Isolation:
    """The level in force; raises `WeakSandboxError` below filesystem + network isolation without the opt-in."""
    info = isolation_info()
    if not info.strong and not allow_weak:
        missing = "; ".join(info.notes) or "no filesystem/network isolation"
        raise WeakSandboxError(
            f"generated code would run with sandbox level {info.level!r} only ({missing}); it needs Landlock "
            "(kernel >= 5.13 with landlock in its LSM list) and seccomp to keep programs off files "
            "and the network: run on such a node, or set allow_weak_sandbox: true to accept the risk "
            "(see docs/cluster.md; check with python -m wmtp_lib.eval.execution --check)")
    return info


# ------------------------------------------------------------------------------------------ one sample


@dataclass
class _Outcome:
    exit_code: int | None  # None: killed (time, output or directory limit)
    stdout: bytes
    stderr: bytes
    limit: str = ""  # "timeout", "output limit", "disk limit" when the harness stopped the sample
    done: bool = False  # run_program: the program reached its end (its own word, see `run_program`)
    setup: bytes = b""  # the sandbox's "ok <uid>" or "error ...", written before the program ran
    result: bytes = b""  # the judge's raw results
    results: list[dict] | None = None  # the judge's per-test results, validated; None: no tests or malformed
    leftovers: tuple[str, ...] = ()  # what cleanup could not remove


class _Pipe:
    """One pipe end the harness reads, with a cap on what it keeps."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.data, self.over, self.open = fd, cap, bytearray(), False, True

    def read(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.open = False
            return
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.over = self.over or len(chunk) > room


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    return read_end, write_end


def _spawn(cmd: list[str], cwd: str, pass_fds: tuple[int, ...], stdin, stdout, stderr) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=dict(SAFE_ENV, HOME=cwd, TMPDIR=cwd), stdin=stdin, stdout=stdout,
                            stderr=stderr, pass_fds=pass_fds, start_new_session=True)


def _directory_over(path: str) -> bool:
    """More than `DIR_BYTES` or `DIR_FILES` below ``path`` (stops counting at the limit)."""
    files, size, stack = 0, 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    files += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        size += entry.stat(follow_symlinks=False).st_blocks * 512
                    if files > DIR_FILES or size > DIR_BYTES:
                        return True
        except OSError:
            continue  # removed while we counted, or not ours to read
    return False


def _execute(code: str, tests: list[str] | None, timeout_s: float, memory_mb: int, allow_weak: bool,
             stdin: bytes | None = None, trusted_prefix: str = "") -> _Outcome:
    """Run ``code`` in the sandbox and, with ``tests``, the judge running them against it; collect both."""
    info = require_isolation(allow_weak)
    python = info.interpreter or sys.executable
    drop = info.sample_uid is not None and info.sample_uid != os.getuid()
    sample_dir = tempfile.mkdtemp(prefix="wmtp-exec-")
    judge_dir = tempfile.mkdtemp(prefix="wmtp-judge-") if tests is not None else None
    procs: list[subprocess.Popen] = []
    child_fds: list[int] = []
    mine: list[int] = []
    try:
        with open(os.path.join(sample_dir, "job.json"), "w") as fh:  # the code only: never the tests
            json.dump({"code": code, "memory_mb": memory_mb, "cpu_s": int(timeout_s) + 1}, fh)
        if drop:
            os.chown(sample_dir, info.sample_uid, info.sample_uid)
        setup_r, setup_w = _pipe()
        done_r, done_w = _pipe()
        mine += [setup_r, done_r]
        child_fds += [setup_w, done_w]
        config = {"setup_fd": setup_w, "done_fd": done_w, "layers": list(info.layers), "drop": drop,
                  "uid": info.sample_uid if info.sample_uid is not None else os.getuid(),
                  "gid": info.sample_uid if drop else os.getgid(), "tmpfs": info.dir_limit == "tmpfs",
                  "dir_bytes": DIR_BYTES, "dir_files": DIR_FILES, "file_mb": FILE_MB, "fds": FDS, "tasks": TASKS,
                  "calls": None}
        sample_fds = [setup_w, done_w]
        if tests is not None:
            req_r, req_w = os.pipe()
            ans_r, ans_w = os.pipe()
            result_r, result_w = _pipe()
            mine.append(result_r)
            child_fds += [req_r, req_w, ans_r, ans_w, result_w]
            config["calls"] = [req_r, ans_w]
            sample_fds += [req_r, ans_w]
            with open(os.path.join(judge_dir, "tests.json"), "w") as fh:
                json.dump(tests, fh)
            # the benchmark's own prompt: the judge defines its helpers itself (a completion may redefine them)
            with open(os.path.join(judge_dir, "prefix.py"), "w") as fh:
                fh.write(trusted_prefix)
            judge_config = json.dumps({"requests": req_w, "answers": ans_r, "result_fd": result_w,
                                       "timeout_s": timeout_s})
            procs.append(_spawn([sys.executable, "-I", "-B", SANDBOX, "judge", judge_config], judge_dir,
                                (req_w, ans_r, result_w), subprocess.DEVNULL, subprocess.DEVNULL,
                                subprocess.DEVNULL))
        sample = _spawn([python, "-I", "-S", "-B", SANDBOX, "run", json.dumps(config)], sample_dir,
                        tuple(sample_fds), subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                        subprocess.PIPE, subprocess.PIPE)
        procs.insert(0, sample)
        for fd in child_fds:
            os.close(fd)
        child_fds = []
        outcome = _collect(sample, procs, setup_r, done_r, mine[2] if tests is not None else None, stdin,
                           timeout_s, sample_dir if info.dir_limit == "polled" else None)
    finally:
        for proc in procs:
            _stop(proc)
        for fd in child_fds + mine:
            os.close(fd)
        leftovers = remove_tree(sample_dir) + (remove_tree(judge_dir) if judge_dir else [])
    outcome.leftovers = tuple(leftovers)
    if leftovers:
        logger.warning("could not remove %d paths of a sample: %s", len(leftovers), leftovers[:5])
    setup = outcome.setup
    if setup.startswith(b"error "):  # written before the program ran, on a pipe closed before it runs
        raise SandboxError(f"the sandbox could not apply level {info.level!r}: {setup[6:].decode(errors='replace')}")
    uid = setup[3:].decode(errors="replace")
    if setup.startswith(b"ok ") and drop and uid != str(info.sample_uid):
        raise SandboxError(f"the sample ran as uid {uid}, not {info.sample_uid}")
    if tests is not None:
        outcome.results = _valid_results(outcome.result, len(tests))
    return outcome


def _collect(sample: subprocess.Popen, procs: list[subprocess.Popen], setup_r: int, done_r: int,
             result_r: int | None, stdin: bytes | None, timeout_s: float, poll_dir: str | None) -> _Outcome:
    """Read every pipe in bounded chunks until all close, a limit is hit, or the time is up; never blocks."""
    deadline = time.monotonic() + timeout_s
    stdout, stderr = _Pipe(sample.stdout.fileno(), OUTPUT_BYTES), _Pipe(sample.stderr.fileno(), OUTPUT_BYTES)
    for pipe in (stdout, stderr):
        os.set_blocking(pipe.fd, False)
    setup, done = _Pipe(setup_r, 4096), _Pipe(done_r, 64)
    result = _Pipe(result_r, 1 << 20) if result_r is not None else None
    pipes = [p for p in (stdout, stderr, setup, done, result) if p is not None]
    pending = memoryview(stdin) if stdin is not None else None
    if stdin is not None:
        os.set_blocking(sample.stdin.fileno(), False)
    limit, exited_at, next_poll = "", None, time.monotonic() + 0.25
    with selectors.DefaultSelector() as selector:
        for pipe in pipes:
            selector.register(pipe.fd, selectors.EVENT_READ, pipe)
        if pending is not None:
            selector.register(sample.stdin.fileno(), selectors.EVENT_WRITE, None)
        while any(p.open for p in pipes):
            now = time.monotonic()
            if now >= deadline:
                limit = "timeout"
                break
            for key, _ in selector.select(min(0.1, deadline - now)):
                if key.data is None:  # the program's stdin
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]  # the program stopped reading: the rest is not needed
                    if not len(pending):
                        selector.unregister(key.fd)
                        sample.stdin.close()
                    continue
                key.data.read()
                if not key.data.open:
                    selector.unregister(key.fd)
            if stdout.over or stderr.over:
                limit = "output limit"
                break
            if poll_dir is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 0.25
                if _directory_over(poll_dir):
                    limit = "disk limit"
                    break
            if all(proc.poll() is not None for proc in procs):
                # a process outside the group may still hold a pipe: read what is there, then stop
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 0.2:
                    break
    for proc in procs:
        _stop(proc)
    if poll_dir is not None and not limit and _directory_over(poll_dir):  # what it left between two polls
        limit = "disk limit"
    return _Outcome(None if limit else sample.returncode, bytes(stdout.data), bytes(stderr.data), limit=limit,
                    done=done.data == b"done", setup=bytes(setup.data),
                    result=bytes(result.data) if result is not None and not result.over else b"")


def _valid_results(data: bytes, count: int) -> list[dict]:
    """The judge's results when they are exactly ``count`` well-formed entries; else every test failed."""
    try:
        results = json.loads(data)
    except ValueError:
        results = None
    if (type(results) is not list or len(results) != count
            or not all(type(r) is dict and type(r.get("passed")) is bool and type(r.get("error")) is str
                       for r in results)):
        return [{"passed": False, "error": "no valid result from the judge"}] * count
    return results


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process's whole group and reap it, waiting at most a few seconds."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError) as exc:
        # the group is already gone (a zombie leader's group cannot be signalled): reaped below
        logger.debug("process group %d already gone: %s", proc.pid, exc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.warning("process %d did not exit 5 s after SIGKILL; left to the system", proc.pid)


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, IMMUTABLE_FLAGS = 0x80086601, 0x40086602, 0x10 | 0x20  # immutable, append-only


def _unfreeze(fd: int) -> None:
    """Clear the immutable and append-only flags of ``fd``'s file and give its owner full rights (best effort)."""
    for attempt in (lambda: os.fchmod(fd, 0o700), lambda: _clear_flags(fd)):
        try:
            attempt()
        except OSError as exc:
            logger.debug("cleanup: %s", exc)  # not permitted, or no such flags here: the retry will tell


def _clear_flags(fd: int) -> None:
    (flags,) = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))
    if flags & IMMUTABLE_FLAGS:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~IMMUTABLE_FLAGS))


def _remove_entry(dir_fd: int, name: str, is_dir: bool) -> bool:
    """Unlink (or rmdir) ``name``; once more after unfreezing it and its directory. False: it stays."""
    remove = (lambda: os.rmdir(name, dir_fd=dir_fd)) if is_dir else (lambda: os.unlink(name, dir_fd=dir_fd))
    try:
        remove()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        _unfreeze(dir_fd)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError:
            fd = None  # a symlink, device or socket: only the directory's flags matter
        if fd is not None:
            _clear_flags_quietly(fd)
            os.close(fd)
        try:
            remove()
            return True
        except OSError:
            return False


def _clear_flags_quietly(fd: int) -> None:
    try:
        _clear_flags(fd)
    except OSError as exc:
        logger.debug("cleanup: %s", exc)


def remove_tree(path: str) -> list[str]:
    """Remove ``path`` and everything below it; returns the paths it could not remove (never raises).

    No recursion and at most two directory descriptors open at a time (a 10,000-deep chain is fine);
    directories without permissions are opened up, immutable and append-only flags cleared where allowed.
    """
    leftovers: list[str] = []
    try:
        cur = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return leftovers
    except OSError as exc:
        return [f"{path} ({exc.strerror})"]
    stack: list[tuple[str, tuple[int, int]]] = []  # (name, (dev, inode)) from ``path`` down to ``cur``
    stuck: set[tuple[int, int]] = set()  # what could not be removed: never retried
    while True:
        subdir = None
        try:
            with os.scandir(cur) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    key = (st.st_dev, st.st_ino)
                    if key in stuck:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        subdir = (entry.name, key)
                        break
                    if not _remove_entry(cur, entry.name, False):
                        stuck.add(key)
                        leftovers.append(os.path.join(path, *[n for n, _ in stack], entry.name))
        except OSError as exc:
            leftovers.append(f"{os.path.join(path, *[n for n, _ in stack])} ({exc.strerror})")
        if subdir is not None:
            name, key = subdir
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            except PermissionError:
                _unfreeze(cur)
                try:
                    os.chmod(name, 0o700, dir_fd=cur)
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
                except OSError as exc:
                    stuck.add(key)
                    leftovers.append(f"{os.path.join(path, *[n for n, _ in stack], name)} ({exc.strerror})")
                    continue
            except OSError as exc:
                stuck.add(key)
                leftovers.append(f"{os.path.join(path, *[n for n, _ in stack], name)} ({exc.strerror})")
                continue
            _unfreeze(child)
            os.close(cur)
            cur = child
            stack.append(subdir)
            continue
        if not stack:
            os.close(cur)
            try:
                os.rmdir(path)
            except OSError as exc:
                if not leftovers:
                    leftovers.append(f"{path} ({exc.strerror})")
            return leftovers
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = parent
        name, key = stack.pop()
        if not _remove_entry(cur, name, True):
            stuck.add(key)
            leftovers.append(f"{os.path.join(path, *[n for n, _ in stack], name)} (not removable)")


# ------------------------------------------------------------------------------------------ entry points


def _last_line(err: bytes, exit_code: int | None) -> str:
    lines = err.decode(errors="replace").strip().splitlines()
    return (lines[-1] if lines else f"exit code {exit_code}")[:300]


def _limit_result(outcome: _Outcome, timeout_s: float) -> ExecResult | None:
    if outcome.limit == "timeout":
        return ExecResult(False, "timeout", f"exceeded {timeout_s}s")
    if outcome.limit:
        limits = {"output limit": f"more than {OUTPUT_BYTES} bytes of output",
                  "disk limit": f"more than {DIR_BYTES} bytes or {DIR_FILES} files in its directory"}
        return ExecResult(False, outcome.limit, limits[outcome.limit])
    return None


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 1024, allow_weak: bool = False
                ) -> ExecResult:
    """Run a whole ``program``; passed iff it ran to its end without an error.

    The verdict is the program's own: with its tests inside it, nothing separates them from the code
    (``os._exit(0)`` before them fails, but a program written to forge "ran to its end" can). To judge an
    untrusted completion against tests, use `check_completion` / `fraction_of_tests_passed`, which run the
    tests in the judge, out of the program's reach.
    """
    outcome = _execute(program, None, timeout_s, memory_mb, allow_weak)
    stopped = _limit_result(outcome, timeout_s)
    if stopped is not None:
        return stopped
    if outcome.exit_code == 0 and outcome.done:
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

    As a contest judge: ``exit()`` after printing the answer is fine; the harness, not the program, compares
    (at most `OUTPUT_BYTES` of output, read in bounded chunks).
    """
    outcome = _execute(code, None, timeout_s, memory_mb, allow_weak, stdin=stdin.encode())
    stopped = _limit_result(outcome, timeout_s)
    if stopped is not None:
        return stopped
    if outcome.exit_code != 0:
        return ExecResult(False, "error", _last_line(outcome.stderr, outcome.exit_code))
    if normalise_output(outcome.stdout.decode(errors="replace")) != normalise_output(expected):
        return ExecResult(False, "failed", "wrong output")
    return ExecResult(True, "passed")


def _judged(code: str, tests: list[str], timeout_s: float, memory_mb: int, allow_weak: bool,
            trusted_prefix: str = "") -> tuple[int, ExecResult]:
    """Tests passed (at most ``len(tests)``) and the sample's result, from the judge's plain-data results.
    ``code`` starts with ``trusted_prefix`` (the benchmark's prompt), which the judge also runs itself."""
    outcome = _execute(code, list(tests), timeout_s, memory_mb, allow_weak, trusted_prefix=trusted_prefix)
    results = outcome.results or []
    passed = sum(r["passed"] for r in results)
    stopped = _limit_result(outcome, timeout_s)
    if stopped is not None:
        return passed, stopped
    if passed == len(tests):
        return passed, ExecResult(True, "passed")
    if outcome.exit_code not in (0, None):  # the program itself failed: its traceback says why
        return passed, ExecResult(False, "error", _last_line(outcome.stderr, outcome.exit_code))
    error = next(r["error"] for r in results if not r["passed"])
    return passed, ExecResult(False, "failed" if error.startswith("AssertionError") else "error", error[:300])


def check_completion(code: str, tests: list[str], io_tests: list[dict[str, str]] | None = None,
                     exec_prefix: str = "", timeout_s: float = 5.0, memory_mb: int = 1024,
                     allow_weak: bool = False) -> ExecResult:
    """One sample: passed iff every test passes (assert tests in the judge, or every stdin/stdout pair)."""
    if io_tests:
        for case in io_tests:
            result = run_io_test(exec_prefix + code, case["input"], case["output"], timeout_s, memory_mb,
                                 allow_weak)
            if not result.passed:
                return result
        return ExecResult(True, "passed")
    if not tests:
        return run_program(exec_prefix + code, timeout_s, memory_mb, allow_weak)
    return _judged(exec_prefix + code, tests, timeout_s, memory_mb, allow_weak, trusted_prefix=exec_prefix)[1]


def fraction_of_tests_passed(code: str, tests: list[str], exec_prefix: str = "", timeout_s: float = 5.0,
                             memory_mb: int = 1024, io_tests: list[dict[str, str]] | None = None,
                             allow_weak: bool = False) -> float:
    """Fraction of the tests that pass against ``code`` (each test on its own; 0 if the code itself crashes).

    ``tests`` are assert snippets the judge runs against the code's functions; ``io_tests`` are
    stdin/stdout pairs, one process each.
    """
    if io_tests:
        passed = sum(run_io_test(exec_prefix + code, case["input"], case["output"], timeout_s, memory_mb,
                                 allow_weak).passed for case in io_tests)
        return passed / len(io_tests)
    if not tests:
        raise ValueError("no tests to run")
    passed = _judged(exec_prefix + code, tests, timeout_s, memory_mb, allow_weak, trusted_prefix=exec_prefix)[0]
    return min(passed, len(tests)) / len(tests)


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
    print(f"  programs run as uid:  {info.sample_uid} (interpreter {info.interpreter or sys.executable})")
    print(f"  directory limit:      {info.dir_limit} ({DIR_BYTES >> 20} MB, {DIR_FILES} files)")
    for note in info.notes:
        print(f"  missing {note}")
    if not info.strong:
        print("  runs that execute generated code need allow_weak_sandbox: true here (see docs/cluster.md)")
    return 0 if info.strong else 1


if __name__ == "__main__":
    sys.exit(main())
