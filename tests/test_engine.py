"""engine: the training loop reads the device only at log points; evaluation is exact."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.bench.train import HostReads, make_parts
from hrnet_cls.config import Config
from hrnet_cls.data import build_train_loader, build_val_loader
from hrnet_cls.engine import evaluate, train_one_epoch
from hrnet_cls.tracking import Tracker

DIGITS = Path(__file__).resolve().parent.parent / "shards" / "digits"
TRAIN = str(DIGITS / "train-{000000..000001}.tar")  # 360 images
VAL = str(DIGITS / "val-{000000..000001}.tar")  # 360 images
NO_TRACKER = Tracker(Config(), "unused", is_main=False)  # a non-main rank's tracker: writes nothing


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("hrnet_tiny_c", num_classes=10)


def test_train_one_epoch_reads_the_device_only_at_log_points() -> None:
    loader = build_train_loader(TRAIN, batch_size=32, img_size=32, seed=0, epoch=0, workers=1)
    steps = loader.batches_per_epoch
    assert steps == 11
    parts = make_parts(tiny_model(), steps, log_interval=steps)
    reads = {}
    for interval in (steps, 1):
        parts.log_interval = interval
        with HostReads() as counter:
            metrics = train_one_epoch(parts, loader, epoch=0, global_step=0, tracker=NO_TRACKER,
                                      save=lambda *a: None)
        reads[interval] = counter.count
        assert metrics["step"] == steps and metrics["train_loss"] > 0
    # reads = constant + one per log line: nothing per step
    assert reads[1] - reads[steps] == steps - 1
    assert reads[steps] <= 3, reads  # 1 log line + the epoch summary (+ the DataLoader's seed draw)


def test_evaluate_counts_every_sample_once_exactly() -> None:
    model = tiny_model().eval()
    autocast = torch.autocast("cpu", enabled=False)
    whole = build_val_loader(VAL, batch_size=360, img_size=32, crop_pct=1.0, workers=0)
    ((images, targets, _),) = list(whole)
    with torch.no_grad():
        logits = model(images)  # (360, 10)
    top1 = (logits.argmax(1) == targets).sum().item()
    top5 = (logits.topk(5, 1).indices == targets[:, None]).any(1).sum().item()
    with HostReads() as counter:
        got = evaluate(model, build_val_loader(VAL, batch_size=37, img_size=32, crop_pct=1.0, workers=0),
                       device=torch.device("cpu"), autocast=autocast)
    assert counter.count == 2  # one read of the hit counts, one of the loss sum: not one per batch
    assert got["samples"] == 360 and got["skipped"] == 0
    assert got["top1"] == 100.0 * top1 / 360 and got["top5"] == 100.0 * top5 / 360
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    workers = evaluate(model, build_val_loader(VAL, batch_size=50, img_size=32, crop_pct=1.0, workers=2),
                       device=torch.device("cpu"), autocast=autocast)
    assert (workers["top1"], workers["top5"], workers["samples"]) == (got["top1"], got["top5"], 360)
    assert not model.training
