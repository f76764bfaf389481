"""hrnet_cls.atomic: the one temp-file / fsync / rename / directory-fsync path of every file written."""
from __future__ import annotations

import os
import stat

import pytest

from hrnet_cls.atomic import _MODE, ChecksumError, file_sha256, publish, sidecar, verify, write_atomic


def test_write_atomic_takes_bytes_text_or_a_writer(tmp_path) -> None:
    path = tmp_path / "a.txt"
    digest = write_atomic(path, "héllo\n", checksum=True)
    assert path.read_text() == "héllo\n" and digest == file_sha256(path) and verify(path) is True
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, lambda f: f.write(b"streamed"))
    assert path.read_bytes() == b"streamed"
    with pytest.raises(ChecksumError, match=r"a.txt: contents do not match a.txt.sha256 \(sha256 [0-9a-f]{16}\.\.\., "
                       r"recorded [0-9a-f]{16}\.\.\.\)"):  # the old sidecar: written only with checksum=True
        verify(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "a.txt.sha256"]  # no temp left
    assert stat.S_IMODE(path.stat().st_mode) == _MODE
    sidecar(path).unlink()
    assert verify(path) is False  # no sidecar: unverifiable, not wrong


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path) -> None:
    path = tmp_path / "a.txt"
    write_atomic(path, "old")

    def broken(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_atomic(path, broken, checksum=True)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_publish_moves_a_finished_file_with_opens_mode(tmp_path) -> None:
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    tmp = staging / "w.bin"
    tmp.write_bytes(b"weights")
    os.chmod(tmp, 0o600)  # as safetensors leaves its files
    publish(tmp, out / "w.bin")
    assert not tmp.exists() and (out / "w.bin").read_bytes() == b"weights"
    assert stat.S_IMODE((out / "w.bin").stat().st_mode) == _MODE
    tmp.write_bytes(b"other")
    with pytest.raises(OSError):
        publish(tmp, tmp_path / "missing" / "w.bin")  # no such directory: the temp is removed
    assert not tmp.exists() and not sidecar(out / "w.bin").exists()
