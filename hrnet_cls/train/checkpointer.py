"""The run folder (``checkpoint.output_dir``) and its one owner, :class:`RunDir`.

Every name in the folder is chosen here and nowhere else:

    .lock               held by the run that uses the folder (hrnet_cls.train.lock)
    config.yaml         the resolved recipe, written before the first checkpoint
    last.pth            every save (mid-epoch, epoch end, stop)
    epoch_XXXX.pth      copy of last.pth after epoch XXXX (0-based), the ``checkpoint.keep`` newest
    best.pth            copy of last.pth when val top-1 improved
    summary.csv         one row per epoch (hrnet_cls.train.tracking writes the rows)
    PREEMPTED           left after a stop signal's save; the next start removes it
    wandb_run_id        the id of the run's W&B run: a resumed run logs to the same one
    wandb/              W&B's local run files (unless WANDB_DIR says elsewhere)

Each ``.pth`` has its ``NAME.sha256`` beside it, and an interrupted write leaves a temp file
``.NAME.HOST.PID.XXXX.tmp``: both named by hrnet_cls.atomic, which writes every file here.

Rank 0 opens the folder (creates it, takes the lock, removes the temp files of dead writers)
and decides where the run starts (:meth:`RunDir.start`: new, resume, already finished, or
refused); every rank learns the outcome. Only rank 0 writes here.
"""
from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hrnet_cls.atomic import copy_atomic, sidecar, stale_temps, verify, write_atomic
from hrnet_cls.train.background_save import BackgroundSave
from hrnet_cls.train.state import check_checkpoint, load_checkpoint, save_checkpoint
from hrnet_cls.config import Config, save_config
from hrnet_cls.distributed import broadcast_object
from hrnet_cls.errors import one_line, os_error_line
from hrnet_cls.train.resume import Position
from hrnet_cls.train.lock import RunDirError, RunLock

logger = logging.getLogger(__name__)

LOCK = ".lock"
CONFIG = "config.yaml"
LAST = "last.pth"
BEST = "best.pth"
EPOCH_GLOB = "epoch_[0-9]*.pth"
SUMMARY = "summary.csv"
PREEMPTED = "PREEMPTED"
WANDB_ID = "wandb_run_id"

__all__ = ["RunDir", "RunDirError", "Start"]


def epoch_name(epoch: int) -> str:
    """The file of the weights after 0-based epoch ``epoch`` (as summary.csv numbers it)."""
    return f"epoch_{epoch:04d}.pth"


@dataclass(frozen=True)
class Start:
    """Where a run starts, decided by rank 0 and known to every rank."""

    checkpoint: Path | None = None  # the file to continue from; None: a new run
    position: Position = field(default_factory=Position)  # read from that file's header
    finished: bool = False  # the checkpoint already ended the run's last epoch


def _problem(path: Path, exc: BaseException) -> str:
    """exc in one line, without the file name the caller puts in front already."""
    return one_line(exc).removeprefix(f"{path}: ")


class RunDir:
    """One run folder. Cheap to construct (no file-system access); :meth:`start` opens it."""

    def __init__(self, path: str | Path, is_main: bool = True, keep: int = 0, async_save: bool = False) -> None:
        self.path = Path(path)
        self.is_main = is_main  # only the main rank writes
        self.keep = keep  # epoch_XXXX.pth files kept besides last.pth and best.pth
        self.lock: RunLock | None = None
        self.best_metric: float | None = None  # higher is better (val top-1)
        self.writer = BackgroundSave(async_save)  # the checkpoint writes: in a thread, or in save()

    # ------------------------------------------------------------ names

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def summary_csv(self) -> Path:
        return self.path / SUMMARY

    @property
    def preempted_marker(self) -> Path:
        return self.path / PREEMPTED

    def checkpoints(self) -> list[Path]:
        """The checkpoint files present (never the temp files of an interrupted save)."""
        names = [self.path / LAST, *sorted(self.path.glob(EPOCH_GLOB)), self.path / BEST]
        return [p for p in names if p.is_file()]

    # ------------------------------------------------------------ start

    def start(self, resume: str, epochs: int) -> Start:
        """Collective: rank 0 opens the folder and decides; every rank returns the same Start,
        or raises the same RunDirError, before anything is written."""
        outcome: Start | RunDirError = RunDirError("rank 0 did not decide")
        if self.is_main:
            try:
                outcome = self._open(resume, epochs)
            except RunDirError as exc:
                outcome = exc
            except OSError as exc:
                outcome = RunDirError(os_error_line(exc, "checkpoint.output_dir: cannot use"))
        outcome = broadcast_object(outcome)
        if isinstance(outcome, RunDirError):
            raise outcome
        return outcome

    def _open(self, resume: str, epochs: int) -> Start:
        self._prepare()
        self.lock = RunLock.acquire(self.path / LOCK)
        try:
            start = self._decide(resume, epochs)
        except BaseException:
            self.close()
            raise
        for stale in stale_temps(self.path):  # left by a save of a process that is gone
            logger.info("removing %s left by an interrupted save", stale)
            stale.unlink(missing_ok=True)
        self.preempted_marker.unlink(missing_ok=True)  # only now: a refused folder is left as it was
        self.best_metric = start.position.best_metric
        return start

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

    def _decide(self, resume: str, epochs: int) -> Start:
        """resume="" into a folder that holds checkpoints is refused (it would overwrite them);
        "auto" takes the newest checkpoint that verifies (none verifying is an error, never a
        silent restart); a path must exist and not overwrite a run in another folder."""
        existing = [p.name for p in self.checkpoints()]
        if resume == "" and existing:
            raise RunDirError(f"{self.path} holds a run ({', '.join(existing)}); continue it with "
                              "checkpoint.resume=auto, or start a new run in another checkpoint.output_dir")
        if resume == "auto":
            path = self._newest_verified()
        elif resume:
            path = Path(resume)
            if existing and path.resolve().parent != self.path.resolve():
                raise RunDirError(f"{self.path} holds another run ({', '.join(existing)}); resuming {resume} "
                                  "there would overwrite it: use another checkpoint.output_dir")
            if not path.is_file():
                raise RunDirError(f"checkpoint.resume: no checkpoint file {resume!r}")
            try:
                if not check_checkpoint(path):
                    logger.warning("checkpoint.resume %s has no .sha256: it loads in full, but is UNVERIFIED", path)
            except Exception as exc:  # noqa: BLE001 - a checksum mismatch, a truncated zip, not a checkpoint
                raise RunDirError(f"checkpoint.resume {path}: {_problem(path, exc)}") from None
        else:
            return Start()
        if path is None:
            return Start()
        position = Position.of(load_checkpoint(path, mmap=True))
        return Start(path, position, finished=position.epoch >= epochs and position.batch_in_epoch == 0)

    def _newest_verified(self) -> Path | None:
        """The newest (by stored step) checkpoint that verifies against its .sha256; failing
        that, the newest without a .sha256 that loads in full (named as unverified). None when
        there is no checkpoint at all. Refuses when there are some and none can be used:
        starting from scratch would overwrite a run."""
        tried, found, unverified = [], [], []
        for order, path in enumerate(self.checkpoints()):
            try:
                step = int(load_checkpoint(path, mmap=True)["step"])  # the pickle only: cheap
            except Exception as exc:  # noqa: BLE001 - any unreadable file is "not this one"
                tried.append(f"{path.name}: {_problem(path, exc)}")
                continue
            found.append((step, -order, path))  # ties prefer last.pth
        for step, _, path in sorted(found, reverse=True):
            try:
                if check_checkpoint(path):
                    if tried or unverified:
                        logger.warning("resuming from %s (step %d); passed over: %s", path, step,
                                       "; ".join(tried + [f"{p.name}: no .sha256" for p in unverified]))
                    return path
                unverified.append(path)  # loads in full, but nothing says these are the bytes saved
            except Exception as exc:  # noqa: BLE001 - a checksum mismatch, a truncated zip: not this one
                tried.append(f"{path.name}: {_problem(path, exc)}")
        if unverified:
            logger.warning("resuming from %s, which is UNVERIFIED: it has no .sha256 (it loads in full) and no "
                           "checkpoint that has one verifies%s", unverified[0],
                           f" ({'; '.join(tried)})" if tried else "")
            return unverified[0]
        if tried:
            raise RunDirError(f"checkpoint.resume=auto: no checkpoint in {self.path} can be resumed from "
                              f"({'; '.join(tried)}); fix or move them, or start a new run in another "
                              "checkpoint.output_dir")
        return None

    def check(self) -> None:
        """Raise the error of a background checkpoint write that failed (the previous file is intact)."""
        self.writer.check()

    def finish_saves(self) -> None:
        """Wait for the checkpoint write in flight and verify last.pth against its .sha256: before a
        stop's marker, at the end of training. Raises the write's error or ChecksumError."""
        self.writer.wait()
        if self.is_main and self.last.is_file():
            verify(self.last)

    def close(self) -> None:
        """Let a checkpoint write in flight finish, then release the lock (idempotent)."""
        try:
            self.writer.wait()
        except BaseException as exc:  # noqa: BLE001 - already leaving on an error: say it, keep that error
            logger.error("the checkpoint write in flight failed too: %s", one_line(exc))
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------ writes (main rank)

    def write_config(self, cfg: Config) -> None:
        """The resolved recipe, written once, before the first checkpoint."""
        if self.is_main:
            save_config(cfg, self.path / CONFIG)

    def wandb_run_id(self, resuming: bool) -> str:
        """The id of this run's W&B run. Resuming, the one in the folder (a resumed run continues
        its W&B run); otherwise, or when there is none, a new one, written down first."""
        path = self.path / WANDB_ID
        kept = path.read_text().strip() if resuming and path.is_file() else ""
        if kept:
            return kept
        run_id = secrets.token_hex(4)  # 8 lowercase characters, as wandb's own ids
        write_atomic(path, f"{run_id}\n")
        return run_id

    def mark_preempted(self, where: str) -> None:
        """The marker a batch script tells a preemption from a crash by (torchrun reports any
        worker exit as status 1)."""
        if self.is_main:
            self.preempted_marker.write_text(f"{where}\n")

    def save(self, state: Mapping[str, Any], metric: float | None = None, epoch_end: bool = True) -> None:
        """Write last.pth; at an epoch end also epoch_XXXX.pth (XXXX = state["epoch"] - 1);
        best.pth when metric improved. Each is an independent copy with its own checksum, so
        a corrupted or truncated file takes no other with it. With async_save the writes run in
        the background (hrnet_cls.train.background_save) on a snapshot of ``state``."""
        if epoch_end and self.keep > 0 and (state["batch_in_epoch"] != 0 or state["epoch"] < 1):
            raise ValueError("epoch_end save needs batch_in_epoch == 0 and epoch >= 1")
        improved = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if improved:
            self.best_metric = metric
        write = functools.partial(self._write, epoch_end=epoch_end, best=metric if improved else None)
        self.writer.submit(write, {**state, "best_metric": self.best_metric})

    def _write(self, state: Mapping[str, Any], epoch_end: bool, best: float | None) -> None:
        save_checkpoint(self.last, state)
        if epoch_end and self.keep > 0:
            copy_atomic(self.last, self.path / epoch_name(state["epoch"] - 1))
            self._prune()
        if best is not None:
            copy_atomic(self.last, self.path / BEST)
            logger.info("new best metric %.4f, saved %s", best, self.path / BEST)

    def _prune(self) -> None:
        epochs = sorted(self.path.glob(EPOCH_GLOB))
        for old in epochs[: max(0, len(epochs) - self.keep)]:
            old.unlink(missing_ok=True)
            sidecar(old).unlink(missing_ok=True)
