"""Inside the sample's process: lock it down, run the generated program, report to the harness.

`wmtp_lib.execution` starts this file as ``python -I -B sandbox.py RUN TOKEN_FD REPORT_FD LAYERS LIBS`` in
the sample's own directory. Before any generated code runs it

1. reads this run's secret token from the inherited pipe ``TOKEN_FD`` and closes it (the token is in no
   file, argument or environment variable the program could read);
2. sets resource limits (memory, CPU, file size, no core files; without seccomp, for a non-root user,
   also the process count);
3. applies the isolation layers the harness asks for (``LAYERS``, probed once by the harness):
   ``landlock``: reads only the interpreter's libraries and stdlib, reads and writes only the sample's directory;
   ``seccomp``: no sockets, no new processes (threads stay allowed), no signals to other processes,
   no ptrace, mount, namespaces or other kernel attack surface. A layer that cannot be applied stops the run
   before the program starts (``<token> sandbox-error ...`` on the report pipe), so a run never silently gets less.

Then it runs ``job.json``'s program (and tests) and, only when control comes back to it normally, writes
``<token> <tests passed>`` to ``REPORT_FD``. ``exit()``, ``os._exit``, a signal or a crash leave no report.
``--probe`` applies every layer the machine offers and checks that each one holds (for the harness's probe).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import sys
import sysconfig
import traceback

# Python-level guard run before the program: the cheap first layer (seccomp and Landlock hold below it).
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

CLONE_THREAD = 0x00010000
# Syscalls a test program never needs and that reach outside its process or into the kernel's rarer parts.
_DENIED = ("fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
           "tkill", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "mount", "umount2", "pivot_root", "chroot",
           "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
           "io_uring_setup", "io_uring_enter", "io_uring_register", "setuid", "setgid", "setreuid", "setregid",
           "setresuid", "setresgid", "setgroups", "capset", "personality", "kexec_load", "init_module",
           "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog")
# Signals only to this process (Python's own os.abort, faulthandler); never to the evaluator or its siblings.
_OWN_PID_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def readable_paths() -> list[str]:
    """What Python needs to read after start-up: its stdlib and site-packages, shared libraries, time zones."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.add(libdir)
    paths.update(["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
                  "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom"])
    return sorted(p for p in paths if os.path.exists(p))


def apply_landlock(workdir: str) -> None:
    """Filesystem: everything inside ``workdir``; read-only the paths Python needs; nothing else, root included."""
    from landlock import FSAccess, Ruleset

    ruleset = Ruleset()  # handles every filesystem right this kernel's Landlock ABI knows
    dir_read = FSAccess.READ_FILE | FSAccess.READ_DIR | FSAccess.EXECUTE
    file_read = FSAccess.READ_FILE | FSAccess.EXECUTE
    for path in readable_paths():
        ruleset.allow(path, rules=dir_read if os.path.isdir(path) else file_read)
    ruleset.allow("/dev/null", rules=FSAccess.READ_FILE | FSAccess.WRITE_FILE)
    ruleset.allow(workdir)
    ruleset.apply()


def apply_seccomp() -> None:
    """Network, processes, signals and kernel surface, filtered by system call (default: allow)."""
    import pyseccomp as sc

    pid = os.getpid()
    filt = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED:
        filt.add_rule(sc.ERRNO(errno.EPERM), name)
    filt.add_rule(sc.ERRNO(errno.EACCES), "socket")  # every family: TCP, UDP, raw, netlink, UNIX paths
    # clone without CLONE_THREAD makes a process; clone3 hides its flags in memory, so it reports
    # "not implemented" and the C library falls back to clone for threads.
    filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for name in _OWN_PID_ONLY:
        filt.add_rule(sc.ERRNO(errno.EPERM), name, sc.Arg(0, sc.NE, pid))
    filt.load()


def _tasks_of_uid(uid: int) -> int:
    """Processes and threads of ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except (FileNotFoundError, PermissionError):
                continue  # exited while we counted, or hidden from us
    return count


def apply_limits(memory_mb: int, cpu_s: int, cap_tasks: bool) -> None:
    """Memory, CPU time, file size, no core dumps; with ``cap_tasks`` a process cap (non-root users only)."""
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if cap_tasks and os.geteuid() != 0:  # root ignores RLIMIT_NPROC
        # It counts every process and thread of the user, so the cap sits a few above what already runs.
        cap = _tasks_of_uid(os.getuid()) + 8
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))


def _run_job(job: dict) -> int:
    """Execute the program (and then each test on its own); the number of tests passed, or -1."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(_GUARD, "<guard>", "exec"), namespace)
    try:
        exec(compile(job["code"], "program.py", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        return -1
    passed = 0
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"test_{i}.py", "exec"), namespace)
            passed += 1
        except Exception:
            traceback.print_exc()
    return passed


def _import_layers(layers: list[str]) -> None:
    if "landlock" in layers:
        import landlock  # noqa: F401
    if "seccomp" in layers:
        import pyseccomp  # noqa: F401


def _probe(workdir: str) -> dict:
    """Apply every layer this machine offers, then check each holds; what worked and why not otherwise."""
    report: dict = {"euid": os.geteuid(), "landlock_abi": 0, "landlock": False, "seccomp": False}
    for layer in ("landlock", "seccomp"):
        try:
            _import_layers([layer])
        except Exception as exc:  # e.g. libseccomp missing: reported, the layer counts as absent
            report[f"{layer}_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        from landlock import landlock_abi_version

        report["landlock_abi"] = landlock_abi_version()
        apply_landlock(workdir)
        try:
            os.listdir("/")
            report["landlock_error"] = "applied, but / is still readable"
        except PermissionError:
            report["landlock"] = True
    except Exception as exc:  # reported to the harness, which names the level in force
        report["landlock_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        apply_seccomp()
        import socket

        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            report["seccomp_error"] = "applied, but a TCP socket was still created"
        except PermissionError:
            report["seccomp"] = True
    except Exception as exc:
        report["seccomp_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return report


def _add_paths(paths: str) -> None:
    """Where landlock and pyseccomp live, as the harness found them (``-I`` may leave them off sys.path)."""
    for path in paths.split(os.pathsep):
        if path and path not in sys.path:
            sys.path.append(path)


def main(argv: list[str]) -> None:
    if argv[1] == "--probe":
        _add_paths(argv[2])
        print(json.dumps(_probe(os.getcwd())), flush=True)
        return
    token_fd, report_fd, layers = int(argv[2]), int(argv[3]), [x for x in argv[4].split(",") if x]
    token = os.read(token_fd, 256)
    os.close(token_fd)
    with open("job.json") as fh:
        job = json.load(fh)
    try:
        _add_paths(argv[5])
        _import_layers(layers)  # before Landlock: their files may lie outside what it leaves readable
        # seccomp already stops new processes and leaves threads alone; without it, cap them by rlimit
        apply_limits(job["memory_mb"], job["cpu_s"], cap_tasks="seccomp" not in layers)
        if "landlock" in layers:
            apply_landlock(os.getcwd())
        if "seccomp" in layers:
            apply_seccomp()
    except Exception as exc:  # the program has not run: this report can be trusted
        os.write(report_fd, token + f" sandbox-error {type(exc).__name__}: {exc}".splitlines()[0].encode())
        os._exit(3)
    sys.argv = ["program.py"]
    del argv, token_fd
    passed = _run_job(job)
    sys.stdout.flush()
    sys.stderr.flush()
    if passed >= 0:
        os.write(report_fd, token + b" %d" % passed)
    os._exit(0 if passed >= 0 else 1)


if __name__ == "__main__":
    main(sys.argv)
