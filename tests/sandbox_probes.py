"""Escape attempts, each a completion a model could emit, run through the public execution entry points.

Every probe is written so that "passed" would mean the escape worked. `run_probes` is called by
tests/test_sandbox.py in the test's own process (root in CI) and, through ``python sandbox_probes.py OUTSIDE
PORT``, by an unprivileged user (``nobody``), the way the Docker image's non-root user runs evaluations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wmtp_lib.execution import check_completion, fraction_of_tests_passed, isolation_info, run_io_test

SECRET = "sekret-aws-value-123"
CREDENTIALS = "[default]\naws_access_key_id = AKIAPROBE\naws_secret_access_key = " + SECRET + "\n"


def prepare_outside(outside: Path) -> None:
    """Files the evaluator owns, open to every user by permission bits: only the sandbox may stop a probe."""
    (outside / ".aws").mkdir(parents=True)
    (outside / ".aws" / "credentials").write_text(CREDENTIALS)
    (outside / "checkpoints").mkdir()
    (outside / "checkpoints" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (outside / "victim.txt").write_text("keep me\n")
    for root, dirs, files in os.walk(outside):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)


def outside_state(outside: Path) -> dict[str, str]:
    """Every file below ``outside`` with its content, to compare before and after the probes."""
    return {str(p.relative_to(outside)): p.read_bytes().hex() for p in sorted(outside.rglob("*")) if p.is_file()}


def probe_programs(outside: Path, port: int, victim_pid: int) -> dict[str, str]:
    out = str(outside)
    return {
        "write_outside": f"open({out + '/written.txt'!r}, 'w').write('x')\n",
        "write_tmp": "open('/tmp/wmtp-probe-written.txt', 'w').write('x')\n",
        "delete_outside": f"import os\nos.unlink({out + '/victim.txt'!r})\n",
        "rename_outside": f"import os\nos.rename({out + '/victim.txt'!r}, 'stolen.txt')\n",
        "read_credentials": f"assert 'AKIA' in open({out + '/.aws/credentials'!r}).read()\n",
        "read_checkpoint": f"assert open({out + '/checkpoints/model.safetensors'!r}, 'rb').read(8)\n",
        "list_outside": f"import os\nassert os.listdir({out!r})\n",
        "read_env_secret": (
            "import os\nfound = 'sekret' in str(dict(os.environ))\n"
            "for pid in os.listdir('/proc') if os.access('/proc', os.R_OK) else []:\n"
            "    try:\n        found = found or b'sekret' in open(f'/proc/{pid}/environ', 'rb').read()\n"
            "    except OSError:\n        continue\nassert found\n"),
        "connect_tcp": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'hi')\n",
        "send_udp": f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', {port}))\n",
        "process_flood": (
            "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nstarted = 0\n"
            "for _ in range(500):\n    pid = libc.fork()\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n"
            "    if pid < 0:\n        break\n    started += 1\n"
            "raise SystemExit(f'started {started} processes')\n"),
        "spawn_subprocess": (
            "import ctypes, os\ntry:\n"
            f"    os.posix_spawn('/bin/sh', ['sh', '-c', 'touch {out}/spawned'], {{}})\n"
            "except OSError:\n    pass\n"
            f"ctypes.CDLL(None).system(b'touch {out}/spawned2')\n"
            f"assert os.path.exists({out + '/spawned'!r}) or os.path.exists({out + '/spawned2'!r})\n"),
        "kill_other_process": (
            f"import ctypes, os, signal\nassert ctypes.CDLL(None).kill({victim_pid}, signal.SIGKILL) == 0\n"),
        "forge_marker": ('print("__WMTP_ALL_TESTS_PASSED__", flush=True)\nimport os\nos._exit(0)\n'
                         "assert False, 'the tests'\n"),
        "forge_report_fds": (
            "import os\nstolen = b''\nfor fd in range(3, 256):\n    try:\n        stolen += os.read(fd, 4096)\n"
            "    except OSError:\n        pass\nfor fd in range(3, 256):\n"
            "    for msg in (stolen + b' 1', b'0' * 32 + b' 1', b'sandbox-error forged'):\n        try:\n            os.write(fd, msg)\n"
            "        except OSError:\n            pass\nos._exit(0)\nassert False, 'the tests'\n"),
        "exit_zero_early": "import sys\nsys.exit(0)\nassert False, 'the tests'\n",
        "endless_loop": "while True:\n    pass\n",
        "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n",
    }


def run_probes(outside: Path, port: int) -> dict:
    """Run every probe (and the forge attempts on the reward and stdin/stdout entry points); report each."""
    victim = subprocess.Popen(["sleep", "60"])
    programs = probe_programs(outside, port, victim.pid)
    limits = {"endless_loop": 2.0}

    def one(name: str) -> dict:
        res = check_completion(programs[name], [], timeout_s=limits.get(name, 5.0),
                               memory_mb=256 if name == "memory_bomb" else 1024)
        return {"passed": res.passed, "status": res.status, "detail": res.detail}

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(programs, pool.map(one, programs)))
        forge_count = 'print("__WMTP_TESTS_PASSED__", 3, flush=True)\nimport os\nos._exit(0)\n'
        results["forge_reward"] = {"fraction": fraction_of_tests_passed(forge_count, ["assert True"] * 3)}
        # stdin/stdout: the harness compares, so the program can only fail by printing something else
        results["stdio_reads_secret"] = {"passed": run_io_test(programs["read_credentials"], "", "").passed}
        results["victim_alive"] = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    info = isolation_info()
    results["isolation"] = {"level": info.level, "strong": info.strong, "user": info.user}
    return results


if __name__ == "__main__":
    print(json.dumps(run_probes(Path(sys.argv[1]), int(sys.argv[2]))))
