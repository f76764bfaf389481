"""Config schema: loading, overrides, and one test per class of error."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from hrnet_cls.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    all_keys,
    check_model_name,
    config_to_dict,
    config_to_yaml,
    field_docs,
    load_config,
    save_config,
)
from hrnet_cls.models.hrnet_c import VARIANTS
from hrnet_cls.precision import Precision, resolve

RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))
PAPER_RECIPES = [p for p in RECIPES if p.stem not in ("demo_digits", "hrnet_w18_c_a2")]  # the a2 recipe is not the paper's


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
        # file name is the model name, and the recipe is the paper's
        assert cfg.model.name == path.stem
        assert (cfg.schedule.epochs, cfg.schedule.decay_epochs, cfg.schedule.decay_rate) == (100, [30, 60, 90], 0.1)
        assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.momentum, cfg.optim.nesterov) == (0.1, 32, 0.9, True)
        assert cfg.optim.weight_decay == 1e-4 and cfg.optim.wd_on_norm_and_bias
        assert (cfg.data.img_size, cfg.data.crop_pct, cfg.train.label_smoothing) == (224, 0.875, 0.0)
        assert "Expected top-1" in path.read_text()


def test_paper_recipes_cover_the_family() -> None:
    names = {p.stem for p in PAPER_RECIPES}
    assert names == {name for name in VARIANTS if name != "hrnet_tiny_c"}


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
        ("optim=3", r"override 'optim=3': 'optim' is a config section; set its keys"),
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
    # config_to_dict output (what a checkpoint stores) written as plain YAML loads back too
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(str(tmp_path / "plain.yaml")) == cfg


def test_every_field_is_documented() -> None:
    docs = field_docs()
    undocumented = [k for k in all_keys() if not docs.get(k)]
    assert undocumented == []


def test_resolve_precision() -> None:
    assert resolve("auto", "cuda") == "bf16"
    assert resolve("auto", "cpu") == "fp32"
    assert resolve("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision 'fp16' needs a CUDA device"):
        resolve("fp16", "cpu")
    fp32 = Precision.of("fp32", "cpu")
    assert not fp32.grad_scaler().is_enabled() and not fp32.autocast()._enabled
    bf16 = Precision.of("bf16", "cpu")
    with bf16.autocast():
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype == torch.bfloat16


def test_check_model_name_suggests_registered_models() -> None:
    check_model_name("resnet10t")
    message = r"unknown timm model 'resnet10x' \(did you mean .*'resnet10t'"
    with pytest.raises(ConfigError, match=message):
        check_model_name("resnet10x")


# ---------------------------------------------------------------- OmegaConf layer


def test_field_docs_come_from_field_metadata() -> None:
    import dataclasses

    docs = field_docs()
    for section in dataclasses.fields(Config):
        assert docs[section.name] == section.metadata["doc"]
        for f in dataclasses.fields(section.default_factory):
            assert docs[f"{section.name}.{f.name}"] == f.metadata["doc"] != ""
    assert set(docs) == set(all_keys()) | {f.name for f in dataclasses.fields(Config)}


def _generate_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_recipes", CONFIG_DIR / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def test_committed_recipes_are_what_generate_py_writes() -> None:
    recipes = _generate_py().recipes()  # derived from the schema and hrnet_c.VARIANTS
    assert sorted(recipes) == [p.name for p in RECIPES]
    for name, text in recipes.items():
        assert (CONFIG_DIR / name).read_text() == text, f"configs/{name} differs from generate.py's output"


def test_readme_model_table_is_the_variant_table() -> None:
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    assert _generate_py().readme_table() in readme, "README's model table differs: configs/generate.py --readme-table"


def test_duplicate_key_names_file_and_line(tmp_path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("  lr: 0.1\n", "  lr: 0.1\n  lr: 0.2\n"))
    line = path.read_text().splitlines().index("  lr: 0.2") + 1
    with pytest.raises(ConfigError, match=rf"^duplicate config key 'lr' in {path} \(line {line}\)$"):
        load_config(str(path))
    path = write_recipe(tmp_path)
    path.write_text(path.read_text() + "optim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"duplicate config key 'optim'"):
        load_config(str(path))


def test_exponent_floats_without_a_dot(tmp_path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("lr: 0.1", "lr: 2e-1"))
    cfg = load_config(str(path), ["optim.weight_decay=5e-5"])
    assert cfg.optim.lr == 0.2 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 5e-5 and isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize(
    "section, key, text, message",
    [
        ("optim", "nesterov", "1", r"'optim\.nesterov' expects bool, got int 1"),
        ("optim", "nesterov", "'y'", r"'optim\.nesterov' expects bool, got str 'y'"),
        ("data", "batch_size", "true", r"'data\.batch_size' expects int, got bool True"),
        ("data", "batch_size", "0.5", r"'data\.batch_size' expects int, got float 0\.5"),
        ("data", "batch_size", "32.0", r"'data\.batch_size' expects int, got float 32\.0"),
        ("optim", "lr", "true", r"'optim\.lr' expects float, got bool True"),
        ("optim", "lr", "[0.1]", r"'optim\.lr' expects float, got list \[0\.1\]"),
        ("checkpoint", "resume", "false", r"'checkpoint\.resume' expects str, got bool False"),
        ("model", "name", "5", r"'model\.name' expects str, got int 5"),
        ("schedule", "decay_epochs", "30", r"'schedule\.decay_epochs' expects a list of int, got int 30"),
        ("schedule", "decay_epochs", "[30, true]", r"'schedule\.decay_epochs\[1\]' expects int, got bool True"),
        ("optim", "lr", "", r"'optim\.lr' expects float, got NoneType None"),
    ],
)
def test_yaml_types_are_strict(tmp_path, section: str, key: str, text: str, message: str) -> None:
    lines = config_to_yaml(Config()).splitlines()  # one line per key, lists in flow style
    start = lines.index(f"{section}:")
    i = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {key}:"))
    lines[i] = f"  {key}: {text}"
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_string_overrides_keep_the_text_as_typed(tmp_path) -> None:
    cfg = load_config(
        str(write_recipe(tmp_path)),
        ["wandb.name=1e-4", "wandb.project=true", "wandb.entity=123", "model.init_from=a b: c", " wandb.tags = [x]"],
    )
    assert (cfg.wandb.name, cfg.wandb.project, cfg.wandb.entity) == ("1e-4", "true", "123")
    assert cfg.model.init_from == "a b: c" and cfg.wandb.tags == ["x"]


def test_an_override_given_twice_is_refused_not_silently_the_last(tmp_path) -> None:
    """As Hydra refuses one: a job script that appends its own value after the user's would else win unseen."""
    with pytest.raises(ConfigError, match=r"^override 'optim.lr' given twice \('0.2', then '0.3'\): give it once$"):
        load_config(str(write_recipe(tmp_path)), ["optim.lr=0.2", "optim.lr=0.3"])
    cfg = load_config(str(write_recipe(tmp_path)), ["optim.lr=0.3", "wandb.tags=[c]"])
    assert cfg.optim.lr == 0.3 and cfg.wandb.tags == ["c"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim: 3\n", r"^config section 'optim' must be a mapping, got 3$"),
        ("optim: [\n", r"recipe\.yaml: invalid YAML: .*line 2"),
        ("- 1\n", r"recipe\.yaml: expected a mapping of config sections, got ListConfig$"),
        ("42\n", r"recipe\.yaml: "),
        ("", r"missing config key 'model\.name'"),
    ],
)
def test_malformed_files_give_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


def test_misspelt_key_is_reported_as_unknown_not_missing(tmp_path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("  lr: 0.1\n", "  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)$"):
        load_config(str(path))


def test_invalid_yaml_in_override_names_it(tmp_path) -> None:
    message = r"^override 'schedule\.decay_epochs=\[1': invalid YAML: .*expected ',' or '\]'"
    with pytest.raises(ConfigError, match=message):
        load_config(str(write_recipe(tmp_path)), ["schedule.decay_epochs=[1"])


def test_dump_then_load_round_trips_awkward_values(tmp_path) -> None:
    cfg = load_config("demo_digits", [
        "wandb.name=1e-4", "wandb.entity=true", "wandb.project=123", "model.init_from=a: b, [c]",
        "wandb.tags=['1e5', 'x, y', '']", "schedule.decay_epochs=[]", "optim.weight_decay=1e-5",
    ])
    text = config_to_yaml(cfg)
    assert "  decay_epochs: []\n" in text and "  weight_decay: 1.0e-05\n" in text
    save_config(cfg, tmp_path / "config.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # the temp file was renamed into place
    assert (tmp_path / "config.yaml").read_text() == text
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    (tmp_path / "bare.yaml").write_text(config_to_yaml(cfg, comments=False))
    assert "#" not in (tmp_path / "bare.yaml").read_text()
    assert load_config(str(tmp_path / "bare.yaml")) == cfg


def test_config_to_dict_is_plain_builtins() -> None:
    def check(value) -> None:
        assert type(value) in (dict, list, str, int, float, bool), type(value)
        for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            check(v)

    raw = config_to_dict(load_config("hrnet_w18_c"))
    check(raw)
    assert list(raw) == ["model", "data", "optim", "schedule", "train", "checkpoint", "wandb"]


def test_config_module_is_free_of_ast_and_spec() -> None:
    import hrnet_cls.config as config

    source = Path(config.__file__).read_text()
    assert "import ast" not in source and "SPEC" not in source
    assert not hasattr(config, "config_from_dict")
