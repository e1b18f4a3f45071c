"""One writer per run directory: an advisory lock that a crashed writer cannot leave stuck.

Two processes writing one ``version_N`` directory (two ``--ckpt_path last`` resumes, or a sweep
restarted while its old fit still runs) interleave ``metrics.csv`` rows and checkpoints. The CLI takes
``RunDirLock`` on the run directory before writing anything there. The lock is ``flock`` on
``<run dir>/.writer.lock``: the kernel drops it when its process dies, however it dies (SIGKILL,
OOM kill, power off), so a crashed writer never leaves the directory locked and no PID has to be
judged stale. The file itself stays (removing a lock file races with the next writer opening it) and
records who holds it and whether that run finished, so an interrupted run can be told from a done one.

POSIX only (``fcntl``); elsewhere the lock is a no-op. On NFS, Linux maps ``flock`` to NFS locks.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None

__all__ = ["LOCK_FILENAME", "RunDirLock", "RunDirLockedError", "lock_holder", "was_interrupted"]

LOCK_FILENAME = ".writer.lock"


class RunDirLockedError(RuntimeError):
    """The run directory is being written by another live process."""


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} (since {since})"


def _try_lock(fd: int, mode: int, attempts: int = 1) -> bool:
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.1)  # a lock_holder() probe holds it for microseconds: look again
    return False


def lock_holder(run_dir) -> Optional[str]:
    """Who writes ``run_dir`` now ("pid 123 on host (since ...)"), or None when no live process does."""
    path = Path(run_dir) / LOCK_FILENAME
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _try_lock(fd, fcntl.LOCK_SH):  # shared: a probe never blocks another probe
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _describe(_read_record(path))
    finally:
        os.close(fd)


def was_interrupted(run_dir) -> bool:
    """True when a writer took ``run_dir`` and died (or failed) before finishing, and none holds it now."""
    record = _read_record(Path(run_dir) / LOCK_FILENAME)
    return record.get("state") == "running" and lock_holder(run_dir) is None


class RunDirLock:
    """The exclusive writer's lock on ``run_dir`` (created if needed); ``release`` records how it ended.

    ``visitor``: the writer only adds to a run it did not train (``diffvision validate`` / ``test`` / ``predict``
    logging into the checkpoint's run). Its record names it but keeps the run's ``state``, so a run interrupted
    before its first ``last.ckpt`` still reads as interrupted (resumable in place) once the visitor is gone,
    even if it is killed; ``release`` puts the run's own record back as it was."""

    def __init__(self, run_dir, visitor: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILENAME
        self.visitor = visitor
        self._fd: Optional[int] = None
        self._previous: bytes = b""  # a visitor's: the run's record, put back on release

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise ``RunDirLockedError`` naming the live writer."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None and not _try_lock(fd, fcntl.LOCK_EX, attempts=10):
            os.close(fd)
            raise RunDirLockedError(
                f"run directory {self.run_dir} is being written by {_describe(_read_record(self.path))}: one "
                f"writer at a time (its metrics and checkpoints would interleave with this run's); wait for it to "
                f"end or stop it, or write to another --experiment")
        self._fd = fd
        if self.visitor:
            self._previous = os.pread(fd, os.fstat(fd).st_size, 0)
            self._write(_read_record(self.path).get("state"), visitor=True)
        else:
            self._write("running")
        return self

    def _write(self, state: Optional[str], **extra) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 1), "state": state,
                  **extra}
        self._put(json.dumps(record).encode())

    def _put(self, data: bytes) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, finished: bool = False) -> None:
        """Give the directory up; ``finished`` marks the run done (else it reads as interrupted)."""
        if self._fd is None:
            return
        try:
            if self.visitor:
                self._put(self._previous)  # the run's own record, however the visit ended
            elif finished:
                self._write("finished")
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
