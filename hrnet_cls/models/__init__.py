"""The HRNet-C network and what reads or rewrites it; importing registers it with timm (docs/design.md §1-2)."""
from hrnet_cls.models import hrnet_c  # noqa: F401
from hrnet_cls.models.features import hrnetv2_features
from hrnet_cls.models.hrnet_c import MODEL_CFGS, PAPER_TOP1, TIMM_TWINS, VARIANTS, HighResolutionNetC, Variant

__all__ = ["HighResolutionNetC", "MODEL_CFGS", "PAPER_TOP1", "TIMM_TWINS", "VARIANTS", "Variant", "hrnetv2_features"]
