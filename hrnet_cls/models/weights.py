"""Reading weights: one path for every file the project meets.

Files: our training checkpoints (``model`` / ``model_ema``), timm's and the authors'
(plain state dicts, or wrapped in ``state_dict`` / ``state_dict_ema``, the authors' with a
``module.`` prefix and ``model`` holding a name string), and ``.safetensors``.

Three separate steps, so no step does something the caller did not ask for:

- ``read_file`` + ``pick_state_dict`` (or ``read_state_dict``): the tensors, with the key
  priority of timm's ``load_state_dict`` (EMA keys first when asked, then ``state_dict``,
  then ``model``), so ``timm.create_model(name, checkpoint_path=...)`` and this module read
  a file alike. Unlike timm, asking for EMA weights that the file lacks is an error, not a
  silent fall-back to the raw weights.
- ``load_strict``: every tensor must fit; a misfit is one line naming the tensors.
- ``reset_mismatched_head``: the explicit fine-tuning step. Classifier tensors of another
  shape (another ``num_classes``) are dropped so the model keeps its fresh classifier, as
  timm's ``load_pretrained`` does; nothing else may differ.
"""
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

    mmap: map the tensors instead of reading them, where the format allows, so reading a
    checkpoint's config costs its pickle only (legacy non-zip torch files are read whole).
    Pass False for tensors that must outlive the file (training state on resume).
    """
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
    """The weights inside a file's object, without wrapper prefixes; see the module doc."""
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
    model.load_state_dict(weights, strict=False)  # strict up to the tolerated BN counters


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier, e.g. ('classifier',) for HRNet, ('fc',) for ResNet."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier")
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return tuple(name for name, module in model.named_modules() if head is not None and module is head)


def reset_mismatched_head(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """(weights with the model's own classifier where the file's has another shape, the keys replaced).

    The explicit fine-tuning step: load_strict then accepts a file trained for another
    num_classes (the classifier keeps its fresh initialisation) and still rejects any other
    difference. A model without a classifier (num_classes=0) drops the file's.
    """
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
    """Fine-tuning start: every weight from ``path`` except a classifier of another shape.

    Returns the classifier keys left at their fresh initialisation.
    """
    weights, replaced = reset_mismatched_head(model, read_state_dict(path, use_ema))
    load_strict(model, weights, str(path))
    return replaced
