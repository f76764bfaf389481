"""The one harness of every benchmark: timing, the common options, machine info, JSON + markdown (docs/design.md §7.2).

A benchmark is ``run(args, report)``, adding rows to ``report`` as it measures (a failing row records its error);
``cli`` runs it, prints the tables, writes OUT/NAME.json and OUT/NAME.md, and exits 1 if a row has an error."""
import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from hrnet_cls.data.workers import usable_cores
from hrnet_cls.errors import one_line

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
STARTED = time.perf_counter()
SMOKE = dict(min_time=0.0, rounds=1, threads=1)  # every benchmark's --smoke: one timed call, one thread


def log(message: str) -> None:
    """A progress line: wall clock and seconds since the process started."""
    print(f"[{datetime.now():%H:%M:%S} +{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def measure(fns: dict[str, Callable[[], Any]], args: argparse.Namespace, first: bool = False) -> dict[str, dict]:
    """{name: timing} of zero-argument callables by Timer.blocked_autorange in ``args.rounds`` interleaved rounds:
    median_s, min_s, max_s, n (seconds per call), or {"error"}. first=True also times each one's first call by
    the wall clock (first_s: a compile, cuDNN autotuning), which Timer's warm-up hides."""
    from torch.utils.benchmark import Timer  # imported here: it imports cpp_extension, which can warn at import

    out: dict[str, dict] = {name: {"times": []} for name in fns}
    live = dict(fns)

    def attempt(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing callable is its own row's error
            out[name] = {"error": one_line(e)}
            live.pop(name)

    for name, fn in list(live.items()) if first else ():
        start = time.perf_counter()
        attempt(name, lambda: (fn(), torch.cuda.synchronize() if torch.cuda.is_available() else None))
        if name in live:
            out[name]["first_s"] = time.perf_counter() - start
    for _ in range(args.rounds):
        for name, fn in list(live.items()):
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default is 1
            attempt(name, lambda: out[name]["times"].extend(timer.blocked_autorange(min_run_time=args.min_time).times))
    for row in out.values():
        if row.get("times"):
            t = row["times"]
            row.update(median_s=statistics.median(t), min_s=min(t), max_s=max(t), n=len(t))
    return out


def timed_row(t: dict, per_call: int = 0, **fields: Any) -> dict:
    """A row from a measure() timing (median_s etc.: seconds per call); per_call images give images_per_s."""
    if "error" in t:
        return {**fields, "error": t["error"]}
    row = {**fields, **{k: t[k] for k in ("median_s", "min_s", "max_s", "n", "first_s") if k in t}}
    return row | ({"images_per_s": per_call / t["median_s"]} if per_call else {})


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


class Report:
    """Sections of rows, filled in as they are measured; ``changed`` runs after every row."""

    def __init__(self, name: str, args: argparse.Namespace, changed: Callable[[], None] = lambda: None) -> None:
        self.data: dict[str, Any] = {"benchmark": name, "settings": dict(vars(args)), "sections": {}}
        self.changed = changed

    def section(self, key: str, title: str, **notes: Any) -> dict[str, dict]:
        self.data["sections"][key] = {"title": title, "notes": notes, "rows": {}}
        return self.data["sections"][key]["rows"]

    def row(self, rows: dict, key: str, fn: Callable[[], dict], many: bool = False) -> None:
        """rows[key] = fn() (many=True: fn returns {name: row}, each added), or rows[key] = {"error": ...}
        when fn raises. A BaseException (the gpu command's time budget, ^C) leaves "timed out" and goes on."""
        log(f"{key} ...")
        start, names = time.perf_counter(), [key]
        rows[key] = {"error": "timed out: the time budget ran out during this row"}
        try:
            got = fn() if many else {key: fn()}
            del rows[key]
            rows.update(got)
            names = list(got)
        except Exception as e:  # noqa: BLE001 - any failure is this row's result
            rows[key] = {"error": one_line(e)}
        finally:  # free this row's models: compiled code holds them too
            torch._dynamo.reset() if "torch._dynamo" in sys.modules else None
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            for k in names:
                rows[k]["row_s"] = time.perf_counter() - start  # the row's wall time, set-up included
            self.changed()
        for k in names:
            shown = [f"{c} {rows[k][c]:.4g}" for c in ("images_per_s", "median_s") if isinstance(rows[k].get(c), float)]
            log(f"  {k}: {rows[k].get('error') or ', '.join(shown)}")


def errors(node: dict, where: str = "") -> list[str]:
    """'section/row: error' for every error in a report (nested: the gpu command's)."""
    found = [f"{where}: {node['error']}"] if node.get("error") and where else []
    found += [f"{where}/{key}: {row['error']}" for key, row in node.get("rows", {}).items() if row.get("error")]
    return found + [e for key, s in node.get("sections", {}).items() for e in errors(s, f"{where}/{key}".strip("/"))]


def fmt(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return {None: "", True: "yes", False: "no"}[v]
    if isinstance(v, float):
        return str(v) if not math.isfinite(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v).replace("|", "/")


def markdown(node: dict, depth: int = 2) -> list[str]:
    """Each section a heading, its notes and a table of its rows' scalar fields (lists and dicts stay in the JSON)."""
    lines: list[str] = []
    for section in node.get("sections", {}).values():
        lines += [f"{'#' * depth} {section['title']}", ""]
        if section.get("error"):
            lines += [f"Section error: {section['error']}", ""]
        lines += markdown(section, depth + 1)
        rows = section.get("rows", {})
        columns = [c for c in dict.fromkeys(k for r in rows.values() for k, v in r.items()
                                            if not isinstance(v, (list, dict))) if c != "error"]
        columns += ["error"] * any("error" in r for r in rows.values())
        if rows:
            lines += ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for name, r in rows.items()]
            lines.append("")
        lines += [f"- {k}: {fmt(v)}" for k, v in section.get("notes", {}).items()] + [""] * bool(section.get("notes"))
    return lines


def machine(device: torch.device, command: list[str]) -> dict[str, Any]:
    import PIL
    import PIL.features
    import timm
    import torchvision

    from hrnet_cls.data import transforms
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(["python", "-m", "benchmarks", *command]), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "cores_usable": usable_cores(), "threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
           "pillow": PIL.__version__, "libjpeg_turbo": PIL.features.version_feature("libjpeg_turbo"),
           "simplejpeg": getattr(transforms.simplejpeg, "__version__", None), "device": str(device),
           "cuda": torch.version.cuda, "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2 ** 30, cudnn=torch.backends.cudnn.version(),
                   gpu_capability=f"{props.major}.{props.minor}", gpu_multiprocessors=props.multi_processor_count)
    return env


def write(out: str | Path, name: str, data: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    env = data["machine"]
    head = [f"# {name}", "", f"`{env['command']}` on {env['gpu'] or env['processor']} ({env['device']}), "
            f"torch {env['torch']}, timm {env['timm']}, {env['cores_usable']} cores, {env['threads']} threads, "
            f"{env['date']}.", ""]
    (out / f"{name}.md").write_text("\n".join(head + markdown(data)))


def parser(name: str, doc: str, **defaults: Any) -> argparse.ArgumentParser:
    """A benchmark's parser with the common options; ``defaults`` are the benchmark's own."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("common options")
    g.add_argument("--out", default="", help=f"folder for {name}.json and {name}.md (created); default: print only")
    g.add_argument("--device", default="cpu")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast (fp32 = off)")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    g.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement and round")
    g.add_argument("--rounds", type=int, default=3, help="measurement rounds, interleaved across what is compared")
    g.add_argument("--smoke", action="store_true", help="tiny sizes, one thread, one timed call: the code path only")
    p.set_defaults(**defaults)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str], smoke: dict[str, Any]) -> argparse.Namespace:
    p.set_defaults(**(SMOKE | smoke if "--smoke" in argv else {}))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    return args


def cli(name: str, p: argparse.ArgumentParser, run: Callable[[argparse.Namespace, Report], None],
        argv: list[str], smoke: dict[str, Any]) -> int:
    args = parse(p, argv, smoke)
    report = Report(name, args)
    report.data["machine"] = machine(torch.device(args.device), [name, *argv])
    run(args, report)
    print("\n".join(markdown(report.data)))
    if args.out:
        write(args.out, name, report.data)
    print("\n".join(found := errors(report.data)), file=sys.stderr, end="\n" * bool(found))
    return 1 if found else 0
