"""Write the recipe YAMLs in this directory from the schema in hrnet_cls/config.py.

    python configs/generate.py [--force]       # write missing recipes (--force: all, losing hand edits)
    python configs/generate.py --readme-table  # the README's model table

From the schema and hrnet_cls/models/hrnet_c.py VARIANTS, so recipes diff to their real differences;
tests/test_config.py checks the committed YAMLs and README table: rerun with --force after adding either.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hrnet_cls.config import Config, config_to_yaml  # noqa: E402
from hrnet_cls.models.hrnet_c import VARIANTS  # noqa: E402

HERE = Path(__file__).resolve().parent

SOURCES = {"paper": "paper Table XV", "repo": "authors' repo"}
PAPER_VARIANTS = [name for name, v in VARIANTS.items() if v.top1 is not None]  # the ImageNet recipes


def paper_recipe(name: str) -> Config:
    """The paper's recipe (docs/design.md section 3): 100 epochs, 8 x 32 = 256 images, lr 0.1, /10 at 30/60/90."""
    cfg = Config()
    cfg.model.name = name
    cfg.checkpoint.output_dir = f"runs/{name}"
    cfg.checkpoint.save_interval_min = 10.0  # a hard crash loses at most ~10 minutes, whatever the hardware
    cfg.wandb.mode = "online"  # degrades to no W&B with one warning when offline or keyless
    cfg.wandb.tags = ["paper-recipe"]
    return cfg


def paper_header(name: str) -> str:
    v = VARIANTS[name]
    return f"""\
# {name}: HRNet-C paper recipe on ImageNet-1k (docs/design.md section 3).
# Expected top-1: {v.top1:.1f}% (top-1 error {100 - v.top1:.1f}%, {SOURCES[v.source]}); {v.params:,} params,
# {v.gflops:.2f} GFLOPs at 224x224 (multiply-adds / 2^30).
#
#   torchrun --nproc_per_node=8 train.py --config {name}.yaml
#
# Global batch 256 = 8 processes x data.batch_size 32. LR scales linearly with the global
# batch: lr = 0.1 x global_batch / 256, e.g. 4 processes x 32 images:
#   torchrun --nproc_per_node=4 train.py --config {name}.yaml optim.lr=0.05
# SGD, Nesterov momentum 0.9, weight decay 1e-4 on every parameter (BN included);
# lr x0.1 at epochs 30, 60, 90 (epoch 29 still runs at 0.1). RandomResizedCrop 224 + flip;
# evaluation: shorter side 256 (crop_pct 0.875), centre crop 224.
# Written by configs/generate.py; this file is the source of truth, edit it directly.
"""


def demo_recipe() -> Config:
    """A few CPU minutes on the bundled 8x8 digits upscaled to 32 px."""
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, name="hrnet_tiny_c", num_classes=10)
    cfg.data = dataclasses.replace(
        cfg.data,
        train_shards="shards/digits/train-{000000..000007}.tar",
        val_shards="shards/digits/val-{000000..000001}.tar",
        batch_size=64, val_batch_size=256, workers=2, img_size=32, crop_pct=1.0,
    )
    cfg.optim.lr = 0.1
    cfg.schedule = dataclasses.replace(cfg.schedule, epochs=30, decay_epochs=[20, 26], warmup_epochs=0)
    cfg.train = dataclasses.replace(cfg.train, channels_last=True, log_interval=10)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, output_dir="runs/demo_digits", keep=1, resume="auto")
    cfg.wandb = dataclasses.replace(cfg.wandb, mode="offline", tags=["demo"])
    return cfg


DEMO_HEADER = """\
# demo_digits: hrnet_tiny_c on the bundled digits shards (shards/digits, 10 classes,
# 8x8 scikit-learn digits upscaled to 32 px); runs on a laptop CPU.
#
#   python train.py --config demo_digits.yaml
#   torchrun --nproc_per_node=2 train.py --config demo_digits.yaml
#
# Target: >= 90% val top-1 in < 3 minutes on 2 CPU cores. Measured: BENCHMARKS.md (f)
# gives the machine, torch version, seeds and the range over runs (n=3 on 2026-12-08:
# 93.6-95.3% top-1, 100% top-5 on the 360 val images, 39-41 s wall including start-up).
# A fixed seed repeats bit for bit on one machine, not across machines or torch versions.
# precision auto = fp32 on CPU; channels_last: HRNet-C's NHWC convolutions are faster on
# CPU too (BENCHMARKS.md (a)). Shard paths are relative to the repository
# root. LR scaling rule as in the paper recipes: lr = 0.1 x global_batch / 256 is the
# ImageNet starting point; this tiny problem tolerates a larger lr.
# Written by configs/generate.py; this file is the source of truth, edit it directly.
"""


def a2_recipe() -> Config:
    """ResNet Strikes Back's A2 procedure (300 epochs, LAMB, cosine, BCE, RandAugment, mixup + cutmix) for W18-C."""
    cfg = paper_recipe("hrnet_w18_c")
    cfg.checkpoint.output_dir = "runs/hrnet_w18_c_a2"
    cfg.model.drop_path_rate = 0.05
    cfg.data = dataclasses.replace(cfg.data, batch_size=128, crop_pct=0.95, interpolation="bicubic",
                                   auto_augment="rand-m7-mstd0.5-inc1")
    cfg.optim = dataclasses.replace(cfg.optim, name="lamb", lr=2.5e-3, weight_decay=0.02, wd_on_norm_and_bias=False)
    cfg.schedule = dataclasses.replace(cfg.schedule, name="cosine", epochs=300, decay_epochs=[], warmup_epochs=5,
                                       warmup_lr=1e-6, min_lr=1e-6)
    cfg.train = dataclasses.replace(cfg.train, bce_loss=True, mixup_alpha=0.1, cutmix_alpha=1.0)
    cfg.wandb.tags = ["rsb-a2"]
    return cfg


A2_HEADER = """\
# hrnet_w18_c_a2: hrnet_w18_c with ResNet Strikes Back's A2 procedure (Wightman et al. 2021) in
# timm's vocabulary: 300 epochs, LAMB at lr 5e-3 per 2048 images (here 8 x 128 = 1024: 2.5e-3),
# weight decay 0.02 off norms and biases, cosine with a 5-epoch warm-up, binary cross-entropy,
# RandAugment rand-m7-mstd0.5-inc1, mixup 0.1 + cutmix 1.0, bicubic crops, evaluation at crop_pct 0.95.
# NOT RUN ON IMAGENET HERE: no top-1 is claimed for it; the paper recipe (hrnet_w18_c.yaml) is the
# one this project reproduces. timm's published hrnet_w18.ms_aug_in1k (78.1) used an augmented recipe.
#
#   torchrun --nproc_per_node=8 train.py --config hrnet_w18_c_a2.yaml
#
# Written by configs/generate.py; this file is the source of truth, edit it directly.
"""


def recipes() -> dict[str, str]:
    """File name -> full YAML text of every recipe this script owns."""
    out = {f"{name}.yaml": paper_header(name) + "\n" + config_to_yaml(paper_recipe(name)) for name in PAPER_VARIANTS}
    out["demo_digits.yaml"] = DEMO_HEADER + "\n" + config_to_yaml(demo_recipe())
    out["hrnet_w18_c_a2.yaml"] = A2_HEADER + "\n" + config_to_yaml(a2_recipe())
    return out


UNITS = {4: "", 2: ", small", 1: ", tiny"}  # residual units per stream per module -> family


def _existing_weights(name: str) -> str:
    """timm's published weights that load into name, from its pretrained_cfgs (hub ids)."""
    import timm

    hubs = [timm.models.get_pretrained_cfg(tagged).hf_hub_id for tagged in timm.list_pretrained(f"{name}.*")]
    hubs = [h.removeprefix("timm/") for h in hubs if h]
    if not hubs:
        return "none published"
    arch = hubs[0].split(".")[0]
    return f"timm `{arch}` ({', '.join(f'`.{h.split(chr(46))[1]}`' for h in hubs)})"


def readme_table() -> str:
    """The README's model table, one row per VARIANTS entry."""
    rows = ["| timm name | residual unit | params | GFLOPs | top-1 | existing weights that load |",
            "|---|---|---|---|---|---|"]
    for name, v in VARIANTS.items():
        top1 = "—" if v.top1 is None else f"{v.top1:.1f}" + (" (repo)" if v.source == "repo" else "")
        rows.append(f"| `{name}` | {v.cfg.block}{UNITS[v.cfg.num_units]} | {v.params:,} | {v.gflops:.2f} | {top1} | "
                    f"{_existing_weights(name)} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing recipes")
    parser.add_argument("--readme-table", action="store_true", help="print the README's model table and exit")
    args = parser.parse_args()
    if args.readme_table:
        print(readme_table(), end="")
        return 0
    for name, text in recipes().items():
        if (HERE / name).exists() and not args.force:
            continue
        (HERE / name).write_text(text)
        logging.info("wrote configs/%s", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
