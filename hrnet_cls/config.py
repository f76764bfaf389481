"""Typed training configuration: the dataclasses below are the schema, OmegaConf loads it. A recipe is one complete
YAML file in ``configs/`` (every key present); overrides are dotted ``section.key=value`` strings parsed as YAML.
Any bad key, type or value raises ConfigError naming the dotted key; each field's ``doc`` text is its recipe comment.
Defaults are the paper recipe for HRNet-W18-C on 8 processes x 32 images."""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from hrnet_cls.atomic import write_atomic
from hrnet_cls.errors import flat
from hrnet_cls.data.transforms import INTERPOLATIONS
from hrnet_cls.precision import PRECISIONS

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
WANDB_MODES = ("online", "offline", "disabled")
SCHEDULES = ("step", "cosine")
MIN_IMG_SIZE = 32  # HRNet's lowest-resolution stream has stride 32: smaller inputs reach it as 1 x 1 or less
RE_MODES = ("pixel", "rand", "const")  # timm's RandomErasing modes
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup modes


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field documented by ``text``; a list or section class default becomes a factory."""
    if isinstance(default, (list, type)):
        return field(default_factory=default if isinstance(default, type) else default.copy, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    name: str = doc("hrnet_w18_c", "timm model name; must be registered after ``import hrnet_cls``.")
    num_classes: int = doc(1000, "Size of the classifier output (classes in the dataset).")
    drop_path_rate: float = doc(0.0, "Stochastic-depth rate, probability in [0, 1); the paper uses 0 (no drop path).")
    grad_checkpointing: bool = doc(
        False, "Recompute activations in the backward pass: less memory, about 30% more compute.")
    init_from: str = doc("", 'Checkpoint to fine-tune from (ours, timm\'s or the authors\'); "" = random init. '
                             "A classifier whose shape differs (other num_classes) is dropped and re-initialised.")


@dataclass
class DataConfig:
    train_shards: str = doc("/data/imagenet-wds/train-{000000..001023}.tar",
                            "Training webdataset shards: a path or URL with brace ranges.")
    val_shards: str = doc("/data/imagenet-wds/val-{000000..000063}.tar",
                          "Validation webdataset shards: a path or URL with brace ranges.")
    batch_size: int = doc(32, "Training images per process per step; global batch = batch_size x world size.")
    val_batch_size: int = doc(64, "Validation images per process per step (no gradients, so it can exceed batch_size).")
    workers: int = doc(8, "DataLoader worker processes per training process (0 = load in the main process).")
    img_size: int = doc(224, "Square training crop and evaluation crop side, pixels.")
    crop_pct: float = doc(0.875, "Evaluation centre-crop fraction: the shorter side is resized to "
                                 "floor(img_size / crop_pct) first, as in timm.")
    scale: list[float] = doc([0.08, 1.0], "RandomResizedCrop area range, fractions of the image (timm's scale).")
    ratio: list[float] = doc([0.75, 1.3333333333333333], "RandomResizedCrop aspect-ratio range (timm's ratio).")
    hflip: float = doc(0.5, "Probability of a horizontal flip of a training crop.")
    interpolation: str = doc("bilinear", 'Training crop resize filter: "bilinear" | "bicubic".')
    auto_augment: str = doc("", 'timm\'s augmentation policy applied to each training crop in the workers: '
                                '"rand-m9-mstd0.5-inc1" (RandAugment), "augmix-m5-w4-d2", "original", "v0", '
                                '"3a", ...; "" = none (the paper).')
    color_jitter: float = doc(0.0, "ColorJitter strength for brightness, contrast and saturation (0 = off, the "
                                   "paper; timm's default is 0.4); off with data.auto_augment unless it is 3a, as "
                                   "in timm.")
    re_prob: float = doc(0.0, "Random-erasing probability per training image (timm's RandomErasing, on the "
                              "device after normalisation as timm's prefetcher does; 0 = off).")
    re_mode: str = doc("pixel", 'Random-erasing fill: "pixel" (per-pixel normal noise) | "rand" (per channel) | '
                                '"const" (zeros).')
    re_count: int = doc(1, "Most erased boxes per image (timm's max_count).")
    retries: int = doc(3, "Times a remote shard read (http(s), pipe:) that is cut or stalls is opened again and "
                          "continued at the sample where it broke; then the run stops naming the URL.")
    read_timeout_s: float = doc(30.0, "Seconds a remote read may go without receiving data before it counts as "
                                      "failed (and is retried).")
    max_bad_fraction: float = doc(
        0.01, "Most bad training samples (missing, unlabelled, undecodable) per image trained in an epoch, "
              "checked every log_interval steps once 10,000 images are in, and at the epoch end; past it the "
              "run stops naming the worst shards (1 = never stop).")


@dataclass
class OptimConfig:
    name: str = doc("sgd", '"sgd" (SGD with momentum, Nesterov as configured: the paper) | "adamw" | "lamb" | any '
                           "name timm's create_optimizer_v2 knows.")
    lr: float = doc(0.1, "Peak SGD learning rate for the global batch actually used. Linear scaling rule: "
                         "lr = 0.1 x global_batch / 256 (paper: 0.1 at 256; authors' repo: 0.05 at 4 x 32).")
    momentum: float = doc(0.9, "SGD momentum coefficient, in [0, 1).")
    nesterov: bool = doc(True, "Use Nesterov momentum (the paper does); needs momentum > 0.")
    weight_decay: float = doc(1e-4, "L2 penalty coefficient added to the gradient by SGD (decoupled for "
                                    "adamw, lamb, ...), per step.")
    betas: list[float] = doc([0.9, 0.999], "Adam-family (beta1, beta2); not read by sgd.")
    eps: float = doc(1e-8, "Adam-family epsilon; not read by sgd.")
    layer_decay: float = doc(0.0, "timm's layer-wise LR decay (lr x layer_decay^(depth from the head), groups from "
                                  "the model's group_matcher); 0 = off.")
    wd_on_norm_and_bias: bool = doc(
        True, "True = decay every parameter (the paper and the authors' code, BN included); "
              "False = exempt normalisation-layer parameters and biases (chosen by module type).")


@dataclass
class ScheduleConfig:
    name: str = doc("step", '"step" (decay_rate at each of decay_epochs: the paper) | "cosine" (to min_lr at the '
                            "end), evaluated per step from the samples seen.")
    epochs: int = doc(100, "Training length, epochs (passes over the training shards).")
    decay_epochs: list[int] = doc(
        [30, 60, 90], "Epochs (0-based) from whose first step the LR is multiplied by decay_rate; "
                      "with [30, 60, 90] epoch 29 still runs at lr and epoch 30 at lr x decay_rate.")
    decay_rate: float = doc(0.1, "LR multiplier applied at each decay epoch, in (0, 1].")
    warmup_epochs: int = doc(0, "Linear LR warm-up length, epochs, evaluated per step (0 = none, as in the paper).")
    warmup_lr: float = doc(0.0, "LR the warm-up starts from (timm's warmup_lr_init).")
    min_lr: float = doc(0.0, "LR the cosine schedule ends at (timm's lr_min); not read by step.")


@dataclass
class TrainConfig:
    precision: str = doc("auto", 'Autocast dtype: "bf16" | "fp16" (with loss scaling) | "fp32" | '
                                 '"auto" = bf16 on CUDA, fp32 on CPU.')
    channels_last: bool = doc(
        True, "Store activations NHWC (HRNet-C models are built with channels_last=this): faster "
              "convolutions with oneDNN on CPU and with cuDNN under autocast.")
    compile: bool = doc(False, "Wrap the model in torch.compile (slow first steps, faster after).")
    sync_bn: bool = doc(False, "Synchronise BatchNorm statistics across processes (only matters with > 1 process); "
                               "the paper uses per-GPU BN.")
    ema: bool = doc(False, "Keep an exponential moving average of the weights and validate it too.")
    ema_decay: float = doc(0.9998, "EMA decay per optimizer step, in (0, 1); only read when ema is true.")
    label_smoothing: float = doc(0.0, "Cross-entropy label smoothing, in [0, 1); the paper uses none.")
    mixup_alpha: float = doc(0.0, "timm's Mixup: Beta(alpha, alpha) mixing of image pairs on the device (0 = off).")
    cutmix_alpha: float = doc(0.0, "timm's CutMix alpha (0 = off).")
    mixup_prob: float = doc(1.0, "Probability of applying mixup or cutmix to a batch.")
    mixup_switch_prob: float = doc(0.5, "Probability of cutmix instead of mixup when both are on.")
    mixup_mode: str = doc("batch", '"batch" | "pair" | "elem": one draw per batch, per pair, per image.')
    bce_loss: bool = doc(False, "timm's BinaryCrossEntropy on the (mixed) targets instead of cross-entropy, as in "
                                "ResNet Strikes Back; validation loss stays plain cross-entropy.")
    grad_accum_steps: int = doc(1, "Micro-batches per optimizer step (DDP syncs on the last only); the batch the "
                                   "LR and the schedule see is data.batch_size x world size x this.")
    clip_grad: float = doc(0.0, "Clip the gradients' global L2 norm to this (after unscaling under fp16); 0 = off.")
    seed: int = doc(0, "Base random seed; each process adds its rank.")
    log_interval: int = doc(50, "Log training loss, LR and throughput every this many optimizer steps.")
    val_interval: int = doc(1, "Validate every this many epochs (the last epoch is always validated).")
    dist_timeout_s: float = doc(1800.0, "Seconds a collective waits for a missing process (one that died or "
                                        "hangs) before the run fails instead of hanging; torch.distributed's "
                                        "process-group timeout.")


@dataclass
class CheckpointConfig:
    output_dir: str = doc("runs/hrnet_w18_c",
                          "Directory for checkpoints, config.yaml and summary.csv (created if missing).")
    keep: int = doc(3, "Number of most recent epoch_XXXX.pth files kept besides last.pth and best.pth.")
    save_interval: int = doc(0, "Also overwrite last.pth every this many optimizer steps inside an epoch, so a "
                                "killed job resumes at the next batch (0 = save at epoch ends only).")
    save_interval_min: float = doc(
        0.0, "Also overwrite last.pth inside an epoch once this many wall-clock minutes have passed since the last "
             "save (rank 0's clock, agreed by every rank at a step boundary): bounds the work a hard crash loses "
             "on any hardware (0 = off).")
    async_save: bool = doc(True, "Snapshot the state into host memory at a save point and write the files in a "
                                 "background thread while training goes on (one save in flight; a stop, the end "
                                 "and errors wait for it and verify it). False = write before the next step.")
    resume: str = doc("auto", '"auto" = continue from the newest checkpoint in output_dir whose checksum '
                              'verifies, or start when there is none; "" = start a new run (refused if output_dir '
                              "holds one); otherwise a checkpoint path. Resuming takes precedence over "
                              "model.init_from.")


@dataclass
class WandbConfig:
    project: str = doc("hrnet-cls", "W&B project name.")
    entity: str = doc("", 'W&B team or user; "" = the account\'s default entity.')
    mode: str = doc("offline", '"online" | "offline" (write files, sync later) | "disabled". Online without an '
                               "API key or a reachable server degrades to no W&B with one warning; the WANDB_MODE "
                               "environment variable, when set, overrides this.")
    tags: list[str] = doc([], "Free-form run tags.")
    name: str = doc("", 'Run display name; "" = <model name>-<output_dir name>.')


@dataclass
class Config:
    model: ModelConfig = doc(ModelConfig, "Network and its initialisation.")
    data: DataConfig = doc(DataConfig, "Shards, batch sizes and image geometry.")
    optim: OptimConfig = doc(OptimConfig, "SGD hyper-parameters.")
    schedule: ScheduleConfig = doc(ScheduleConfig, "Training length and step LR schedule.")
    train: TrainConfig = doc(TrainConfig, "Numerics, regularisation and logging cadence.")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "Where to save and whether to resume.")
    wandb: WandbConfig = doc(WandbConfig, "Weights & Biases run settings.")

    def __post_init__(self) -> None:
        validate(self)


# section -> dataclass, dotted key -> type, in declaration order (get_type_hints resolves __future__'s strings)
_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_TYPES: dict[str, Any] = {f"{s}.{k}": tp for s, c in _SECTIONS.items() for k, tp in typing.get_type_hints(c).items()}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``optim.lr``, in declaration order."""
    return list(_TYPES)


def field_docs() -> dict[str, str]:
    """Dotted key (or section name) -> the ``doc`` text in its field's metadata."""
    docs = {}
    for section in dataclasses.fields(Config):
        docs[section.name] = section.metadata["doc"]
        for f in dataclasses.fields(section.default_factory):
            docs[f"{section.name}.{f.name}"] = f.metadata["doc"]
    return docs


def _unknown(key: str, candidates: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _wrong_type(key: str, value: Any) -> ConfigError:
    """``key`` may index a list (``schedule.decay_epochs[1]``): the expected type is then the item's."""
    base, _, index = key.partition("[")
    tp = typing.get_args(_TYPES[base])[0] if index else _TYPES[base]
    expected = f"a list of {typing.get_args(tp)[0].__name__}" if typing.get_origin(tp) is list else tp.__name__
    value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    return ConfigError(f"config key '{key}' expects {expected}, got {type(value).__name__} {value!r}")


def _translate(e: Exception, source: str) -> ConfigError:
    """One line naming the dotted key or the source, from OmegaConf's or PyYAML's several."""
    if isinstance(e, yaml.YAMLError):
        problem = getattr(e, "problem", None) or ""
        if problem.startswith("found duplicate key "):  # OmegaConf's loader rejects these, without the file
            line = e.problem_mark.line + 1  # type: ignore[attr-defined]
            return ConfigError(f"duplicate config key '{problem[20:]}' in {source} (line {line})")
        return ConfigError(f"{source}: invalid YAML: {flat(e)}")
    key = str(getattr(e, "full_key", None) or "")
    if isinstance(e, ConfigKeyError) and key:
        return _unknown(key, all_keys() if "." in key else list(_SECTIONS) + all_keys())
    if isinstance(e, ValidationError) and key.partition("[")[0] in _TYPES:
        return _wrong_type(key, e.value)
    first = (str(getattr(e, "msg", None) or e).splitlines() or [type(e).__name__])[0]
    return ConfigError(f"config key '{key}': {first}" if key else f"{source}: {first}")


def _check_strict(raw: dict[str, Any]) -> None:
    """Reject, in parsed but untyped YAML, the values OmegaConf would convert silently."""
    for name, body in raw.items():
        if name in _SECTIONS and not isinstance(body, dict):  # OmegaConf's error names no key
            raise ConfigError(f"config section '{name}' must be a mapping, got {body!r}")
    for key, tp in _TYPES.items():
        section, name = key.split(".")
        body = raw.get(section, {})
        # OmegaConf silently makes 1, "1" or "y" a bool True and false or 5 a str ("False", "5"); a scalar
        # for a list it rejects, but its message shows its wrapper node instead of the value
        expected = typing.get_origin(tp) or tp
        if expected in (bool, str, list) and name in body and not isinstance(body[name], expected):
            raise _wrong_type(key, body[name])


def find_config_file(path_or_name: str) -> Path:
    """Resolve a path, or a bare recipe name looked up in ./configs and the repo's configs/."""
    given = Path(path_or_name)
    names = [given] if given.suffix in (".yaml", ".yml") else [given, given.with_suffix(".yaml")]
    dirs = [Path(), Path("configs"), CONFIG_DIR] if not given.is_absolute() and len(given.parts) == 1 else [Path()]
    for candidate in (d / n for d in dirs for n in names):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(given.stem, known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"config file '{path_or_name}' not found in ., ./configs or {CONFIG_DIR}{hint}")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``section.key=value`` strings -> an untyped DictConfig, values parsed as YAML."""
    conf, given = OmegaConf.create(), {}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:  # OmegaConf would read a bare key as key=null
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        if key in _SECTIONS:
            raise ConfigError(f"override '{item}': '{key}' is a config section; set its keys, e.g. "
                              f"{next(k for k in _TYPES if k.startswith(key + '.'))}=...")
        if key in given:  # the last would silently win
            raise ConfigError(f"override '{key}' given twice ({given[key]!r}, then {text!r}): give it once")
        given[key] = text
        if key not in _TYPES:  # OmegaConf would name only the first unknown part of the key
            raise _unknown(key, all_keys())
        if _TYPES[key] is str:
            # OmegaConf parses the text as YAML and then str()s it ("" -> null, true -> "True",
            # 1e-4 -> "0.0001"); quoting passes it as typed, so output_dir=runs/2024 needs no quotes.
            text = json.dumps(text)
        try:
            conf.merge_with_dotlist([f"{key}={text}"])
        except yaml.YAMLError as e:
            raise _translate(e, f"override '{item}'") from None
    return conf


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> Config:
    """Load a complete YAML recipe, apply dotted overrides, type-check and validate it."""
    path = find_config_file(path_or_name)
    try:
        file_conf = OmegaConf.load(path)  # raises OSError for a document that is a bare number
        if not isinstance(file_conf, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config sections, got {type(file_conf).__name__}")
        raw = OmegaConf.to_container(file_conf)
        _check_strict(raw)
        override_conf = _parse_overrides(overrides)
        _check_strict(OmegaConf.to_container(override_conf))
        merged = OmegaConf.merge(OmegaConf.structured(Config), file_conf, override_conf)
        # OmegaConf fills a missing key with its default, but recipes must spell out every key. Checked
        # after the merge, so that a misspelt key is reported as unknown (with a hint), not as missing.
        for key in all_keys():
            section, name = key.split(".")
            if name not in raw.get(section, {}):
                raise ConfigError(f"missing config key '{key}' in {path} (recipes must be complete)")
        cfg = OmegaConf.to_object(merged)  # real dataclasses, so Config.__post_init__ validates
    except (yaml.YAMLError, OmegaConfBaseException, OSError) as e:
        raise _translate(e, str(path)) from None
    logger.debug("loaded config %s with overrides %s", path, list(overrides))
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of builtins (safe for YAML, W&B and weights_only checkpoints)."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Flow-style lists; quotes strings like '1e-4' that OmegaConf's loader (unlike PyYAML's) reads as floats."""


_Dumper.add_representer(list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def config_to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML text of cfg; with comments, each key is preceded by its documentation."""
    lines: list[str] = []
    docs = field_docs() if comments else {}
    for section, values in config_to_dict(cfg).items():
        lines += [f"# {line}" for line in textwrap.wrap(docs.get(section, ""), 88)]
        lines.append(f"{section}:")
        for key, value in values.items():
            lines += [f"  # {line}" for line in textwrap.wrap(docs.get(f"{section}.{key}", ""), 86)]
            lines.append("  " + yaml.dump({key: value}, Dumper=_Dumper, width=1000).strip())
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically; it loads back with load_config unchanged."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, config_to_yaml(cfg))


def check_model_name(name: str) -> None:
    """Raise ConfigError naming an unregistered timm model and the closest registered names."""
    import timm  # deferred: importing timm costs about a second

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(f"unknown timm model {name!r}{hint}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Reject impossible values and combinations; each message names the key."""
    m, d, o, s, t, c, w = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.checkpoint, cfg.wandb
    _require(m.name != "", "model.name must not be empty")
    _require(m.num_classes >= 1, f"model.num_classes must be >= 1, got {m.num_classes}")
    _require(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    _require(d.train_shards != "", "data.train_shards must not be empty")
    _require(d.val_shards != "", "data.val_shards must not be empty")
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.val_batch_size >= 1, f"data.val_batch_size must be >= 1, got {d.val_batch_size}")
    _require(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    _require(d.img_size >= MIN_IMG_SIZE, f"data.img_size must be >= {MIN_IMG_SIZE} pixels (the lowest stream's "
                                         f"stride), got {d.img_size}")
    _require(0.0 < d.crop_pct <= 1.0, f"data.crop_pct must be in (0, 1], got {d.crop_pct}")
    _require(0.0 <= d.max_bad_fraction <= 1.0, f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
    _validate_augment(d)
    _validate_optim(o)
    _validate_schedule(s, o.lr)
    _validate_train(t)
    mixing = t.mixup_alpha > 0 or t.cutmix_alpha > 0
    _require(not mixing or d.batch_size % 2 == 0,
             f"data.batch_size must be even with train.mixup_alpha / train.cutmix_alpha (timm's Mixup pairs the "
             f"batch), got {d.batch_size}")
    _require(c.output_dir != "", "checkpoint.output_dir must not be empty")
    _require(c.keep >= 0, f"checkpoint.keep must be >= 0, got {c.keep}")
    _require(c.save_interval >= 0, f"checkpoint.save_interval must be >= 0 steps, got {c.save_interval}")
    _require(c.save_interval_min >= 0, f"checkpoint.save_interval_min must be >= 0 minutes, got {c.save_interval_min}")
    _require(w.mode in WANDB_MODES, f"wandb.mode must be one of {WANDB_MODES}, got {w.mode!r}")
    _require(w.mode == "disabled" or w.project != "", "wandb.project must not be empty unless wandb.mode is disabled")


def _validate_augment(d: DataConfig) -> None:
    _require(len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1,
             f"data.scale must be [min, max] with 0 < min <= max <= 1, got {d.scale}")
    _require(len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1],
             f"data.ratio must be [min, max] with 0 < min <= max, got {d.ratio}")
    _require(0.0 <= d.hflip <= 1.0, f"data.hflip must be in [0, 1], got {d.hflip}")
    _require(d.interpolation in INTERPOLATIONS, f"data.interpolation must be one of {INTERPOLATIONS}, "
                                                f"got {d.interpolation!r}")
    _require(d.color_jitter >= 0, f"data.color_jitter must be >= 0, got {d.color_jitter}")
    _require(0.0 <= d.re_prob <= 1.0, f"data.re_prob must be in [0, 1], got {d.re_prob}")
    _require(d.re_mode in RE_MODES, f"data.re_mode must be one of {RE_MODES}, got {d.re_mode!r}")
    _require(d.re_count >= 1, f"data.re_count must be >= 1, got {d.re_count}")
    _require(d.retries >= 0, f"data.retries must be >= 0, got {d.retries}")
    _require(d.read_timeout_s > 0, f"data.read_timeout_s must be > 0 seconds, got {d.read_timeout_s}")
    if d.auto_augment:
        from hrnet_cls.data.augment import build_augment  # deferred: timm's transforms

        try:
            build_augment(d.auto_augment, 0.0, 224, (0.5, 0.5, 0.5), d.interpolation)
        except Exception as e:  # noqa: BLE001 - timm's parser raises assorted errors for a bad policy string
            raise ConfigError(f"data.auto_augment: timm cannot parse {d.auto_augment!r} ({flat(e) or type(e).__name__}); "
                              "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0") from None


def _validate_optim(o: OptimConfig) -> None:
    import timm.optim  # deferred: importing timm costs about a second

    known = ["sgd", *timm.optim.list_optimizers()]
    if o.name not in known:
        close = difflib.get_close_matches(o.name, known, n=3, cutoff=0.6)
        raise ConfigError(f"optim.name: {o.name!r} is not an optimizer timm knows"
                          + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two values in [0, 1), "
                                                                    f"got {o.betas}")
    _require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _require(0.0 <= o.layer_decay <= 1.0, f"optim.layer_decay must be in [0, 1] (0 = off), got {o.layer_decay}")
    _require(0.0 <= o.momentum < 1.0, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")


def _validate_schedule(s: ScheduleConfig, lr: float) -> None:
    _require(s.name in SCHEDULES, f"schedule.name must be one of {SCHEDULES}, got {s.name!r}")
    _require(s.epochs >= 1, f"schedule.epochs must be >= 1, got {s.epochs}")
    _require(0 <= s.warmup_lr <= lr, f"schedule.warmup_lr must be in [0, optim.lr={lr}], got {s.warmup_lr}")
    _require(0 <= s.min_lr <= lr, f"schedule.min_lr must be in [0, optim.lr={lr}], got {s.min_lr}")
    _require(0.0 < s.decay_rate <= 1.0, f"schedule.decay_rate must be in (0, 1], got {s.decay_rate}")
    _require(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    _require(s.warmup_epochs < s.epochs,
             f"schedule.warmup_epochs ({s.warmup_epochs}) must be < schedule.epochs ({s.epochs})")
    steps = s.decay_epochs
    _require(all(e >= 1 for e in steps), f"schedule.decay_epochs must be >= 1, got {steps}")
    _require(all(a < b for a, b in zip(steps, steps[1:])),
             f"schedule.decay_epochs must be strictly increasing, got {steps}")
    _require(not steps or steps[0] >= s.warmup_epochs,
             f"schedule.decay_epochs {steps} starts inside the warm-up (schedule.warmup_epochs={s.warmup_epochs})")
    late = [e for e in steps if e >= s.epochs]
    if late and s.name == "step":
        # Legitimate for a shortened smoke run (schedule.epochs=2), so a warning, not an error.
        logger.warning("schedule.decay_epochs %s are never reached with schedule.epochs=%d", late, s.epochs)


def _validate_train(t: TrainConfig) -> None:
    _require(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    _require(0.0 < t.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    _require(0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _require(t.log_interval >= 1, f"train.log_interval must be >= 1 step, got {t.log_interval}")
    _require(t.val_interval >= 1, f"train.val_interval must be >= 1 epoch, got {t.val_interval}")
    _require(t.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0 seconds, got {t.dist_timeout_s}")
    _require(t.mixup_alpha >= 0, f"train.mixup_alpha must be >= 0, got {t.mixup_alpha}")
    _require(t.cutmix_alpha >= 0, f"train.cutmix_alpha must be >= 0, got {t.cutmix_alpha}")
    _require(0.0 <= t.mixup_prob <= 1.0, f"train.mixup_prob must be in [0, 1], got {t.mixup_prob}")
    _require(0.0 <= t.mixup_switch_prob <= 1.0, f"train.mixup_switch_prob must be in [0, 1], got {t.mixup_switch_prob}")
    _require(t.mixup_mode in MIXUP_MODES, f"train.mixup_mode must be one of {MIXUP_MODES}, got {t.mixup_mode!r}")
    _require(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
    _require(t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = off), got {t.clip_grad}")
