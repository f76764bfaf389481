"""Export a training checkpoint as a timm model folder (and optionally ONNX) to share and deploy.

    python -m hrnet_cls.export runs/demo_digits/best.pth exports/digits_tiny [--use-ema] [--onnx]
    python -m hrnet_cls.export hrnetv2_w18_imagenet_pretrained.pth exports/w18 --model hrnet_w18_c

OUT_DIR receives:

- ``model.safetensors``: the model's state dict (the EMA weights with --use-ema), nothing else;
- ``config.json``: timm's format (``timm.models._hub.save_config_for_hf``: ``architecture``,
  ``num_classes``, ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``,
  ``label_names``) with the preprocessing the model was trained and validated with: the
  checkpoint's ``data.img_size`` and ``data.crop_pct``, bilinear, ImageNet mean/std
  (hrnet_cls.data.transforms), and the class names of the training shards' _info.json when
  it can be read; plus ``export``, where the weights came from (informational; timm ignores it);
- with --onnx, ``model.onnx``: the torch.export-based exporter (``dynamo=True``) via timm's
  ``onnx_export``, opset 20 (``OPSET``), input ``input`` (batch, 3, img_size, img_size) float32
  normalised, output ``logits`` (batch, num_classes); the batch is dynamic, the image side is
  fixed to img_size. The exported graph is checked by onnx's full checker and run with
  onnxruntime at batch 1 and 3 against PyTorch.

The folder loads with ``timm.create_model('local-dir:OUT_DIR', pretrained=True)`` after
``import hrnet_cls`` (without pretrained=True timm builds the architecture only), validates with
``validate.py --model local-dir:OUT_DIR``, and ``model.safetensors`` is an ordinary timm state
dict (``timm.models.load_checkpoint``, ``pretrained_cfg_overlay=dict(file=...)``).

CHECKPOINT is one of our training checkpoints (hrnet_cls.checkpoint). Any other weights file that
hrnet_cls.weights reads (a plain or wrapped state dict, timm's, the authors', .safetensors)
needs ``--model NAME``; num_classes then comes from the classifier's shape, the preprocessing
from NAME's pretrained_cfg (e.g. ``hrnet_w18_small_c.gluon_in1k`` is bicubic), and there are no
label names.

HRNet-C keeps activations NHWC by default (``channels_last=True``). The exported config does not
record a layout, so ``local-dir:`` builds the default, the same as validate.py and train.py's
default: logits are bit-identical to the model built from the checkpoint. The ONNX graph is
traced from the same weights with ``channels_last=False`` (plain NCHW, no layout conversions).

Exit status: 0 = exported; 2 = a usage or input problem (one line on stderr, nothing written);
1 = the export itself failed (one line on stderr; OUT_DIR is left as it was).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._hub import save_config_for_hf
from torch import nn

from hrnet_cls.checkpoint import load_checkpoint
from hrnet_cls.config import check_model_name
from hrnet_cls.data import read_info
from hrnet_cls.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from hrnet_cls.errors import one_line
from hrnet_cls.hrnet_c import MODEL_CFGS
from hrnet_cls.weights import is_state_dict, load_strict, pick_state_dict, read_file


PROG = "python -m hrnet_cls.export"
OPSET = 20  # the default opset of torch 2.9+'s exporter; onnxruntime >= 1.16 runs it
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| / max |torch logit|, at batch 1 and 3
WEIGHTS_NAME, CONFIG_NAME, ONNX_NAME = "model.safetensors", "config.json", "model.onnx"
# what training and validation feed every model (hrnet_cls.data.transforms, validate.py)
TRAINED = {"interpolation": "bilinear", "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD)}


class ExportError(ValueError):
    """A usage or input problem: one line, exit status 2, nothing written."""


@dataclass
class Source:
    """What to export, read from CHECKPOINT."""

    model_name: str
    num_classes: int  # 0 = the architecture's default
    weights: dict[str, torch.Tensor]
    is_checkpoint: bool  # one of our training checkpoints (else a weights file with --model)
    data_config: dict[str, Any] = field(default_factory=dict)  # preprocessing for save_config_for_hf
    train_shards: str = ""  # where the class names are looked up
    info: dict[str, Any] = field(default_factory=dict)  # provenance: config.json's "export"


# ---------------------------------------------------------------- reading the input


def _classes_in(weights: Mapping[str, torch.Tensor], name: str) -> int:
    """Rows of the classifier weight in ``weights`` (0 when not found), the classifier named by
    the architecture's pretrained_cfg."""
    cfg = get_pretrained_cfg(name)
    heads = cfg.classifier if cfg is not None else None
    for head in (heads,) if isinstance(heads, str) else tuple(heads or ()):
        weight = weights.get(f"{head}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return 0


def read_source(path: str, model: str = "", use_ema: bool = False) -> Source:
    """The weights, architecture and preprocessing to export; ExportError when they cannot be had."""
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        ckpt: dict[str, Any] | None = load_checkpoint(path, mmap=True)
    except ValueError as exc:  # readable, but not one of our training checkpoints
        ckpt, why = None, one_line(exc, whole=True).removeprefix(f"{path}: ")
    except Exception as exc:  # noqa: BLE001 - truncated zip, garbage, a pickle that is not data
        raise ExportError(f"{path}: cannot read it ({one_line(exc)})") from None
    weights_of = "ema" if use_ema else "model"

    if ckpt is None:  # a weights file: the architecture is --model's
        if not model:
            if is_state_dict(read_file(path)):
                why = "a plain state dict, not a training checkpoint"
            raise ExportError(f"{path}: {why}; to export a plain weights file, give --model NAME (its architecture)")
        try:
            check_model_name(model)
            weights = pick_state_dict(read_file(path), use_ema)
            classes = _classes_in(weights, model)
        except Exception as exc:  # noqa: BLE001 - unknown model or tag, no state dict, no EMA weights
            raise ExportError(f"{path}: {one_line(exc, whole=True).removeprefix(f'{path}: ')}") from None
        info = {"source": os.path.basename(path), "weights": weights_of, "model_name": model}
        return Source(model, classes, weights, is_checkpoint=False, info=info)

    config = ckpt.get("config") or {}
    name = ckpt.get("model_name") or config.get("model", {}).get("name")
    if not name:
        raise ExportError(f"{path}: the checkpoint names no model (no 'model_name', no config model.name)")
    if model and model != name:
        raise ExportError(f"{path}: a checkpoint of {name!r}, not of --model {model!r}; leave --model out")
    try:
        check_model_name(name)
        weights = pick_state_dict(ckpt, use_ema)
        classes = int(config.get("model", {}).get("num_classes") or 0) or _classes_in(weights, name)
    except Exception as exc:  # noqa: BLE001 - unknown architecture, no EMA weights
        raise ExportError(f"{path}: {one_line(exc, whole=True)}") from None
    data = config.get("data", {})
    data_config = dict(TRAINED)
    if data.get("img_size"):
        data_config["img_size"] = int(data["img_size"])
    if data.get("crop_pct"):
        data_config["crop_pct"] = float(data["crop_pct"])
    info = {"source": os.path.basename(path), "weights": weights_of, "model_name": name,
            **{k: ckpt.get(k) for k in ("epoch", "step", "git_commit", "metrics")}}
    return Source(name, classes, weights, True, data_config, str(data.get("train_shards") or ""), info)


def label_names(train_shards: str, num_classes: int) -> tuple[list[str] | None, str]:
    """(class names from the shards' _info.json, or None; one line saying where they came from or why not)."""
    if not train_shards:
        return None, "no label names: the checkpoint's config names no data.train_shards"
    try:
        info = read_info(train_shards)
    except Exception as exc:  # noqa: BLE001 - shards moved or unreachable: the export goes on without names
        return None, f"no label names: the training shards {train_shards} are not reachable ({one_line(exc, whole=True)})"
    if info is None:
        return None, f"no label names: no _info.json beside the training shards {train_shards}"
    names = info.get("class_names")
    if not names:
        return None, f"no label names: the _info.json of {train_shards} lists no class_names"
    if len(names) != num_classes:
        return None, (f"no label names: the _info.json of {train_shards} lists {len(names)} class names, "
                      f"the model has {num_classes} classes")
    return [str(n) for n in names], f"label names: {len(names)} class names from the _info.json of {train_shards}"


# ---------------------------------------------------------------- building and writing


def build_model(source: Source, channels_last: bool | None = None) -> nn.Module:
    """The architecture with the exported weights loaded strictly, on the CPU, in eval mode.

    channels_last: HRNet-C's activation layout (None = its default); other timm models have none.
    """
    kwargs: dict[str, Any] = {}
    if source.num_classes:
        kwargs["num_classes"] = source.num_classes
    if channels_last is not None and source.model_name.split(".")[0] in MODEL_CFGS:
        kwargs["channels_last"] = channels_last
    if source.is_checkpoint:  # our weights, not the registry tag's: filter_pretrained_cfg drops the None
        kwargs["pretrained_cfg_overlay"] = {"tag": None}
    model = timm.create_model(source.model_name, **kwargs)
    load_strict(model, source.weights, source.model_name)
    return model.eval()


def write_folder(model: nn.Module, folder: Path, source: Source, names: list[str] | None) -> dict[str, Any]:
    """model.safetensors + config.json (timm's save_config_for_hf) in folder; returns the config written.

    timm's save_for_hf is not used for the weights: safetensors refuses the NHWC (channels_last)
    conv weights HRNet-C holds, so they are packed contiguous first (the values are unchanged).
    """
    from safetensors.torch import save_file  # a dependency of timm

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    model_config: dict[str, Any] = {"export": source.info}
    if names:
        model_config["label_names"] = names
    save_config_for_hf(model, str(folder / CONFIG_NAME), model_config=model_config,
                       data_config=source.data_config or None)
    return json.loads((folder / CONFIG_NAME).read_text())


def missing_onnx_packages() -> list[str]:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def logit_differences(onnx_file: Path, model: nn.Module, input_size: tuple[int, int, int],
                      batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> dict[int, float]:
    """{batch size: max |onnxruntime - torch| / max |torch logit|} on random normal inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for batch in batch_sizes:
        x = torch.randn((batch, *input_size), generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        out[batch] = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    return out


def write_onnx(source: Source, folder: Path, input_size: tuple[int, int, int], reference: nn.Module) -> dict[int, float]:
    """model.onnx in folder (dynamic batch, opset OPSET), traced from an NCHW build of the weights;
    returns its logit_differences against ``reference`` (the model as model.safetensors loads)."""
    from timm.utils.onnx import onnx_export  # needs onnx (and onnxscript for the exporter)

    model = build_model(source, channels_last=False)
    example = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))  # batch 2: stays dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        onnx_export(model, str(folder / ONNX_NAME), example_input=example, opset=OPSET, use_dynamo=True,
                    input_names=["input"], output_names=["logits"], check=True)
    return logit_differences(folder / ONNX_NAME, reference, input_size)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir}: exists and is not empty; pass --force to overwrite the export in it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished files into out_dir; a stale model.onnx of an earlier export is removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {p.name for p in staging.iterdir()}
    for stale in out_dir.glob(f"{ONNX_NAME}*"):  # model.onnx and its external data, if any
        if stale.name not in written:
            stale.unlink()
    for name in sorted(written):
        os.chmod(staging / name, _FILE_MODE)  # safetensors writes 0600 files
        os.replace(staging / name, out_dir / name)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="training checkpoint (train.py's last.pth / best.pth / epoch_XXXX.pth), or with --model "
                        "any weights file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write model.safetensors, config.json (model.onnx)")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights (error if the file has none)")
    p.add_argument("--onnx", action="store_true", help=f"also write {ONNX_NAME} (dynamic batch, opset {OPSET})")
    p.add_argument("--model", default="", metavar="NAME",
                   help="timm architecture of a plain weights file (not needed for training checkpoints)")
    p.add_argument("--force", action="store_true", help="overwrite an OUT_DIR that is not empty")
    return p.parse_args(argv)


def export(args: argparse.Namespace) -> list[str]:
    """Run the export; returns the lines to print. ExportError: input problem, nothing written."""
    out_dir = Path(args.out_dir)
    _check_out_dir(out_dir, args.force)
    if args.onnx:
        missing = missing_onnx_packages()
        if missing:
            raise ExportError(f"--onnx needs {', '.join(ONNX_PACKAGES)} (missing: {', '.join(missing)}): "
                              'pip install "hrnet-cls[export]"')
    source = read_source(args.checkpoint, args.model, args.use_ema)
    try:
        model = build_model(source)
    except Exception as exc:  # noqa: BLE001 - weights of another architecture or shape
        raise ExportError(f"{args.checkpoint}: {one_line(exc, whole=True)}") from None
    source.num_classes = model.num_classes
    names, names_note = label_names(source.train_shards, model.num_classes) if source.is_checkpoint else (None, "")

    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.absolute().name}.export-", dir=out_dir.absolute().parent))
    try:
        config = write_folder(model, staging, source, names)
        cfg = config["pretrained_cfg"]
        input_size = tuple(cfg["input_size"])
        lines = [f"{out_dir / WEIGHTS_NAME}: {config['architecture']}, {config['num_classes']} classes, "
                 f"{len(model.state_dict())} tensors ({source.info['weights']} weights of {args.checkpoint})",
                 f"{out_dir / CONFIG_NAME}: input {input_size[-1]} px, crop_pct {cfg['crop_pct']:g}, "
                 f"{cfg['interpolation']}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}"]
        if names_note:
            lines.append(names_note)
        if args.onnx:
            try:
                diffs = write_onnx(source, staging, input_size, model)
            except Exception as exc:  # noqa: BLE001 - tracing or conversion: name the step
                raise RuntimeError(f"ONNX export (torch.onnx.export, dynamo=True, opset {OPSET}) of "
                                   f"{source.model_name}: {one_line(exc)}") from exc
            worst = max(diffs.values())
            if worst > ONNX_TOLERANCE:
                raise RuntimeError(f"{ONNX_NAME} disagrees with PyTorch: max |diff| / max |logit| = {worst:.2e} "
                                   f"> {ONNX_TOLERANCE:g}")
            lines.append(f"{out_dir / ONNX_NAME}: opset {OPSET}, dynamic batch; onnxruntime vs torch, max |diff| / "
                         f"max |logit|: " + ", ".join(f"{d:.1e} at batch {b}" for b, d in diffs.items()))
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    lines.append(f"load with: import hrnet_cls, timm; timm.create_model('local-dir:{out_dir}', pretrained=True)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        lines = export(args)
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the export failed (ONNX exporter, disk): one line, exit 1
        print(f"{PROG}: error: export failed: {one_line(exc)}", file=sys.stderr)
        return 1
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
