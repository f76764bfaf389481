"""engine: the training loop reads the device only at log points."""
from __future__ import annotations

import pytest
import torch

from conftest import DIGITS, tiny_model
from hrnet_cls.config import Config
from hrnet_cls.data import build_train_loader
from hrnet_cls.distributed import DistInfo
from hrnet_cls.train.engine import build_parts, train_one_epoch
from hrnet_cls.precision import Precision
from hrnet_cls.train.preemption import StopRequest
from hrnet_cls.train.checkpointer import Checkpointer
from hrnet_cls.timing import HostReads
from hrnet_cls.train.tracking import Tracker

TRAIN = str(DIGITS / "train-{000000..000001}.tar")  # 360 images
NO_TRACKER = Tracker(Config().wandb, Checkpointer(Config().checkpoint, is_main=False))  # a non-main rank's tracker: writes nothing


@pytest.mark.slow
def test_train_one_epoch_reads_the_device_only_at_log_points() -> None:
    loader = build_train_loader(TRAIN, batch_size=32, img_size=32, seed=0, epoch=0, workers=1)
    steps = loader.batches_per_epoch
    assert steps == 11
    cfg = Config()
    cfg.train.log_interval = steps
    cpu = torch.device("cpu")
    parts = build_parts(cfg, DistInfo(0, 0, 1, cpu, True), tiny_model(), Precision.of("fp32", cpu))
    reads = {}
    for interval in (steps, 1):
        parts.log_interval = interval
        with HostReads() as counter:
            result = train_one_epoch(parts, loader, epoch=0, global_step=0, tracker=NO_TRACKER,
                                     checkpointer=None, stop=StopRequest())
        reads[interval] = counter.count
        assert result.step == steps and result.train_loss > 0 and not result.stopped
    # reads = constant + one per log line: nothing per step
    assert reads[1] - reads[steps] == steps - 1
    assert reads[steps] <= 3, reads  # 1 log line + the epoch summary (+ the DataLoader's seed draw)
