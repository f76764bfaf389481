"""Build shards/digits/, the bundled demo dataset, from scikit-learn's handwritten digits.

    pip install -e ".[sample]"        # scikit-learn
    python shards/make_digits.py      # rewrites shards/digits/ (same bytes on a rerun)

What the set holds and how it is made (the ImageNet routes, in a temporary folder): shards/README.md.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from hrnet_cls.shards import write_split

SIZE = 32  # pixels per side after upscaling
QUALITY = 90  # JPEG quality; 95 pushes most files past two 512-byte tar blocks
SEED = 0  # split and write-time shuffle
SHARD_SAMPLES = 180  # 1,437 train -> 8 shards, 360 val -> 2 shards
OUT = Path(__file__).resolve().parent / "digits"


def digit_image(pixels: np.ndarray) -> Image.Image:
    """(8, 8) array of 0..16 grey levels -> SIZE x SIZE RGB image."""
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    return grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB")


def write_sources(root: Path) -> tuple[Path, Path, Path]:
    """ImageFolder train tree, flat val folder and its labels CSV under ``root``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=SEED)
    train_dir, val_dir, labels = root / "train", root / "val", root / "val_labels.csv"
    for i in train_idx:
        folder = train_dir / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[i]).save(folder / f"digit_{i:04d}.jpg", quality=QUALITY)
    val_dir.mkdir()
    with open(labels, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filename", "class"])
        for i in sorted(val_idx):
            digit_image(digits.images[i]).save(val_dir / f"digit_{i:04d}.jpg", quality=QUALITY)
            rows.writerow([f"digit_{i:04d}.jpg", str(digits.target[i])])
    return train_dir, val_dir, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (replaced)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir, labels = write_sources(Path(tmp))
        common = dict(seed=SEED, max_per_shard=SHARD_SAMPLES, workers=1, name="digits", with_json=False,
                      progress=False)
        for split, src, lab in (("train", train_dir, None), ("val", val_dir, labels)):
            result = write_split(src, args.out, split, labels=lab, **common)
            print(f"{split}: {result.num_samples} samples in {len(result.filenames)} shards")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
