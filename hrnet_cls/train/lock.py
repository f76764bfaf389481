"""The lock of a run folder: one run at a time, and a holder that says who it is (docs/design.md
§6.4). The kernel (or NFS server) drops a POSIX lock when its process dies, even by SIGKILL, so a
dead run's lock is taken over; without POSIX locks the run goes on with a warning."""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hrnet_cls.atomic import HOST
from hrnet_cls.errors import RunDirError, os_error_line

logger = logging.getLogger(__name__)


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"({holder.get('command', '?')})")


class RunLock:
    """The lock of one run folder, held by this process."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: Path) -> RunLock:
        output_dir = path.parent
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
