"""Typed training configuration: the dataclasses below are the schema.

A recipe is one complete YAML file in ``configs/`` (every key present, so two recipes
diff side by side); command-line overrides are dotted ``section.key=value`` strings whose
values are parsed as YAML. Unknown keys, missing keys, wrong types and impossible values
raise :class:`ConfigError` with one line naming the full dotted key.

Defaults are the paper recipe (SPEC section 4) for HRNet-W18-C on 8 processes x 32 images.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import logging
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""


@dataclass
class ModelConfig:
    name: str = "hrnet_w18_c"
    """timm model name; must be registered after ``import hrnet_cls``."""
    num_classes: int = 1000
    """Size of the classifier output (classes in the dataset)."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate, probability in [0, 1); the paper uses 0 (no drop path)."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    init_from: str = ""
    """Checkpoint to fine-tune from (ours, timm's or the authors'); "" = random init.
    A classifier whose shape differs (other num_classes) is dropped and re-initialised."""


@dataclass
class DataConfig:
    train_shards: str = "/data/imagenet-wds/train-{000000..001023}.tar"
    """Training webdataset shards: a path or URL with brace ranges."""
    val_shards: str = "/data/imagenet-wds/val-{000000..000063}.tar"
    """Validation webdataset shards: a path or URL with brace ranges."""
    batch_size: int = 32
    """Training images per process per step; global batch = batch_size x world size."""
    val_batch_size: int = 64
    """Validation images per process per step (no gradients, so it can exceed batch_size)."""
    workers: int = 8
    """DataLoader worker processes per training process (0 = load in the main process)."""
    img_size: int = 224
    """Square training crop and evaluation crop side, pixels."""
    crop_pct: float = 0.875
    """Evaluation centre-crop fraction: resize the shorter side to img_size / crop_pct."""


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Peak SGD learning rate for the global batch actually used. Linear scaling rule:
    lr = 0.1 x global_batch / 256 (paper: 0.1 at 256; authors' repo: 0.05 at 4 x 32)."""
    momentum: float = 0.9
    """SGD momentum coefficient, in [0, 1)."""
    nesterov: bool = True
    """Use Nesterov momentum (the paper does); needs momentum > 0."""
    weight_decay: float = 1e-4
    """L2 penalty coefficient added to the gradient by SGD, per step."""
    wd_on_norm_and_bias: bool = True
    """True = decay every parameter (the paper and the authors' code, BN included);
    False = exempt normalisation-layer parameters and biases (chosen by module type)."""


@dataclass
class ScheduleConfig:
    epochs: int = 100
    """Training length, epochs (passes over the training shards)."""
    decay_epochs: list[int] = field(default_factory=lambda: [30, 60, 90])
    """Epochs (0-based) from whose first step the LR is multiplied by decay_rate;
    with [30, 60, 90] epoch 29 still runs at lr and epoch 30 at lr x decay_rate."""
    decay_rate: float = 0.1
    """LR multiplier applied at each decay epoch, in (0, 1]."""
    warmup_epochs: int = 0
    """Linear LR warm-up length, epochs, evaluated per step (0 = none, as in the paper)."""


@dataclass
class TrainConfig:
    precision: str = "auto"
    """Autocast dtype: "bf16" | "fp16" (with loss scaling) | "fp32" |
    "auto" = bf16 on CUDA, fp32 on CPU."""
    channels_last: bool = True
    """Store activations NHWC (HRNet-C models are built with channels_last=this): faster
    convolutions with oneDNN on CPU and with cuDNN under autocast."""
    compile: bool = False
    """Wrap the model in torch.compile (slow first steps, faster after)."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (only matters with > 1 process);
    the paper uses per-GPU BN."""
    ema: bool = False
    """Keep an exponential moving average of the weights and validate it too."""
    ema_decay: float = 0.9998
    """EMA decay per optimizer step, in (0, 1); only read when ema is true."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing, in [0, 1); the paper uses none."""
    seed: int = 0
    """Base random seed; each process adds its rank."""
    log_interval: int = 50
    """Log training loss, LR and throughput every this many optimizer steps."""
    val_interval: int = 1
    """Validate every this many epochs (the last epoch is always validated)."""


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/hrnet_w18_c"
    """Directory for checkpoints, config.yaml and summary.csv (created if missing)."""
    keep: int = 3
    """Number of most recent epoch_XXXX.pth files kept besides last.pth and best.pth."""
    save_interval: int = 0
    """Also overwrite last.pth every this many optimizer steps inside an epoch, so a killed
    job resumes at the next batch (0 = save at epoch ends only)."""
    resume: str = "auto"
    """"" = start fresh; "auto" = newest valid checkpoint in output_dir if any;
    otherwise a checkpoint path. Resuming takes precedence over model.init_from."""


@dataclass
class WandbConfig:
    project: str = "hrnet-cls"
    """W&B project name."""
    entity: str = ""
    """W&B team or user; "" = the account's default entity."""
    mode: str = "offline"
    """"online" | "offline" (write files, sync later) | "disabled". Online without an
    API key or a reachable server degrades to no W&B with one warning; the WANDB_MODE
    environment variable, when set, overrides this."""
    tags: list[str] = field(default_factory=list)
    """Free-form run tags."""
    name: str = ""
    """Run display name; "" = <model name>-<output_dir name>."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network and its initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batch sizes and image geometry."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """SGD hyper-parameters."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Training length and step LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Numerics, regularisation and logging cadence."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where to save and whether to resume."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases run settings."""

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------- schema helpers


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under __future__ annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sections() -> dict[str, type]:
    """Section name -> section dataclass, in declaration order."""
    return _field_types(Config)


@functools.cache
def _all_keys() -> tuple[str, ...]:
    return tuple(f"{s}.{k}" for s, cls in _sections().items() for k in _field_types(cls))


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``optim.lr``, in declaration order."""
    return list(_all_keys())


def _unknown(key: str, candidates: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


# ---------------------------------------------------------------- YAML parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate config key '{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: "1e-4" would load as a string.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from None


# ---------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return value as type tp (int -> float is the only conversion) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    # bool is a subclass of int: never let True pass as 1 or 1 as True.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(
            f"config key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if tp is float else value


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    """Build a Config from a complete, key-checked nested dict (types checked here)."""
    sections = {}
    for name, cls in _sections().items():
        values = {k: _coerce(f"{name}.{k}", raw[name][k], tp) for k, tp in _field_types(cls).items()}
        sections[name] = cls(**values)
    return Config(**sections)


def _check_keys(raw: Any, source: str) -> None:
    """Raise on unknown or missing keys: recipes must be complete."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(raw).__name__}")
    sections = _sections()
    for name, body in raw.items():
        if name not in sections:
            raise _unknown(str(name), list(sections) + all_keys())
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {body!r}")
        for key in body:
            if f"{name}.{key}" not in all_keys():
                raise _unknown(f"{name}.{key}", all_keys())
    for dotted in all_keys():
        name, key = dotted.split(".")
        if name not in raw or key not in raw[name]:
            raise ConfigError(f"missing config key '{dotted}' in {source} (recipes must be complete)")


# ---------------------------------------------------------------- overrides


def _apply_override(raw: dict[str, dict[str, Any]], override: str) -> None:
    """Apply one ``section.key=value`` override to the raw nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        raise _unknown(key, all_keys())
    section, name = key.split(".")
    value = _parse_yaml(text, f"override '{override}'")
    # Strings need no quotes on the command line: output_dir=runs/2024 stays "runs/2024".
    if _field_types(_sections()[section])[name] is str and not isinstance(value, str):
        value = text
    raw[section][name] = value


# ---------------------------------------------------------------- public API


def find_config_file(path_or_name: str) -> Path:
    """Resolve a path, or a bare recipe name looked up in ./configs and the repo's configs/."""
    given = Path(path_or_name)
    names = [given] if given.suffix in (".yaml", ".yml") else [given, given.with_suffix(".yaml")]
    search = [Path.cwd(), Path.cwd() / "configs", CONFIG_DIR]
    candidates = list(names)
    if not given.is_absolute() and len(given.parts) == 1:
        candidates += [d / n for d in search[1:] for n in names]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(given.stem, known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"config file '{path_or_name}' not found in ., ./configs or {CONFIG_DIR}{hint}")


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> Config:
    """Load a complete YAML recipe, apply dotted overrides, type-check and validate it."""
    path = find_config_file(path_or_name)
    raw = _parse_yaml(path.read_text(), str(path))
    _check_keys(raw, str(path))
    for override in overrides:
        _apply_override(raw, override)
    cfg = _build(raw)
    logger.debug("loaded config %s with overrides %s", path, list(overrides))
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "config dict") -> Config:
    """Rebuild a Config from ``config_to_dict`` output (e.g. the one inside a checkpoint)."""
    _check_keys(raw, source)
    return _build(raw)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of builtins (safe for YAML, W&B and weights_only checkpoints)."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists: ``decay_epochs: [30, 60, 90]``."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


@functools.cache
def field_docs() -> dict[str, str]:
    """Dotted key (or section name) -> the docstring written under its field above."""
    tree = ast.parse(Path(__file__).read_text())
    docs: dict[str, str] = {}
    # Config's own fields are the sections; each section class documents its keys.
    owners = {c.__name__: f"{s}." for s, c in _sections().items()} | {"Config": ""}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in owners):
        prefix = owners[cls.name]
        for node, nxt in zip(cls.body, cls.body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[prefix + node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML text of cfg; with comments, each key is preceded by its documentation."""
    lines: list[str] = []
    docs = field_docs() if comments else {}
    for section, values in config_to_dict(cfg).items():
        lines += [f"# {line}" for line in _wrap(docs.get(section, ""), 88)]
        lines.append(f"{section}:")
        for key, value in values.items():
            lines += [f"  # {line}" for line in _wrap(docs.get(f"{section}.{key}", ""), 86)]
            text = yaml.dump({key: value}, Dumper=_Dumper, sort_keys=False, width=1000)
            lines.append("  " + text.strip())
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) if text else []


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; it loads back with load_config unchanged."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_to_yaml(cfg))


def resolve_precision(precision: str, device_type: str) -> str:
    """Map "auto" to bf16 on CUDA / fp32 elsewhere; reject half precision on CPU."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(f"train.precision='fp16' needs a CUDA device, running on {device_type}")
    return precision


def check_model_name(name: str) -> None:
    """Raise ConfigError naming an unregistered timm model and the closest registered names."""
    import timm  # deferred: importing timm costs about a second

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(f"model.name '{name}' is not a registered timm model{hint}")


# ---------------------------------------------------------------- validation


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
    _require(d.img_size >= 8, f"data.img_size must be >= 8 pixels, got {d.img_size}")
    _require(0.0 < d.crop_pct <= 1.0, f"data.crop_pct must be in (0, 1], got {d.crop_pct}")
    _validate_optim(o)
    _validate_schedule(s)
    _validate_train(t)
    _require(c.output_dir != "", "checkpoint.output_dir must not be empty")
    _require(c.keep >= 0, f"checkpoint.keep must be >= 0, got {c.keep}")
    _require(c.save_interval >= 0, f"checkpoint.save_interval must be >= 0 steps, got {c.save_interval}")
    _require(w.mode in WANDB_MODES, f"wandb.mode must be one of {WANDB_MODES}, got {w.mode!r}")
    _require(w.mode == "disabled" or w.project != "", "wandb.project must not be empty unless wandb.mode is disabled")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(0.0 <= o.momentum < 1.0, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")


def _validate_schedule(s: ScheduleConfig) -> None:
    _require(s.epochs >= 1, f"schedule.epochs must be >= 1, got {s.epochs}")
    _require(0.0 < s.decay_rate <= 1.0, f"schedule.decay_rate must be in (0, 1], got {s.decay_rate}")
    _require(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    _require(
        s.warmup_epochs < s.epochs,
        f"schedule.warmup_epochs ({s.warmup_epochs}) must be < schedule.epochs ({s.epochs})",
    )
    steps = s.decay_epochs
    _require(all(e >= 1 for e in steps), f"schedule.decay_epochs must be >= 1, got {steps}")
    _require(
        all(a < b for a, b in zip(steps, steps[1:])),
        f"schedule.decay_epochs must be strictly increasing, got {steps}",
    )
    _require(
        not steps or steps[0] >= s.warmup_epochs,
        f"schedule.decay_epochs {steps} starts inside the warm-up (schedule.warmup_epochs={s.warmup_epochs})",
    )
    late = [e for e in steps if e >= s.epochs]
    if late:
        # Legitimate for a shortened smoke run (schedule.epochs=2), so a warning, not an error.
        logger.warning("schedule.decay_epochs %s are never reached with schedule.epochs=%d", late, s.epochs)


def _validate_train(t: TrainConfig) -> None:
    _require(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    _require(0.0 < t.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    _require(0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _require(t.log_interval >= 1, f"train.log_interval must be >= 1 step, got {t.log_interval}")
    _require(t.val_interval >= 1, f"train.val_interval must be >= 1 epoch, got {t.val_interval}")
