"""Shards over a network that fails in small ways: a loopback HTTP server that cuts tar responses half-way
and stalls one; training and validate.py over it must give the local run's rows exactly."""
from __future__ import annotations

import csv
import http.server
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DIGITS, DIGITS_VAL, REPO, TINY_RECIPE, layered, subprocess_env
from hrnet_cls.data import build_val_loader
from hrnet_cls.data.remote import NetworkError

pytestmark = pytest.mark.slow  # real curl transfers and train.py / validate.py children


class Faulty(http.server.ThreadingHTTPServer):
    """Serves shards/digits; of the .tar responses, every ``cut``-th stops half-way (connection closed) and the
    ``stall``-th stops sending for ``stall_s`` first. The _info.json is always served whole."""

    daemon_threads = True

    def __init__(self, cut: int = 3, stall: int = 2, stall_s: float = 4.0, dead: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.cut, self.stall, self.stall_s, self.dead = cut, stall, stall_s, dead
        self.count, self.lock, self.faults = itertools.count(1), threading.Lock(), []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: Faulty = self.server  # type: ignore[assignment]
        path = DIGITS / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        with server.lock:
            n = next(server.count) if path.suffix == ".tar" else 0
        if server.dead and n:
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if n and n == server.stall:
            server.faults.append(("stall", path.name))
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            time.sleep(server.stall_s)
            return
        if n and n % server.cut == 0:
            server.faults.append(("cut", path.name))
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server():
    with Faulty() as s:
        yield s
        s.shutdown()


def rows(out: Path) -> list[dict]:
    keep = ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "skipped", "train_images")
    return [{k: r[k] for k in keep} for r in csv.DictReader((out / "summary.csv").open())]


def run(tmp_path: Path, *args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*(launcher if nproc else [sys.executable]), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=subprocess_env(tmp_path, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("nproc, pipe", [(0, False), (2, False), (0, True)],
                         ids=["1 process", "2 processes", "pipe:curl"])
def test_training_over_a_faulty_server_gives_the_local_rows(tmp_path, server, nproc, pipe) -> None:
    recipe = [*TINY_RECIPE, "schedule.epochs=2", "data.read_timeout_s=1"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    for out, base in ((local, str(DIGITS)), (remote, f"pipe:curl -s -f {server.url}" if pipe else server.url)):
        proc = run(tmp_path, "train.py", "--config", "demo_digits.yaml", *layered(
            *recipe, f"checkpoint.output_dir={out}", f"data.train_shards={base}/train-{{000000..000001}}.tar",
            f"data.val_shards={base}/val-{{000000..000001}}.tar"), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(remote) == rows(local)  # nothing lost, nothing read twice, nothing called bad data
    kinds = {kind for kind, _ in server.faults}
    assert kinds == {"cut", "stall"} and "retry 1 of 3" in proc.stderr and "no data for 1 s" in proc.stderr


def test_validate_over_a_faulty_server_gives_the_local_row_and_a_dead_one_an_error_row(tmp_path, server) -> None:
    ckpt = str(REPO / "tests" / "data" / "pre_move" / "last.pth")
    got = {}
    for name, data in (("local", DIGITS_VAL), ("remote", f"{server.url}/val-{{000000..000001}}.tar")):
        proc = run(tmp_path, "validate.py", "--checkpoint", ckpt, "--data", data, "--workers", "2",
                   "--read-timeout-s", "1", "--results-file", str(tmp_path / f"{name}.csv"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        (got[name],) = csv.DictReader((tmp_path / f"{name}.csv").open())
    keep = ("top1", "top5", "loss", "samples", "skipped")
    assert {k: got["remote"][k] for k in keep} == {k: got["local"][k] for k in keep}
    server.dead = True  # every tar request refused: the row is an error naming the URL, exit 1
    proc = run(tmp_path, "validate.py", "--checkpoint", ckpt, "--data", f"{server.url}/val-{{000000..000001}}.tar",
               "--workers", "0", "--retries", "1", "--read-timeout-s", "1", "--results-file", str(tmp_path / "dead.csv"))
    (row,) = csv.DictReader((tmp_path / "dead.csv").open())
    assert proc.returncode == 1 and row["top1"] == "" and "NetworkError" in row["error"]
    assert f"{server.url}/val-000000.tar: the transfer failed (exit 22" in row["error"]


def test_a_read_that_fails_every_retry_is_a_network_error_naming_the_url(server) -> None:
    server.dead = True
    loader = build_val_loader(f"{server.url}/val-{{000000..000000}}.tar", batch_size=8, img_size=32, crop_pct=1.0,
                              workers=0, retries=1, read_timeout_s=1)
    with pytest.raises(NetworkError, match=r"val-000000.tar: the transfer failed .*; 1 retries failed at sample 0"):
        list(loader)
