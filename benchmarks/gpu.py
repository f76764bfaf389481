"""``python -m benchmarks gpu``: the GPU check in one command, made of the other benchmarks' own ``run``.

    python -m benchmarks gpu --out bench-gpu            # one CUDA GPU, budgeted to finish in under 8 minutes
    python -m benchmarks gpu --smoke --out smoke        # the same code at tiny sizes on the CPU (CI runs it)

Sections (--sections 1 4 runs some), each one or two runs of the other benchmarks at GPU sizes (their
command lines are in the JSON): 1. train step (models): timm hrnet_w18 eager NCHW against hrnet_w18_c
NHWC eager and compiled (the one cold compile, timed: section 6 is budgeted from it), hrnet_w44_c and
hrnet_w48_c eager, bf16 batch 256: images/s, memory, MFU; 2. gradient
checkpointing (models --grad-ckpt); 3. fp16 + GradScaler in the engine (train --parts overhead): loss,
scale, host reads and CUDA syncs per step; 4. validation (validate), batch 1024: ours folded + NHWC +
compiled against timm's eager model, and both validate.py paths end to end on 10,240 synthetic JPEGs (at
least a full batch per worker);
5. input pipeline (data): our loader, a worker per core, against section 1's demand (vs_demand), and
nvJPEG; 6. a real train.py (train --parts train_py): ~300 steps, bf16, channels_last, compiled when 1.5x
section 1's compile time fits the time left (else eager, and the section's note says why);
7. checkpoints (checkpoint) of hrnet_w18_c and hrnet_w64_c training states on the GPU: a synchronous
save, the asynchronous save's stall (copy into pinned host memory) and its background write.
Section 1 also times timm's resnet50 alone at the same settings: the reference row (HRNet-W18's
FLOPs equal ResNet-50's; timm's published RTX 3090 table has it at 0.39x ResNet-50's img/s).
Each section has a time budget (SIGALRM) inside the command's limit; a row that fails or runs out of
time records its error and the rest go on; OUT/gpu.json and gpu.md are rewritten after every row.
Exit status: 0; 1 when a row recorded an error; 2 without CUDA (use --smoke) or for a bad --sections.
"""
import argparse
import importlib
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hrnet_cls.data.workers import usable_cores
from hrnet_cls.errors import one_line

from benchmarks import harness
from benchmarks.data import make_shards

FULL = dict(timm="hrnet_w18", w18="hrnet_w18_c", big=["hrnet_w44_c", "hrnet_w48_c", "resnet50"], img=224, batch=256,
            ckpt=["hrnet_w18_c", "hrnet_w48_c"], val_batch=1024, precision="bf16", backend="inductor", min_time=2.0,
            fp16_model="hrnet_w18_c", fp16_steps=8, images=10240, unique=1024, loader_batch=64, decode_batch=256,
            train_model="hrnet_w18_c", train_batch=256, train_steps=300, train_compile=True, limit=440.0,
            states=["hrnet_w18_c", "hrnet_w64_c"],
            budgets={1: 140.0, 2: 30.0, 3: 20.0, 4: 70.0, 5: 30.0, 6: 100.0, 7: 40.0})
# --smoke: the same code at CPU sizes (docs/design.md §7.3); the budgets leave a busy machine room
SMOKE = dict(FULL, timm="hrnet_w18_small", w18="hrnet_w18_small_c", big=["resnet18"], ckpt=["hrnet_tiny_c"],
             states=["hrnet_tiny_c"], img=32, batch=2,
             val_batch=4, precision="fp32", backend="eager", min_time=0.0, fp16_model="hrnet_tiny_c", fp16_steps=4,
             images=16, unique=8, loader_batch=4, decode_batch=4, train_model="hrnet_tiny_c", train_batch=8,
             train_steps=4, train_compile=False, limit=175.0,
             budgets={1: 60.0, 2: 30.0, 3: 20.0, 4: 40.0, 5: 25.0, 6: 60.0, 7: 20.0})
TITLES = {1: ("train_step", "Train step (synthetic batch)"), 2: ("grad_ckpt", "Gradient checkpointing"),
          3: ("fp16", "fp16 + GradScaler through the training engine"), 4: ("validation", "Validation"),
          5: ("input_pipeline", "Input pipeline against the train step"), 6: ("train_py", "train.py end to end"),
          7: ("checkpoint", "Checkpoint saves: what the loop waits")}


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the code path only")
    p.add_argument("--device", default="", help="default: cuda, or cpu with --smoke")
    p.add_argument("--out", default="bench-gpu", help="folder for gpu.json and gpu.md (created)")
    p.add_argument("--sections", nargs="+", type=int, choices=list(TITLES), default=list(TITLES), metavar="N")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = every usable core)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU if the GPU is not known")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds for the whole command (default: profile)")
    return p


def runs(n: int, p: dict, args: argparse.Namespace, shards: Any, workers: int) -> list[tuple[str, list[str]]]:
    """Section n's benchmark runs: (benchmark, argv)."""
    common = ["--device", args.device, "--min-time", str(p["min_time"]), "--rounds", "1", "--img-size", str(p["img"]),
              "--threads", str(1 if args.smoke else usable_cores())] + ["--smoke"] * args.smoke
    prec, batch, data = ["--precision", p["precision"]], ["--batch", str(p["batch"])], ["--workers", str(workers)]
    model = [*common, *prec, *batch, "--channels-last", "ours", "--compile-backend", p["backend"],
             "--peak-tflops", str(args.peak_tflops)]
    val = [*common, *prec, "--model", p["w18"], "--timm-model", p["timm"], "--batch-size", str(p["val_batch"]),
           "--compile-backend", p["backend"]]
    return {
        1: [("models", [*model, "--compile", "ours", "--compile-only", p["w18"], "--pairs", f"{p['w18']}:{p['timm']}",
                        *(f"{m}:" for m in p["big"])])],  # one cold compile: each is a minute or more
        2: [("models", [*model, "--pairs", *(f"{m}:" for m in p["ckpt"]), "--grad-ckpt"])],
        3: [("train", [*common, *batch, "--parts", "overhead", "--models", p["fp16_model"], "--precision", "fp16",
                       "--channels-last", "--steps", str(p["fp16_steps"])])],
        4: [("validate", [*val, "--parts", "model", "--compile-ours"]),
            ("validate", [*val, *data, "--parts", "e2e", "--data", shards.pattern, "--start-images", "0"])],
        5: [("data", [*common, *data, "--data", shards.pattern, "--pipelines", "train ours", "--no-ceiling",
                      "--batch", str(p["loader_batch"]), "--decode-batch", str(p["decode_batch"])])],
        6: [("train", [*common, *prec, *data, "--parts", "train_py", "--models", p["train_model"], "--shards",
                       shards.pattern, "--batch", str(p["train_batch"]), "--channels-last", "--train-steps",
                       str(p["train_steps"]), "--time-limit",
                       str(p["budgets"][6] - 5)] + ["--compile"] * p["train_compile"])],
        7: [("checkpoint", ["--device", args.device, "--model", m, "--min-time", "0", "--rounds", "1"]
             + ["--smoke"] * args.smoke) for m in p["states"]],
    }[n]


class SectionTimeout(BaseException):
    """A section ran out of its time budget (a BaseException: the row handlers let it through)."""


def expire(signum: int, frame: Any) -> None:
    raise SectionTimeout("the section's time budget is spent")


def demand(result: dict, p: dict) -> dict:
    """What the train step consumes: section 1's ours compiled w18 (else eager) images/s."""
    rows = result["sections"].get("train_step", {}).get("sections", {}).get("train_step", {}).get("rows", {})
    for key in (f"{p['w18']} compiled", p["w18"]):
        if rows.get(key, {}).get("images_per_s"):
            return {"source": f"section 1: {key}", "images_per_s": rows[key]["images_per_s"]}
    raise RuntimeError("no train-step images/s: section 1's w18 rows did not run (--sections)")


def compile_seconds(result: dict) -> float | None:
    """Section 1's measured cold compile of the w18 train step: its compiled row's first step less a steady one."""
    rows = result["sections"].get("train_step", {}).get("sections", {}).get("train_step", {}).get("rows", {})
    row = next((r for key, r in rows.items() if key.endswith(" compiled")), {})
    first, step = row.get("first_s"), row.get("median_s")
    return first - step if first and step else None


def plan_train_py(p: dict, compile_s: float | None, left: float) -> tuple[float, str]:
    """(section 6's budget, why): a compiled train.py gets 1.5x section 1's compile on top of its budget when
    the command's time left allows it, else it runs eager; p is updated to match."""
    if not p["train_compile"]:
        return min(p["budgets"][6], left), ""
    need = p["budgets"][6] + 1.5 * compile_s if compile_s is not None else None
    if need is None or need > left:
        p["train_compile"] = False
        why = "no compile time measured in section 1" if need is None else \
            f"its cold compile (section 1: {compile_s:.0f} s) does not fit the {left:.0f} s left"
        return min(p["budgets"][6], left), f"train.compile off: {why}"
    p["budgets"][6] = need
    return need, f"budget {need:.0f} s: {need - 1.5 * compile_s:.0f} s + 1.5 x section 1's compile ({compile_s:.0f} s)"


def run_section(n: int, result: dict, p: dict, args: argparse.Namespace, shards: Any, workers: int,
                save: Callable[[], None]) -> None:
    node = result["sections"][TITLES[n][0]]
    for name, argv in runs(n, p, args, shards, workers):
        module = importlib.import_module(f"benchmarks.{name}")
        run_args = harness.parse(module.options(), argv, module.SMOKE)
        report = harness.Report(name, run_args, changed=save)
        report.data["sections"] = node["sections"]  # the run's sections nest in this one
        node["runs"].append(shlex.join(["python", "-m", "benchmarks", name, *argv]))
        module.run(run_args, report)
    if n == 5:
        rows = node["sections"]["pipelines"]["rows"]
        report.row(rows, "train demand", lambda: demand(result, p))
        for row in [*rows.values(), *node["sections"].get("device_decode", {}).get("rows", {}).values()]:
            row["vs_demand"] = harness.ratio(row.get("images_per_s"), rows["train demand"].get("images_per_s"))


def main(argv: list[str]) -> int:
    args = options().parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run with --smoke for the CPU check",
              file=sys.stderr)
        return 2
    p, start, workers = dict(SMOKE if args.smoke else FULL), time.perf_counter(), args.workers or usable_cores()
    p["limit"] = args.time_limit or p["limit"]
    p["images"] = max(p["images"], workers * p["val_batch"])  # every worker's validation batch full
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")
    result: dict[str, Any] = {"benchmark": "gpu", "smoke": args.smoke, "profile": p, "sections_run": args.sections,
                              "machine": harness.machine(torch.device(args.device), ["gpu", *argv]), "sections": {}}

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        harness.write(args.out, "gpu", result)
    signal.signal(signal.SIGALRM, expire)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        shards = make_shards(Path(tmp), p["images"], unique=p["unique"], workers=workers) \
            if {4, 5, 6} & set(args.sections) else None
        for n in sorted(set(args.sections)):
            key, title = TITLES[n]
            node = result["sections"][key] = {"title": f"{n}. {title}", "runs": [], "sections": {}}
            left = min(p["budgets"][n], p["limit"] - (time.perf_counter() - start))
            if n == 6:  # a compiled train.py only where section 1's measured compile fits
                left, node["note"] = plan_train_py(p, compile_seconds(result),
                                                   p["limit"] - (time.perf_counter() - start))
            harness.log(f"section {n}: {title} ({left:.0f} s)")
            section_start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))  # SIGALRM interrupts the section's Python code
            try:
                run_section(n, result, p, args, shards, workers, save)
            except SectionTimeout as e:
                node["error"] = f"{e}: {p['budgets'][n]:.0f} s, or the command's {p['limit']:.0f} s"
            except Exception as e:  # noqa: BLE001 - a broken section is its result; the others still run
                node["error"] = one_line(e)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            node["seconds"] = time.perf_counter() - section_start
            save()
    found = harness.errors(result)
    harness.log(f"wrote {args.out}/gpu.json and gpu.md: {len(found)} error(s), {result['seconds']:.0f} s")
    for line in found:
        print(f"  {line}", file=sys.stderr)
    return 1 if found else 0
