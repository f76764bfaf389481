"""What HRNet-C exposes as features: the two ``feature_location`` values (as timm's ``hrnet_wXX``) and HRNetV2.

Taps, channels and strides of each: docs/design.md §1.5."""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timm_private import feature_take_indices

__all__ = ['FEATURE_LOCATIONS', 'check_feature_location', 'feature_info', 'hrnetv2_concat', 'hrnetv2_features',
           'take_indices']

FEATURE_LOCATIONS = ('incre', '')


def check_feature_location(location: str) -> str:
    if location not in FEATURE_LOCATIONS:
        raise ValueError(f"feature_location={location!r} is invalid: must be 'incre' (the default) or ''")
    return location


def feature_info(stem_chs: int, stream_chs: Sequence[int], head_chs: Sequence[int], location: str,
                 stem_stride: int = 4) -> List[Dict[str, Any]]:
    """timm's feature_info for one feature location: the stem (stride 2), then four taps at strides 4-32."""
    if check_feature_location(location) == 'incre':
        taps = [(c, f'incre_modules.{i}') for i, c in enumerate(head_chs)]
    else:
        taps = [(c, f'streams.{i}') for i, c in enumerate(stream_chs)]
    return [dict(num_chs=stem_chs, reduction=2, module='act1')] + [
        dict(num_chs=c, reduction=stem_stride << i, module=name) for i, (c, name) in enumerate(taps)]


def take_indices(n: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's feature_take_indices, with a ValueError naming out_indices / indices when out of range."""
    if isinstance(indices, int) and not 0 < indices <= n:
        raise ValueError(f'out_indices / indices={indices} out of range: last-n must be 1..{n}')
    if isinstance(indices, (list, tuple)) and any(not -n <= i < n for i in indices):
        raise ValueError(f'out_indices / indices={list(indices)} out of range: features are 0..{n - 1}')
    return feature_take_indices(n, indices)


def hrnetv2_concat(streams: Sequence[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
    """Upsample streams 1-3 bilinearly to stream 0's size and concatenate along channels (stream 0 first)."""
    size = streams[0].shape[-2:]
    up = [F.interpolate(s, size=size, mode='bilinear', align_corners=align_corners) for s in streams[1:]]
    return torch.cat([streams[0], *up], dim=1)


def hrnetv2_features(model: nn.Module, x: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """The HRNetV2 representation of x (docs/design.md §1.5): (B, 15C, H/4, W/4), 270 channels for W18.

    model: an HRNet-C model (only its trunk runs), or a ``features_only=True, feature_location=''`` one whose
    out_indices cover 1-4. align_corners: False as in mmsegmentation; the authors' older configs used True."""
    if hasattr(model, 'forward_streams'):
        streams = model.forward_streams(model.forward_stem(x))
    else:
        info = getattr(model, 'feature_info', None)
        names = info.module_name() if info is not None else []
        streams = [f for f, name in zip(model(x), names) if name.startswith('streams.')]
        if len(streams) != 4:
            raise ValueError(f"hrnetv2_features needs the 4 raw streams: a features_only model built with "
                             f"feature_location='' and out_indices covering 1-4 (it returns {names})")
    return hrnetv2_concat(streams, align_corners)
