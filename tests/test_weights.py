"""hrnet_cls.models.weights: one reader for every weights file, strict loading, the explicit head reset."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import same_weights as same, tiny_model
from hrnet_cls.train.state import Position, build_state, save_checkpoint
from hrnet_cls.config import Config, config_to_dict
from hrnet_cls.train.optim import build_optimizer
from hrnet_cls.models.weights import init_from, load_strict, pick_state_dict, read_file, read_state_dict, reset_mismatched_head


def tiny(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    return tiny_model(num_classes, seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One model's weights in every layout the project reads, and an EMA that differs."""
    root = tmp_path_factory.mktemp("weights")
    model, ema = tiny(seed=0), tiny(seed=1)
    sd = model.state_dict()
    torch.save(sd, root / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "model": "cls_hrnet", "epoch": 100},
               root / "authors.pth")
    torch.save({"state_dict": sd, "state_dict_ema": ema.state_dict()}, root / "timm_train.pth.tar")
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "model.safetensors")
    save_checkpoint(root / "ours.pth", build_state(model=model, optimizer=build_optimizer(model, Config().optim),
                                                   position=Position(1, 1, 0),
                                                   config=config_to_dict(Config()), model_ema=ema))
    return {"root": root, "model": sd, "ema": ema.state_dict()}


@pytest.mark.parametrize("name", ["plain.pth", "authors.pth", "timm_train.pth.tar", "model.safetensors", "ours.pth"])
def test_every_layout_reads_to_the_same_weights_as_timm(files, name: str) -> None:
    path = files["root"] / name
    assert same(read_state_dict(path), files["model"])
    probe = tiny(seed=5)  # timm's own loader, asked for the raw weights, agrees
    timm.models.load_checkpoint(probe, str(path), use_ema=False)
    assert same(probe.state_dict(), files["model"])


@pytest.mark.parametrize("name", ["timm_train.pth.tar", "ours.pth"])
def test_ema_is_picked_when_asked(files, name: str) -> None:
    assert same(read_state_dict(files["root"] / name, use_ema=True), files["ema"])


def test_asking_for_ema_that_is_not_there_is_an_error(files) -> None:
    with pytest.raises(ValueError, match="no EMA weights"):
        read_state_dict(files["root"] / "plain.pth", use_ema=True)
    with pytest.raises(ValueError, match="no state dict found"):
        pick_state_dict({"epoch": 3})
    with pytest.raises(FileNotFoundError, match="nope.pth: no such file"):
        read_file(files["root"] / "nope.pth")


def test_strict_loading_names_every_kind_of_misfit(files) -> None:
    load_strict(tiny(seed=3), files["model"])  # fits
    with pytest.raises(ValueError, match=r"classifier.weight: file \[10, 256\], model \[7, 256\]"):
        load_strict(tiny(num_classes=7), files["model"])
    fewer = {k: v for k, v in files["model"].items() if not k.startswith("conv1.")}
    with pytest.raises(ValueError, match="tensors missing .e.g. conv1.weight"):
        load_strict(tiny(), fewer)
    with pytest.raises(ValueError, match="1 unexpected tensors .e.g. extra"):
        load_strict(tiny(), {**files["model"], "extra": torch.zeros(1)})
    without_counters = {k: v for k, v in files["model"].items() if not k.endswith("num_batches_tracked")}
    load_strict(tiny(), without_counters)  # BN batch counters are not needed


def test_fine_tuning_resets_only_a_classifier_of_another_shape(files) -> None:
    target = tiny(num_classes=7, seed=4)
    head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("classifier.")}
    assert sorted(init_from(target, files["root"] / "authors.pth")) == sorted(head)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in head.items())  # kept its fresh initialisation
    assert all(torch.equal(after[k], files["model"][k]) for k in after if k not in head)
    assert init_from(tiny(seed=6), files["root"] / "ours.pth") == []  # same classes: nothing reset
    features = timm.create_model("hrnet_tiny_c", num_classes=0)
    weights, dropped = reset_mismatched_head(features, files["model"])
    assert sorted(dropped) == sorted(head) and not any(k.startswith("classifier.") for k in weights)


def test_fine_tuning_still_rejects_another_architecture(files) -> None:
    other = dict(files["model"])
    key = next(k for k, v in other.items() if v.dim() == 4)
    other[key] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="tensors of another shape"):
        load_strict(tiny(), reset_mismatched_head(tiny(), other)[0])
    with pytest.raises(ValueError, match="do not fit"):
        load_strict(tiny(), {"foo.weight": torch.zeros(3)})
