"""Tracker: summary.csv, real offline W&B runs read back from disk, and online degrading."""
from __future__ import annotations

import csv
import glob
import http.server
import json
import logging
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import read_offline_run
from hrnet_cls.config import CheckpointConfig, Config
from hrnet_cls.train.checkpointer import Checkpointer
from hrnet_cls.train.tracking import SUMMARY_COLUMNS, Tracker, resolve_wandb_mode


def tracker_for(cfg: Config, folder, is_main: bool = True, **kwargs) -> Tracker:
    """The Tracker of a run of ``cfg`` in ``folder``, as train.py makes it."""
    return Tracker(cfg.wandb, Checkpointer(CheckpointConfig(output_dir=str(folder)), recipe=cfg, is_main=is_main),
                   **kwargs)


def offline_config(tmp_path: Path) -> Config:
    cfg = Config()
    cfg.wandb.mode = "offline"
    cfg.wandb.tags = ["test"]
    cfg.checkpoint.output_dir = str(tmp_path / "run")
    return cfg


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def wandb_services() -> list[str]:
    """wandb-core service processes started by this process (from /proc; [] where there is none)."""
    pids: list[str] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids += f.read().split()
    services = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("wandb-core"):
                    services.append(pid)
        except OSError:  # exited meanwhile
            pass
    return services


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """W&B isolated in tmp_path: no user settings, no netrc, no key; torn down afterwards."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb-core's crash reports and the SDK's usage telemetry off: tests talk to 127.0.0.1 only
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")  # tests set another loopback one
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_HTTP_TIMEOUT",
                "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    assert wandb_services() == [], "a wandb-core service process outlived the test"
    left = [t.name for t in threading.enumerate() if t.name.startswith(("wandb", "Otel"))]
    assert left == [], f"wandb threads outlived the test: {left}"


def test_offline_run_records_metrics_config_and_name(wandb_env: Path) -> None:
    cfg = offline_config(wandb_env)
    tracker = tracker_for(cfg, cfg.checkpoint.output_dir, is_main=True)
    assert tracker.run is not None
    tracker.log_step(10, {"loss": 2.5, "lr": 0.1, "images_per_s": 100.0})
    tracker.log_epoch(0, {"lr": 0.1, "train_loss": 2.4, "val_top1": 55.0, "val_top5": 90.0, "step": 20})
    tracker.log_epoch(1, {"lr": 0.01, "train_loss": 1.5, "val_top1": 66.5, "val_top5": 95.5, "step": 40})
    tracker.finish()
    tracker.finish()  # idempotent
    run = read_offline_run(wandb_env)
    assert run["name"] == "hrnet_w18_c-run" and run["tags"] == ["test"]
    assert run["config"]["optim"]["lr"] == 0.1 and run["config"]["schedule"]["decay_epochs"] == [30, 60, 90]
    steps = [h for h in run["history"] if "train/loss" in h]
    assert [(h["train/step"], h["train/loss"], h["train/lr"]) for h in steps] == [(10, 2.5, 0.1)]
    epochs = [h for h in run["history"] if "epoch/val_top1" in h]
    got = [(h["epoch"], h["epoch/val_top1"], h["epoch/val_top5"]) for h in epochs]
    assert got == [(0, 55.0, 90.0), (1, 66.5, 95.5)]


def test_summary_csv_rows(tmp_path, wandb_env) -> None:
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "disabled"
    tracker = tracker_for(cfg, tmp_path / "run", is_main=True)
    tracker.log_epoch(0, {"lr": 0.1, "train_loss": 2.0, "val_top1": 50.0, "val_top5": 80.0,
                          "epoch_time_s": 12.5, "images_per_s": 1000.0, "skipped": 0, "train_images": 12500, "checkpoint_s": 0.25,
                          "extra_metric": 1.0})
    tracker.finish()
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the documented column order (README), written out: a reordered column breaks readers of the file
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "epoch_time_s",
                             "images_per_s", "skipped", "train_images", "checkpoint_s",
                             "val_samples"] == list(SUMMARY_COLUMNS)
    assert rows == [{"epoch": "0", "step": "", "lr": "0.1", "train_loss": "2", "val_loss": "",
                     "val_top1": "50", "val_top5": "80", "epoch_time_s": "12.5",
                     "images_per_s": "1000", "skipped": "0", "train_images": "12500", "checkpoint_s": "0.25",
                     "val_samples": ""}]
    assert not list(tmp_path.glob("**/offline-run-*"))  # disabled: no W&B files


def test_resumed_run_keeps_earlier_rows_only(tmp_path, wandb_env) -> None:
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "disabled"
    tracker = tracker_for(cfg, tmp_path, is_main=True)
    for epoch in range(4):
        tracker.log_epoch(epoch, {"val_top1": float(epoch)})
    resumed = tracker_for(cfg, tmp_path, is_main=True, start_epoch=2)  # crashed after epoch 3's row
    resumed.log_epoch(2, {"val_top1": 20.0})
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [(r["epoch"], r["val_top1"]) for r in csv.DictReader(f)] == [("0", "0"), ("1", "1"), ("2", "20")]


def test_non_main_rank_writes_nothing(tmp_path, wandb_env) -> None:
    cfg = offline_config(tmp_path)
    tracker = tracker_for(cfg, tmp_path / "run", is_main=False)
    tracker.log_step(1, {"loss": 1.0})
    tracker.log_epoch(0, {"val_top1": 1.0})
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "run").exists()
    assert not list(tmp_path.glob("**/offline-run-*"))


def test_wandb_mode_env_overrides_config(monkeypatch, wandb_env) -> None:
    cfg = Config().wandb
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(cfg) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode(cfg) == "offline"


def online_config(tmp_path: Path) -> Config:
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "online"
    return cfg


def assert_trains_on_without_wandb(tracker: Tracker, tmp_path: Path) -> None:
    assert tracker.run is None
    tracker.log_step(1, {"loss": 1.0})
    tracker.log_epoch(0, {"val_top1": 1.0})  # training goes on: the CSV still fills
    tracker.finish()
    assert (tmp_path / "run" / "summary.csv").read_text().count("\n") == 2
    assert wandb_services() == []  # the Tracker stopped the service it had started


@pytest.mark.slow
@pytest.mark.parametrize("situation", ["no key", "malformed key", "refused", "silent", "silent, wandb verbose",
                                       "not W&B"])
def test_online_degrades_to_no_wandb_quickly(tmp_path, wandb_env, monkeypatch, caplog, situation) -> None:
    """No key: wandb.login finds none (no prompt). Otherwise the key check with the server,
    bounded by connect_timeout_s, fails: a closed port, a listener that accepts and never
    replies, an HTTP server that is no W&B server. init_timeout_s is never waited for.
    Verbose: wandb's "logged in as" account lookup (5 s against a silent server) is off."""
    if situation.endswith("verbose"):
        monkeypatch.delenv("WANDB_SILENT")
        situation = "silent"
    silent = socket.socket()  # accepts connections (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    not_wandb = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=not_wandb.serve_forever, daemon=True).start()  # 501 to everything
    url = {"silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
           "not W&B": f"http://127.0.0.1:{not_wandb.server_address[1]}"}
    if situation in url:  # else the fixture's closed port
        monkeypatch.setenv("WANDB_BASE_URL", url[situation])
    if situation != "no key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40 if situation != "malformed key" else "short")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = tracker_for(online_config(tmp_path), tmp_path / "run", is_main=True,
                          connect_timeout_s=1.0, init_timeout_s=60.0)
    elapsed = time.monotonic() - started
    silent.close()
    not_wandb.shutdown()
    not_wandb.server_close()
    assert elapsed < 5.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "W&B disabled" in warnings[0].getMessage()
    assert_trains_on_without_wandb(tracker, tmp_path)


class StallingWandbServer(http.server.ThreadingHTTPServer):
    """Verifies any API key (answers wandb's Viewer query), then never answers the request
    that creates the run (UpsertBucket) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if b"UpsertBucket" in body:
                    outer.release.wait(30)
                    return
                data = {"viewer": {"id": "VXNlcjox", "entity": "me", "username": "me", "email": "",
                                   "flags": "{}", "teams": {"edges": []}}}
                reply = json.dumps({"data": data}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.mark.slow
def test_init_failure_is_bounded_and_warned_once(tmp_path, wandb_env, monkeypatch, caplog) -> None:
    """A server that verifies the key and then stalls creating the run: wandb.init fails
    within init_timeout_s, training continues without W&B."""
    server = StallingWandbServer()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.train.tracking"):
        tracker = tracker_for(online_config(tmp_path), tmp_path / "run", is_main=True,
                          connect_timeout_s=1.0, init_timeout_s=2.0)
    elapsed = time.monotonic() - started
    server.close()
    assert 2.0 <= elapsed < 15.0
    assert tracker.run is None
    ours = [r for r in caplog.records if r.name == "hrnet_cls.train.tracking" and r.levelno >= logging.WARNING]
    assert len(ours) == 1 and "wandb.init failed" in ours[0].getMessage()
    assert_trains_on_without_wandb(tracker, tmp_path)


@pytest.mark.slow  # a child process that imports torch: ~5-8 s
def test_online_without_key_never_prompts_on_a_terminal(tmp_path, wandb_env, monkeypatch) -> None:
    """On a terminal wandb.init asks for an API key and waits for ever; the Tracker must
    come up without W&B instead (a child process on a pseudo-terminal, wandb not silenced)."""
    monkeypatch.delenv("WANDB_SILENT")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    code = ("from hrnet_cls.config import Config\nfrom hrnet_cls.train.checkpointer import Checkpointer\n"
            "from hrnet_cls.train.tracking import Tracker\n"
            "cfg = Config()\ncfg.wandb.mode = 'online'\n"
            "print('run:', Tracker(cfg.wandb, Checkpointer(cfg.checkpoint, recipe=cfg)).run, flush=True)\n")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=secondary, stdout=secondary, stderr=secondary,
                            cwd=tmp_path)
    os.close(secondary)
    output, deadline = b"", time.monotonic() + 20
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([primary], [], [], left)[0]:
                break  # silent until the deadline: waiting at a prompt
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal: it has exited
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "run: None" in text and "W&B disabled" in text and "Enter your choice" not in text
