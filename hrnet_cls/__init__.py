"""HRNet-C image classifiers for timm.

Importing this package registers the HRNet-C family in timm's model registry, so
``timm.create_model('hrnet_w44_c')`` works anywhere after ``import hrnet_cls``.
"""
__version__ = "0.1.0"
