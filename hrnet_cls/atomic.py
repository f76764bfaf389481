"""Files that are the old version or the new one, never a mix, optionally with a sha256 sidecar (docs/design.md §6.3).
``publish`` carries checkpoints and their sidecars, config.yaml, wandb_run_id, the PREEMPTED marker, shards and
_info.json, results files and export folders; summary.csv rows (appended), the run lock and W&B's files bypass it.
Temp names (``.NAME.HOST.PID.XXXX.tmp``) let clean-up remove only those of dead writers on this host."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

HOST = socket.gethostname()
_HOST_TAG = re.sub(r"[^A-Za-z0-9_-]", "_", HOST)  # a host name may hold dots; temp names may not
_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_CHUNK = 1 << 22  # bytes per read when hashing or copying


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _Hashing:
    """Hashes what is written through it and keeps the first OSError (torch's zip writer says "unexpected pos")."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.hash, self.error = file, hashlib.sha256(), None

    def write(self, data: Any) -> int:
        try:
            n = self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.hash.update(data)
        return n

    def flush(self) -> None:
        self.file.flush()


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries (what makes a rename durable), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide checkpoints from the group


def _write_temp(path: Path, write: Callable[[Any], None]) -> tuple[str, str]:
    """(temp path, sha256 hex) of ``write``'s output beside path; the temp is removed on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST_TAG}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Hashing(f)
            try:
                write(out)
                f.flush()
            except Exception as exc:
                if out.error is not None:  # the OS said why; torch's message would not
                    raise OSError(out.error.errno, out.error.strerror, str(path)) from exc
                raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp, out.hash.hexdigest()


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished file ``tmp`` at ``path`` (same file system) atomically: fsync'ed, given open()'s mode,
    renamed, the folder fsync'ed; on failure tmp is removed and path left as it was."""
    try:
        _fsync(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(Path(path).parent)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None] | bytes | str, checksum: bool = False) -> str:
    """Put the bytes, the text (UTF-8) or what ``write(file)`` writes at ``path`` atomically; returns its sha256 hex.
    checksum: also ``path.sha256``, after the file (a crash between leaves a mismatch: resume falls back)."""
    path = Path(path)
    if isinstance(write, (bytes, str)):
        data = write.encode() if isinstance(write, str) else write
        write = lambda f: f.write(data)  # noqa: E731
    tmp, digest = _write_temp(path, write)
    pairs = [(tmp, path)]
    try:
        if checksum:  # both written before either is renamed: a full disk leaves the old pair
            side = _write_temp(sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))[0]
            pairs.append((side, sidecar(path)))
        for temp, final in pairs:
            publish(temp, final)
    except BaseException:
        for temp, _ in pairs:
            Path(temp).unlink(missing_ok=True)
        raise
    return digest


def copy_atomic(src: Path, dst: Path, checksum: bool = True) -> None:
    """An independent copy of src at dst (own storage: corrupting one leaves the other intact)."""
    with open(src, "rb") as f:
        write_atomic(dst, lambda out: shutil.copyfileobj(f, out, _CHUNK), checksum=checksum)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ChecksumError(ValueError):
    """A file whose bytes differ from the digest in its .sha256: corrupt, or cut during a save."""


def verify(path: str | os.PathLike) -> bool:
    """True when path's bytes match its .sha256, False when it has none; ChecksumError naming both digests if not."""
    path = Path(path)
    try:
        recorded = sidecar(path).read_text().split()
    except FileNotFoundError:
        return False
    actual = file_sha256(path)
    if not recorded or recorded[0] != actual:
        raise ChecksumError(f"{path}: contents do not match {sidecar(path).name} (sha256 {actual[:16]}..., "
                            f"recorded {recorded[0][:16] if recorded else 'nothing'}...): corrupt or half-written")
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale_temps(directory: Path) -> list[Path]:
    """Temp files in directory left by dead writers on this host (safe to delete)."""
    stale = []
    for path in directory.glob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match and match["host"] == _HOST_TAG and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            stale.append(path)
    return stale
