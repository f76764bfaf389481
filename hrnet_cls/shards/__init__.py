"""Write image datasets as webdataset tar shards (format: shards/README.md, docs/design.md section 5).

    python -m hrnet_cls.shards write /data/imagenet/train /data/imagenet-wds --split train
    python -m hrnet_cls.shards write /data/imagenet/val /data/imagenet-wds --split val \\
        --labels /data/imagenet/val_labels.txt

scan.py turns the source (an ImageFolder tree, or a flat folder plus ``--labels``) into items;
writer.py decodes each file once, writes shards under temporary names renamed when complete, and
writes the split's _info.json entry back only at the end, so an interrupted run never leaves a
listed partial shard.
"""
from hrnet_cls.shards.scan import (Item, ScanReport, SourceError, collect_items, make_keys, read_labels,
                                   scan_image_folder)
from hrnet_cls.shards.writer import WriteResult, plan_shards, shard_image, write_split
from hrnet_cls.shards.cli import main

__all__ = ["Item", "ScanReport", "SourceError", "WriteResult", "collect_items", "main",
           "make_keys", "plan_shards", "read_labels", "scan_image_folder", "shard_image", "write_split"]
