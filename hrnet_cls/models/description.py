"""ModelDescription: what a set of weights is (architecture, classes, labels, preprocessing), read from a recipe, a
checkpoint's config or a timm name / ``local-dir:FOLDER``; ``create_model`` builds it (docs/design.md §6.5)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from hrnet_cls.models import weights as _weights
from hrnet_cls.config import Config, check_model_name, config_to_dict
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, read_info
from hrnet_cls.errors import one_line
from hrnet_cls.models.hrnet_c import MODEL_CFGS
from hrnet_cls.models.timm_private import local_dir_config

LOCAL_DIR = "local-dir:"  # timm's prefix for a model folder: timm.create_model('local-dir:FOLDER')


def is_local_dir(name: str) -> bool:
    return name.startswith(LOCAL_DIR)


def classes_in(weights: Mapping[str, torch.Tensor], classifier: str | Sequence[str] | None) -> int:
    """Rows of the classifier weight in a state dict (0 when not found); classifier: pretrained_cfg's module name(s)."""
    for head in (classifier,) if isinstance(classifier, str) else tuple(classifier or ()):
        weight = weights.get(f"{head}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return 0


def is_checkpoint(obj: Any) -> bool:
    """Whether a file's object is one of our training checkpoints (it carries a config or a model name)."""
    return isinstance(obj, Mapping) and ("config" in obj or "model_name" in obj)


def pretrained_cfg(name: str) -> PretrainedCfg:
    """timm's pretrained_cfg for a name (its default tag, else a generic one) or a ``local-dir:FOLDER``'s config.json;
    the architecture must be registered."""
    if not is_local_dir(name):
        check_model_name(name)
        return get_pretrained_cfg(name) or PretrainedCfg()
    folder = name[len(LOCAL_DIR):]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model folder")
    cfg, architecture = local_dir_config(folder)
    check_model_name(architecture)
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    return PretrainedCfg(**{k: v for k, v in cfg.items() if k in known})


@dataclass(frozen=True)
class ModelDescription:
    """What a set of weights is: the model to build and the preprocessing it expects."""

    model: str  # timm name (pretrained tag optional) or local-dir:FOLDER
    num_classes: int
    img_size: int  # evaluation crop side, pixels
    crop_pct: float  # the shorter side is resized to img_size / crop_pct, then centre-cropped
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    crop_mode: str = "center"
    precision: str = ""  # train.precision of the run that trained it ("" = not known)
    label_names: tuple[str, ...] = ()  # class names in classifier order, when known
    label_source: str = ""  # else the training shards whose _info.json lists them

    @classmethod
    def from_config(cls, cfg: Config | Mapping[str, Any], model_name: str = "",
                    weights: Mapping[str, torch.Tensor] | None = None) -> ModelDescription:
        """A training recipe: ``Config`` or its dict, as a checkpoint stores it. model_name wins over the config's
        model.name; weights give num_classes when the config has none."""
        config = config_to_dict(cfg) if isinstance(cfg, Config) else cfg
        model, data = config.get("model") or {}, config.get("data") or {}
        name = model_name or model.get("name")
        if not name:
            raise ValueError("the checkpoint names no model (no 'model_name', no config model.name)")
        default = pretrained_cfg(name)
        classes = model.get("num_classes") or (weights is not None and classes_in(weights, default.classifier))
        return cls(name, int(classes or default.num_classes), int(data.get("img_size") or default.input_size[-1]),
                   float(data.get("crop_pct") or default.crop_pct),
                   precision=str((config.get("train") or {}).get("precision") or ""),
                   label_source=str(data.get("train_shards") or ""))

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | None = None) -> ModelDescription:
        """One of our training checkpoints, read; ``weights``: its tensors, as in from_config."""
        return cls.from_config(ckpt.get("config") or {}, ckpt.get("model_name") or "", weights)

    @classmethod
    def from_name(cls, name: str, weights: Mapping[str, torch.Tensor] | None = None) -> ModelDescription:
        """A timm name or ``local-dir:FOLDER`` with timm's preprocessing; num_classes from ``weights`` when given."""
        cfg = pretrained_cfg(name)
        classes = (weights is not None and classes_in(weights, cfg.classifier)) or cfg.num_classes
        names = tuple(cfg.label_names or ()) if len(cfg.label_names or ()) == classes else ()
        return cls(name, int(classes), int(cfg.input_size[-1]), float(cfg.crop_pct), cfg.interpolation,
                   tuple(cfg.mean), tuple(cfg.std), cfg.crop_mode, label_names=names)

    def data_config(self) -> dict[str, Any]:
        """The preprocessing as timm's data config keys (resolve_data_config, save_for_hf)."""
        return {"img_size": self.img_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "crop_mode": self.crop_mode}

    def labels(self) -> tuple[list[str] | None, str]:
        """(class names, or None; one line saying where they came from or why there are none)."""
        if self.label_names:
            return list(self.label_names), f"label names: {len(self.label_names)} class names from {self.model}"
        try:
            info = read_info(self.label_source) if self.label_source else None
        except Exception as exc:  # noqa: BLE001 - shards moved or unreachable: go on without names
            return None, (f"no label names: the training shards {self.label_source} are not reachable "
                          f"({one_line(exc, whole=True)})")
        names, where = (info or {}).get("class_names") or [], f"the _info.json of {self.label_source}"
        if names and len(names) == self.num_classes:
            return [str(n) for n in names], f"label names: {len(names)} class names from {where}"
        why = ("the checkpoint's config names no data.train_shards" if not self.label_source else
               f"no _info.json beside the training shards {self.label_source}" if info is None else
               f"{where} lists {len(names) or 'no'} class names, the model has {self.num_classes} classes")
        return None, f"no label names: {why}"


def create_model(card: ModelDescription, weights: Mapping[str, torch.Tensor] | None = None, *, init_from: str = "",
                 use_ema: bool = False, channels_last: bool | None = None, pretrained: bool = False,
                 **kwargs: Any) -> nn.Module:
    """The timm model ``card`` describes, on the CPU, in train mode as timm returns it.

    weights: loaded strictly; init_from: a file to fine-tune from (weights.init_from, EMA with use_ema);
    pretrained: timm's weights for the name. channels_last: HRNet-C only (None = its default, NHWC)."""
    if channels_last is not None and card.model.split(".")[0] in MODEL_CFGS:
        kwargs["channels_last"] = channels_last
    model = timm.create_model(card.model, pretrained=pretrained, num_classes=card.num_classes, **kwargs)
    if weights is not None:
        _weights.load_strict(model, weights, card.model)
    if init_from:
        _weights.init_from(model, init_from, use_ema)
    return model
