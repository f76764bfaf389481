"""HRNet-C image classifiers for timm: ``import hrnet_cls`` registers the family, so
``timm.create_model('hrnet_w44_c')`` works. The package map is docs/design.md §0."""
__version__ = "0.1.0"

from hrnet_cls.models import MODEL_CFGS, PAPER_TOP1, VARIANTS, HighResolutionNetC, Variant, hrnetv2_features

__all__ = ['HighResolutionNetC', 'MODEL_CFGS', 'PAPER_TOP1', 'VARIANTS', 'Variant', 'hrnetv2_features']
