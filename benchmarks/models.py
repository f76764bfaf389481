"""Train step of HRNet-C against timm's implementation of the same architecture: speed, memory, MFU.

    python -m benchmarks models                                       # hrnet_w18_c vs timm hrnet_w18, CPU fp32
    python -m benchmarks models --pairs hrnet_w18_c:hrnet_w18 hrnet_w48_c:hrnet_w48 --grad-ckpt
    python -m benchmarks models --device cuda --batch 256 --precision bf16 --channels-last ours --compile ours

OURS:TIMM pairs get timm's weights (its state dict loaded into ours); OURS: times ours alone. Rows:
timm's and ours, compiled too with --compile, ours with gradient checkpointing with --grad-ckpt; the
step: forward under autocast, cross-entropy, backward, Nesterov SGD, timed interleaved (first_step_s:
the first step alone). Peak memory: the CUDA allocator's peak during a step above what was allocated
before it; on a CPU torch.profiler's memory timeline. MFU = images/s x 3 x 2 x MACs / dense bf16 peak.
"""
import argparse

import timm
import torch
import torch.nn.functional as F

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.models.inference import count_macs
from hrnet_cls.precision import Precision

from benchmarks import harness

# Dense bf16 matrix rate by device name, TFLOP/s, from the vendors' datasheets (SXM parts; "with sparsity" halved)
PEAK_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.6, "NVIDIA H100 80GB HBM3": 989.4,
                    "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.6, "NVIDIA A100-SXM4-80GB": 312.0,
                    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0}
SMOKE = dict(pairs=["hrnet_w18_small_c:hrnet_w18_small"], batch=2, img_size=32, compile_backend="eager")


def options() -> argparse.ArgumentParser:
    p = harness.parser("models", __doc__, threads=2, min_time=4.0)
    p.add_argument("--pairs", nargs="+", default=["hrnet_w18_c:hrnet_w18"], help="OURS:TIMM, or OURS: for ours alone")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--channels-last", choices=("none", "ours", "both"), default="none", help="NHWC model and input")
    p.add_argument("--compile", choices=("none", "ours", "both"), default="none", help="also time compiled rows")
    p.add_argument("--compile-only", nargs="+", default=[], metavar="NAME",
                   help="compiled rows for these models only (each cold compile costs minutes)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--grad-ckpt", action="store_true", help="also time ours with gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU if not in the table")
    return p


class Step:
    """One model's train step at fixed settings, on its own synthetic batch (random: never zeros)."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, nhwc: bool, compiled: bool) -> None:
        self.device = torch.device(args.device)
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        self.autocast = Precision.of(args.precision, self.device).autocast()
        self.fwd_bwd = torch.compile(self._fwd_bwd, backend=args.compile_backend) if compiled else self._fwd_bwd
        self.x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=self.device).contiguous(
            memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch,), device=self.device)

    def _fwd_bwd(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.fwd_bwd(self.x, self.y)
        self.opt.step()

    def peak_mib(self) -> float:
        """Peak bytes allocated during one step above what was allocated before it, MiB."""
        self.opt.zero_grad(set_to_none=True)  # the last step's grads are freed before measuring
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self()
            return (torch.cuda.max_memory_allocated(self.device) - base) / harness.MIB
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            self()
        level = peak = 0
        for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
            level += e.self_cpu_memory_usage  # + allocated, - freed
            peak = max(peak, level)
        return peak / harness.MIB


def peak_flops(args: argparse.Namespace) -> float | None:
    name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else ""
    return (args.peak_tflops or PEAK_BF16_TFLOPS.get(name, 0.0)) * 1e12 or None


def bench_pair(ours: str, theirs: str, args: argparse.Namespace) -> dict[str, dict]:
    """The rows of one pair, timed interleaved: {row name: row}."""
    torch.manual_seed(0)
    weights, variants = timm.create_model(theirs or ours).state_dict(), {}  # row -> model, impl, NHWC, compiled, ckpt
    for impl, name in (("timm", theirs), ("ours", ours)) if theirs else (("ours", ours),):
        label, nhwc = f"{name} (timm)" if impl == "timm" else name, args.channels_last in ("both", impl)
        variants[label] = (name, impl, nhwc, False, False)
        if args.compile in ("both", impl) and (not args.compile_only or name in args.compile_only):
            variants[f"{label} compiled"] = (name, impl, nhwc, True, False)
    if args.grad_ckpt:
        variants[f"{ours} +grad-ckpt"] = (ours, "ours", args.channels_last != "none", False, True)
    steps = {}
    for key, (name, _, nhwc, compiled, ckpt) in variants.items():
        model = timm.create_model(name)
        model.load_state_dict(weights)
        model.set_grad_checkpointing(ckpt)
        steps[key] = Step(model, args, nhwc, compiled)
    timed, peak = harness.measure(steps, args, first=True), peak_flops(args)
    macs = count_macs(timm.create_model(ours), (3, args.img_size, args.img_size))
    rows = {key: harness.timed_row(timed[key], args.batch, model=name, impl=impl, layout="NHWC" if nhwc else "NCHW",
                                   compile=args.compile_backend if compiled else None, grad_ckpt=ckpt,
                                   batch=args.batch, img_size=args.img_size, precision=args.precision)
            for key, (name, impl, nhwc, compiled, ckpt) in variants.items()}
    for key, row in rows.items():
        if "images_per_s" in row:
            row.update(peak_mem_mib=steps[key].peak_mib(), gmacs_per_image=macs / 1e9,
                       mfu=row["images_per_s"] * 3 * 2 * macs / peak if peak else None)
        _, impl, _, compiled, ckpt = variants[key]
        base = rows.get(f"{theirs} (timm) compiled" if compiled else "", rows.get(f"{theirs} (timm)"))
        if impl == "ours" and not ckpt and base:  # against timm's row compiled alike, else its eager one
            row["speed_vs_timm"] = harness.ratio(row.get("images_per_s"), base.get("images_per_s"))
            row["mem_vs_timm"] = harness.ratio(row.get("peak_mem_mib"), base.get("peak_mem_mib"))
        if ckpt:
            row["time_vs_plain"] = harness.ratio(row.get("median_s"), rows[ours].get("median_s"))
            row["mem_vs_plain"] = harness.ratio(row.get("peak_mem_mib"), rows[ours].get("peak_mem_mib"))
    return rows


def run(args: argparse.Namespace, report: harness.Report) -> None:
    rows = report.section("train_step", f"Train step: batch {args.batch} at {args.img_size} px, {args.device} "
                          f"{args.precision}", mfu="images/s x 3 x 2 x MACs per image / peak dense bf16 FLOP/s",
                          peak_flops=peak_flops(args))
    for pair in args.pairs:
        ours, _, theirs = pair.partition(":")
        report.row(rows, pair, lambda: bench_pair(ours, theirs, args), many=True)


def main(argv: list[str]) -> int:
    return harness.cli("models", options(), run, argv, SMOKE)
