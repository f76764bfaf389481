"""Write image datasets as webdataset tar shards: ``python -m hrnet_cls.shards write SRC OUT_DIR --split NAME``.
scan.py lists the source's items, writer.py writes and publishes the shards and _info.json (shards/README.md)."""
from hrnet_cls.shards.scan import (Item, ScanReport, SourceError, collect_items, make_keys, read_labels,
                                   scan_image_folder)
from hrnet_cls.shards.writer import WriteResult, plan_shards, shard_image, write_split
from hrnet_cls.shards.cli import main

__all__ = ["Item", "ScanReport", "SourceError", "WriteResult", "collect_items", "main",
           "make_keys", "plan_shards", "read_labels", "scan_image_folder", "shard_image", "write_split"]
