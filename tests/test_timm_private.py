"""The private timm functions hrnet_cls.models.timm_private wraps: fail here, not deep in an export or a
forward_intermediates call, when timm moves or changes them."""
from __future__ import annotations

import inspect

import pytest
import timm

from hrnet_cls.models import timm_private


def test_feature_take_indices_keeps_timms_index_rule() -> None:
    from timm.models._features import feature_take_indices

    assert list(inspect.signature(feature_take_indices).parameters)[:2] == ["num_features", "indices"]
    assert timm_private.feature_take_indices(5, None) == ([0, 1, 2, 3, 4], 4)  # all of them
    assert timm_private.feature_take_indices(5, 2) == ([3, 4], 4)  # the last n
    assert timm_private.feature_take_indices(5, [0, -1]) == ([0, 4], 4)  # negative from the end
    assert timm_private.feature_take_indices(5, [1, 2]) == ([1, 2], 2)


def test_local_dir_config_reads_a_folder_as_create_model_does(tmp_path) -> None:
    from timm.models._hub import load_model_config_from_path

    assert list(inspect.signature(load_model_config_from_path).parameters) == ["model_path"]
    model = timm.create_model("resnet10t", num_classes=3)
    timm.models.save_for_hf(model, str(tmp_path), model_config={"label_names": ["a", "b", "c"]},
                            safe_serialization=True, data_config={"img_size": 96, "crop_pct": 0.5})
    cfg, architecture = timm_private.local_dir_config(tmp_path)
    assert architecture == "resnet10t"
    assert cfg["num_classes"] == 3 and list(cfg["label_names"]) == ["a", "b", "c"]
    assert tuple(cfg["input_size"]) == (3, 96, 96) and cfg["crop_pct"] == 0.5 and cfg["source"] == "local-dir"
    created = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).pretrained_cfg
    assert {k: created[k] for k in ("num_classes", "crop_pct")} == {k: cfg[k] for k in ("num_classes", "crop_pct")}
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError):
        timm_private.local_dir_config(tmp_path)


def test_no_other_module_imports_timms_private_modules() -> None:
    import pathlib

    package = pathlib.Path(timm_private.__file__).parent
    private = [p.name for p in package.rglob("*.py") if p.name != "timm_private.py"
               and any(f"timm.models._{m}" in p.read_text() for m in ("hub", "registry", "features", "builder"))]
    assert private == []
