"""Write image datasets as webdataset tar shards (format: docs/design.md section 5).

    python -m hrnet_cls.shards write /data/imagenet/train /data/imagenet-wds --split train
    python -m hrnet_cls.shards write /data/imagenet/val /data/imagenet-wds --split val \\
        --labels /data/imagenet/val_labels.txt

A sample is ``KEY.jpg`` (or ``.png``/``.webp``: the source file's bytes, except that a 16-bit
grayscale PNG is stored re-encoded as an 8-bit PNG, value >> 8), ``KEY.cls`` (decimal class
index) and ``KEY.json`` (source path and class name). Shards are ``OUT_DIR/{split}-000000.tar``,
...; ``OUT_DIR/_info.json`` indexes them in the layout timm's ``wds/`` reader reads and holds
the class list every split of OUT_DIR shares.

Sources: an ImageFolder tree (one sub-folder per class; the first split written fixes the
class order as sorted folder names, like torchvision) or a flat folder plus ``--labels``
(lines ``FILENAME CLASS`` or ``FILENAME,CLASS``; CLASS is a class name or an index).
Symlinks are followed, each real folder entered and each real file written once; a dangling
link is reported and left out, a folder loop or a second path to a file is reported.

Every file is decoded once (the CPU-heavy part, spread over ``--workers`` processes); one that
does not decode is reported by path and left out. Shards are written under temporary names
and renamed when complete, and the split's entry in _info.json is removed first and written
back (atomically) only at the end, so an interrupted run never leaves a listed partial shard.
"""
from hrnet_cls.shards.scan import (Item, ScanReport, SourceError, collect_items, make_keys, read_labels,
                                   scan_image_folder)
from hrnet_cls.shards.writer import WriteResult, plan_shards, shard_image, write_split
from hrnet_cls.shards.cli import main

__all__ = ["Item", "ScanReport", "SourceError", "WriteResult", "collect_items", "main",
           "make_keys", "plan_shards", "read_labels", "scan_image_folder", "shard_image", "write_split"]
