"""Reading weights: our training checkpoints, timm's and the authors' files, ``.safetensors`` (docs/design.md §6.5).

Three steps, each only when asked: ``read_file`` + ``pick_state_dict``, ``load_strict``, ``reset_mismatched_head``."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict  # strips DDP 'module.' / torch.compile '_orig_mod.'
from torch import nn

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model")


def read_file(path: str | os.PathLike, mmap: bool = True) -> Any:
    """The object stored in a weights or checkpoint file, on the CPU, as data only.

    mmap: map the tensors rather than read them (legacy non-zip files are read whole); pass False for
    tensors that must outlive the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # a dependency of timm
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if not mmap or "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def pick_state_dict(obj: Any, use_ema: bool = False) -> StateDict:
    """The weights in a file's object, wrapper prefixes stripped, by timm's key priority; unlike timm, use_ema
    on a file without EMA weights raises. The authors' ``model`` key may hold a name string."""
    for key in _EMA_KEYS if use_ema else _PLAIN_KEYS:
        if isinstance(obj, Mapping) and is_state_dict(obj.get(key)):
            return clean_state_dict(obj[key])
    if use_ema:
        raise ValueError("no EMA weights in this file (no state dict under 'model_ema' or 'state_dict_ema')")
    if is_state_dict(obj):
        return clean_state_dict(obj)
    top = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"no state dict found (top level: {top})")


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> StateDict:
    return pick_state_dict(read_file(path), use_ema)


def _misfits(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``weights`` from loading into ``model`` exactly, one phrase per kind."""
    own = model.state_dict()
    other = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    # BN batch counters are not used by eval or by momentum-based BN; older files lack them
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
    return problems


def load_strict(model: nn.Module, weights: Mapping[str, torch.Tensor], name: str = "") -> None:
    """Load every tensor of ``model`` from ``weights``; raise one line on any misfit."""
    problems = _misfits(model, weights)
    if problems:
        what = name or type(model).__name__
        raise ValueError(f"weights do not fit {what} with {getattr(model, 'num_classes', '?')} classes: "
                         + "; ".join(problems))
    own = model.state_dict()
    changed = [k for k in own if k in weights and not weights[k].is_floating_point() and weights[k].dtype != own[k].dtype
               and not torch.equal(weights[k].to(own[k].dtype).to(weights[k].dtype), weights[k])]
    if changed:
        raise ValueError(f"{len(changed)} integer tensors would change value as {own[changed[0]].dtype} "
                         f"(e.g. {changed[0]}: {weights[changed[0]].dtype})")
    cast = sorted({(str(weights[k].dtype), str(own[k].dtype)) for k in own if k in weights
                   and weights[k].dtype != own[k].dtype})
    if cast:  # load_state_dict copies into the model's tensors, converting: say so, it can lose precision
        logger.warning("%s: tensors converted to the model's dtypes (%s)", name or type(model).__name__,
                       ", ".join(f"{a} -> {b}" for a, b in cast))
    model.load_state_dict(weights, strict=False)  # strict up to the tolerated BN counters


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier, e.g. ('classifier',) for HRNet, ('fc',) for ResNet."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return tuple(name for name, module in model.named_modules() if head is not None and module is head)


def reset_mismatched_head(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """(weights with the model's own classifier where the file's has another shape, the keys replaced); a model
    without a classifier (num_classes=0) drops the file's. Every other tensor is left for load_strict."""
    own = model.state_dict()
    heads = tuple(f"{h}." for h in classifier_names(model))
    out, replaced = dict(weights), []
    for key in [k for k in weights if k.startswith(heads)]:
        if key not in own:
            del out[key]
            replaced.append(key)
        elif own[key].shape != weights[key].shape:
            out[key] = own[key]
            replaced.append(key)
    if replaced:
        logger.info("classifier re-initialised (the file's has another shape): %s", replaced)
    return out, replaced


def init_from(model: nn.Module, path: str | Path, use_ema: bool = False) -> list[str]:
    """Fine-tuning start: every weight from ``path`` but a classifier of another shape; returns the keys left fresh."""
    weights, replaced = reset_mismatched_head(model, read_state_dict(path, use_ema))
    load_strict(model, weights, str(path))
    return replaced
