"""Training checkpoints: layout, atomic saves under crashes, resume fallback."""
from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import same_weights, tiny_model
from hrnet_cls.train.state import (
    Position,
    build_state,
    capture_rng,
    git_commit,
    load_checkpoint,
    own_cuda_state,
    restore_rng,
    restore_state,
    save_checkpoint,
)
from hrnet_cls.config import CheckpointConfig, Config, config_to_dict
from hrnet_cls.train.optim import build_optimizer
from hrnet_cls.train.checkpointer import Checkpointer, RunDirError, Start

CONFIG = config_to_dict(Config())


def make_state(model: nn.Module, epoch: int, step: int, **extra) -> dict:
    opt = build_optimizer(model, Config().optim)
    return {**build_state(model=model, optimizer=opt, position=Position(epoch, step), config=CONFIG), **extra}


def run_folder(out: Path, keep: int = 3, resume: str = "auto") -> Checkpointer:
    return Checkpointer(CheckpointConfig(output_dir=str(out), keep=keep, resume=resume, async_save=False))


def started(out: Path, resume: str = "auto", epochs: int = 100) -> Start:
    """Where a run in ``out`` would start (the lock is taken and released)."""
    run = run_folder(out, resume=resume)
    try:
        return run.start(epochs)
    finally:
        run.close()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model()


def test_state_layout_round_trips_and_timm_can_read_it(tmp_path, model) -> None:
    ema = tiny_model()
    with torch.no_grad():
        next(ema.parameters()).add_(1.0)  # EMA differs from the model
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = build_optimizer(model, Config().optim)
    state = build_state(model=model, optimizer=opt, position=Position(3, 300, 7, metrics={"val_top1": 12.5}),
                        config=CONFIG, model_ema=ema, scaler=scaler)
    save_checkpoint(tmp_path / "c.pth", state)
    loaded = load_checkpoint(tmp_path / "c.pth")  # weights_only=True: no pickled classes
    assert (loaded["epoch"], loaded["step"], loaded["batch_in_epoch"]) == (3, 300, 7)
    assert loaded["model_name"] == "hrnet_w18_c" and loaded["config"] == CONFIG
    assert loaded["metrics"] == {"val_top1": 12.5}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in loaded["model"])
    assert same_weights(loaded["model"], model.state_dict())
    # timm's own loader prefers the EMA weights when present, else 'model'
    probe = tiny_model()
    timm.models.load_checkpoint(probe, str(tmp_path / "c.pth"), use_ema=True)
    assert same_weights(probe.state_dict(), ema.state_dict())
    timm.models.load_checkpoint(probe, str(tmp_path / "c.pth"), use_ema=False)
    assert same_weights(probe.state_dict(), model.state_dict())


def test_wrapper_prefixes_are_stripped(tmp_path, model) -> None:
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until called
    state = build_state(model=compiled, optimizer=build_optimizer(model, Config().optim),
                        position=Position(), config=CONFIG)
    assert state["model"].keys() == model.state_dict().keys()


def test_restore_state_and_rng(tmp_path, model) -> None:
    opt = build_optimizer(model, Config().optim)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # gives the optimizer momentum buffers
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = build_state(model=model, optimizer=opt, position=Position(1, 1), config=CONFIG)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(tmp_path / "c.pth", state)
    fresh = tiny_model()
    fresh_opt = build_optimizer(fresh, Config().optim)
    restore_state(load_checkpoint(tmp_path / "c.pth"), fresh, fresh_opt)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert same_weights(fresh.state_dict(), model.state_dict())
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_cuda_rng_is_the_current_devices_and_old_per_device_lists_still_restore() -> None:
    """A checkpoint from a 1x8 node held 8 CUDA states per rank; a 2x4 node has 4 visible devices:
    each process restores its own device's state, never all of them (set_rng_state_all raised)."""
    states = [torch.full((16,), d, dtype=torch.uint8) for d in range(8)]
    assert torch.equal(own_cuda_state(states, 1), states[1])  # this process's device in the old list
    assert own_cuda_state(states[:2], 3) is None  # not saved: its draws start afresh
    assert own_cuda_state(states[5], 3) is states[5]  # today's: the saving process's own device
    assert own_cuda_state(None, 0) is None
    assert capture_rng()["cuda"] is None  # no CUDA in this process: nothing saved, nothing initialised
    restore_rng({**capture_rng(), "cuda": states})  # an old 8-device list restores here too


def test_rng_capture_restore_is_exact() -> None:
    rng = capture_rng()
    a = (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist())
    restore_rng(rng)
    assert (random.random(), np.random.randn(3).tolist(), torch.randn(3).tolist()) == a


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("disk full, say")


def test_failed_save_keeps_previous_file(tmp_path, model) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(path, make_state(model, epoch=1, step=10))
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, make_state(model, epoch=2, step=20, boom=ExplodesWhenPickled()))
    assert load_checkpoint(path)["step"] == 10
    assert sorted(os.listdir(tmp_path)) == ["last.pth", "last.pth.sha256"]  # the temp file was removed


# The child writes a checkpoint whose pickling blocks after the temp file is open; the
# parent SIGKILLs it there: the situation of a node dying in the middle of a save.
CHILD = """
import sys, time, pathlib, torch
from hrnet_cls.train.state import save_checkpoint
class Hang:
    def __reduce__(self):
        pathlib.Path(sys.argv[2]).write_text("saving")
        time.sleep(60)
save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(1000)}, "hang": Hang()})
"""


@pytest.mark.slow  # a child interpreter importing torch and timm: ~5 s
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, model) -> None:
    out = tmp_path / "run"
    out.mkdir()
    run_folder(out, keep=2).write(make_state(model, epoch=1, step=10))
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out / "last.pth"), str(marker)],
                             cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "child never reached the middle of the save"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list(out.glob(".*.tmp"))
    assert leftovers, "the killed save should have left its partial temp file"
    assert load_checkpoint(out / "last.pth")["step"] == 10
    assert started(out).checkpoint == out / "last.pth"  # opening the folder removes the partial file
    assert not list(out.glob(".*.tmp"))


def test_the_checkpointer_keeps_k_newest_epochs_and_best(tmp_path, model) -> None:
    manager = run_folder(tmp_path, keep=2)
    for epoch, top1 in enumerate([10.0, 30.0, 20.0, 50.0, 40.0], start=1):
        manager.write(make_state(model, epoch=epoch, step=epoch * 100), top1=top1)
    files = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert files == ["best.pth", "epoch_0003.pth", "epoch_0004.pth", "last.pth"]
    assert load_checkpoint(tmp_path / "best.pth")["step"] == 400
    assert load_checkpoint(tmp_path / "epoch_0003.pth")["step"] == 400
    assert load_checkpoint(tmp_path / "last.pth")["best_metric"] == 50.0
    assert not (tmp_path / "config.yaml").exists()  # train.py writes it, once per run
    start = started(tmp_path, epochs=5)
    assert start.checkpoint == tmp_path / "last.pth" and start.finished
    assert (start.position.step, start.position.epoch, start.position.best_metric) == (500, 5, 50.0)


def test_mid_epoch_save_writes_only_last(tmp_path, model) -> None:
    manager = run_folder(tmp_path, keep=2)
    state = {**make_state(model, epoch=2, step=250), "batch_in_epoch": 50}
    manager.write(state, epoch_end=False)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["last.pth"]
    with pytest.raises(ValueError, match="batch_in_epoch == 0"):
        manager.write(state, epoch_end=True)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, model, caplog) -> None:
    manager = run_folder(tmp_path, keep=3)
    for epoch in (1, 2, 3):
        manager.write(make_state(model, epoch=epoch, step=epoch * 100))
    # Truncate last.pth in place: epoch_0002.pth holds the same state in its own storage.
    data = (tmp_path / "last.pth").read_bytes()
    with open(tmp_path / "last.pth", "r+b") as f:
        f.truncate(len(data) // 2)
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.train.checkpointer"):
        assert started(tmp_path).checkpoint == tmp_path / "epoch_0002.pth"
    (tmp_path / "epoch_0002.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "epoch_0001.pth").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.train.checkpointer"):
        start = started(tmp_path)
        assert start.checkpoint == tmp_path / "epoch_0000.pth" and start.position.step == 100
    assert "last.pth" in caplog.text and "epoch_0002.pth" in caplog.text and "epoch_0001.pth" in caplog.text
    for path in tmp_path.glob("*.pth"):
        path.write_bytes(b"garbage")
    with pytest.raises(RunDirError, match=r"no checkpoint in .* can be resumed from \(last.pth: .*epoch_0000.pth"):
        started(tmp_path)


def test_resume_modes(tmp_path, model) -> None:
    save_checkpoint(tmp_path / "x.pth", make_state(model, epoch=4, step=40))
    assert started(tmp_path / "empty", str(tmp_path / "x.pth")).position.epoch == 4
    assert started(tmp_path, "") == Start() and started(tmp_path / "empty") == Start()
    assert started(tmp_path) == Start()  # x.pth is not one of the run's file names
    assert started(tmp_path, str(tmp_path / "x.pth")).checkpoint == tmp_path / "x.pth"
    with pytest.raises(RunDirError, match="no checkpoint file"):
        started(tmp_path, str(tmp_path / "missing.pth"))


def test_git_commit(tmp_path) -> None:
    commit = git_commit()
    assert commit is None or len(commit.split("-")[0]) == 40
    assert git_commit(tmp_path) is None


def test_finished_marks_a_done_run_until_a_start_trains_on(tmp_path, model) -> None:
    run = run_folder(tmp_path)
    run.write(make_state(model, epoch=5, step=500))
    run.mark_finished("epoch 5, step 500")
    assert (tmp_path / "FINISHED").read_text() == "epoch 5, step 500\n"
    assert started(tmp_path, epochs=5).finished and (tmp_path / "FINISHED").exists()  # reported, kept
    assert not started(tmp_path, epochs=8).finished and not (tmp_path / "FINISHED").exists()  # 3 epochs to go
