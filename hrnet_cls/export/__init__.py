"""``python -m hrnet_cls.export``: a trained model as a timm model folder with a model card (docs/design.md §6.5)."""
from hrnet_cls.export.folder import OPSET, ExportError, export, main

__all__ = ["ExportError", "OPSET", "export", "main"]
