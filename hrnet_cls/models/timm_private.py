"""The private timm functions this project needs (timm has no public equivalent), each behind one
name here: a model folder's config.json read as ``timm.create_model('local-dir:FOLDER')`` reads
it, and forward_intermediates' index rule. tests/test_timm_private.py fails when timm changes them.
"""
from __future__ import annotations

import os
from typing import Any

# feature_take_indices(n, indices): (feature indices to return, the largest one) for indices = last-n (int),
# a list (negative from the end) or None (all of them): timm's rule for forward_intermediates
from timm.models._features import feature_take_indices
from timm.models._hub import load_model_config_from_path as _load_model_config_from_path

__all__ = ["feature_take_indices", "local_dir_config"]


def local_dir_config(folder: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(pretrained_cfg, architecture) of a timm model folder, parsed as timm.create_model parses
    ``local-dir:FOLDER``'s config.json (top-level num_classes and label_names folded in)."""
    pretrained_cfg, architecture, _ = _load_model_config_from_path(folder)
    return pretrained_cfg, architecture
