"""Train an HRNet-C classifier on webdataset shards, in one process or many.

    python train.py --config demo_digits.yaml                        # one process: CPU or one GPU
    torchrun --nproc_per_node=8 train.py --config hrnet_w44_c.yaml   # 8 GPUs of one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --config hrnet_w44_c.yaml                           # the same on each of 2 machines
    python train.py --config demo_digits.yaml schedule.epochs=2 data.batch_size=32  # dotted overrides

--config is a path or a file name in configs/; every key is documented in hrnet_cls/config.py.
Each choice of the recipe is made below, once, when the training objects are built;
hrnet_cls/engine.py then runs them. checkpoint.output_dir receives last.pth, best.pth,
epoch_XXXX.pth, config.yaml and summary.csv; with checkpoint.resume=auto the same command
continues from the newest valid checkpoint there (mid-epoch with checkpoint.save_interval).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path

import timm
import torch
from timm.utils import random_seed
from torch import nn

from hrnet_cls import MODEL_CFGS  # importing hrnet_cls registers the HRNet-C models with timm
from hrnet_cls.checkpoint import CheckpointManager, build_state, capture_rng, load_checkpoint, restore_state, resume_path
from hrnet_cls.config import Config, ConfigError, check_model_name, config_to_dict, load_config, save_config
from hrnet_cls.data import TrainLoader, ValLoader, build_train_loader, build_val_loader, expand_urls
from hrnet_cls.distributed import (DistInfo, all_gather_object, broadcast_buffers, broadcast_object, cleanup,
                                   init_distributed)
from hrnet_cls.engine import NonFiniteLossError, TrainParts, build_parts, train_one_epoch
from hrnet_cls.evaluation import evaluate
from hrnet_cls.precision import Precision
from hrnet_cls.tracking import Tracker
from hrnet_cls.weights import init_from

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe: a YAML path or a file name in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. schedule.epochs=2")
    return parser.parse_args(argv)


def preflight(cfg: Config) -> Precision:
    """Errors that need the file system or the model registry, found in seconds and before
    any output exists. Returns the precision resolved for this machine."""
    for key in ("train_shards", "val_shards"):
        try:
            expand_urls(getattr(cfg.data, key))
        except FileNotFoundError as e:
            raise ConfigError(f"data.{key}: {e}") from None
    try:
        check_model_name(cfg.model.name)
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from None
    for key, path in (("model.init_from", cfg.model.init_from), ("checkpoint.resume", cfg.checkpoint.resume)):
        if path not in ("", "auto") and not Path(path).is_file():
            raise ConfigError(f"{key}: no checkpoint file {path!r}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.sync_bn and device_type != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.sync_bn=true needs CUDA: DDP runs SyncBatchNorm on GPUs only")
    try:
        return Precision.of(cfg.train.precision, device_type)
    except ValueError as e:
        raise ConfigError(f"train.precision: {e}") from None


def build_model(cfg: Config, info: DistInfo, start_from: str) -> nn.Module:
    """The bare model on its device, identical on every rank (same seed; DDP broadcasts too)."""
    random_seed(cfg.train.seed)
    # HRNet-C keeps its activations in the layout it is built with; other timm models follow their input
    layout = {"channels_last": cfg.train.channels_last} if cfg.model.name in MODEL_CFGS else {}
    net = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes,
                            drop_path_rate=cfg.model.drop_path_rate, **layout)
    if start_from:
        logger.info("initialising %s from %s", cfg.model.name, start_from)
        init_from(net, start_from)  # a classifier of another num_classes keeps its fresh init
    net.set_grad_checkpointing(cfg.model.grad_checkpointing)
    if cfg.train.sync_bn and info.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    logger.info("%s: %.2fM parameters on %s x %d", cfg.model.name,
                sum(p.numel() for p in net.parameters()) / 1e6, info.device, info.world_size)
    return net.to(info.device, memory_format=fmt)


def save(parts: TrainParts, manager: CheckpointManager | None, cfg: Config, epoch: int, batch_in_epoch: int,
         step: int, metrics: dict | None = None, metric: float | None = None) -> None:
    """Collective: every rank adds its RNG state; rank 0 writes last.pth (+ epoch/best) atomically."""
    rng = all_gather_object(capture_rng())
    if manager is None:
        return
    state = build_state(model=parts.net, optimizer=parts.optimizer, epoch=epoch, step=step,
                        batch_in_epoch=batch_in_epoch, config=config_to_dict(cfg), metrics=metrics,
                        model_ema=parts.ema.module, scaler=parts.scaler, rng=rng)
    manager.save(state, metric=metric, epoch_end=batch_in_epoch == 0)


def validate(parts: TrainParts, loader: ValLoader) -> dict[str, float]:
    """val_* metrics of the model and, with EMA, ema_* of the averaged weights: one decode of the data."""
    models = {name: m for name, m in (("val", parts.net), ("ema", parts.ema.module)) if m is not None}
    for model in models.values():
        broadcast_buffers(model)  # every rank validates (and trains on from) rank 0's BN statistics
    return evaluate(models, loader, device=parts.device, precision=parts.precision, memory_format=parts.memory_format)


def fit(cfg: Config, parts: TrainParts, train_loader: TrainLoader, val_loader: ValLoader, tracker: Tracker,
        manager: CheckpointManager | None, position: dict) -> dict:
    """The epoch loop from the resume position on; returns the last validation metrics."""
    epoch, batch, step, last = position["epoch"], position["batch_in_epoch"], position["step"], position["metrics"]
    checkpoint = functools.partial(save, parts, manager, cfg)
    for epoch in range(epoch, cfg.schedule.epochs):
        start = time.perf_counter()
        train_loader.set_epoch(epoch, start_batch=batch)
        batch = 0
        trained = train_one_epoch(parts, train_loader, epoch=epoch, global_step=step, tracker=tracker,
                                  save=checkpoint)
        step = trained["step"]
        due = (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.schedule.epochs
        val = validate(parts, val_loader) if due else {}
        last = val or last
        row = {**trained, **val, "epoch_time_s": time.perf_counter() - start,
               "skipped": trained["skipped"] + val.get("val_skipped", 0)}
        tracker.log_epoch(epoch, row)  # before the save: a resume from it keeps this row
        logger.info("epoch %d/%d done: train loss %.4f  val loss %.4f  top-1 %.2f%%  top-5 %.2f%%%s  lr %.4g  "
                    "%.1f s  %.0f img/s  skipped %d", epoch, cfg.schedule.epochs, trained["train_loss"],
                    val.get("val_loss", float("nan")), val.get("val_top1", float("nan")),
                    val.get("val_top5", float("nan")),
                    f"  (EMA top-1 {val['ema_top1']:.2f}%)" if "ema_top1" in val else "",
                    trained["lr"], row["epoch_time_s"], trained["images_per_s"], row["skipped"])
        checkpoint(epoch + 1, 0, step, metrics=last, metric=val.get("val_top1"))
    return last


def train(cfg: Config, info: DistInfo, precision: Precision) -> dict:
    """Build everything, restore the resume position, run fit(); returns the last val metrics."""
    out, d = Path(cfg.checkpoint.output_dir), cfg.data
    train_loader = build_train_loader(d.train_shards, batch_size=d.batch_size, img_size=d.img_size,
                                      seed=cfg.train.seed, epoch=0, rank=info.rank, world_size=info.world_size,
                                      workers=d.workers, num_classes=cfg.model.num_classes,
                                      pin_memory=info.device.type == "cuda")
    val_loader = build_val_loader(d.val_shards, batch_size=d.val_batch_size, img_size=d.img_size,
                                  crop_pct=d.crop_pct, rank=info.rank, world_size=info.world_size,
                                  workers=d.workers, num_classes=cfg.model.num_classes,
                                  pin_memory=info.device.type == "cuda")
    resume = broadcast_object(resume_path(cfg.checkpoint.resume, out) if info.is_main else None)
    net = build_model(cfg, info, start_from="" if resume else cfg.model.init_from)  # resume wins
    parts = build_parts(cfg, info, net, precision, train_loader.batches_per_epoch)
    state = load_checkpoint(resume) if resume else None
    manager = CheckpointManager(out, cfg.checkpoint.keep) if info.is_main else None
    if info.is_main:
        save_config(cfg, out / "config.yaml")  # the resolved recipe, before the first checkpoint
    tracker = Tracker(cfg, out, info.is_main, start_epoch=state["epoch"] if state else 0)
    try:
        random_seed(cfg.train.seed, info.rank)  # dropout / drop-path differ per rank
        position = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "metrics": {}}
        if state:
            restore_state(state, net, parts.optimizer, parts.scaler, parts.ema.module, rank=info.rank)
            position = {k: state.get(k, v) for k, v in position.items()}
            if manager:
                manager.best_metric = state.get("best_metric")
            logger.info("resumed from %s: epoch %d, batch %d, step %d",
                        resume, state["epoch"], state["batch_in_epoch"], state["step"])
        logger.info("%d epochs x %d steps of %d x %d images, precision %s", cfg.schedule.epochs,
                    train_loader.batches_per_epoch, d.batch_size, info.world_size, precision.name)
        return fit(cfg, parts, train_loader, val_loader, tracker, manager, position)
    finally:
        tracker.finish()


def setup_logging(rank: int) -> None:
    """INFO on rank 0; other ranks only warn (torchrun interleaves every rank's output)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%H:%M:%S",
                        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(message)s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    started = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        precision = preflight(cfg)
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")  # one line, and no output_dir yet
    info = init_distributed()
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # bit-exact resume: kernels independent of history
    else:  # speed over bit-exactness: autotuned cuDNN kernels, TF32 for fp32 matmuls and convs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        final = train(cfg, info, precision)
    except NonFiniteLossError as e:
        logger.error("error: %s", e)
        return 3
    finally:
        cleanup()
    if info.is_main:
        print(f"final val top-1 {final.get('val_top1', float('nan')):.2f}%  top-5 "
              f"{final.get('val_top5', float('nan')):.2f}%  ({final.get('val_samples', 0)} images, "
              f"{cfg.schedule.epochs} epochs; {time.perf_counter() - started:.0f} s)  -> {cfg.checkpoint.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
