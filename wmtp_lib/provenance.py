"""Which code a run (or an evaluation) ran: the commit, whether the code differed from it, and a hash of how.

Torch-free: the training entry records it when it starts, before the model is built, so an edit or a commit
made while a long run trains is never attributed to it; evaluation records it beside its results.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wmtp_lib.registry import PROJECT_ROOT

# The code a run executes. Notebooks are not in it: an opened, autosaved or executed notebook (outputs,
# metadata) never makes a run dirty; what a notebook computes lives in wmtp_lib and params.
CODE_PATHS = ("wmtp_lib", "params", "bench", "pyproject.toml")
CODE_FIELDS = ("git_commit", "code_dirty", "code_diff_sha256", "code_tree_sha256")
UNKNOWN = dict.fromkeys(CODE_FIELDS)


def code_provenance(root: Path | None = None) -> dict[str, Any]:
    """The commit the code at ``root`` (the project) is at and whether its `CODE_PATHS` differ from it.

    ``git_commit``: the HEAD commit, with ``-dirty`` when the code differs (None outside a git checkout, e.g.
    the Docker image); ``code_dirty``; ``code_diff_sha256``: None when clean, else sha256 over every changed,
    deleted or untracked (not ignored) path under `CODE_PATHS`, sorted, each with its working-tree bytes (or a
    deletion mark). Content, not ``git diff`` text: the same uncommitted code gives the same hash whatever
    the user's git configuration (diff prefixes, colour, context lines) or git version.
    ``code_tree_sha256``: sha256 of the committed `CODE_PATHS` (their git object ids), the same at every
    commit that leaves the code alone (a README edit, an unrelated commit in an enclosing repository).
    """
    root = PROJECT_ROOT if root is None else root

    def git(*args: str) -> subprocess.CompletedProcess:
        # no optional locks: reading the status never takes index.lock from a user's concurrent `git commit`
        return subprocess.run(["git", "--no-optional-locks", *args], check=False, cwd=root, capture_output=True,
                              timeout=30)

    try:
        head = git("rev-parse", "HEAD", "--show-toplevel")
        if head.returncode != 0:
            return dict(UNKNOWN)
        # porcelain v1: a format git keeps stable across versions and configuration; -z: names verbatim
        status = git("status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all", "--", *CODE_PATHS)
        tree = git("ls-tree", "-z", "HEAD", "--", *CODE_PATHS)
    except (OSError, subprocess.TimeoutExpired):
        return dict(UNKNOWN)
    if status.returncode != 0 or tree.returncode != 0:
        raise RuntimeError(f"git could not compare the code with HEAD: {(status.stderr or tree.stderr).decode()}")
    commit, toplevel = head.stdout.decode().split("\n")[:2]
    committed = {"code_tree_sha256": hashlib.sha256(tree.stdout).hexdigest()}
    # names as bytes: any file name the filesystem allows (not only UTF-8) is hashed and read back
    changed = sorted({entry[3:] for entry in status.stdout.split(b"\0") if len(entry) > 3})
    if not changed:
        return {"git_commit": commit, "code_dirty": False, "code_diff_sha256": None, **committed}
    digest = hashlib.sha256()
    for name in changed:
        digest.update(b"\0path\0" + name + b"\0")
        path = Path(toplevel) / os.fsdecode(name)  # porcelain names are relative to the repository's top, always
        try:
            digest.update(b"content\0" + path.read_bytes())
        except FileNotFoundError:  # deleted, or removed between git's listing and this read
            digest.update(b"deleted\0")
        except IsADirectoryError:  # a submodule or nested repository: its commit is not this project's code
            digest.update(b"directory\0")
    return {"git_commit": commit + "-dirty", "code_dirty": True, "code_diff_sha256": digest.hexdigest(), **committed}


def git_commit() -> str | None:
    """The project's commit, with ``-dirty`` when the code that runs differs from it (`code_provenance`)."""
    return code_provenance()["git_commit"]


class SessionLog:
    """``runs/<run>/provenance.jsonl``: one line per training session (stage and step it started at, its code).

    A resume rolls the log back with the run: sessions that started at or after the step this one resumes
    from trained nothing that survives, so they are dropped (the rule `TrainMetrics.truncate` applies to the
    metrics). What is left lists the code of every step the run's weights went through.
    """

    def __init__(self, run_dir: Path, code: dict[str, Any]):
        self.path = run_dir / "provenance.jsonl"
        self.code = {k: code.get(k) for k in CODE_FIELDS}

    def start(self, stage: str, step: int) -> None:
        """Record this session, starting ``stage`` at ``step`` (0 and the first stage: a fresh run)."""
        kept = [s for s in self.sessions()
                if (s["stage"] == "value" and stage == "mtp") or (s["stage"] == stage and s["step"] < step)]
        record = {"stage": stage, "step": step, **self.code,
                  "started": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in kept + [record]))
        tmp.replace(self.path)

    def sessions(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: the code of the session that finished the run, every session's code, and
        ``code_mixed`` when they differ (the weights were trained by more than one version of the code)."""
        sessions = self.sessions()
        return {**self.code, "code_mixed": len(code_versions(sessions)) > 1,
                "code_sessions": [{k: s.get(k) for k in ("stage", "step", *CODE_FIELDS)} for s in sessions]}


def code_versions(sessions: list[dict[str, Any]]) -> set[tuple[Any, Any]]:
    """The distinct code of these sessions: the code's content, not the commit (a commit that leaves
    `CODE_PATHS` alone changes nothing that ran); sessions recorded before code trees were compare by commit."""
    key = "code_tree_sha256" if all(s.get("code_tree_sha256") for s in sessions) else "git_commit"
    return {(s.get(key), s.get("code_diff_sha256")) for s in sessions}
