"""The run folder (``checkpoint.output_dir``) and the one owner of a run's life, :class:`Checkpointer`:
start (lock; new, resume, finished or refused; the resume file read once), restore, save (last, epoch,
best; in a thread or in the loop), stop, close. Every file name in the folder is chosen here, and only
rank 0 writes there (docs/design.md §6.2-6.7)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from timm.utils import random_seed

from hrnet_cls.atomic import copy_atomic, sidecar, stale_temps, verify, write_atomic
from hrnet_cls.config import CheckpointConfig, Config, config_to_dict, save_config
from hrnet_cls.distributed import DistInfo, all_gather_object, barrier, broadcast_object
from hrnet_cls.errors import RunDirError, one_line, os_error_line
from hrnet_cls.train.background_save import BackgroundSave
from hrnet_cls.train.lock import RunLock
from hrnet_cls.train.state import EpochSums, Position, build_state, capture_rng, load_checkpoint, restore_state
from hrnet_cls.train.state import save_checkpoint

if TYPE_CHECKING:
    from hrnet_cls.data import TrainLoader
    from hrnet_cls.train.engine import TrainParts

logger = logging.getLogger(__name__)

LOCK = ".lock"  # held by the run using the folder (train.lock)
CONFIG = "config.yaml"  # the resolved recipe
LAST = "last.pth"  # every save
BEST = "best.pth"  # copy of last.pth when val top-1 improved
EPOCH_GLOB = "epoch_[0-9]*.pth"  # copies of last.pth after each epoch, the checkpoint.keep newest
SUMMARY = "summary.csv"  # one row per epoch (train.tracking)
PREEMPTED = "PREEMPTED"  # left by a stop signal's save; removed by the next start
FINISHED = "FINISHED"  # left when the last epoch's checkpoint is written and verified; removed by a start that trains
WANDB_ID = "wandb_run_id"  # a resumed run logs to the same W&B run

__all__ = ["Checkpointer", "RunDirError", "Start"]


def epoch_name(epoch: int) -> str:
    """The file of the weights after 0-based epoch ``epoch`` (as summary.csv numbers it)."""
    return f"epoch_{epoch:04d}.pth"


@dataclass(frozen=True)
class Start:
    """Where a run starts, decided by rank 0 and known to every rank."""

    checkpoint: Path | None = None  # the file to continue from; None: a new run
    position: Position = field(default_factory=Position)
    finished: bool = False  # the checkpoint already ended the run's last epoch
    state: Mapping[str, Any] | None = field(default=None, repr=False)  # that file, read once on this rank


def _problem(path: Path, exc: BaseException) -> str:
    """exc in one line, without the file name the caller puts in front already."""
    return one_line(exc).removeprefix(f"{path}: ")


def _read(path: Path, state: Mapping[str, Any] | None = None) -> tuple[Mapping[str, Any], bool]:
    """(the checkpoint, whether it matched its .sha256). Verified bytes keep ``state`` (already
    read, memory-mapped) or are mapped; a file without a .sha256 is read in full, every tensor,
    so a truncated one fails here."""
    if verify(path):
        return (state if state is not None else load_checkpoint(path, mmap=True)), True
    return load_checkpoint(path), False


class Checkpointer:
    """One run folder and the saves of the run in it. Cheap to construct; :meth:`start` opens it.

    recipe: the run's Config, stored in every checkpoint and as config.yaml (None: library use,
    with states built by the caller and given to :meth:`write`)."""

    def __init__(self, cfg: CheckpointConfig, recipe: Config | None = None, is_main: bool = True) -> None:
        self.path, self.cfg, self.is_main = Path(cfg.output_dir), cfg, is_main
        self.recipe = recipe
        self.lock: RunLock | None = None
        self.best_metric: float | None = None  # best val top-1 so far
        self.metrics: dict[str, float] = {}  # the latest validation metrics: every save carries them
        self.writer = BackgroundSave(cfg.async_save)
        self.seconds = 0.0  # spent in saves since take_seconds(): checkpoint_s
        self._last_save, self._asked = time.monotonic(), False

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def summary_csv(self) -> Path:
        return self.path / SUMMARY

    def checkpoints(self) -> list[Path]:
        """The checkpoint files present (never the temp files of an interrupted save)."""
        names = [self.path / LAST, *sorted(self.path.glob(EPOCH_GLOB)), self.path / BEST]
        return [p for p in names if p.is_file()]

    # ------------------------------------------------------------ start and restore

    def start(self, epochs: int) -> Start:
        """Collective: rank 0 opens the folder and decides; every rank returns the same Start (and
        reads its file), or raises the same RunDirError, before anything is written."""
        outcome: Start | RunDirError = RunDirError("rank 0 did not decide")
        if self.is_main:
            try:
                outcome = self._open(epochs)
            except RunDirError as exc:
                outcome = exc
            except OSError as exc:
                outcome = RunDirError(os_error_line(exc, "checkpoint.output_dir: cannot use"))
        shared = broadcast_object(dataclasses.replace(outcome, state=None) if isinstance(outcome, Start) else outcome)
        if isinstance(shared, RunDirError):
            raise shared
        start = outcome if self.is_main else shared
        if start.checkpoint is not None and start.state is None:  # rank 0 verified it
            start = dataclasses.replace(start, state=load_checkpoint(start.checkpoint, mmap=True))
        self.best_metric, self.metrics = start.position.best_metric, dict(start.position.metrics)
        return start

    def _open(self, epochs: int) -> Start:
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # leaf first
        self._prepare()
        self.lock = RunLock.acquire(self.path / LOCK)
        try:
            path, state = self._choose()
        except BaseException:
            self.close()
            for folder in created:  # a refused start leaves no new, empty folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        for stale in stale_temps(self.path):  # left by a save of a process that is gone
            logger.info("removing %s left by an interrupted save", stale)
            stale.unlink(missing_ok=True)
        (self.path / PREEMPTED).unlink(missing_ok=True)  # only now: a refused folder is left as it was
        if path is None:
            (self.path / FINISHED).unlink(missing_ok=True)
            return Start()
        position = Position.of(state)
        finished = position.epoch >= epochs and position.batch_in_epoch == 0
        if not finished:  # more epochs to train: not finished any more
            (self.path / FINISHED).unlink(missing_ok=True)
        return Start(path, position, finished, state)

    def _prepare(self) -> None:
        """Create the folder (and parents) or fail in one line: not a directory, read-only, no space."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"checkpoint.output_dir {self.path}: exists and is not a directory") from None
        except OSError as exc:
            raise RunDirError(os_error_line(exc, "checkpoint.output_dir: cannot create")) from None
        if not self.path.is_dir():
            raise RunDirError(f"checkpoint.output_dir {self.path}: exists and is not a directory")

    def _choose(self) -> tuple[Path | None, Mapping[str, Any] | None]:
        """The file checkpoint.resume names and its contents: "" refuses a folder that holds
        checkpoints, "auto" takes the newest that verifies, a path must exist and not overwrite
        a run in another folder."""
        resume, existing = self.cfg.resume, [p.name for p in self.checkpoints()]
        if resume == "" and existing:
            raise RunDirError(f"{self.path} holds a run ({', '.join(existing)}); continue it with "
                              "checkpoint.resume=auto, or start a new run in another checkpoint.output_dir")
        if resume == "auto":
            return self._newest_verified()
        if not resume:
            return None, None
        path = Path(resume)
        if existing and path.resolve().parent != self.path.resolve():
            raise RunDirError(f"{self.path} holds another run ({', '.join(existing)}); resuming {resume} "
                              "there would overwrite it: use another checkpoint.output_dir")
        if not path.is_file():
            raise RunDirError(f"checkpoint.resume: no checkpoint file {resume!r}")
        try:
            state, verified = _read(path)
        except Exception as exc:  # noqa: BLE001 - a checksum mismatch, a truncated zip, not a checkpoint
            raise RunDirError(f"checkpoint.resume {path}: {_problem(path, exc)}") from None
        if not verified:
            logger.warning("checkpoint.resume %s has no .sha256: it loads in full, but is UNVERIFIED", path)
        return path, state

    def _newest_verified(self) -> tuple[Path | None, Mapping[str, Any] | None]:
        """The newest checkpoint (by stored step, ties to last.pth) that verifies; failing that the
        newest without a .sha256 that loads in full, named as unverified; none at all: a new run.
        Refuses when there are some and none can be used: a new run would overwrite them."""
        tried, found = [], []
        for order, path in enumerate(self.checkpoints()):
            try:
                state = load_checkpoint(path, mmap=True)  # the pickle only: cheap
            except Exception as exc:  # noqa: BLE001 - any unreadable file is "not this one"
                tried.append(f"{path.name}: {_problem(path, exc)}")
                continue
            found.append((int(state["step"]), -order, path, state))
        unverified: list[Path] = []
        fallback: tuple[Path, Mapping[str, Any]] | None = None  # the newest that loads in full, unverified
        for _, _, path, state in sorted(found, key=lambda f: f[:2], reverse=True):
            try:
                state, verified = _read(path, state)
            except Exception as exc:  # noqa: BLE001 - a checksum mismatch, a truncated zip: not this one
                tried.append(f"{path.name}: {_problem(path, exc)}")
                continue
            if verified:
                if tried or unverified:
                    logger.warning("resuming from %s (step %d); passed over: %s", path, state["step"],
                                   "; ".join(tried + [f"{p.name}: no .sha256" for p in unverified]))
                return path, state
            unverified.append(path)
            fallback = fallback or (path, state)
        if fallback is not None:
            logger.warning("resuming from %s, which is UNVERIFIED: it has no .sha256 (it loads in full) and no "
                           "checkpoint that has one verifies%s", fallback[0], f" ({'; '.join(tried)})" if tried else "")
            return fallback
        if tried:
            raise RunDirError(f"checkpoint.resume=auto: no checkpoint in {self.path} can be resumed from "
                              f"({'; '.join(tried)}); fix or move them, or start a new run in another "
                              "checkpoint.output_dir")
        return None, None

    def restore(self, start: Start, parts: TrainParts, loader: TrainLoader, info: DistInfo, seed: int) -> Position:
        """Put the loader and the training objects where ``start`` stopped, or seed a new run; returns
        the position the epoch loop starts from. Raises RunDirError when the checkpoint cannot
        continue on this data. The LR needs nothing back: the schedule computes it from samples seen."""
        position = start.position
        if start.state is not None:
            self._warn_global_batch(position, loader, info.world_size, parts.scheduler.base_lr)
            try:
                where = loader.resume(position.epoch, position.batch_in_epoch, position.data)
            except ValueError as exc:  # the same on every rank: the same files
                raise RunDirError(str(exc)) from None
            logger.info("resuming at %s, step %d", where, position.step)
        random_seed(seed + position.step, info.rank)  # dropout / drop-path differ per rank
        if start.state is not None:
            restore_state(start.state, parts.net, parts.optimizer, parts.scaler, parts.ema.module, rank=info.rank,
                          world_size=info.world_size)
        return position

    @staticmethod
    def _warn_global_batch(position: Position, loader: TrainLoader, world_size: int, lr: float) -> None:
        was = (position.data or {}).get("layout", {})
        if not was:
            return
        before, now = was["world_size"] * was["batch_size"], world_size * loader.plan.batch_size
        if before != now and loader.plan.rank == 0:
            logger.warning("global batch %d (%d x %d) differs from the checkpoint's %d (%d x %d): the lr per "
                           "sample continues as scheduled, but optim.lr=%g was set for the old batch (linear "
                           "scaling: %g)", now, world_size, loader.plan.batch_size, before, was["world_size"],
                           was["batch_size"], lr, lr * now / before)

    # ------------------------------------------------------------ saves (collective; rank 0 writes)

    def save_epoch(self, parts: TrainParts, loader: TrainLoader, epoch: int, step: int,
                   metrics: Mapping[str, float], rank_best: bool = True) -> None:
        """After epoch ``epoch`` (0-based): last.pth, epoch_XXXX.pth, and best.pth when ``metrics``
        (this epoch's validation, {} if none) improved val top-1 and ``rank_best`` (the whole set validated)."""
        self.metrics = dict(metrics) or self.metrics
        self._save(parts, loader, Position(epoch + 1, step, 0), metrics.get("val_top1") if rank_best else None)

    def save_mid(self, parts: TrainParts, loader: TrainLoader, epoch: int, batch: int, step: int,
                 sums: EpochSums) -> None:
        """last.pth inside epoch ``epoch``, after ``batch`` of its batches; ``sums``: its totals so far."""
        spent = self._save(parts, loader, Position(epoch, step, batch, epoch_sums=sums), None)
        logger.info("saved last.pth at epoch %d, batch %d, step %d (%.3f s in the loop)", epoch, batch, step, spent)

    def _save(self, parts: TrainParts, loader: TrainLoader, at: Position, top1: float | None) -> float:
        """Every rank adds its RNG state and, mid-epoch, the samples it trained on; rank 0 writes."""
        began = time.perf_counter()
        mid = at.batch_in_epoch > 0
        gathered = all_gather_object((capture_rng(), loader.packed_consumed() if mid else None))
        if self.is_main:
            data = loader.state([g[1] for g in gathered] if mid else None)  # any layout can continue from it
            at = dataclasses.replace(at, metrics=self.metrics, best_metric=self.best_metric, data=data)
            state = build_state(model=parts.net, optimizer=parts.optimizer, position=at,
                                config=config_to_dict(self.recipe) if self.recipe else {},
                                model_ema=parts.ema.module, scaler=parts.scaler, rng=[g[0] for g in gathered])
            self.write(state, epoch_end=not mid, top1=top1)
        self._last_save, self._asked = time.monotonic(), False
        spent = time.perf_counter() - began
        self.seconds += spent
        return spent

    def write(self, state: Mapping[str, Any], epoch_end: bool = True, top1: float | None = None) -> None:
        """Write last.pth; at an epoch end also epoch_XXXX.pth (XXXX = state["epoch"] - 1); best.pth
        when ``top1`` improved. Each an independent copy with its own checksum; with async_save in a
        thread, from a host snapshot of ``state``."""
        if epoch_end and self.cfg.keep > 0 and (state["batch_in_epoch"] != 0 or state["epoch"] < 1):
            raise ValueError("epoch_end save needs batch_in_epoch == 0 and epoch >= 1")
        improved = top1 is not None and (self.best_metric is None or top1 > self.best_metric)
        if improved:
            self.best_metric = top1
        write = functools.partial(self._write, epoch_end=epoch_end, best=top1 if improved else None)
        self.writer.submit(write, {**state, "best_metric": self.best_metric})

    def _write(self, state: Mapping[str, Any], epoch_end: bool, best: float | None) -> None:
        save_checkpoint(self.last, state)
        if epoch_end and self.cfg.keep > 0:
            copy_atomic(self.last, self.path / epoch_name(state["epoch"] - 1))
            epochs = sorted(self.path.glob(EPOCH_GLOB))
            for old in epochs[: max(0, len(epochs) - self.cfg.keep)]:
                old.unlink(missing_ok=True)
                sidecar(old).unlink(missing_ok=True)
        if best is not None:
            copy_atomic(self.last, self.path / BEST)
            logger.info("new best metric %.4f, saved %s", best, self.path / BEST)

    def step_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` ends with a save by count (checkpoint.save_interval)."""
        return self.cfg.save_interval > 0 and step % self.cfg.save_interval == 0

    def time_due(self) -> bool:
        """On rank 0, once per checkpoint.save_interval_min (it asks until the save resets the clock)."""
        if not self.is_main or not self.cfg.save_interval_min or self._asked:
            return False
        self._asked = time.monotonic() - self._last_save >= self.cfg.save_interval_min * 60
        return self._asked

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def check(self) -> None:
        """Raise the error of a background write that failed (the previous file is intact)."""
        self.writer.check()

    # ------------------------------------------------------------ records and the end

    def write_config(self) -> None:
        """config.yaml: the resolved recipe, written once per start, before the first checkpoint."""
        if self.is_main and self.recipe is not None:
            save_config(self.recipe, self.path / CONFIG)

    def wandb_run_id(self, resuming: bool) -> str:
        """The id of this run's W&B run: resuming, the one in the folder; otherwise (or when there
        is none) a new one, written down first."""
        path = self.path / WANDB_ID
        kept = path.read_text().strip() if resuming and path.is_file() else ""
        if kept:
            return kept
        run_id = secrets.token_hex(4)  # 8 lowercase characters, as wandb's own ids
        write_atomic(path, f"{run_id}\n")
        return run_id

    def finish(self) -> None:
        """Wait for the write in flight and verify last.pth: before a stop's marker, at the end.
        Raises the write's error or ChecksumError."""
        self.writer.wait()
        if self.is_main and self.last.is_file():
            verify(self.last)

    def mark_finished(self, where: str) -> None:
        """After the last save is verified: the marker a requeue script tells done by, whatever status torchrun
        reports (a signal that reaches it during the final save makes that 1)."""
        if self.is_main:
            write_atomic(self.path / FINISHED, f"{where}\n")

    def stop(self, where: str) -> str:
        """After a stop's save: finish it, leave PREEMPTED (torchrun reports any worker exit as status
        1; a requeue script reads this file), and every rank waits for that; returns ``where``."""
        self.finish()
        if self.is_main:
            write_atomic(self.path / PREEMPTED, f"{where}\n")
        barrier()  # a rank that exits first makes torchrun stop the others mid-save
        return where

    def close(self) -> None:
        """Let a write in flight finish, then release the lock (idempotent)."""
        try:
            self.writer.wait()
        except BaseException as exc:  # noqa: BLE001 - already leaving on an error: say it, keep that error
            logger.error("the checkpoint write in flight failed too: %s", one_line(exc))
        if self.lock is not None:
            self.lock.release()
            self.lock = None
