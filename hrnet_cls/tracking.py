"""Metrics sink of the main rank: summary.csv in the output directory, and W&B.

The W&B mode is decided before ``wandb.init`` is called (SPEC section 5: against an
unreachable server init blocks for ~90 s and then raises, and switching to offline in the
same process can hang). "online" without an API key, or with a server that does not
answer an HTTP request within a few seconds, runs without W&B after one warning; the
init timeout is bounded as well for servers that answer but then stall.
"""
from __future__ import annotations

import configparser
import csv
import http.client
import logging
import netrc
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hrnet_cls.config import Config, WandbConfig, config_to_dict

logger = logging.getLogger(__name__)

# summary.csv columns, one row per epoch; "epoch" is the 0-based index of the finished
# epoch (epoch_XXXX.pth of the same epoch holds the weights after it).
SUMMARY_COLUMNS = (
    "epoch",  # 0-based epoch index
    "step",  # global optimizer steps after the epoch
    "lr",  # learning rate during the epoch
    "train_loss",  # mean training loss over the epoch
    "val_loss",  # mean validation loss
    "val_top1",  # validation top-1 accuracy, %
    "val_top5",  # validation top-5 accuracy, %
    "epoch_time_s",  # wall time of training + validation, seconds
    "images_per_s",  # training throughput over all ranks, images per second
    "skipped",  # samples skipped by the data pipeline (unreadable images)
)
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_DEFAULT_BASE_URL = "https://api.wandb.ai"


# ---------------------------------------------------------------- mode decision


def _base_url() -> str:
    """W&B server: WANDB_BASE_URL, else `wandb login --host`'s settings file, else wandb's default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        return parser.get("default", "base_url")
    except (configparser.Error, OSError):
        pass
    try:
        import wandb

        return wandb.Settings().base_url
    except Exception:  # any wandb version quirk: fall back to the classic host
        return _DEFAULT_BASE_URL


def _has_api_key(base_url: str) -> bool:
    """An API key in the environment, an identity-token file, or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own lookup also knows hosts that proxy to another (CoreWeave Forge)
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return read_netrc_auth(host=base_url) is not None
    except ImportError:
        pass
    except Exception:  # a malformed entry is as good as none
        return False
    path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(urlsplit(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout_s: float) -> bool:
    """Whether the server at url answers an HTTP request (any status) within timeout_s.

    An HTTP answer rather than a TCP connect: a firewall or a hung server can accept
    connections and never reply, which is what makes wandb.init block. Certificates are
    not verified (only liveness is probed, nothing secret is sent); proxies from the
    environment are used as wandb would. A daemon thread bounds a hanging DNS lookup too.
    """
    answered = threading.Event()

    def probe() -> None:
        request = urllib.request.Request(url, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout_s, context=ssl._create_unverified_context()).close()
            answered.set()
        except urllib.error.HTTPError:  # 404, 401, ...: a server is there
            answered.set()
        except (OSError, ValueError, http.client.HTTPException):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


def resolve_wandb_mode(cfg: WandbConfig, connect_timeout_s: float = 3.0) -> str:
    """"online", "offline" or "disabled", decided without calling wandb.init.

    WANDB_MODE, when set, overrides cfg.mode. Online degrades to "disabled" with one
    warning when no API key is configured or the server does not answer in time.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or cfg.mode
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        logger.warning("WANDB_MODE=%r is not online/offline/disabled; using wandb.mode=%r", mode, cfg.mode)
        mode = cfg.mode
    if mode != "online":
        return mode
    url = _base_url()
    if not _has_api_key(url):
        logger.warning("W&B disabled: wandb.mode is online but no API key is configured for %s "
                       "(set WANDB_API_KEY or run `wandb login`; or use wandb.mode=offline)", url)
        return "disabled"
    if not _reachable(url, connect_timeout_s):
        logger.warning("W&B disabled: %s does not answer within %.0f s (use wandb.mode=offline "
                       "to keep a local run and `wandb sync` it later)", url, connect_timeout_s)
        return "disabled"
    return "online"


# ---------------------------------------------------------------- tracker


def _number(key: str, value: Any) -> float | int:
    """Plain Python number from a float, int, 0-d tensor or numpy scalar."""
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return number


def _csv_cell(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class Tracker:
    """summary.csv + W&B for the main rank; on other ranks every method does nothing.

    start_epoch: the epoch a resumed run restarts at (checkpoint["epoch"]); rows of
    summary.csv from that epoch on are dropped, earlier ones kept. 0 starts a new file.
    A resumed run is a new W&B run with the same name.
    """

    def __init__(self, cfg: Config, output_dir: str | Path, is_main: bool, start_epoch: int = 0,
                 connect_timeout_s: float = 3.0, init_timeout_s: float = 30.0):
        self.enabled = is_main
        self.run: Any = None  # the wandb Run, or None without W&B
        self.summary_path = Path(output_dir) / "summary.csv"
        self._warned_extra: set[str] = set()
        if not is_main:
            return
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self._start_summary(start_epoch)
        mode = resolve_wandb_mode(cfg.wandb, connect_timeout_s)
        if mode != "disabled":
            self.run = _init_wandb(cfg, Path(output_dir), mode, init_timeout_s)

    def _start_summary(self, start_epoch: int) -> None:
        kept: list[dict[str, str]] = []
        if start_epoch > 0 and self.summary_path.is_file():
            with open(self.summary_path, newline="") as f:
                rows = csv.DictReader(f)
                kept = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) < start_epoch]
        with open(self.summary_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Per-step metrics (e.g. loss, lr, images_per_s) as train/<name> against train/step."""
        if self.run is None:
            return
        self.run.log({"train/step": step, **{f"train/{k}": _number(k, v) for k, v in metrics.items()}})

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """One summary.csv row and epoch/<name> in W&B against epoch (0-based index).

        Keys outside SUMMARY_COLUMNS go to W&B only; missing columns stay empty.
        """
        if not self.enabled:
            return
        values = {k: _number(k, v) for k, v in metrics.items()}
        extra = set(values) - set(SUMMARY_COLUMNS) - self._warned_extra
        if extra:
            logger.info("metrics %s are not summary.csv columns; logged to W&B only", sorted(extra))
            self._warned_extra |= extra
        row = {c: _csv_cell(values.get(c)) for c in SUMMARY_COLUMNS} | {"epoch": str(epoch)}
        with open(self.summary_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS).writerow(row)
        if self.run is not None:
            self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in values.items()}})

    def finish(self) -> None:
        """Close the W&B run and wait until its files are written (idempotent)."""
        if self.run is not None:
            import wandb

            run, self.run = self.run, None
            run.finish()
            # finish() can return before the W&B service has written the run file
            # (observed with 0.31 offline); teardown waits for the service to exit.
            wandb.teardown()


def _init_wandb(cfg: Config, output_dir: Path, mode: str, init_timeout_s: float) -> Any:
    """wandb.init in an already-decided mode; on failure warn once and return None."""
    import wandb

    name = cfg.wandb.name or f"{cfg.model.name}-{output_dir.resolve().name}"
    started = time.monotonic()
    try:
        run = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=name, tags=list(cfg.wandb.tags),
            config=config_to_dict(cfg), mode=mode,
            # WANDB_DIR, when set, chooses where run files go; else next to the checkpoints
            dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
            settings=wandb.Settings(init_timeout=init_timeout_s),
        )
    except Exception as e:  # never retry offline in-process: that can hang (SPEC section 5)
        logger.warning("W&B disabled: wandb.init failed after %.0f s: %s", time.monotonic() - started, e)
        return None
    run.define_metric("train/step")
    run.define_metric("train/*", step_metric="train/step")
    run.define_metric("epoch")
    run.define_metric("epoch/*", step_metric="epoch")
    run.define_metric("epoch/val_top1", step_metric="epoch", summary="max")
    logger.info("W&B run %r (%s) in %s", name, mode, run.dir)
    return run
