"""What every section of ``bench gpu`` shares: sizes, the clock, row bookkeeping, the environment."""
from __future__ import annotations

import argparse
import gc
import math
import platform
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import torch
import torchvision

from hrnet_cls.bench.data import machine
from hrnet_cls.data.workers import usable_cores
from hrnet_cls.errors import one_line

REPO = Path(__file__).resolve().parents[3]
STARTED = time.perf_counter()  # the clock of --time-limit and of the progress lines
MIB = 2 ** 20

# Dense bf16 matrix rate by torch.cuda.get_device_name(), TFLOP/s, from the vendors' datasheets
# (SXM parts; the "with sparsity" figures halved). KINDS.md measured 769-798 on random data on an H200.
PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.6,
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.6,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}


@dataclass(frozen=True)
class Profile:
    """The sizes of one run: FULL on a GPU, SMOKE on a CPU (the same code, tiny)."""

    timm_w18: str  # timm's implementation, the baseline of sections 1 and 4
    w18: str  # ours in place of hrnet_w18_c
    w44: str
    w48: str
    img_size: int
    batch: int  # train step (sections 1-3)
    val_batch: int  # section 4
    precision: str  # autocast of sections 1, 2, 4, 6 (section 3 is fp16)
    compile_backend: str  # torch.compile(backend=...)
    warmup: int  # untimed steps (the first one compiles)
    iters: int  # timed steps, median reported
    fp16_steps: tuple[int, int]  # two epoch lengths: per-step counts are their difference
    images: int  # synthetic JPEGs in the shards (sections 4-6)
    unique_images: int  # distinct ones among them (each written images / unique times)
    loader_batch: int  # section 5's CPU loader batch (its images/s hardly depend on it)
    decode_batch: int  # section 5's GPU decode batch
    decode_iters: int
    train_model: str  # section 6
    train_batch: int
    train_steps: int
    train_log_interval: int
    train_compile: bool
    e2e_repeats: int  # section 4's end-to-end runs of each side
    e2e_estimate_s: float  # section 4's end-to-end rows are skipped with less than this left
    compile_estimate_s: float  # a compile row is skipped with less than this left in its section
    budgets: dict[int, float] = field(default_factory=dict)  # seconds per section
    time_limit_s: float = 0.0  # the whole command, from its start


FULL = Profile(
    timm_w18="hrnet_w18", w18="hrnet_w18_c", w44="hrnet_w44_c", w48="hrnet_w48_c", img_size=224, batch=256,
    val_batch=1024, precision="bf16", compile_backend="inductor", warmup=3, iters=10, fp16_steps=(4, 8),
    images=10240, unique_images=1024, loader_batch=64, decode_batch=256, decode_iters=8,
    train_model="hrnet_w18_c", train_batch=256, train_steps=300, train_log_interval=10, train_compile=True,
    e2e_repeats=2, e2e_estimate_s=25.0, compile_estimate_s=45.0,
    budgets={1: 140.0, 2: 30.0, 3: 20.0, 4: 70.0, 5: 30.0, 6: 130.0}, time_limit_s=440.0)


def cpu_has_bf16() -> bool:
    """Whether the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX); else autocast is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def smoke_profile() -> Profile:
    return Profile(
        timm_w18="hrnet_w18_small", w18="hrnet_w18_small_c", w44="hrnet_tiny_c", w48="hrnet_tiny_c", img_size=64,
        batch=2, val_batch=4, precision="bf16" if cpu_has_bf16() else "fp32", compile_backend="eager",
        warmup=1, iters=2, fp16_steps=(2, 4), images=48, unique_images=16, loader_batch=4, decode_batch=4,
        decode_iters=2, train_model="hrnet_tiny_c", train_batch=8, train_steps=12, train_log_interval=2,
        train_compile=False, e2e_repeats=1, e2e_estimate_s=5.0, compile_estimate_s=8.0,
        # ~50 s in all on an idle 2-core VM; the budgets leave room for a busy one (they may sum past the limit:
        # a section that ends early leaves its time to the next ones)
        budgets={1: 90.0, 2: 30.0, 3: 20.0, 4: 40.0, 5: 25.0, 6: 60.0}, time_limit_s=175.0)


def log(message: str) -> None:
    """A progress line: wall clock and seconds since the command started."""
    print(f"[{datetime.now():%H:%M:%S} +{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


class SectionTimeout(BaseException):
    """A section ran out of its time budget (a BaseException: row handlers let it through)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; interrupts Python code)."""
    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section time budget of {seconds:.0f} s spent")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    """One run: arguments, sizes, device, shared results and the current section's deadline."""

    args: argparse.Namespace
    p: Profile
    device: torch.device
    tmp: Path
    workers: int
    results: dict = field(default_factory=dict)  # section key -> its result (section 5 reads section 1)
    shards: Any = None  # pipeline.Shards, written before the sections when 4, 5 or 6 run
    deadline: float = math.inf  # perf_counter time the current section must end by

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def peak_flops(self) -> tuple[float | None, str | None]:
        """(dense bf16 FLOP/s, where it comes from) or (None, None) when unknown (a CPU)."""
        if self.args.peak_tflops:
            return self.args.peak_tflops * 1e12, "--peak-tflops"
        if self.cuda and torch.cuda.get_device_name(self.device) in PEAK_BF16_TFLOPS:
            name = torch.cuda.get_device_name(self.device)
            return PEAK_BF16_TFLOPS[name] * 1e12, f"table: {name}"
        return None, None

    def mfu(self, images_per_s: float, macs_per_image: int) -> float | None:
        """Model FLOP utilisation of a train step: forward + backward = 3 x forward, 2 FLOPs per MAC."""
        peak, _ = self.peak_flops()
        return images_per_s * 3 * 2 * macs_per_image / peak if peak else None


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled steps of earlier rows: their caches hold the models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def has_numbers(row: dict) -> bool:
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())


def run_rows(ctx: Context, rows: dict, keys: tuple[str, ...], fn: Callable[[], dict], need_s: float = 0.0) -> None:
    """rows[k] = fn()[k] for k in keys, or each an {"error": ...} when fn fails or time is short.

    A failure (OOM, a compile error) becomes the row's error and the section goes on; a
    SectionTimeout marks the rows and propagates (the section is over).
    """
    label = "/".join(keys)
    if ctx.left() < need_s:
        reason = f"skipped: {max(ctx.left(), 0):.0f} s left of the section's budget, this needs about {need_s:.0f} s"
        rows.update({k: {"error": reason} for k in keys})
        log(f"  {label}: {reason}")
        return
    log(f"  {label} ...")
    start = time.perf_counter()
    try:
        got = fn()
        rows.update({k: got[k] for k in keys})
    except SectionTimeout:
        rows.update({k: {"error": "timed out: the section's time budget ran out during this row"} for k in keys})
        raise
    except Exception as e:  # noqa: BLE001 - any failure is this row's result
        rows.update({k: {"error": one_line(e)} for k in keys})
    finally:
        free_memory(ctx.device)
    for k in keys:
        rows[k]["seconds"] = time.perf_counter() - start
        shown = rows[k].get("error") or ", ".join(f"{name} {rows[k][name]:.4g}" for name in
                                                   ("images_per_s", "step_s", "peak_mem_mib") if name in rows[k])
        log(f"  {k}: {shown}")


def synthetic_batch(ctx: Context, batch: int, channels_last: bool, classes: int = 1000
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (never zeros: they can run faster than data) and labels on the device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    size = ctx.p.img_size
    x = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=fmt)
    return x, torch.randint(0, classes, (batch,), device=ctx.device)


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    env = machine() | {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torchvision": torchvision.__version__,
        "timm": timm.__version__, "cuda": torch.version.cuda, "cores_usable": usable_cores(), "executable": sys.executable,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "machine": platform.machine(), "command": shlex.join(["python", "-m", "hrnet_cls.bench", "gpu", *argv]),
        "device": str(device), "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=props.total_memory / 2 ** 30,
                   gpu_multiprocessors=props.multi_processor_count,
                   gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_driver=_driver())
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
