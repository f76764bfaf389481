"""The evaluation core: exact integer counts, several models on one stream, errors kept per model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DIGITS_VAL as VAL, tiny_model
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_val_loader
from hrnet_cls.data.transforms import Normalize
from hrnet_cls.validation.evaluation import accuracy_counts, evaluate, feed, reduce
from hrnet_cls.precision import Precision
from hrnet_cls.timing import HostReads

FP32 = Precision.of("fp32", "cpu")
CPU = torch.device("cpu")
NORM = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def test_accuracy_counts_and_single_process_reduce() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.01, 0.05], [0.2, 0.3, 0.5], [0.3, 0.2, 0.1]])
    targets = torch.tensor([1, 2, 0, 0])
    assert accuracy_counts(logits, targets, topk=(1, 2)).tolist() == [2, 3]
    counts = accuracy_counts(logits, targets)  # top-5 of 3 classes: every sample
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 4]
    assert accuracy_counts(logits[:0], targets[:0]).tolist() == [0, 0]


class Fixed(nn.Module):
    """Predicts class `cls` for every image."""

    def __init__(self, cls: int, classes: int = 3) -> None:
        super().__init__()
        self.cls, self.classes = cls, classes
        self.bn = nn.BatchNorm1d(1)  # a mode to check it is restored

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((images.shape[0],), self.cls), self.classes).float()


class Broken(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def batches() -> list:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    return [(images, torch.tensor([0, 0, 1, 2]), 1), (images[:0], torch.zeros(0, dtype=torch.int64), 2),
            (images[:2], torch.tensor([1, 1]), 0)]


def test_several_models_share_one_stream_with_exact_counts() -> None:
    totals = reduce(feed([Fixed(0), Fixed(1)], batches(), normalize=NORM, device=CPU, precision=FP32))
    assert totals.counts == [[2, 6, 6], [3, 6, 6]]
    assert (totals.decoded, totals.skipped) == (6, 3)
    assert totals.metrics[1]["top1"] == pytest.approx(50.0)


def test_a_failing_model_keeps_its_error_and_the_others_go_on() -> None:
    tally = feed([Broken(), Fixed(0)], batches(), normalize=NORM, device=CPU, precision=FP32, catch=True)
    assert tally.errors == ["forward failed: RuntimeError: boom", ""]
    assert (tally.hits[1].tolist(), tally.samples[1]) == ([2, 6], 6)  # samples counted on the host
    with pytest.raises(RuntimeError, match="boom"):
        feed([Broken()], batches(), normalize=NORM, device=CPU, precision=FP32)


def test_a_failing_loader_fails_every_model() -> None:
    def loader():
        yield batches()[0]
        raise OSError("disk went away")

    tally = feed([Fixed(0), Fixed(1)], loader(), normalize=NORM, device=CPU, precision=FP32, catch=True)
    assert all(e.startswith("reading the shards failed: OSError: disk went away") for e in tally.errors)


def test_evaluate_names_metrics_and_restores_modes() -> None:
    a, b = Fixed(0).train(), Fixed(2).eval()
    out = evaluate({"val": a, "ema": b}, batches(), normalize=NORM, device=CPU, precision=FP32)
    assert a.training and not b.training
    assert out["val_samples"] == out["ema_samples"] == 6 and out["val_skipped"] == 3
    assert out["val_top1"] == pytest.approx(100 * 2 / 6) and out["ema_top1"] == pytest.approx(100 / 6)
    assert out["val_loss"] > 0


def test_evaluate_counts_every_sample_once_exactly() -> None:
    model = tiny_model().eval()
    whole = build_val_loader(VAL, batch_size=360, img_size=32, crop_pct=1.0, workers=0)
    ((images, targets, _),) = list(whole)
    with torch.no_grad():
        logits = model(whole.normalize(images))  # (360, 10)
    top1 = (logits.argmax(1) == targets).sum().item()
    top5 = (logits.topk(5, 1).indices == targets[:, None]).any(1).sum().item()
    with HostReads() as counter:
        got = evaluate({"val": model}, build_val_loader(VAL, batch_size=37, img_size=32, crop_pct=1.0, workers=0),
                       normalize=whole.normalize, device=CPU, precision=FP32)
    assert counter.count == 2  # one read of the integer counts, one of the loss sums: not one per batch
    assert got["val_samples"] == 360 and got["val_skipped"] == 0
    assert got["val_top1"] == 100.0 * top1 / 360 and got["val_top5"] == 100.0 * top5 / 360
    assert got["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    workers = evaluate({"val": model}, build_val_loader(VAL, batch_size=50, img_size=32, crop_pct=1.0, workers=2),
                       normalize=whole.normalize, device=CPU, precision=FP32)
    assert (workers["val_top1"], workers["val_top5"], workers["val_samples"]) == (got["val_top1"], got["val_top5"], 360)
    assert not model.training


def test_a_compiled_models_throughput_leaves_out_each_shapes_first_batch() -> None:
    """validate.py --compile: the first batch of a shape compiles (and a worker's short last batch
    recompiles); neither is throughput, so the time covers the batches after them only."""
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), backend="eager")
    images = torch.zeros(8, 3, 2, 2, dtype=torch.uint8)
    stream = [(images, torch.zeros(8, dtype=torch.int64), 0)] * 3 + [(images[:3], torch.zeros(3, dtype=torch.int64), 0)]
    tally = feed([model], stream, normalize=NORM, device=CPU, precision=FP32, timed=True, compiled=True)
    assert (tally.samples, tally.timed_samples) == ([27], [16])  # counted: all 27; timed: batches 2 and 3
    eager = feed([model], stream, normalize=NORM, device=CPU, precision=FP32, timed=True)
    assert eager.timed_samples == [27]
