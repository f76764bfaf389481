"""Config schema: loading, overrides, and one test per class of error."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from hrnet_cls.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    all_keys,
    check_model_name,
    config_from_dict,
    config_to_dict,
    field_docs,
    load_config,
    resolve_precision,
    save_config,
)

RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))
PAPER_RECIPES = [p for p in RECIPES if p.stem != "demo_digits"]


def write_recipe(tmp_path: Path, edit=None) -> Path:
    """A complete recipe (the defaults), optionally edited as a nested dict."""
    raw = config_to_dict(Config())
    if edit:
        edit(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path: Path) -> None:
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    if path in PAPER_RECIPES:
        # file name is the model name, and the recipe is the paper's (SPEC section 4)
        assert cfg.model.name == path.stem
        assert (cfg.schedule.epochs, cfg.schedule.decay_epochs, cfg.schedule.decay_rate) == (100, [30, 60, 90], 0.1)
        assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.momentum, cfg.optim.nesterov) == (0.1, 32, 0.9, True)
        assert cfg.optim.weight_decay == 1e-4 and cfg.optim.wd_on_norm_and_bias
        assert (cfg.data.img_size, cfg.data.crop_pct, cfg.train.label_smoothing) == (224, 0.875, 0.0)
        assert "Expected top-1" in path.read_text()


def test_paper_recipes_cover_the_family() -> None:
    names = {p.stem for p in PAPER_RECIPES}
    assert names == {
        "hrnet_w18_c", "hrnet_w30_c", "hrnet_w32_c", "hrnet_w40_c", "hrnet_w48_c", "hrnet_w64_c",
        "hrnet_w44_c", "hrnet_w76_c", "hrnet_w96_c", "hrnet_w44_c_basic",
        "hrnet_w18_small_c", "hrnet_w18_small_v2_c",
    }


def test_demo_recipe_points_at_existing_shards() -> None:
    import braceexpand

    cfg = load_config("demo_digits")
    assert (cfg.model.name, cfg.model.num_classes, cfg.data.img_size) == ("hrnet_tiny_c", 10, 32)
    repo = CONFIG_DIR.parent
    for pattern in (cfg.data.train_shards, cfg.data.val_shards):
        files = [repo / f for f in braceexpand.braceexpand(pattern)]
        assert files and all(f.is_file() for f in files), pattern


def test_bare_name_is_found_in_configs_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repo: the package-relative configs/ is used
    assert load_config("hrnet_w44_c").model.name == "hrnet_w44_c"
    assert load_config("hrnet_w44_c.yaml").model.name == "hrnet_w44_c"


def test_missing_recipe_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"'hrnet_w44c' not found.*did you mean hrnet_w44_c"):
        load_config("hrnet_w44c")


def test_overrides_are_parsed_and_typed(tmp_path) -> None:
    cfg = load_config(
        str(write_recipe(tmp_path)),
        [
            "schedule.epochs=2", "data.batch_size=64", "schedule.decay_epochs=[1,2]",
            "wandb.tags=[a,b]", "optim.weight_decay=5e-5", "optim.lr=1",
            "checkpoint.output_dir=runs/2024", "wandb.entity=", "train.compile=true",
        ],
    )
    assert cfg.schedule.epochs == 2 and cfg.data.batch_size == 64
    assert cfg.schedule.decay_epochs == [1, 2] and cfg.wandb.tags == ["a", "b"]
    assert cfg.optim.weight_decay == 5e-5 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.checkpoint.output_dir == "runs/2024"  # a str field keeps the raw text
    assert cfg.wandb.entity == "" and cfg.train.compile is True


def test_yaml_1e_minus_4_is_a_float(tmp_path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("weight_decay: 0.0001", "weight_decay: 1e-4"))
    assert load_config(str(path)).optim.weight_decay == 1e-4


def test_unknown_key_in_override_suggests_closest(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)$"):
        load_config(str(write_recipe(tmp_path)), ["optim.lrr=0.2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optm\.lr' \(did you mean 'optim\.lr'\?\)"):
        load_config(str(write_recipe(tmp_path)), ["optm.lr=0.2"])


def test_unknown_key_in_yaml_suggests_closest(tmp_path) -> None:
    path = write_recipe(tmp_path, lambda raw: raw["schedule"].update(decay_epoch=[1]))
    message = r"unknown config key 'schedule\.decay_epoch' \(did you mean 'schedule\.decay_epochs'\?\)"
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    path = write_recipe(tmp_path, lambda raw: raw.update(optimizer={}))
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer' \(did you mean 'optim'\?\)"):
        load_config(str(path))


def test_missing_key_is_named(tmp_path) -> None:
    path = write_recipe(tmp_path, lambda raw: raw["optim"].pop("nesterov"))
    with pytest.raises(ConfigError, match=r"missing config key 'optim\.nesterov'"):
        load_config(str(path))


def test_duplicate_key_is_an_error(tmp_path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("  epochs: 100\n", "  epochs: 100\n  epochs: 90\n"))
    with pytest.raises(ConfigError, match=r"duplicate config key 'epochs'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=32.5", r"'data\.batch_size' expects int, got float 32\.5"),
        ("data.batch_size=true", r"'data\.batch_size' expects int, got bool"),
        ("optim.nesterov=1", r"'optim\.nesterov' expects bool, got int 1"),
        ("optim.lr=fast", r"'optim\.lr' expects float, got str 'fast'"),
        ("schedule.decay_epochs=30", r"'schedule\.decay_epochs' expects a list of int"),
        ("schedule.decay_epochs=[30,6.5]", r"'schedule\.decay_epochs\[1\]' expects int"),
        ("optim.lr", r"override 'optim\.lr' is not of the form section\.key=value"),
        ("optim=3", r"unknown config key 'optim'"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(str(write_recipe(tmp_path)), [override])


def test_wrong_type_in_yaml(tmp_path) -> None:
    path = write_recipe(tmp_path, lambda raw: raw["train"].update(seed="zero"))
    with pytest.raises(ConfigError, match=r"'train\.seed' expects int, got str 'zero'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", r"optim\.lr must be > 0"),
        ("optim.lr=-0.1", r"optim\.lr must be > 0"),
        ("data.batch_size=0", r"data\.batch_size must be >= 1"),
        ("schedule.epochs=0", r"schedule\.epochs must be >= 1"),
        ("schedule.decay_epochs=[60,30]", r"schedule\.decay_epochs must be strictly increasing"),
        ("schedule.decay_epochs=[30,30]", r"schedule\.decay_epochs must be strictly increasing"),
        ("schedule.decay_epochs=[0,30]", r"schedule\.decay_epochs must be >= 1"),
        ("schedule.warmup_epochs=100", r"schedule\.warmup_epochs \(100\) must be < schedule\.epochs"),
        ("schedule.warmup_epochs=40", r"schedule\.decay_epochs \[30, 60, 90\] starts inside the warm-up"),
        ("schedule.decay_rate=0", r"schedule\.decay_rate must be in \(0, 1\]"),
        ("train.precision=fp8", r"train\.precision must be one of"),
        ("train.ema_decay=1.0", r"train\.ema_decay must be in \(0, 1\)"),
        ("train.label_smoothing=1.0", r"train\.label_smoothing must be in \[0, 1\)"),
        ("optim.momentum=0", r"optim\.nesterov needs optim\.momentum > 0"),
        ("data.crop_pct=1.2", r"data\.crop_pct must be in \(0, 1\]"),
        ("checkpoint.keep=-1", r"checkpoint\.keep must be >= 0"),
        ("wandb.mode=cloud", r"wandb\.mode must be one of"),
        ("model.drop_path_rate=1.0", r"model\.drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_impossible_values_are_rejected(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(str(write_recipe(tmp_path)), [override])


def test_momentum_zero_is_fine_without_nesterov(tmp_path) -> None:
    cfg = load_config(str(write_recipe(tmp_path)), ["optim.momentum=0", "optim.nesterov=false"])
    assert cfg.optim.momentum == 0.0


def test_unreached_decay_epochs_only_warn(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.config"):
        cfg = load_config(str(write_recipe(tmp_path)), ["schedule.epochs=2"])
    assert cfg.schedule.epochs == 2
    assert "never reached" in caplog.text


def test_save_then_load_round_trips(tmp_path) -> None:
    cfg = load_config("hrnet_w44_c", ["optim.lr=0.05", "wandb.tags=[x]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_field_is_documented() -> None:
    docs = field_docs()
    undocumented = [k for k in all_keys() if not docs.get(k)]
    assert undocumented == []


def test_resolve_precision() -> None:
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision='fp16' needs a CUDA device"):
        resolve_precision("fp16", "cpu")


def test_check_model_name_suggests_registered_models() -> None:
    check_model_name("resnet10t")
    message = r"model\.name 'resnet10x' is not a registered timm model \(did you mean .*'resnet10t'"
    with pytest.raises(ConfigError, match=message):
        check_model_name("resnet10x")
