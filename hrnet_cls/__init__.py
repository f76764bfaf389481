"""HRNet-C image classifiers for timm.

Importing this package registers the HRNet-C family in timm's model registry, so
``timm.create_model('hrnet_w44_c')`` works anywhere after ``import hrnet_cls``.
"""
__version__ = "0.1.0"

from . import hrnet_c  # noqa: F401  (registers the models with timm)
from .features import hrnetv2_features
from .hrnet_c import MODEL_CFGS, PAPER_TOP1, VARIANTS, HighResolutionNetC, Variant

__all__ = ['HighResolutionNetC', 'MODEL_CFGS', 'PAPER_TOP1', 'VARIANTS', 'Variant', 'hrnetv2_features']
