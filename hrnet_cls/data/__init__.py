"""Input pipelines over webdataset shards: ``sources`` (shard lists, _info.json, checked samples), ``transforms``
(decode, crop, normalise), ``train_loader`` / ``val_loader`` (docs/design.md §5.3-§5.5, pitfalls §4), ``workers``.
Evaluation batches are ``(images, targets, skipped)``: uint8 (B, 3, S, S) (``loader.normalize`` on the device), int64 (B,), bad samples skipped since
the worker's previous batch; training batches add positions, int64 (B,). A label out of range raises LabelError."""
from __future__ import annotations

from hrnet_cls.data.sources import LabelError, expand_urls, read_info, shard_lengths
from hrnet_cls.data.train_loader import TrainLoader, build_train_loader
from hrnet_cls.data.val_loader import ValLoader, build_val_loader
from hrnet_cls.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "LabelError", "TrainLoader", "ValLoader", "build_train_loader",
    "build_val_loader", "expand_urls", "read_info", "shard_lengths",
]
