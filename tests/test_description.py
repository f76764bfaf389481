"""hrnet_cls.models.description: one description of a model from a recipe, a checkpoint, a name or a folder,
and the one place that builds it and loads its weights."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DIGITS, tiny_model
from hrnet_cls.config import config_to_dict, load_config
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from hrnet_cls.models.description import ModelDescription, classes_in, create_model, is_checkpoint

CLASS_NAMES = json.loads((DIGITS / "_info.json").read_text())["class_names"]


def demo(**changes) -> dict:
    config = config_to_dict(load_config("demo_digits.yaml"))
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_a_recipe_and_its_saved_dict_describe_the_same_model() -> None:
    cfg = load_config("demo_digits.yaml", ["data.img_size=48", "data.crop_pct=0.9", "train.precision=fp32"])
    card = ModelDescription.from_config(cfg)
    assert card == ModelDescription.from_config(config_to_dict(cfg))
    assert (card.model, card.num_classes, card.img_size, card.crop_pct) == (cfg.model.name, 10, 48, 0.9)
    assert (card.interpolation, card.mean, card.std, card.crop_mode) == (
        "bilinear", tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "center")  # the training pipeline's
    assert card.precision == "fp32" and card.label_source == cfg.data.train_shards and card.label_names == ()
    assert card.data_config() == {"img_size": 48, "crop_pct": 0.9, "interpolation": "bilinear",
                                  "mean": card.mean, "std": card.std, "crop_mode": "center"}


def test_a_checkpoint_names_its_model_and_falls_back_on_the_classifier_and_the_registry() -> None:
    weights = tiny_model(7).state_dict()
    config = demo(model__num_classes=0, data__img_size=0, data__crop_pct=0.0)
    card = ModelDescription.from_checkpoint({"config": config, "model_name": "hrnet_tiny_c"}, weights)
    assert (card.model, card.num_classes) == ("hrnet_tiny_c", 7)  # model_name wins, classes from the classifier
    assert (card.img_size, card.crop_pct) == (32, 1.0)  # hrnet_tiny_c's pretrained_cfg: as the demo trains
    assert ModelDescription.from_checkpoint({"config": config, "model_name": "hrnet_tiny_c"}).num_classes == 1000
    with pytest.raises(ValueError, match="names no model"):
        ModelDescription.from_checkpoint({"config": demo(model__name="")})
    with pytest.raises(ValueError, match="unknown timm model 'hrnet_nosuch_c'"):
        ModelDescription.from_checkpoint({"model_name": "hrnet_nosuch_c"})
    assert is_checkpoint({"config": {}}) and is_checkpoint({"model_name": "x"}) and not is_checkpoint(weights)


def test_a_name_gives_timms_preprocessing_and_classes_from_a_weights_file() -> None:
    card = ModelDescription.from_name("hrnet_w18_small_c.gluon_in1k")
    assert (card.num_classes, card.img_size, card.crop_pct, card.interpolation) == (1000, 224, 0.875, "bicubic")
    fc = {"fc.weight": torch.zeros(3, 8), "fc.bias": torch.zeros(3)}
    assert ModelDescription.from_name("resnet10t", fc).num_classes == 3
    assert ModelDescription.from_name("hrnet_tiny_c", {"other.weight": torch.zeros(3, 8)}).num_classes == 1000
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        ModelDescription.from_name("local-dir:/nowhere/at/all")


def test_classes_in_reads_the_classifier_rows() -> None:
    weights = {"head.fc.weight": torch.zeros(5, 4), "fc.weight": torch.zeros(3, 4), "scalar.weight": torch.tensor(1.0)}
    assert classes_in(weights, "fc") == 3 and classes_in(weights, ("head.fc", "fc")) == 5
    assert classes_in(weights, ["missing", "fc"]) == 3 and classes_in(weights, None) == 0
    assert classes_in(weights, "scalar") == 0 and classes_in({}, "fc") == 0


def test_labels_come_from_the_training_shards_when_they_fit() -> None:
    card = ModelDescription.from_config(demo(data__train_shards=str(DIGITS / "train-{000000..000003}.tar")))
    names, note = card.labels()
    assert names == CLASS_NAMES and note.startswith("label names: 10 class names from the _info.json of ")
    names, note = ModelDescription.from_config(demo(data__train_shards=str(DIGITS / "train-000000.tar"),
                                             model__num_classes=7)).labels()
    assert names is None and "lists 10 class names, the model has 7 classes" in note
    assert ModelDescription.from_config(demo(data__train_shards="")).labels() == (
        None, "no label names: the checkpoint's config names no data.train_shards")
    assert ModelDescription("resnet10t", 2, 224, 0.9, label_names=("a", "b")).labels()[0] == ["a", "b"]


def test_create_model_layout_only_for_hrnet_c_and_strict_weights(tmp_path) -> None:
    tiny, resnet = ModelDescription.from_name("hrnet_tiny_c"), ModelDescription("resnet10t", 4, 64, 0.9)
    assert create_model(tiny, channels_last=False).channels_last is False
    assert create_model(tiny).channels_last is True  # HRNet-C's default
    assert create_model(resnet, channels_last=True).num_classes == 4  # no such argument for resnet: not passed
    source = tiny_model(10, seed=1)
    card = ModelDescription("hrnet_tiny_c", 10, 32, 1.0)
    built = create_model(card, source.state_dict(), drop_path_rate=0.1)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="another shape"):
        create_model(ModelDescription("hrnet_tiny_c", 7, 32, 1.0), source.state_dict())
    torch.save(source.state_dict(), tmp_path / "ten.pth")  # fine-tuning: a 7-class model from 10-class weights
    tuned = create_model(ModelDescription("hrnet_tiny_c", 7, 32, 1.0), init_from=str(tmp_path / "ten.pth"))
    assert tuned.num_classes == 7 and torch.equal(tuned.conv1.weight, source.conv1.weight)
