"""Running a sweep: rows grouped by preprocessing, one loader pass per group (docs/design.md §5.5, §7.1).

A pass keeps all its models resident (fp32 weights: 85 MB for hrnet_w18_c, 512 MB for hrnet_w64_c) but the
activations of one at a time; ``max_models_per_pass=N`` cuts a group into passes of at most N models."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hrnet_cls.data import build_val_loader, read_info, shard_lengths
from hrnet_cls.data.remote import READ_TIMEOUT_S, RETRIES
from hrnet_cls.data.transforms import Normalize
from hrnet_cls.distributed import DistInfo, all_gather_object
from hrnet_cls.errors import one_line
from hrnet_cls.validation.evaluation import Tally, feed, reduce
from hrnet_cls.models.inference import count_macs
from hrnet_cls.models.inference import fold_batchnorm
from hrnet_cls.precision import Precision
from hrnet_cls.models.description import create_model
from hrnet_cls.validation.specs import PRETRAINED, ModelSpec, Preprocess, Row, merge_errors
from hrnet_cls.models.weights import read_state_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSettings:
    """How to run the passes (the same on every rank)."""

    shards: tuple[str, ...]  # expanded list of val shards
    expected_samples: int  # from expected_samples()
    expected_source: str = ""  # where that number comes from, for messages
    batch_size: int = 256
    workers: int = 4  # DataLoader workers per rank (0 = decode in the main process)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = field(default_factory=lambda: Precision("fp32", "cpu"))
    channels_last: bool = False
    use_ema: bool = False
    max_models_per_pass: int = 0
    fold_bn: bool = True
    compile: bool = False  # torch.compile each model, weights frozen
    retries: int = RETRIES  # of a remote read that is cut or stalls
    read_timeout_s: float = READ_TIMEOUT_S


@dataclass(frozen=True)
class PassStats:
    """What one pass did: its batches were decoded once and fed to ``models`` models."""

    preprocess: Preprocess
    models: int  # models that ran on the batches
    decoded: int  # samples decoded and fed, all ranks together (each once)
    skipped: int  # bad samples met, all ranks together
    seconds: float  # wall time of the pass on this rank, model loading included


def expected_samples(shards: Sequence[str]) -> tuple[int, str]:
    """(samples the shards should hold, where the number comes from): _info.json's num_samples for a whole split,
    its listed lengths for part of one, else the count read from the tar headers."""
    names = sorted(os.path.basename(url) for url in shards)
    for split in (read_info(list(shards)) or {}).get("splits", {}).values():
        listed = dict(zip(split.get("filenames", ()), split.get("shard_lengths", ())))
        if names and all(n in listed for n in names):
            where = f"_info.json split {split.get('name', '?')!r}"
            if names == sorted(listed) and "num_samples" in split:
                return int(split["num_samples"]), where
            return sum(int(listed[n]) for n in names), f"{where}, {len(names)} of its {len(listed)} shards"
    return sum(shard_lengths(list(shards))), "counted in the tar headers (no _info.json lists these shards)"


def plan_passes(rows: Sequence[Row], max_models_per_pass: int = 0) -> list[list[Row]]:
    """Rows still to run by preprocessing (first-seen order), in passes of max_models_per_pass (0 = no limit)."""
    groups: dict[Preprocess, list[Row]] = {}
    for row in rows:
        if not row.error:
            groups.setdefault(row.preprocess, []).append(row)
    n = max_models_per_pass if max_models_per_pass > 0 else max(1, len(rows))
    return [group[i:i + n] for group in groups.values() for i in range(0, len(group), n)]


def build_model(spec: ModelSpec, use_ema: bool = False) -> nn.Module:
    """The spec's model with its weights, on the CPU, in eval mode."""
    weights = None if spec.source == PRETRAINED else read_state_dict(spec.path, use_ema)
    return create_model(spec.desc, weights, pretrained=spec.source == PRETRAINED).eval()


def _load_pass(rows: Sequence[Row], settings: SweepSettings, macs: dict[tuple, int]) -> list[nn.Module | None]:
    """Each row's model on the device (None where it failed: the row's error says why); ``macs`` caches the
    MAC counts per (model, classes, img_size) over the sweep."""
    models: list[nn.Module | None] = []
    for row in rows:
        try:
            model = build_model(row.spec, settings.use_ema)
            key = (row.spec.model, row.spec.desc.num_classes, row.img_size)
            if key not in macs:  # a meta-device forward at img_size: an unusable size fails here
                macs[key] = count_macs(model, (3, row.img_size, row.img_size))
            row.params, row.gmacs = sum(p.numel() for p in model.parameters()), macs[key] / 2**30
            if settings.fold_bn:  # checked against the unfolded model on a small batch (any size shows a misfold)
                model = fold_batchnorm(model, check=torch.randn(2, 3, 64, 64))
            model = model.to(settings.device, memory_format=torch.channels_last if settings.channels_last
                             else torch.preserve_format)
            # freezing: weights become constants, right only for weights that never change (docs/design.md §7.1)
            models.append(torch.compile(model, options={"freezing": True}) if settings.compile else model)
        except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
            row.error = row.spec.failed(one_line(exc)).error
            models.append(None)
    return models


def _finish(rows: Sequence[Row], tally: Tally, settings: SweepSettings) -> tuple[int, int]:
    """Sum the tallies over ranks, agree on failures, fill the rows; (decoded, skipped) of all ranks."""
    totals = reduce(tally)
    views = all_gather_object((tally.errors, tally.seconds, tally.timed_samples))
    errors = merge_errors([v[0] for v in views])
    for i, row in enumerate(rows):
        if errors[i]:  # partial counts would read like a result: leave the numbers empty
            row.error = row.spec.failed(errors[i]).error
            continue
        top1, top5, n = totals.counts[i]
        seconds = max(v[1][i] for v in views)  # ranks run side by side: the slowest one sets the pace
        timed = sum(v[2][i] for v in views)  # compiled: without each shape's first batch (its compile)
        row.samples, row.skipped, row.expected_samples = n, totals.skipped, settings.expected_samples
        row.top1, row.top5 = (100.0 * top1 / n, 100.0 * top5 / n) if n else (None, None)
        row.images_per_s = timed / seconds if timed and seconds > 0 else None
        row.loss = totals.loss_sum[i] / n if n else None
        row.precision, row.device = settings.precision.name, str(settings.device)
        if n + totals.skipped != settings.expected_samples:
            row.error = row.spec.failed(f"{n} samples validated + {totals.skipped} bad = {n + totals.skipped}, but "
                                        f"{settings.expected_samples} expected ({settings.expected_source})").error
        elif n == 0:
            row.error = row.spec.failed("no sample of the shards could be decoded").error
    return totals.decoded, totals.skipped


def _batches(settings: SweepSettings, prep: Preprocess, dist_info: DistInfo) -> Iterator:
    """The val loader of one pass, built when first iterated: a failure to build it (an
    interpolation the loader lacks, say) is then met inside feed(), like a read error."""
    s, p = settings, prep
    yield from build_val_loader(
        list(s.shards), batch_size=s.batch_size, img_size=p.img_size, crop_pct=p.crop_pct, rank=dist_info.rank,
        world_size=dist_info.world_size, workers=s.workers, mean=p.mean, std=p.std, interpolation=p.interpolation,
        retries=s.retries, read_timeout_s=s.read_timeout_s, pin_memory=s.device.type == "cuda")


def run_pass(rows: Sequence[Row], settings: SweepSettings, dist_info: DistInfo,
             macs: dict[tuple, int] | None = None) -> PassStats:
    """Validate rows that share one Preprocess with one loader; fills the rows in place."""
    start, prep = time.perf_counter(), rows[0].preprocess
    models = _load_pass(rows, settings, {} if macs is None else macs)
    # agree before the loader starts: a row that failed to load on any rank is dropped everywhere
    errors = merge_errors(all_gather_object([row.error for row in rows]))
    for row, error in zip(rows, errors):
        row.error = error
    live = [(row, model) for row, model in zip(rows, models) if not row.error and model is not None]
    batches = _batches(settings, prep, dist_info) if live else []
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    tally = feed([model for _, model in live], batches, normalize=Normalize(prep.mean, prep.std),
                 device=settings.device, precision=settings.precision, memory_format=memory_format, timed=True,
                 catch=True, compiled=settings.compile)
    decoded, skipped = _finish([row for row, _ in live], tally, settings)
    return PassStats(prep, len(live), decoded, skipped, time.perf_counter() - start)


def run_sweep(rows: Sequence[Row], settings: SweepSettings, dist_info: DistInfo) -> list[PassStats]:
    """Validate every row that has not failed yet; one PassStats per loader pass."""
    passes, macs, stats = plan_passes(rows, settings.max_models_per_pass), {}, []
    for i, group in enumerate(passes):
        p = group[0].preprocess
        logger.info("pass %d/%d: img_size %d, crop_pct %g, %s: %d model(s)", i + 1, len(passes), p.img_size,
                    p.crop_pct, p.interpolation, len(group))
        stats.append(run_pass(group, settings, dist_info, macs))
        done = stats[-1]
        if not done.models:
            logger.info("pass %d/%d: no model of this pass could be loaded; the data was not read", i + 1, len(passes))
            continue
        logger.info("pass %d/%d: %d samples validated + %d bad = %d; %d expected (%s); %.1f s", i + 1, len(passes),
                    done.decoded, done.skipped, done.decoded + done.skipped, settings.expected_samples,
                    settings.expected_source, done.seconds)
    return stats
