"""Train-step speed and memory of HRNet-C against timm's implementation of the same architecture.

    python -m hrnet_cls.bench models                         # hrnet_w18_c vs timm hrnet_w18, CPU fp32
    python -m hrnet_cls.bench models --pairs hrnet_w48_c:hrnet_w48 --batch 16 --threads 2
    python -m hrnet_cls.bench models --device cuda --batch 256 --precision bf16 --channels-last --compile

Both models get the same weights (timm's state dict loaded into ours), the same input and
thread count; their timed steps are interleaved (A B A B ...) so drift of the machine hits
both alike. Reported: median step time, images/s, peak memory, and ours/timm ratios.
"""
import argparse
import json
import logging
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.precision import Precision
from hrnet_cls.timing import synchronize

_logger = logging.getLogger(__name__)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m hrnet_cls.bench models', description=__doc__.splitlines()[0])
    p.add_argument('--pairs', nargs='+', default=['hrnet_w18_c:hrnet_w18'], help='ours:timm pairs')
    p.add_argument('--batch', type=int, default=8, help='images per step')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--iters', type=int, default=6, help='timed steps per model')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2, help='torch intra-op threads (CPU)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', choices=('bf16', 'fp16', 'fp32'), default='fp32', help='autocast dtype (fp32 = off)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile both models')
    p.add_argument('--grad-ckpt', action='store_true', help='also time ours with gradient checkpointing')
    p.add_argument('--out', default='', help='write the results as JSON here')
    return p.parse_args(argv)


class Runner:
    """One model's train step (forward, loss, backward, SGD update) at fixed settings."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace):
        self.name = name
        self.device = torch.device(args.device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt).train()
        self.step_fn: Callable[..., Any] = torch.compile(self._step) if args.compile else self._step
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        self.autocast = Precision.of(args.precision, self.device).autocast()
        self.times: List[float] = []

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss

    def step(self, x: torch.Tensor, y: torch.Tensor, timed: bool) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.step_fn(x, y)
        self.opt.step()
        synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)


def peak_memory_bytes(runner: Runner, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes allocated during one train step, above what was allocated before it.

    CUDA: the caching allocator's max_memory_allocated. CPU: torch.profiler's memory timeline,
    replayed in time order at operator granularity (each op's own net allocation).
    """
    runner.opt.zero_grad(set_to_none=True)  # last step's grads are freed before measuring
    if runner.device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        runner.step(x, y, timed=False)
        return torch.cuda.max_memory_allocated(runner.device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(x, y, timed=False)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:  # +bytes allocated, -bytes freed
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def bench_pair(ours_name: str, timm_name: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    reference = timm.create_model(timm_name)
    ours = timm.create_model(ours_name)
    ours.load_state_dict(reference.state_dict())  # same weights: same math, same work
    runners = [Runner(f'{timm_name} (timm)', reference, args), Runner(ours_name, ours, args)]
    if args.grad_ckpt:
        ckpt = timm.create_model(ours_name)
        ckpt.load_state_dict(reference.state_dict())
        ckpt.set_grad_checkpointing(True)
        runners.append(Runner(f'{ours_name} +grad-ckpt', ckpt, args))
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    first = {}
    for r in runners:  # the first step alone: allocator warm-up, cuDNN autotuning and, with --compile, the compile
        start = time.perf_counter()
        r.step(x, y, timed=False)
        first[r.name] = time.perf_counter() - start
    untimed = max(args.warmup, 1) - 1  # the first step was one of the warm-up steps
    for i in range(untimed + args.iters):
        for r in runners:  # interleaved
            r.step(x, y, timed=i >= untimed)
    rows = []
    for r in runners:
        median = statistics.median(r.times)
        rows.append(dict(model=r.name, step_s=median, images_per_s=args.batch / median, first_step_s=first[r.name],
                         peak_mem_mib=peak_memory_bytes(r, x, y) / 2**20))
    base = rows[0]
    for row in rows:
        row['speed_vs_timm'] = row['images_per_s'] / base['images_per_s']
        row['mem_vs_timm'] = row['peak_mem_mib'] / base['peak_mem_mib'] if base['peak_mem_mib'] else None
    return rows


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec='seconds'), torch=torch.__version__,
               timm=timm.__version__, python=platform.python_version(), machine=platform.machine(),
               cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if args.device.startswith('cuda'):
        env['gpu'] = torch.cuda.get_device_name()
    return env


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"{'model':32} {'step s':>8} {'img/s':>9} {'peak MiB':>9} {'speed x':>8} {'mem x':>6} {'first s':>8}")
    for r in rows:
        mem_x = f"{r['mem_vs_timm']:.2f}" if r['mem_vs_timm'] is not None else '-'
        print(f"{r['model']:32} {r['step_s']:8.3f} {r['images_per_s']:9.1f} {r['peak_mem_mib']:9.0f} "
              f"{r['speed_vs_timm']:8.2f} {mem_x:>6} {r['first_step_s']:8.2f}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv or [])
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ('pairs', 'out')}
    results: Dict[str, Any] = dict(benchmark='models', settings=settings, environment=environment(args), rows=[])
    for pair in args.pairs:
        ours, _, theirs = pair.partition(':')
        rows = bench_pair(ours, theirs, args)
        print_table(rows)
        results['rows'].extend(rows)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    import sys
    raise SystemExit(main(sys.argv[1:]))
