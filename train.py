"""Train an HRNet-C classifier on webdataset shards, in one process or many.

    python train.py --config demo_digits.yaml                        # one process: CPU or one GPU
    torchrun --nproc_per_node=8 train.py --config hrnet_w44_c.yaml   # 8 GPUs of one machine
    python train.py --config demo_digits.yaml schedule.epochs=2 data.batch_size=32  # dotted overrides

Every key is documented in hrnet_cls/config.py; the run folder and its life are
hrnet_cls/train/checkpointer.py's (docs/design.md §6). Exit status: 0 trained (or already
finished), 1 an error while training, 2 a config or run-folder error before anything was written,
3 a non-finite loss (the last good checkpoint kept), 75 stopped by a signal (checkpoint saved).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from timm.utils import random_seed
from torch import nn

from hrnet_cls.atomic import verify
from hrnet_cls.config import Config, ConfigError, check_model_name, load_config
from hrnet_cls.data import LabelError, TrainLoader, ValLoader, build_train_loader, build_val_loader, expand_urls
from hrnet_cls.data.remote import NetworkError
from hrnet_cls.data.sources import info_num_classes
from hrnet_cls.distributed import DistInfo, broadcast_buffers, cleanup, init_distributed
from hrnet_cls.errors import RunDirError, one_line, os_error_line
from hrnet_cls.models.description import ModelDescription, create_model
from hrnet_cls.precision import Precision
from hrnet_cls.train.checkpointer import Checkpointer
from hrnet_cls.train.engine import BadDataError, NonFiniteLossError, build_parts, train_one_epoch
from hrnet_cls.train.preemption import PREEMPTED_EXIT, Preempted, StopRequest
from hrnet_cls.train.tracking import Tracker
from hrnet_cls.validation.evaluation import evaluate

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe: a YAML path or a file name in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. schedule.epochs=2")
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    """INFO on rank 0; other ranks only warn (torchrun interleaves every rank's output)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%H:%M:%S",
                        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(message)s")


def check(cfg: Config) -> tuple[Precision, nn.Module]:
    """What the file system and the registry can refuse, before any output exists: the shards'
    class counts, the model, the files named, the precision on this machine; then the model, built
    and initialised from model.init_from (read once, here). Raises ConfigError."""
    for key in ("train_shards", "val_shards"):
        try:
            classes = info_num_classes(expand_urls(getattr(cfg.data, key)))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.{key}: {e}") from None
        if classes is not None and classes != cfg.model.num_classes:  # else labels are checked as they are read
            raise ConfigError(f"model.num_classes={cfg.model.num_classes}, but the _info.json of data.{key} "
                              f"lists {classes} classes: set model.num_classes={classes} (model.init_from re-"
                              "initialises a classifier of another size)")
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
        precision = Precision.of(cfg.train.precision, device_type)
    except ValueError as e:
        raise ConfigError(f"train.precision: {e}") from None
    return precision, build_model(cfg)


def build_model(cfg: Config) -> nn.Module:
    """The bare model on the CPU, identical on every rank (same seed), started from model.init_from
    (a resume overwrites it); an unreadable, corrupt or misfitting init_from is a ConfigError."""
    path = cfg.model.init_from
    random_seed(cfg.train.seed)
    try:
        if path and not verify(path):
            logger.warning("model.init_from %s has no .sha256 beside it: its bytes are UNVERIFIED", path)
        net = create_model(ModelDescription.from_config(cfg), init_from=path, channels_last=cfg.train.channels_last,
                           drop_path_rate=cfg.model.drop_path_rate)  # another num_classes keeps its fresh classifier
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, not a checkpoint, another architecture
        if not path:
            raise
        raise ConfigError(f"model.init_from {path}: cannot start from it: "
                          f"{one_line(e).removeprefix(f'{path}: ')}") from None
    if path:
        logger.info("initialised %s from %s", cfg.model.name, path)
    net.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return net


def set_numerics(device: torch.device) -> None:
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # bit-exact resume: kernels independent of history
    else:  # speed over bit-exactness: autotuned cuDNN kernels, TF32 for fp32 matmuls and convs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def build_loaders(cfg: Config, info: DistInfo) -> tuple[TrainLoader, ValLoader]:
    """This rank's training and validation loaders."""
    d, pin = cfg.data, info.device.type == "cuda"
    train_loader = build_train_loader(d.train_shards, batch_size=d.batch_size, img_size=d.img_size,
                                      seed=cfg.train.seed, epoch=0, rank=info.rank, world_size=info.world_size,
                                      workers=d.workers, num_classes=cfg.model.num_classes, pin_memory=pin,
                                      scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
                                      interpolation=d.interpolation, auto_augment=d.auto_augment,
                                      color_jitter=d.color_jitter, retries=d.retries, read_timeout_s=d.read_timeout_s)
    val_loader = build_val_loader(d.val_shards, batch_size=d.val_batch_size, img_size=d.img_size,
                                  crop_pct=d.crop_pct, rank=info.rank, world_size=info.world_size,
                                  workers=d.workers, num_classes=cfg.model.num_classes, pin_memory=pin,
                                  retries=d.retries, read_timeout_s=d.read_timeout_s)
    return train_loader, val_loader


def train(cfg: Config, info: DistInfo, precision: Precision, net: nn.Module, run: Checkpointer,
          stop: StopRequest, started: float) -> str:
    """Blocks 4 to 8 of main(); returns the final line. Raises what ending() turns into a status."""
    # 4. Plan the data: the loaders (shards or an index that cannot be read stop here, before any output)
    try:
        train_loader, val_loader = build_loaders(cfg, info)
    except ValueError as e:  # no batch to fill, a bad index: exit 2, nothing written
        raise RunDirError(f"data: {e}") from None

    # 5. Start the run: rank 0 locks the folder and decides new / resume / finished / refused
    start = run.start(cfg.schedule.epochs)
    if start.finished:
        top1 = start.position.metrics.get("val_top1", float("nan"))
        return (f"already finished: {start.checkpoint} ended epoch {start.position.epoch} with val top-1 "
                f"{top1:.2f}%; to train again, use a new checkpoint.output_dir")

    # 6. Build the training objects: the model to its device, layout and SyncBN
    if cfg.train.sync_bn and info.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(info.device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    logger.info("%s: %.2fM parameters on %s x %d", cfg.model.name,
                sum(p.numel() for p in net.parameters()) / 1e6, info.device, info.world_size)
    parts = build_parts(cfg, info, net, precision)

    # 7. Restore the loader, seed, weights, optimizer, EMA and RNG; then the records
    position = run.restore(start, parts, train_loader, info, cfg.train.seed)
    if position.batch_in_epoch and cfg.train.grad_accum_steps > 1:  # saves are at step boundaries only
        logger.info("resuming after micro-batch %d of epoch %d: accumulation cycles of %d count from here (%s)",
                    position.batch_in_epoch, position.epoch, cfg.train.grad_accum_steps,
                    "exact" if position.batch_in_epoch % cfg.train.grad_accum_steps == 0 else
                    "the checkpoint's cycles were of another length: not bit-identical to an uninterrupted run")
    run.write_config()
    tracker = Tracker(cfg.wandb, run, start_epoch=position.epoch, resuming=start.checkpoint is not None)
    logger.info("%d epochs x %d steps of %d x %d x %d images, precision %s", cfg.schedule.epochs,
                -(-train_loader.batches_per_epoch // cfg.train.grad_accum_steps), cfg.data.batch_size, info.world_size,
                cfg.train.grad_accum_steps, precision.name)

    # 8. The epoch loop: train, validate, record the row, save; a stop signal saves and exits 75
    step, last = position.step, position.metrics
    try:
        for epoch in range(position.epoch, cfg.schedule.epochs):
            if epoch != position.epoch:
                train_loader.set_epoch(epoch)
            trained = train_one_epoch(parts, train_loader, epoch=epoch, global_step=step, tracker=tracker,
                                      checkpointer=run, stop=stop,
                                      carried=position.epoch_sums if epoch == position.epoch else None)
            step = trained.step
            if trained.stopped:
                run.save_mid(parts, train_loader, epoch, trained.batch, step, trained.sums)
                raise Preempted(run.stop(f"epoch {epoch}, batch {trained.batch}, step {step}"))
            began = time.perf_counter()
            val = {}
            if (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.schedule.epochs:
                models = {k: m for k, m in (("val", parts.net), ("ema", parts.ema.module)) if m is not None}
                for model in models.values():
                    broadcast_buffers(model)  # every rank validates (and trains on from) rank 0's BN statistics
                val = evaluate(models, val_loader, normalize=val_loader.normalize, device=parts.device,
                               precision=parts.precision, memory_format=parts.memory_format)
            listed = sum(val_loader.plan.lengths)
            partial = bool(val) and val["val_samples"] < listed
            if partial:  # bad samples left out: a top-1 over part of the set never picks best.pth
                logger.warning("epoch %d validated on %d of the %d listed images: best.pth is not chosen on it",
                               epoch, val["val_samples"], listed)
            last = val or last
            row = {**trained.metrics(), **val, "epoch_time_s": trained.train_time_s + time.perf_counter() - began,
                   "checkpoint_s": run.take_seconds(), "skipped": trained.skipped + val.get("val_skipped", 0)}
            tracker.log_epoch(epoch, row)  # before the save: a resume from it keeps this row
            log_epoch(epoch, cfg.schedule.epochs, row)
            run.save_epoch(parts, train_loader, epoch, step, val, rank_best=not partial)
            if epoch + 1 < cfg.schedule.epochs and stop.agree():  # a signal during validation or the save
                raise Preempted(run.stop(f"epoch {epoch + 1}, batch 0, step {step}"))
        run.finish()  # the last checkpoint written and verified before the final line
        run.mark_finished(f"epoch {cfg.schedule.epochs}, step {step}")
    finally:
        tracker.finish()
    return (f"final val top-1 {last.get('val_top1', float('nan')):.2f}%  top-5 {last.get('val_top5', float('nan')):.2f}%"
            f"  ({last.get('val_samples', 0)} images, {cfg.schedule.epochs} epochs; "
            f"{time.perf_counter() - started:.0f} s)  -> {run.path}")


def log_epoch(epoch: int, epochs: int, row: dict) -> None:
    nan = float("nan")
    ema = f"  (EMA top-1 {row['ema_top1']:.2f}%)" if "ema_top1" in row else ""
    logger.info("epoch %d/%d done: train loss %.4f  val loss %.4f  top-1 %.2f%%  top-5 %.2f%%%s  lr %.4g  %.1f s  "
                "%.0f img/s  skipped %d", epoch, epochs, row["train_loss"], row.get("val_loss", nan),
                row.get("val_top1", nan), row.get("val_top5", nan), ema, row["lr"], row["epoch_time_s"],
                row["images_per_s"], row["skipped"])


ENDINGS = (RunDirError, NonFiniteLossError, Preempted, LabelError, BadDataError, NetworkError, OSError, RuntimeError)


def ending(exc: BaseException, info: DistInfo, run: Checkpointer) -> tuple[int, str]:
    """(exit status, final line) of a run that ended on ``exc``; re-raises what is not an ending."""
    if isinstance(exc, RunDirError):
        return 2, f"train.py: error: {exc}"
    if isinstance(exc, NonFiniteLossError):
        return 3, f"train.py: error: {exc}"
    if isinstance(exc, Preempted):  # stop signals have been ignored since the stop was agreed
        return PREEMPTED_EXIT, (f"train.py: preempted at {exc}: checkpoint saved in {run.path}; rerun the same "
                                "command to continue")
    if isinstance(exc, (LabelError, NetworkError)):  # re-raised from a worker by torch: its reason is the line
        return 1, f"train.py: error: {exc.reason}"
    if isinstance(exc, BadDataError):  # raised on every rank alike: rank 0 says it
        return 1, f"train.py: error: {exc}" if info.is_main else ""
    if isinstance(exc, OSError):  # a full disk, a read-only or vanished file system while saving
        kept = run.checkpoints()
        return 1, (f"train.py: error: {os_error_line(exc, 'cannot write')}; " + (
            f"the previous checkpoint is intact ({kept[0].name})" if kept else "no checkpoint was written"))
    # a collective whose peer is gone: NCCL raises DistBackendError, gloo a RuntimeError marked only by its text
    if info.world_size > 1 and (isinstance(exc, torch.distributed.DistBackendError) or "closed by peer" in str(exc)):
        return 1, (f"train.py: error: rank {info.rank} lost another process (it failed or was stopped: its own "
                   f"error says why): {one_line(exc)}")
    raise exc


def main(argv: list[str] | None = None) -> int:
    # 1. Parse the command line; log per rank
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    started = time.perf_counter()

    # 2. Check the recipe, the files and the model: exit 2 with one line, before any output exists
    try:
        cfg = load_config(args.config, args.overrides)
        precision, net = check(cfg)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2

    # 3. Join the process group; the device's numerics; stop signals agreed across ranks
    info = init_distributed(cfg.train.dist_timeout_s)
    set_numerics(info.device)
    stop = StopRequest(info.control_group).install()
    run = Checkpointer(cfg.checkpoint, recipe=cfg, is_main=info.is_main)
    try:
        status, line = 0, train(cfg, info, precision, net, run, stop, started)  # blocks 4-8
    except ENDINGS as exc:
        status, line = ending(exc, info, run)
    finally:
        stop.settle()
        run.close()
        stop.restore()
        cleanup()

    # 9. The end: one status and one line; status 1 may be one rank's own (a bad label, a lost peer)
    if line and (info.is_main or status == 1):
        print(line, file=sys.stdout if status == 0 else sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
