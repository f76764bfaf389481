"""``python -m hrnet_cls.shards write SRC OUT_DIR --split S``: the shard writer's command line."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from hrnet_cls.data.workers import usable_cores
from hrnet_cls.shards.scan import SourceError
from hrnet_cls.shards.writer import write_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hrnet_cls.shards",
                                     description="Write image datasets as webdataset tar shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write SRC as OUT_DIR/{split}-NNNNNN.tar + _info.json")
    write.add_argument("src", help="ImageFolder tree (one folder per class), or a flat folder with --labels")
    write.add_argument("out_dir", help="shard folder; created if missing, shared by all splits")
    write.add_argument("--split", required=True, help="split name, e.g. train or val")
    write.add_argument("--labels", help="labels file for a flat folder: 'FILENAME CLASS' or 'FILENAME,CLASS' "
                                        "lines; CLASS is a class name or index")
    write.add_argument("--seed", type=int, default=0, help="seed of the write-time sample shuffle")
    write.add_argument("--max-per-shard", type=int, default=1000, help="samples per shard at most")
    write.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="bytes per shard at most")
    write.add_argument("--workers", type=int, default=usable_cores(),
                       help="processes decoding and writing (default: all CPUs)")
    write.add_argument("--name", help="dataset name stored in _info.json (default: OUT_DIR's name)")
    write.add_argument("--no-json", action="store_true", help="omit the KEY.json sidecars (source path, class name)")
    write.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = write_split(args.src, args.out_dir, args.split, labels=args.labels, seed=args.seed,
                             max_per_shard=args.max_per_shard, max_shard_bytes=args.max_shard_bytes,
                             workers=args.workers, name=args.name, with_json=not args.no_json,
                             progress=not args.quiet)
    except SourceError as exc:
        raise SystemExit(f"error: {exc}") from None
    # skipped: files not written (dangling symlinks, files that do not decode); a second path to
    # a file already written (symlinks) is no skipped file, but is counted too when there is one
    same = f", {len(result.duplicates)} duplicate path(s) left out" if result.duplicates else ""
    print(f"{args.split}: {result.num_samples} samples in {len(result.filenames)} shards "
          f"({args.out_dir}/{args.split}-*.tar), {len(result.bad)} file(s) skipped{same}")
    return 0
