"""Validation sweeps: checkpoints x models x image sizes x crop ratios over one set of val shards.

A *row* is one set of weights (one of our training checkpoints, a weights file for a timm
model, or timm's pretrained weights) evaluated at one (img_size, crop_pct). Steps:

1. ``checkpoint_specs`` / ``model_specs`` turn the command line into ``ModelSpec`` s;
2. ``describe_all`` reads each one's model name, classes and default preprocessing (from
   the checkpoint's config, or the model's pretrained_cfg);
3. ``build_rows`` takes the product with the requested image sizes and crop ratios;
4. ``run_sweep`` groups the rows by preprocessing (img_size, crop_pct, interpolation,
   mean, std) and validates each group in one *pass*: one loader, every batch decoded once
   and fed to each model of the group in turn.

Memory trade-off of a pass: all its models are resident on the device together (their
weights: 4 bytes per parameter in fp32, e.g. 85 MB for hrnet_w18_c, 512 MB for
hrnet_w64_c); activations are those of one model at a time, because the models run one
after another on each batch. ``max_models_per_pass=N`` cuts a group into passes of at most
N models (1 = one pass per row, every sample then decoded once per row).

Exact numbers: each sample is read by exactly one (rank, worker) slot of the val loader
(no padding), correct counts are integers summed with all_reduce, and a row whose samples
+ bad samples differ from the count in _info.json carries an error.

Distributed: every step that can fail on one rank only (describing a checkpoint, loading
the models of a pass, running one) ends in an all_gather of the failures, so all ranks drop
the same rows and reach the same collectives. Nothing inside the batch loop communicates:
ranks with different numbers of batches never wait on each other.

Failures of a row (missing or truncated file, weights of another architecture or shape,
unknown model name, a forward that raises) become one-line ``Row.error`` texts naming the
file and the problem; the sweep goes on with the other rows.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from hrnet_cls.checkpoint import clean_state_dict
from hrnet_cls.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    accuracy_counts,
    all_reduce_counts,
    build_val_loader,
    read_info,
    shard_lengths,
)
from hrnet_cls.distributed import DistInfo, all_gather_object, collective_device
from hrnet_cls.flops import count_macs
from hrnet_cls.hrnet_c import PAPER_TOP1

logger = logging.getLogger(__name__)

CHECKPOINT, WEIGHTS, PRETRAINED = "checkpoint", "weights", "pretrained"  # where a spec's weights come from
RESULT_COLUMNS = ("model", "checkpoint", "img_size", "crop_pct", "top1", "top5", "samples", "skipped",
                  "expected_samples", "params", "gmacs", "images_per_s", "paper_top1", "top1_minus_paper", "error")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SweepError(RuntimeError):
    """The sweep as a whole cannot run (e.g. ranks found different checkpoint lists)."""


# ---------------------------------------------------------------- what to validate


@dataclass(frozen=True)
class ModelSpec:
    """One set of weights to validate, with the preprocessing it defaults to."""

    source: str  # CHECKPOINT | WEIGHTS | PRETRAINED
    path: str = ""  # checkpoint or weights file as named on the command line ("" for pretrained)
    model: str = ""  # timm name; a checkpoint's is read from the file by describe()
    num_classes: int = 0  # classifier outputs; 0 until described
    img_size: int = 0  # default evaluation crop side, pixels; 0 until described
    crop_pct: float = 0.0  # default centre-crop fraction; 0 until described
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    error: str = ""  # why this spec cannot be validated ("" = fine so far)

    @property
    def label(self) -> str:
        """The 'checkpoint' column: the file validated, or 'pretrained'."""
        return self.path or PRETRAINED

    def failed(self, problem: str) -> ModelSpec:
        """A copy carrying ``problem`` as a one-line error that names the file (or model)."""
        where = {CHECKPOINT: self.path, WEIGHTS: f"{self.path} ({self.model})"}.get(
            self.source, f"{self.model} (pretrained)")
        return dataclasses.replace(self, error=f"{where}: {problem}")


def checkpoint_specs(args: Sequence[str]) -> list[ModelSpec]:
    """--checkpoint arguments: files, glob patterns (sorted), directories (every *.pth, sorted).

    A pattern or directory that finds nothing, like a missing file, becomes a failed spec.
    """
    specs = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(glob.glob(os.path.join(glob.escape(arg), "*.pth")))
            nothing = "no *.pth file in this directory"
        elif glob.has_magic(arg):
            found, nothing = sorted(glob.glob(arg)), "no file matches this pattern"
        else:
            found, nothing = [arg], ""
        specs += [ModelSpec(CHECKPOINT, path) for path in found] or [ModelSpec(CHECKPOINT, arg).failed(nothing)]
    return specs


def model_specs(patterns: Sequence[str], weights: str = "") -> list[ModelSpec]:
    """--model arguments: timm names (with or without a pretrained tag) or patterns
    (``hrnet_w18*_c``); each model loads ``weights`` when given, else timm's pretrained weights."""
    source = WEIGHTS if weights else PRETRAINED
    specs = []
    for pattern in patterns:
        names = timm.list_models(pattern) if glob.has_magic(pattern) else [pattern]
        specs += [ModelSpec(source, weights, model=name) for name in names]
        if not names:
            specs.append(ModelSpec(source, weights, model=pattern).failed("no timm model matches this pattern"))
    return specs


# ---------------------------------------------------------------- reading files


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _load_file(path: str) -> Any:
    """A checkpoint or weights file, on the CPU, loaded as data only (weights_only).

    Memory-mapped where the format allows, so describing a checkpoint reads its pickle and
    not its tensors; legacy (non-zip) torch files are read whole.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError("no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_weights(ckpt: Any, use_ema: bool) -> Mapping[str, torch.Tensor]:
    """The 'model' (or 'model_ema') state dict of one of our training checkpoints."""
    if not isinstance(ckpt, Mapping) or not _is_state_dict(ckpt.get("model")):
        raise ValueError("not a training checkpoint of this repo (no 'model' state dict); "
                         "for other weights use --model NAME --weights FILE")
    if use_ema and not _is_state_dict(ckpt.get("model_ema")):
        raise ValueError("--use-ema given but the checkpoint holds no EMA weights (model_ema is None)")
    return ckpt["model_ema" if use_ema else "model"]


def _plain_weights(obj: Any, use_ema: bool) -> Mapping[str, torch.Tensor]:
    """A plain state dict (timm's, the authors' final_state.pth) or one wrapped in
    'state_dict' / 'model' (EMA: 'state_dict_ema' / 'model_ema', which must then exist)."""
    if _is_state_dict(obj):
        if use_ema:
            raise ValueError("--use-ema given but the file is a plain state dict (no EMA weights)")
        return obj
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    for key in keys:
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            return obj[key]
    top = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"no state dict under {' or '.join(map(repr, keys))} (top level: {top})")


def load_weights(spec: ModelSpec, use_ema: bool) -> dict[str, torch.Tensor]:
    """The state dict a CHECKPOINT or WEIGHTS spec names, without DDP/compile prefixes."""
    obj = _load_file(spec.path)
    picked = _checkpoint_weights(obj, use_ema) if spec.source == CHECKPOINT else _plain_weights(obj, use_ema)
    return clean_state_dict(picked)


def _one_line(exc: BaseException) -> str:
    """An exception as one short line; ValueErrors are ours and already say what is wrong."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 160 and ". " in text:
        text = text.split(". ")[0]  # e.g. torch.load's four-sentence message for a truncated zip
    text = text if len(text) <= 300 else text[:297] + "..."
    return text if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------- describing specs


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")


def _pretrained_defaults(name: str) -> PretrainedCfg:
    """timm's PretrainedCfg for the name (its default tag), or the generic one."""
    return get_pretrained_cfg(name) or PretrainedCfg()


def _classes_in(weights: Mapping[str, torch.Tensor], classifier: Any) -> int:
    """Rows of the classifier weight in a state dict (0 when it is not found)."""
    name = classifier if isinstance(classifier, str) else (classifier or [""])[0]
    weight = weights.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else 0


def _describe_checkpoint(spec: ModelSpec, use_ema: bool, num_classes: int | None) -> ModelSpec:
    ckpt = _load_file(spec.path)
    weights = _checkpoint_weights(ckpt, use_ema)
    config = ckpt.get("config") or {}
    name = ckpt.get("model_name") or config.get("model", {}).get("name")
    if not name:
        raise ValueError("the checkpoint names no model (no 'model_name', no config model.name)")
    _check_model_name(name)
    cfg, data = _pretrained_defaults(name), config.get("data", {})
    classes = num_classes or config.get("model", {}).get("num_classes") or _classes_in(weights, cfg.classifier)
    # interpolation, mean and std stay at the training pipeline's (bilinear, ImageNet)
    return dataclasses.replace(spec, model=name, num_classes=int(classes or cfg.num_classes),
                               img_size=int(data.get("img_size") or cfg.input_size[-1]),
                               crop_pct=float(data.get("crop_pct") or cfg.crop_pct))


def _describe_model(spec: ModelSpec, use_ema: bool, num_classes: int | None) -> ModelSpec:
    _check_model_name(spec.model)
    cfg = _pretrained_defaults(spec.model)
    classes = num_classes or cfg.num_classes
    if spec.source == WEIGHTS:  # read now: a missing or unreadable file fails before any pass
        classes = num_classes or _classes_in(load_weights(spec, use_ema), cfg.classifier) or classes
    if cfg.crop_mode != "center":
        logger.warning("%s: pretrained_cfg crop_mode=%r; validating with a centre crop", spec.model, cfg.crop_mode)
    return dataclasses.replace(spec, num_classes=int(classes), img_size=int(cfg.input_size[-1]),
                               crop_pct=float(cfg.crop_pct), interpolation=cfg.interpolation,
                               mean=tuple(cfg.mean), std=tuple(cfg.std))


def describe(spec: ModelSpec, *, use_ema: bool = False, num_classes: int | None = None) -> ModelSpec:
    """The spec with model name, classes and default preprocessing filled in, or its error.

    num_classes overrides what the checkpoint / weights / pretrained_cfg say.
    """
    if spec.error:
        return spec
    try:
        if spec.source == CHECKPOINT:
            return _describe_checkpoint(spec, use_ema, num_classes)
        return _describe_model(spec, use_ema, num_classes)
    except Exception as exc:  # noqa: BLE001 - any unreadable input is this row's error, not the sweep's
        return spec.failed(_one_line(exc))


def _merge_errors(per_rank: list[list[str]]) -> list[str]:
    """Each rank's error texts for the same rows -> one list: a row failed if it failed on
    any rank; the text says on which ranks when not on all."""
    merged = []
    for texts in zip(*per_rank):
        failed = [rank for rank, text in enumerate(texts) if text]
        if not failed:
            merged.append("")
        elif len(failed) == len(texts):
            merged.append(texts[0])
        else:
            merged.append(f"{texts[failed[0]]} (on rank {', '.join(map(str, failed))} only)")
    return merged


def describe_all(specs: Sequence[ModelSpec], *, use_ema: bool = False,
                 num_classes: int | None = None) -> list[ModelSpec]:
    """describe() every spec, then make all ranks agree: a spec that failed on any rank, or
    that reads differently on two ranks (node-local files), fails on all of them."""
    described = [describe(s, use_ema=use_ema, num_classes=num_classes) for s in specs]
    views = all_gather_object(described)  # views[rank][i]: spec i as that rank read it
    if any([s.label for s in view] != [s.label for s in described] for view in views):
        counts = ", ".join(f"rank {r}: {len(view)}" for r, view in enumerate(views))
        raise SweepError(f"the ranks found different lists of checkpoints/models to validate ({counts}); "
                         "every rank must see the same files")
    errors = _merge_errors([[s.error for s in view] for view in views])
    out = []
    for i, spec in enumerate(described):
        if not errors[i] and any(view[i] != views[0][i] for view in views):
            errors[i] = f"{spec.label}: reads differently on different ranks (model, classes or defaults)"
        out.append(dataclasses.replace(spec, error=errors[i]))
    return out


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Preprocess:
    """Everything that determines a decoded batch: rows sharing it share their batches."""

    img_size: int  # centre-crop side, pixels
    crop_pct: float  # shorter side resized to round(img_size / crop_pct) first
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Row:
    """One (weights, img_size, crop_pct) and its results; the fields after crop_pct stay
    None until validated (and after a failure)."""

    spec: ModelSpec
    img_size: int | None
    crop_pct: float | None
    top1: float | None = None  # percent
    top5: float | None = None  # percent
    samples: int | None = None  # samples validated, all ranks together
    skipped: int | None = None  # bad samples (unreadable, undecodable, bad label) left out
    expected_samples: int | None = None  # samples the shards hold per _info.json (or counted)
    params: int | None = None
    gmacs: float | None = None  # conv + linear multiply-adds per image at img_size / 2^30 (the paper's "GFLOPs")
    images_per_s: float | None = None  # forward throughput of this model, decoding excluded
    error: str = ""

    @property
    def preprocess(self) -> Preprocess:
        s = self.spec
        return Preprocess(int(self.img_size or 0), float(self.crop_pct or 0), s.interpolation, s.mean, s.std)

    def as_dict(self) -> dict[str, Any]:
        """The results file's row: RESULT_COLUMNS in order."""
        paper = PAPER_TOP1.get(self.spec.model.split(".")[0])
        gap = None if paper is None or self.top1 is None else self.top1 - paper
        values = dict(model=self.spec.model, checkpoint=self.spec.label, paper_top1=paper, top1_minus_paper=gap,
                      **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"})
        return {column: values[column] for column in RESULT_COLUMNS}


def build_rows(specs: Sequence[ModelSpec], img_sizes: Sequence[int] = (), crop_pcts: Sequence[float] = ()) -> list[Row]:
    """One row per spec x img_size x crop_pct; an empty list means each spec's default."""
    rows = []
    for spec in specs:
        sizes = list(img_sizes) or [spec.img_size or None]
        crops = list(crop_pcts) or [spec.crop_pct or None]
        rows += [Row(spec, size, crop, error=spec.error) for size in sizes for crop in crops]
    return rows


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepSettings:
    """How to run the passes (the same on every rank)."""

    shards: tuple[str, ...]  # expanded list of val shards
    expected_samples: int  # samples they hold, from expected_samples()
    expected_source: str = ""  # where that number comes from, for messages
    batch_size: int = 256  # images per rank per forward
    workers: int = 4  # DataLoader workers per rank (0 = decode in the main process)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # resolved autocast dtype: bf16 | fp16 | fp32
    channels_last: bool = False
    use_ema: bool = False
    max_models_per_pass: int = 0  # 0 = every model of a preprocessing group in one pass


@dataclass(frozen=True)
class PassStats:
    """What one pass did: its batches were decoded once and fed to ``models`` models."""

    preprocess: Preprocess
    models: int  # models that ran on the batches
    decoded: int  # samples decoded and fed, all ranks together (each once)
    skipped: int  # bad samples met, all ranks together
    seconds: float  # wall time of the pass on this rank, model loading included


def expected_samples(shards: Sequence[str]) -> tuple[int, str]:
    """(samples the shards should hold, where the number comes from): the split's
    num_samples in _info.json when the shards are that whole split, the listed lengths of
    these shards when they are part of one, else the count read from the tar headers."""
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
    """Rows still to run, grouped by preprocessing (first-seen order), each group cut into
    passes of at most max_models_per_pass models (0 = no limit)."""
    groups: dict[Preprocess, list[Row]] = {}
    for row in rows:
        if not row.error:
            groups.setdefault(row.preprocess, []).append(row)
    n = max_models_per_pass if max_models_per_pass > 0 else max(1, len(rows))
    return [group[i:i + n] for group in groups.values() for i in range(0, len(group), n)]


def load_exact(model: nn.Module, weights: Mapping[str, torch.Tensor], name: str) -> None:
    """Load every tensor of ``model`` from ``weights``; raise one line on any misfit.

    Stricter than load_state_dict: HRNetC keeps a fresh classifier when the file's has
    another shape (a fine-tuning convenience) - here that would be a silently wrong row.
    Missing BatchNorm num_batches_tracked counters are tolerated: eval does not use them.
    """
    own = model.state_dict()
    other = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    problems = []
    if other:
        k = other[0]
        problems.append(f"{len(other)} tensors of another shape (e.g. {k}: file {list(weights[k].shape)}, "
                        f"model {list(own[k].shape)})")
    if missing:
        problems.append(f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if problems:
        raise ValueError(f"weights do not fit {name} with {getattr(model, 'num_classes', '?')} classes: "
                         + "; ".join(problems))
    model.load_state_dict(weights, strict=False)


def build_model(spec: ModelSpec, use_ema: bool = False) -> nn.Module:
    """The spec's model with its weights, on the CPU, in eval mode."""
    if spec.source == PRETRAINED:
        return timm.create_model(spec.model, pretrained=True, num_classes=spec.num_classes).eval()
    model = timm.create_model(spec.model, num_classes=spec.num_classes)
    load_exact(model, load_weights(spec, use_ema), spec.model)
    return model.eval()


def _load_pass(rows: Sequence[Row], settings: SweepSettings, macs: dict[tuple, int]) -> list[nn.Module | None]:
    """Each row's model on the device (None where it failed: the row's error says why).

    MACs depend on the architecture and input size only, so they are counted once per
    (model, classes, img_size) in the sweep.
    """
    models: list[nn.Module | None] = []
    for row in rows:
        try:
            model = build_model(row.spec, settings.use_ema)
            key = (row.spec.model, row.spec.num_classes, row.img_size)
            if key not in macs:  # a forward at img_size on the CPU: an unusable size fails here
                macs[key] = count_macs(model, (3, row.img_size, row.img_size))
            row.params, row.gmacs = sum(p.numel() for p in model.parameters()), macs[key] / 2**30
            model = model.to(settings.device, memory_format=torch.channels_last if settings.channels_last
                             else torch.preserve_format)
            models.append(model)
        except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
            row.error = row.spec.failed(_one_line(exc)).error
            models.append(None)
    return models


@dataclass
class _Fed:
    """One rank's tallies for the models of a pass."""

    counts: torch.Tensor  # int64 (models, 3): top-1 correct, top-5 correct, samples
    seconds: list[float]  # forward time per model
    errors: list[str]  # per model; "" = fine
    decoded: int = 0  # samples fed
    skipped: int = 0  # bad samples the loader reported


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: time the work, not its launch


def _feed(models: Sequence[nn.Module], batches: Iterable, settings: SweepSettings) -> _Fed:
    """Run every batch through every model; a model that raises stops (its error is kept),
    the others go on. An error of the loader itself fails every model of the pass."""
    device = settings.device
    fed = _Fed(torch.zeros(len(models), 3, dtype=torch.int64, device=device), [0.0] * len(models), [""] * len(models))
    dtype = _AUTOCAST_DTYPES.get(settings.precision)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    try:
        for images, targets, bad in batches:  # images (B, 3, S, S) float32, targets (B,) int64
            fed.skipped += bad
            fed.decoded += len(targets)
            if not len(targets):
                continue  # an empty batch only reports bad samples
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            for i, model in enumerate(models):
                if fed.errors[i]:
                    continue
                start = time.perf_counter()
                try:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        logits = model(images)  # (B, num_classes)
                    fed.counts[i] += accuracy_counts(logits.float(), targets)
                    _sync(device)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at this size: this row only
                    fed.errors[i] = f"forward failed: {_one_line(exc)}"
                fed.seconds[i] += time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - the loader: every row of the pass fails, the sweep goes on
        fed.errors = [e or f"reading the shards failed: {_one_line(exc)}" for e in fed.errors]
    return fed


def _finish(rows: Sequence[Row], fed: _Fed, settings: SweepSettings) -> tuple[int, int]:
    """Sum the tallies over ranks, agree on failures, fill the rows; (decoded, skipped) of all ranks."""
    local = torch.cat([fed.counts.flatten().cpu(), torch.tensor([fed.decoded, fed.skipped])])
    total = all_reduce_counts(local.to(collective_device())).cpu().tolist()
    counts, (decoded, skipped) = [total[3 * i:3 * i + 3] for i in range(len(rows))], total[-2:]
    views = all_gather_object((fed.errors, fed.seconds))
    errors = _merge_errors([v[0] for v in views])
    for i, row in enumerate(rows):
        if errors[i]:  # partial counts would read like a result: leave the numbers empty
            row.error = row.spec.failed(errors[i]).error
            continue
        top1, top5, n = counts[i]
        seconds = max(v[1][i] for v in views)  # ranks run side by side: the slowest one sets the pace
        row.samples, row.skipped, row.expected_samples = n, skipped, settings.expected_samples
        row.top1, row.top5 = (100.0 * top1 / n, 100.0 * top5 / n) if n else (None, None)
        row.images_per_s = n / seconds if n and seconds > 0 else None
        if n + skipped != settings.expected_samples:
            row.error = row.spec.failed(f"{n} samples validated + {skipped} bad = {n + skipped}, but "
                                        f"{settings.expected_samples} expected ({settings.expected_source})").error
        elif n == 0:
            row.error = row.spec.failed("no sample of the shards could be decoded").error
    return decoded, skipped


class _LazyLoader:
    """The val loader of one pass, built when iterated: a failure to build it (an
    interpolation the loader lacks, say) is then met inside _feed, like a read error."""

    def __init__(self, settings: SweepSettings, prep: Preprocess, dist_info: DistInfo) -> None:
        self.settings, self.prep, self.dist_info = settings, prep, dist_info

    def __iter__(self) -> Iterable:
        s, p = self.settings, self.prep
        return iter(build_val_loader(
            list(s.shards), batch_size=s.batch_size, img_size=p.img_size, crop_pct=p.crop_pct,
            rank=self.dist_info.rank, world_size=self.dist_info.world_size, workers=s.workers, mean=p.mean,
            std=p.std, interpolation=p.interpolation, pin_memory=s.device.type == "cuda"))


def run_pass(rows: Sequence[Row], settings: SweepSettings, dist_info: DistInfo,
             macs: dict[tuple, int] | None = None) -> PassStats:
    """Validate rows that share one Preprocess with one loader; fills the rows in place."""
    start, prep = time.perf_counter(), rows[0].preprocess
    models = _load_pass(rows, settings, {} if macs is None else macs)
    # agree before the loader starts: a row that failed to load on any rank is dropped everywhere
    errors = _merge_errors(all_gather_object([row.error for row in rows]))
    for row, error in zip(rows, errors):
        row.error = error
    live = [(row, model) for row, model in zip(rows, models) if not row.error and model is not None]
    batches = _LazyLoader(settings, prep, dist_info) if live else []
    fed = _feed([model for _, model in live], batches, settings)
    decoded, skipped = _finish([row for row, _ in live], fed, settings)
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


# ---------------------------------------------------------------- output


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_table(rows: Sequence[Row]) -> str:
    """The console table; failed rows show FAILED and their errors are listed below it."""
    header = (f"{'model':<24} {'checkpoint':<32} {'img':>4} {'crop':>6} {'top1':>7} {'top5':>7} {'samples':>8} "
              f"{'bad':>5} {'expected':>8} {'params(M)':>9} {'GMACs':>8} {'img/s':>8} {'paper':>6} {'vs paper':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        d = row.as_dict()
        label = d["checkpoint"] if len(d["checkpoint"]) <= 32 else "..." + d["checkpoint"][-29:]
        result = "FAILED" if row.error else _cell(d["top1"], ".3f")
        lines.append(
            f"{d['model']:<24} {label:<32} {_cell(d['img_size'], 'd'):>4} {_cell(d['crop_pct'], '.3f'):>6} "
            f"{result:>7} {_cell(d['top5'], '.3f'):>7} {_cell(d['samples'], 'd'):>8} {_cell(d['skipped'], 'd'):>5} "
            f"{_cell(d['expected_samples'], 'd'):>8} {_cell(d['params'] and d['params'] / 1e6, '.3f'):>9} "
            f"{_cell(d['gmacs'], '.4f'):>8} {_cell(d['images_per_s'], '.1f'):>8} {_cell(d['paper_top1'], '.1f'):>6} "
            f"{_cell(d['top1_minus_paper'], '+.2f'):>8}")
    failed = [row.error for row in rows if row.error]
    if failed:
        lines += ["", f"{len(failed)} of {len(rows)} row(s) failed:"] + [f"  {error}" for error in failed]
    return "\n".join(lines)


def write_results(rows: Sequence[Row], path: str | Path) -> None:
    """Rows as CSV (RESULT_COLUMNS, empty cells for missing values) or as a JSON list of
    objects (null for missing values), chosen by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [row.as_dict() for row in rows]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
