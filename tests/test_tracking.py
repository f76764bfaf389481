"""Tracker: summary.csv, real offline W&B runs read back from disk, and online degrading."""
from __future__ import annotations

import csv
import json
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from hrnet_cls.config import Config
from hrnet_cls.tracking import SUMMARY_COLUMNS, Tracker, resolve_wandb_mode


def read_wandb_records(path: Path) -> list:
    """Records of an offline run's .wandb file: wandb's LevelDB-style log of protobufs
    (a 7-byte file header, then 32 KiB blocks of chunks: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items_to_dict(items) -> dict:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_run(wandb_dir: Path) -> dict:
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [_items_to_dict(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    return {"name": runs[0].display_name, "config": _items_to_dict(runs[0].config.update),
            "tags": list(runs[0].tags), "history": history}


def offline_config(tmp_path: Path) -> Config:
    cfg = Config()
    cfg.wandb.mode = "offline"
    cfg.wandb.tags = ["test"]
    cfg.checkpoint.output_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """W&B isolated in tmp_path: no user settings, no netrc, no key."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_offline_run_records_metrics_config_and_name(wandb_env: Path) -> None:
    cfg = offline_config(wandb_env)
    tracker = Tracker(cfg, cfg.checkpoint.output_dir, is_main=True)
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
    tracker = Tracker(cfg, tmp_path / "run", is_main=True)
    tracker.log_epoch(0, {"lr": 0.1, "train_loss": 2.0, "val_top1": 50.0, "val_top5": 80.0,
                          "epoch_time_s": 12.5, "images_per_s": 1000.0, "skipped": 0, "extra_metric": 1.0})
    tracker.finish()
    with open(tmp_path / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert rows == [{"epoch": "0", "step": "", "lr": "0.1", "train_loss": "2", "val_loss": "",
                     "val_top1": "50", "val_top5": "80", "epoch_time_s": "12.5",
                     "images_per_s": "1000", "skipped": "0"}]
    assert not list(tmp_path.glob("**/offline-run-*"))  # disabled: no W&B files


def test_resumed_run_keeps_earlier_rows_only(tmp_path, wandb_env) -> None:
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "disabled"
    tracker = Tracker(cfg, tmp_path, is_main=True)
    for epoch in range(4):
        tracker.log_epoch(epoch, {"val_top1": float(epoch)})
    resumed = Tracker(cfg, tmp_path, is_main=True, start_epoch=2)  # crashed after epoch 3's row
    resumed.log_epoch(2, {"val_top1": 20.0})
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [(r["epoch"], r["val_top1"]) for r in csv.DictReader(f)] == [("0", "0"), ("1", "1"), ("2", "20")]


def test_non_main_rank_writes_nothing(tmp_path, wandb_env) -> None:
    cfg = offline_config(tmp_path)
    tracker = Tracker(cfg, tmp_path / "run", is_main=False)
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


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("situation", ["no key", "refused", "silent"])
def test_online_degrades_to_no_wandb_quickly(tmp_path, wandb_env, monkeypatch, caplog, situation) -> None:
    silent = socket.socket()  # accepts connections (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    if situation != "no key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    if situation == "refused":
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    if situation == "silent":
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "online"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(cfg, tmp_path / "run", is_main=True, connect_timeout_s=1.0)
    silent.close()
    assert time.monotonic() - started < 5.0
    assert tracker.run is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "W&B disabled" in warnings[0].getMessage()
    tracker.log_epoch(0, {"val_top1": 1.0})  # training goes on: the CSV still fills
    assert (tmp_path / "run" / "summary.csv").read_text().count("\n") == 2


def test_init_failure_is_bounded_and_warned_once(tmp_path, wandb_env, monkeypatch, caplog) -> None:
    """A server that answers HTTP but is no W&B server (a captive proxy, say): the probe
    passes, wandb.init fails within init_timeout, training continues without W&B."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()  # answers 501 to everything
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    cfg = offline_config(tmp_path)
    cfg.wandb.mode = "online"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.tracking"):
        tracker = Tracker(cfg, tmp_path / "run", is_main=True, connect_timeout_s=1.0, init_timeout_s=3.0)
    server.shutdown()
    assert time.monotonic() - started < 15.0
    assert tracker.run is None
    ours = [r for r in caplog.records if r.name == "hrnet_cls.tracking" and r.levelno >= logging.WARNING]
    assert len(ours) == 1 and "wandb.init failed" in ours[0].getMessage()
