"""The release of a trained model: a timm model folder (``folder``) and its model card (``card``).

    python -m hrnet_cls.export CHECKPOINT OUT_DIR [--use-ema] [--onnx]

What the folder holds and how each file loads: docs/design.md §6.5.
"""
from hrnet_cls.export.folder import OPSET, ExportError, export, main

__all__ = ["ExportError", "OPSET", "export", "main"]
