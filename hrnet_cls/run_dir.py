"""One run per output directory: a lock naming its holder, one-line file-system errors, and
the decision where a run starts (``open_run``).

``RunLock.acquire`` takes an exclusive POSIX lock (``fcntl.lockf``) on ``OUTPUT_DIR/.lock``
and writes the holder (host, pid, start date, command) into the file. A second run fails at
once with one line naming the holder. The kernel (or the NFS server) drops the lock when
its process dies, even by SIGKILL, so a lock left by a dead run is taken over, with a
warning naming the run that left it. On a file system without POSIX locks the run goes on
with a warning: nothing then keeps a second run out.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrnet_cls.atomic import HOST
from hrnet_cls.errors import os_error_line
from hrnet_cls.checkpoint import ResumeError, load_checkpoint, resume_path, run_files

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
PREEMPTED_MARKER = "PREEMPTED"  # written after a preemption's save; the next start removes it


class RunDirError(RuntimeError):
    """The output directory cannot be used (locked, unwritable, holds another run); one line."""


def prepare(output_dir: Path) -> None:
    """Create output_dir (and parents) or fail in one line: not a directory, read-only, no space."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"checkpoint.output_dir {output_dir}: exists and is not a directory") from None
    except OSError as exc:
        raise RunDirError(os_error_line(exc, "checkpoint.output_dir: cannot create")) from None
    if not output_dir.is_dir():
        raise RunDirError(f"checkpoint.output_dir {output_dir}: exists and is not a directory")


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')})")


class RunLock:
    """The lock of one output directory, held by this process (see the module docstring)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        path = output_dir / LOCK_NAME
        for _ in range(5):  # retried only when the file was replaced between open and lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise RunDirError(os_error_line(exc, "checkpoint.output_dir: cannot create the lock")) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                previous = _read(fd)
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunDirError(f"{output_dir} is in use by another run: {_describe(previous)}; wait for it, "
                                      "or use another checkpoint.output_dir") from None
                logger.warning("%s: file locking unsupported here (%s): nothing keeps a second run out of %s",
                               path, exc.strerror, output_dir)
                return cls(path, None)
            if os.fstat(fd).st_ino != _inode(path):  # released and removed by its holder meanwhile
                os.close(fd)
                continue
            previous = _read(fd)
            if previous:
                logger.warning("taking over %s from a run that is gone: %s", path, _describe(previous))
            _write(fd, {"host": HOST, "pid": os.getpid(), "command": " ".join(sys.argv),
                        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")})
            return cls(path, fd)
        raise RunDirError(f"{path}: could not take the lock (other runs keep replacing it)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent); removal first, so that a
        run opening the file meanwhile finds it replaced and tries again."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)


@dataclass
class RunStart:
    """What rank 0 found in the output directory: where to resume, or that the run is done."""

    resume: Path | None  # checkpoint to continue from; None = a new run
    finished: dict[str, Any] | None = None  # the last checkpoint's epoch and metrics when it ended the run
    lock: RunLock | None = None  # rank 0's lock (other ranks hold none)


def open_run(output_dir: Path, resume: str, epochs: int) -> RunStart:
    """Rank 0: make output_dir usable, lock it, and decide where training starts.

    resume="" into a folder that holds checkpoints is refused (it would overwrite them);
    "auto" takes the newest checkpoint that verifies (none verifying is an error, never a
    silent restart); an explicit path must not point outside a folder that holds another run.
    """
    prepare(output_dir)
    lock = RunLock.acquire(output_dir)
    try:
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        existing = [p.name for p in run_files(output_dir)]
        if resume == "" and existing:
            raise RunDirError(f"{output_dir} holds a run ({', '.join(existing)}); continue it with "
                              "checkpoint.resume=auto, or start a new run in another checkpoint.output_dir")
        if resume not in ("", "auto") and existing and Path(resume).resolve().parent != output_dir.resolve():
            raise RunDirError(f"{output_dir} holds another run ({', '.join(existing)}); resuming {resume} there "
                              "would overwrite it: use another checkpoint.output_dir")
        try:
            path = resume_path(resume, output_dir)
        except ResumeError as exc:
            raise RunDirError(str(exc)) from None
        finished = None
        if path is not None:
            state = load_checkpoint(path, mmap=True)
            if state["epoch"] >= epochs and state["batch_in_epoch"] == 0:
                finished = {"epoch": state["epoch"], "metrics": state.get("metrics") or {}, "path": str(path)}
        return RunStart(path, finished, lock)
    except BaseException:
        lock.release()
        raise
