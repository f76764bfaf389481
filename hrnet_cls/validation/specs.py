"""What to validate: the weights named on the command line, described, and the rows they make."""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import timm

from hrnet_cls.atomic import verify
from hrnet_cls.distributed import all_gather_object
from hrnet_cls.errors import one_line
from hrnet_cls.models.description import ModelDescription, is_checkpoint, is_local_dir
from hrnet_cls.models.weights import pick_state_dict, read_file, read_state_dict

logger = logging.getLogger(__name__)

CHECKPOINT, WEIGHTS, PRETRAINED = "checkpoint", "weights", "pretrained"


class SweepError(RuntimeError):
    """The sweep as a whole cannot run (e.g. ranks found different checkpoint lists)."""


@dataclass(frozen=True)
class ModelSpec:
    """One set of weights to validate; describe() adds what they are (model, classes, preprocessing)."""

    source: str  # where the weights come from: CHECKPOINT | WEIGHTS | PRETRAINED
    path: str = ""  # checkpoint or weights file as named on the command line ("" for pretrained)
    model: str = ""  # timm name; a checkpoint's is read from the file by describe()
    desc: ModelDescription | None = None
    error: str = ""  # why this spec cannot be validated ("" = fine so far)
    verified: bool | None = None  # the file matched its .sha256 (False: it has none); None: no file

    @property
    def label(self) -> str:
        """The 'checkpoint' column: the file validated, or 'pretrained'."""
        return self.path or PRETRAINED

    def failed(self, problem: str) -> ModelSpec:
        """A copy carrying ``problem`` as a one-line error that names the file (or model) once."""
        where = {CHECKPOINT: self.path, WEIGHTS: f"{self.path} ({self.model})"}.get(
            self.source, self.model if is_local_dir(self.model) else f"{self.model} (pretrained)")
        problem = problem.removeprefix(f"{self.path}: ") if self.path else problem  # errors that name it already
        return dataclasses.replace(self, error=f"{where}: {problem}")


def checkpoint_specs(args: Sequence[str]) -> list[ModelSpec]:
    """--checkpoint arguments: files, globs (sorted), directories (every *.pth, sorted); none found: a failed spec."""
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
    """--model arguments: timm names (tag optional), patterns (``hrnet_w18*_c``) or ``local-dir:FOLDER`` (never a
    pattern); each loads ``weights`` when given, else its pretrained weights (a folder's own for local-dir:)."""
    source = WEIGHTS if weights else PRETRAINED
    specs = []
    for pattern in patterns:
        names = timm.list_models(pattern) if glob.has_magic(pattern) and not is_local_dir(pattern) else [pattern]
        specs += [ModelSpec(source, weights, model=name) for name in names]
        if not names:
            specs.append(ModelSpec(source, weights, model=pattern).failed("no timm model matches this pattern"))
    return specs


def _describe_checkpoint(spec: ModelSpec, use_ema: bool) -> ModelDescription:
    ckpt = read_file(spec.path)
    if not is_checkpoint(ckpt):
        raise ValueError("not a training checkpoint (no 'config', no 'model_name'); for other weights use "
                         "--model NAME --weights FILE")
    return ModelDescription.from_checkpoint(ckpt, pick_state_dict(ckpt, use_ema))


def _describe_model(spec: ModelSpec, use_ema: bool) -> ModelDescription:
    # a weights file is read now: a missing or unreadable one fails before any pass
    desc = ModelDescription.from_name(spec.model, read_state_dict(spec.path, use_ema) if spec.source == WEIGHTS else None)
    if desc.crop_mode != "center":
        logger.warning("%s: pretrained_cfg crop_mode=%r; validating with a centre crop", spec.model, desc.crop_mode)
    return desc


def describe(spec: ModelSpec, *, use_ema: bool = False, num_classes: int | None = None) -> ModelSpec:
    """The spec with model name, classes (num_classes overrides) and default preprocessing filled in, or its error."""
    if spec.error:
        return spec
    try:
        verified = verify(spec.path) if spec.path else None
        desc = (_describe_checkpoint if spec.source == CHECKPOINT else _describe_model)(spec, use_ema)
        desc = dataclasses.replace(desc, num_classes=num_classes or desc.num_classes)
        return dataclasses.replace(spec, model=desc.model, desc=desc, verified=verified)
    except Exception as exc:  # noqa: BLE001 - any unreadable input is this row's error, not the sweep's
        return spec.failed(one_line(exc))


def merge_errors(per_rank: list[list[str]]) -> list[str]:
    """Each rank's error texts for the same rows -> one list: failed on any rank, naming the ranks when not all."""
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
    errors = merge_errors([[s.error for s in view] for view in views])
    out = []
    for i, spec in enumerate(described):
        if not errors[i] and any(view[i] != views[0][i] for view in views):
            errors[i] = f"{spec.label}: reads differently on different ranks (model, classes or defaults)"
        out.append(dataclasses.replace(spec, error=errors[i]))
    return out


@dataclass(frozen=True)
class Preprocess:
    """Everything that determines a decoded batch: rows sharing it share their batches."""

    img_size: int  # centre-crop side, pixels
    crop_pct: float  # the shorter side is resized to img_size / crop_pct first
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Row:
    """One (weights, img_size, crop_pct); the results after crop_pct stay None until validated or on failure."""

    spec: ModelSpec
    img_size: int | None
    crop_pct: float | None
    top1: float | None = None  # percent, as top5
    top5: float | None = None
    samples: int | None = None  # samples validated, all ranks together
    skipped: int | None = None  # bad samples (unreadable, undecodable, bad label) left out
    expected_samples: int | None = None  # samples the shards hold per _info.json (or counted)
    params: int | None = None
    gmacs: float | None = None  # conv + linear multiply-adds per image at img_size / 2^30 (the paper's "GFLOPs")
    images_per_s: float | None = None  # forward throughput of this model, decoding excluded
    loss: float | None = None  # mean cross-entropy
    precision: str = ""
    device: str = ""
    error: str = ""

    @property
    def preprocess(self) -> Preprocess:
        c = self.spec.desc
        return Preprocess(int(self.img_size or 0), float(self.crop_pct or 0), c.interpolation, c.mean, c.std)


def build_rows(specs: Sequence[ModelSpec], img_sizes: Sequence[int] = (), crop_pcts: Sequence[float] = ()) -> list[Row]:
    """One row per spec x img_size x crop_pct; an empty list means each spec's default."""
    rows = []
    for spec in specs:
        sizes = list(img_sizes) or [spec.desc.img_size if spec.desc else None]
        crops = list(crop_pcts) or [spec.desc.crop_pct if spec.desc else None]
        rows += [Row(spec, size, crop, error=spec.error) for size in sizes for crop in crops]
    return rows
