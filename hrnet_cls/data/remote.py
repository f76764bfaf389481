"""Remote shards read through a transfer command (curl for http(s), the user's ``pipe:`` command) whose output
is read with a timeout: a cut, a stall of ``read_timeout_s`` or a failed command is a NetworkError, which
read_segment retries from the sample where it broke (docs/design.md §5.6)."""
from __future__ import annotations

import io
import os
import select
import signal
import subprocess

RETRIES = 3  # data.retries' default
READ_TIMEOUT_S = 30.0  # data.read_timeout_s' default
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # before retry 1, 2, 3, 4 and after


class NetworkError(RuntimeError):
    """A remote read that failed (cut, stalled, refused): a transport fault, never bad data. Its text stays
    the message it was made with (webdataset appends its stream and URL to an exception's args)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # pickled across DataLoader workers with its message only
        return type(self), (self.message,)

    @property
    def reason(self) -> str:
        """The message as raised, also after torch re-raised it from a DataLoader worker."""
        return str(self).strip().splitlines()[-1].split("NetworkError: ")[-1]


def has_command(url: str) -> bool:
    """Whether this module reads ``url``: http(s) URLs and pipe: commands (other schemes go to webdataset)."""
    return url.startswith(("http://", "https://", "pipe:"))


def command(url: str, timeout_s: float) -> tuple[list[str] | str, bool]:
    """(argv or shell command, shell?) that writes the shard to stdout; curl fails on HTTP errors (-f), says
    why (-sS) and gives up connecting after timeout_s; the stall timeout is ours, for every command."""
    if url.startswith("pipe:"):
        return url[len("pipe:"):], True
    return ["curl", "-f", "-sS", "-L", "--connect-timeout", f"{timeout_s:g}", url], False


class _Stream(io.RawIOBase):
    """The stdout of a transfer command, read with a timeout; at its end, a non-zero exit is a NetworkError."""

    def __init__(self, url: str, timeout_s: float) -> None:
        argv, shell = command(url, timeout_s)
        self.url, self.timeout_s = url, timeout_s
        self.proc = subprocess.Popen(argv, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise NetworkError(f"{self.url}: no data for {self.timeout_s:g} s (data.read_timeout_s)")
        data = os.read(self.fd, len(buffer))
        if not data:
            status = self.proc.wait()
            if status != 0:
                why = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise NetworkError(f"{self.url}: the transfer failed (exit {status}"
                                   + (f": {why[-1]}" if why else "") + ")")
        buffer[:len(data)] = data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.proc.stdout.close()
            self.proc.stderr.close()
        super().close()


def open_remote(url: str, timeout_s: float = READ_TIMEOUT_S) -> io.BufferedReader:
    """A buffered stream of the shard at ``url`` (see the module docstring)."""
    return io.BufferedReader(_Stream(url, timeout_s), buffer_size=1 << 20)
