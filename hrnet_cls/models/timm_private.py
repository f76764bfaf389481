"""The private timm functions this project needs, one name each; tests/test_timm_private.py fails if they change."""
from __future__ import annotations

import os
from typing import Any

from timm.models._features import feature_take_indices
from timm.models._hub import load_model_config_from_path as _load_model_config_from_path

__all__ = ["feature_take_indices", "local_dir_config"]


def local_dir_config(folder: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(pretrained_cfg, architecture) of a model folder's config.json, parsed as timm's ``local-dir:`` is."""
    pretrained_cfg, architecture, _ = _load_model_config_from_path(folder)
    return pretrained_cfg, architecture
