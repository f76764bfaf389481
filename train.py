"""Train an HRNet-C classifier on webdataset shards, in one process or many.

    python train.py --config demo_digits.yaml                        # one process: CPU or one GPU
    torchrun --nproc_per_node=8 train.py --config hrnet_w44_c.yaml   # 8 GPUs of one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --config hrnet_w44_c.yaml                           # the same on each of 2 machines
    python train.py --config demo_digits.yaml schedule.epochs=2 data.batch_size=32  # dotted overrides

--config is a path or a file name in configs/; every key is documented in hrnet_cls/config.py.
Each choice of the recipe is made below, once, when the training objects are built;
hrnet_cls/engine.py then runs them. checkpoint.output_dir is the run folder, owned by
hrnet_cls/run_dir.py (its files: last.pth, epoch_XXXX.pth, best.pth, each with a .sha256,
config.yaml, summary.csv, .lock, PREEMPTED); one run at a time holds it. With
checkpoint.resume=auto the same command continues from the newest checkpoint that verifies,
on any number of processes (hrnet_cls/resume.py); SIGTERM, SIGUSR1, SIGINT or SIGHUP save at
the next step and exit with status 75, so rerunning the command loses no step.

Exit status: 0 trained (or the run had already finished), 1 an error while training (data,
disk), 2 a config or output-directory error before anything was written, 3 a non-finite
loss (the last good checkpoint is kept), 75 preempted by a signal (checkpoint saved).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from timm.utils import random_seed
from torch import nn

from hrnet_cls.atomic import verify
from hrnet_cls.train.state import build_state, capture_rng, load_checkpoint
from hrnet_cls.config import Config, ConfigError, check_model_name, config_to_dict, load_config
from hrnet_cls.data import LabelError, TrainLoader, ValLoader, build_train_loader, build_val_loader, expand_urls
from hrnet_cls.data.sources import info_num_classes
from hrnet_cls.distributed import DistInfo, all_gather_object, barrier, broadcast_buffers, cleanup, init_distributed
from hrnet_cls.train.engine import BadDataError, EpochSums, NonFiniteLossError, TrainParts, build_parts, train_one_epoch
from hrnet_cls.errors import one_line, os_error_line
from hrnet_cls.validation.evaluation import evaluate
from hrnet_cls.precision import Precision
from hrnet_cls.train.preemption import PREEMPTED_EXIT, Preempted, StopRequest
from hrnet_cls.train.resume import Position, restore
from hrnet_cls.train.checkpointer import RunDir, RunDirError, Start
from hrnet_cls.train.tracking import Tracker
from hrnet_cls.models.description import ModelDescription, create_model
from hrnet_cls.models.weights import read_state_dict

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
    if cfg.model.init_from:
        path = cfg.model.init_from
        try:  # the checksum when it has one; memory-mapped, the pickle and zip index find a truncated file
            verified = verify(path)
            read_state_dict(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is this key's error
            raise ConfigError(f"model.init_from {path}: cannot start from it: "
                              f"{one_line(e).removeprefix(f'{path}: ')}") from None
        if not verified:
            logger.warning("model.init_from %s has no .sha256 beside it: its bytes are UNVERIFIED", path)
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
    if start_from:
        logger.info("initialising %s from %s", cfg.model.name, start_from)
    try:  # a classifier of another num_classes keeps its fresh init
        net = create_model(ModelDescription.from_config(cfg), init_from=start_from, channels_last=cfg.train.channels_last,
                           drop_path_rate=cfg.model.drop_path_rate)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, another architecture
        if not start_from:
            raise
        raise RunDirError(f"model.init_from {start_from}: cannot start from it: "
                          f"{one_line(e).removeprefix(f'{start_from}: ')}") from None
    net.set_grad_checkpointing(cfg.model.grad_checkpointing)
    if cfg.train.sync_bn and info.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    logger.info("%s: %.2fM parameters on %s x %d", cfg.model.name,
                sum(p.numel() for p in net.parameters()) / 1e6, info.device, info.world_size)
    return net.to(info.device, memory_format=fmt)


class Checkpoints:
    """Saves of one run: a collective call saves; ``seconds`` is the time the loop spent in them
    (checkpoint_s); rank 0's clock asks for a save every checkpoint.save_interval_min minutes."""

    def __init__(self, parts: TrainParts, run: RunDir, cfg: Config, loader: TrainLoader) -> None:
        self.parts, self.run, self.cfg, self.loader = parts, run, cfg, loader
        self.seconds, self.interval_s = 0.0, cfg.checkpoint.save_interval_min * 60
        self.last, self.asked = time.monotonic(), False

    def __call__(self, epoch: int, batch_in_epoch: int, step: int, metrics: dict | None = None,
                 metric: float | None = None, sums: EpochSums | None = None) -> None:
        """Every rank adds its RNG state and the samples it trained on this epoch; rank 0 writes
        last.pth (+ epoch/best) atomically, in the background with async_save. Mid-epoch, ``sums``
        are the epoch's totals."""
        began = time.perf_counter()
        mine = (capture_rng(), np.packbits(self.loader.consumed) if batch_in_epoch else None)
        gathered = all_gather_object(mine)
        if self.run.is_main:
            consumed = None
            if batch_in_epoch:  # the union of every rank's samples: a position any layout can continue from
                consumed = np.unpackbits(np.bitwise_or.reduce([g[1] for g in gathered]),
                                         count=self.loader.plan.samples).astype(bool)
            p, sums = self.parts, asdict(sums) if sums and batch_in_epoch else None
            state = build_state(model=p.net, optimizer=p.optimizer, epoch=epoch, step=step,
                                batch_in_epoch=batch_in_epoch, config=config_to_dict(self.cfg), metrics=metrics,
                                model_ema=p.ema.module, scaler=p.scaler, rng=[g[0] for g in gathered],
                                data=self.loader.state(consumed), epoch_sums=sums)
            self.run.save(state, metric=metric, epoch_end=batch_in_epoch == 0)
        self.last, self.asked, spent = time.monotonic(), False, time.perf_counter() - began
        self.seconds += spent
        if batch_in_epoch:
            logger.info("saved last.pth at epoch %d, batch %d, step %d (%.3f s in the loop)", epoch, batch_in_epoch,
                        step, spent)

    def check(self) -> None:
        self.run.check()

    def time_due(self) -> bool:
        """On rank 0, once per interval (it asks until poll() answers; then the save resets the clock)."""
        if not self.run.is_main or not self.interval_s or self.asked:
            return False
        self.asked = time.monotonic() - self.last >= self.interval_s
        return self.asked

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def validate(parts: TrainParts, loader: ValLoader) -> dict[str, float]:
    """val_* metrics of the model and, with EMA, ema_* of the averaged weights: one decode of the data."""
    models = {name: m for name, m in (("val", parts.net), ("ema", parts.ema.module)) if m is not None}
    for model in models.values():
        broadcast_buffers(model)  # every rank validates (and trains on from) rank 0's BN statistics
    return evaluate(models, loader, device=parts.device, precision=parts.precision, memory_format=parts.memory_format)


def fit(cfg: Config, parts: TrainParts, train_loader: TrainLoader, val_loader: ValLoader, tracker: Tracker,
        run: RunDir, position: Position, stop: StopRequest) -> dict:
    """The epoch loop from ``position`` on (train_loader is already there); returns the last
    validation metrics. Raises Preempted after saving when a stop signal came."""
    step, last = position.step, position.metrics
    checkpoint = Checkpoints(parts, run, cfg, train_loader)
    for epoch in range(position.epoch, cfg.schedule.epochs):
        if epoch != position.epoch:
            train_loader.set_epoch(epoch)
        carried = position.epoch_sums if epoch == position.epoch and position.batch_in_epoch else None
        trained = train_one_epoch(parts, train_loader, epoch=epoch, global_step=step, tracker=tracker,
                                  save=checkpoint, stop=stop, carried=EpochSums(**carried) if carried else None)
        step = trained.step
        if trained.stopped:
            checkpoint(epoch, trained.batch, step, metrics=last, sums=trained.sums)
            preempted(run, f"epoch {epoch}, batch {trained.batch}, step {step}")
        due = (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.schedule.epochs
        start = time.perf_counter()
        val = validate(parts, val_loader) if due else {}
        last = val or last
        row = {**trained.metrics(), **val, "epoch_time_s": trained.train_time_s + time.perf_counter() - start,
               "checkpoint_s": checkpoint.take_seconds(),
               "skipped": trained.skipped + val.get("val_skipped", 0)}
        tracker.log_epoch(epoch, row)  # before the save: a resume from it keeps this row
        logger.info("epoch %d/%d done: train loss %.4f  val loss %.4f  top-1 %.2f%%  top-5 %.2f%%%s  lr %.4g  "
                    "%.1f s  %.0f img/s  skipped %d", epoch, cfg.schedule.epochs, trained.train_loss,
                    val.get("val_loss", float("nan")), val.get("val_top1", float("nan")),
                    val.get("val_top5", float("nan")),
                    f"  (EMA top-1 {val['ema_top1']:.2f}%)" if "ema_top1" in val else "",
                    trained.lr, row["epoch_time_s"], trained.images_per_s, row["skipped"])
        checkpoint(epoch + 1, 0, step, metrics=last, metric=val.get("val_top1"))
        if epoch + 1 < cfg.schedule.epochs and stop.agree():  # a signal during validation or the save
            preempted(run, f"epoch {epoch + 1}, batch 0, step {step}")
    run.finish_saves()  # the last checkpoint written and verified before the final line
    return last


def preempted(run: RunDir, where: str) -> None:
    """After the stop's checkpoint: rank 0 waits for it to be written and verifies it, leaves the
    marker, every rank waits for that (a rank that exits first makes torchrun stop the others),
    then Preempted ends the run."""
    run.finish_saves()
    run.mark_preempted(where)
    barrier()
    raise Preempted(where)


def train(cfg: Config, info: DistInfo, precision: Precision, run: RunDir, start: Start, stop: StopRequest) -> dict:
    """Build everything, restore the start position, run fit(); returns the last val metrics."""
    d = cfg.data
    train_loader = build_train_loader(d.train_shards, batch_size=d.batch_size, img_size=d.img_size,
                                      seed=cfg.train.seed, epoch=0, rank=info.rank, world_size=info.world_size,
                                      workers=d.workers, num_classes=cfg.model.num_classes,
                                      pin_memory=info.device.type == "cuda")
    val_loader = build_val_loader(d.val_shards, batch_size=d.val_batch_size, img_size=d.img_size,
                                  crop_pct=d.crop_pct, rank=info.rank, world_size=info.world_size,
                                  workers=d.workers, num_classes=cfg.model.num_classes,
                                  pin_memory=info.device.type == "cuda")
    state = load_checkpoint(start.checkpoint) if start.checkpoint else None
    net = build_model(cfg, info, start_from="" if state else cfg.model.init_from)  # resume wins
    parts = build_parts(cfg, info, net, precision)
    position = restore(state, cfg, info, parts, train_loader)
    run.write_config(cfg)
    tracker = Tracker(cfg, run, start_epoch=position.epoch, resuming=state is not None)
    try:
        logger.info("%d epochs x %d steps of %d x %d images, precision %s", cfg.schedule.epochs,
                    train_loader.batches_per_epoch, d.batch_size, info.world_size, precision.name)
        return fit(cfg, parts, train_loader, val_loader, tracker, run, position, stop)
    finally:
        tracker.finish()


def setup_logging(rank: int) -> None:
    """INFO on rank 0; other ranks only warn (torchrun interleaves every rank's output)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%H:%M:%S",
                        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(message)s")


def run_training(cfg: Config, info: DistInfo, precision: Precision, stop: StopRequest,
                 started: float) -> tuple[int, str]:
    """(exit status, final line): every way a run ends becomes one status and one line."""
    run = RunDir(cfg.checkpoint.output_dir, is_main=info.is_main, keep=cfg.checkpoint.keep,
                 async_save=cfg.checkpoint.async_save)
    try:
        start = run.start(cfg.checkpoint.resume, cfg.schedule.epochs)
        if start.finished:
            at = start.position
            return 0, (f"already finished: {start.checkpoint} ended epoch {at.epoch} with val top-1 "
                       f"{at.metrics.get('val_top1', float('nan')):.2f}%; to train again, use a new "
                       "checkpoint.output_dir")
        final = train(cfg, info, precision, run, start, stop)
        return 0, (f"final val top-1 {final.get('val_top1', float('nan')):.2f}%  top-5 "
                   f"{final.get('val_top5', float('nan')):.2f}%  ({final.get('val_samples', 0)} images, "
                   f"{cfg.schedule.epochs} epochs; {time.perf_counter() - started:.0f} s)  -> {run.path}")
    except RunDirError as e:
        return 2, f"train.py: error: {e}"
    except NonFiniteLossError as e:
        return 3, f"train.py: error: {e}"
    except Preempted as e:  # stop signals have been ignored since the stop was agreed (StopRequest.ignore)
        return PREEMPTED_EXIT, (f"train.py: preempted at {e}: checkpoint saved in {run.path}; rerun the same "
                                "command to continue")
    except LabelError as e:
        return 1, f"train.py: error: {e.reason}"
    except BadDataError as e:  # raised on every rank alike: rank 0 says it
        return 1, f"train.py: error: {e}" if info.is_main else ""
    except OSError as e:  # a full disk, a read-only or vanished file system while saving
        kept = run.checkpoints()
        return 1, (f"train.py: error: {os_error_line(e, 'cannot write')}; " + (
            f"the previous checkpoint is intact ({kept[0].name})" if kept else "no checkpoint was written"))
    except (torch.distributed.DistBackendError, RuntimeError) as e:
        if info.world_size == 1 or not _lost_peer(e):
            raise
        return 1, (f"train.py: error: rank {info.rank} lost another process (it failed or was stopped: its own "
                   f"error says why): {one_line(e)}")
    finally:
        stop.settle()
        run.close()


def _lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank is gone. NCCL raises DistBackendError;
    gloo raises a plain RuntimeError whose only mark is its text, so that is matched here."""
    return isinstance(exc, torch.distributed.DistBackendError) or "closed by peer" in str(exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    started = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        precision = preflight(cfg)
    except ConfigError as e:  # one line, exit 2, and no output_dir yet
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    info = init_distributed(cfg.train.dist_timeout_s)
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # bit-exact resume: kernels independent of history
    else:  # speed over bit-exactness: autotuned cuDNN kernels, TF32 for fp32 matmuls and convs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    stop = StopRequest(info.control_group).install()
    try:
        status, line = run_training(cfg, info, precision, stop, started)
    finally:
        stop.restore()
        cleanup()
    if line and (info.is_main or status == 1):  # status 1 may be one rank's own (a bad label in its shard, a lost peer)
        print(line, file=sys.stdout if status == 0 else sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
