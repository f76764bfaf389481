"""Export a training checkpoint as a timm model folder (and optionally ONNX) to share and deploy.

The folder and how it loads: README "Export", docs/design.md §6.5. A plain weights file needs --model NAME: its
classes then come from the classifier's shape, its preprocessing from NAME's pretrained_cfg, and it has no label
names. Exit status: 0 exported; 2 a usage or input problem (nothing written); 1 the export failed (OUT_DIR kept)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf
from torch import nn

from hrnet_cls.export import card
from hrnet_cls.atomic import ChecksumError, publish, verify
from hrnet_cls.errors import one_line
from hrnet_cls.models.hrnet_c import TIMM_TWINS
from hrnet_cls.models.description import ModelDescription, create_model, is_checkpoint
from hrnet_cls.models.weights import is_state_dict, pick_state_dict, read_file

logger = logging.getLogger(__name__)


PROG = "python -m hrnet_cls.export"
OPSET = 20  # the default opset of torch 2.9+'s exporter; onnxruntime >= 1.16 runs it
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| / max |torch logit|, at batch 1 and 3
WEIGHTS_NAME, CONFIG_NAME, ONNX_NAME = "model.safetensors", "config.json", "model.onnx"  # save_for_hf's names


class ExportError(ValueError):
    """A usage or input problem: one line, exit status 2, nothing written."""


@dataclass
class Source:
    """What to export, read from CHECKPOINT."""

    desc: ModelDescription
    weights: dict[str, torch.Tensor]
    is_checkpoint: bool  # one of our training checkpoints (else a weights file with --model)
    info: dict[str, Any]  # provenance: config.json's "export"
    train_config: dict[str, Any]  # the checkpoint's recipe, for the card ({} for a plain weights file)


def read_source(path: str, model: str = "", use_ema: bool = False) -> Source:
    """The weights, architecture and preprocessing to export; ExportError when they cannot be had."""
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        verified = verify(path)
    except ChecksumError as exc:
        raise ExportError(one_line(exc)) from None
    if not verified:
        logger.warning("%s has no .sha256 beside it: its bytes are UNVERIFIED", path)
    try:
        obj = read_file(path)
    except Exception as exc:  # noqa: BLE001 - truncated zip, garbage, a pickle that is not data
        raise ExportError(f"{path}: cannot read it ({one_line(exc)})") from None
    checkpoint = is_checkpoint(obj)
    if not checkpoint and not model:
        why = "a plain state dict" if is_state_dict(obj) else "no 'config', no 'model_name'"
        raise ExportError(f"{path}: {why}, not a training checkpoint; to export a plain weights file, give "
                          "--model NAME (its architecture)")
    try:
        weights = pick_state_dict(obj, use_ema)
        desc = ModelDescription.from_checkpoint(obj, weights) if checkpoint else ModelDescription.from_name(model, weights)
    except Exception as exc:  # noqa: BLE001 - unknown model or tag, no state dict, no EMA weights
        raise ExportError(f"{path}: {one_line(exc, whole=True).removeprefix(f'{path}: ')}") from None
    if checkpoint and model and model != desc.model:
        raise ExportError(f"{path}: a checkpoint of {desc.model!r}, not of --model {model!r}; leave --model out")
    info = {"source": os.path.basename(path), "verified": verified, "weights": "ema" if use_ema else "model",
            "model_name": desc.model}
    if checkpoint:
        info.update({k: obj.get(k) for k in ("epoch", "step", "git_commit", "metrics")}, precision=desc.precision)
    return Source(desc, weights, checkpoint, info, dict(obj.get("config") or {}) if checkpoint else {})


def build_model(source: Source, channels_last: bool | None = None) -> nn.Module:
    """The architecture with the exported weights loaded strictly, on the CPU, in eval mode."""
    # our weights, not the registry tag's: filter_pretrained_cfg drops the None
    overlay = {"pretrained_cfg_overlay": {"tag": None}} if source.is_checkpoint else {}
    return create_model(source.desc, source.weights, channels_last=channels_last, **overlay).eval()


def write_folder(model: nn.Module, folder: Path, source: Source, names: list[str] | None,
                 names_note: str = "", folder_name: str = "") -> dict[str, Any]:
    """model.safetensors, config.json (save_for_hf; TIMM_TWINS as timm's name), README.md; returns the config."""
    twin = TIMM_TWINS.get(model.pretrained_cfg.get("architecture", ""))
    loads_with = card.PLAIN_TIMM if twin else "timm, after import hrnet_cls (pip install hrnet-cls)"
    model_config: dict[str, Any] = {"export": {**source.info, "loads_with": loads_with},
                                    **({"label_names": names} if names else {})}
    model.to(memory_format=torch.contiguous_format)  # safetensors takes contiguous tensors only
    try:
        save_for_hf(model, str(folder), model_config=model_config, safe_serialization=True,
                    data_config=source.desc.data_config() if source.is_checkpoint else None)
    finally:
        if getattr(model, "channels_last", False):
            model.to(memory_format=torch.channels_last)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if twin:
        config["architecture"] = twin
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))  # the staging folder: published whole
    readme = card.render(config, source.train_config, names_note, folder_name or folder.name)
    (folder / card.README_NAME).write_text(readme)
    return config


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


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


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished files into out_dir; a stale model.onnx of an earlier export is removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {p.name for p in staging.iterdir()}
    for stale in out_dir.glob(f"{ONNX_NAME}*"):  # model.onnx and its external data, if any
        if stale.name not in written:
            stale.unlink()
    for name in sorted(written):
        publish(staging / name, out_dir / name)


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
    names, names_note = source.desc.labels() if source.is_checkpoint else (None, "")

    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.absolute().name}.export-", dir=out_dir.absolute().parent))
    try:
        config = write_folder(model, staging, source, names, names_note, str(out_dir))
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
                                   f"{source.desc.model}: {one_line(exc)}") from exc
            worst = max(diffs.values())
            if worst > ONNX_TOLERANCE:
                raise RuntimeError(f"{ONNX_NAME} disagrees with PyTorch: max |diff| / max |logit| = {worst:.2e} "
                                   f"> {ONNX_TOLERANCE:g}")
            lines.append(f"{out_dir / ONNX_NAME}: opset {OPSET}, dynamic batch; onnxruntime vs torch, max |diff| / "
                         f"max |logit|: " + ", ".join(f"{d:.1e} at batch {b}" for b, d in diffs.items()))
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    needs = "" if config["export"]["loads_with"] == card.PLAIN_TIMM else "import hrnet_cls; "
    lines.append(f"load with: {needs}import timm; timm.create_model('local-dir:{out_dir}', pretrained=True)")
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

