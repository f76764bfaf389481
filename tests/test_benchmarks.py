"""``python -m benchmarks gpu``: the smoke run (the GPU check's code, tiny, on the CPU) and the refusal without CUDA.

The benchmarks are not part of the package: they run as a child process from the repository root.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # a fresh interpreter; the smoke run ~30-50 s on 2 cores
SECTIONS = {"train_step": "train_step", "grad_ckpt": "train_step", "fp16": "overhead", "validation": "model",
            "input_pipeline": "pipelines", "train_py": "train_py",
            "checkpoint": "checkpoint hrnet_tiny_c"}  # gpu section -> a benchmark section inside it


def gpu(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu")
    run = gpu("--smoke", "--out", str(out), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"json": json.loads((out / "gpu.json").read_text()), "md": (out / "gpu.md").read_text()}


def test_smoke_runs_every_section_and_writes_numbers(smoke) -> None:
    result = smoke["json"]
    assert list(result["sections"]) == list(SECTIONS) and result["smoke"] and result["seconds"] < 175
    assert result["machine"]["device"] == "cpu" and " gpu --smoke --out " in result["machine"]["command"]
    for n, (key, inner) in enumerate(SECTIONS.items(), 1):
        section = result["sections"][key]
        assert "error" not in section and section["runs"][0].startswith("python -m benchmarks "), key
        rows = section["sections"][inner]["rows"]
        assert rows, key
        for name, row in rows.items():
            assert "error" not in row, (key, name, row["error"])
            assert positive(row["row_s"]) and (positive(row.get("images_per_s")) or positive(row.get("median_s"))), \
                (key, name, row)
        assert section["title"].startswith(f"{n}. ") and f"## {section['title']}\n" in smoke["md"], key
        assert f"| {next(iter(rows))} |" in smoke["md"], key


def test_smoke_rows_hold_what_each_section_measures(smoke) -> None:
    s = smoke["json"]["sections"]
    step = s["train_step"]["sections"]["train_step"]["rows"]
    assert set(step) == {"hrnet_w18_small (timm)", "hrnet_w18_small_c", "hrnet_w18_small_c compiled",
                         "resnet18"}  # the reference row: timm's ResNet at the same settings; one cold compile
    for row in step.values():
        assert positive(row["peak_mem_mib"]) and positive(row["gmacs_per_image"]) and positive(row["first_s"])
        assert row["mfu"] is None  # no peak FLOP/s for a CPU: no made-up utilisation
    assert step["hrnet_w18_small (timm)"]["layout"] == "NCHW" and step["hrnet_w18_small_c"]["layout"] == "NHWC"
    assert step["hrnet_w18_small_c compiled"]["compile"] == "eager"
    assert step["hrnet_w18_small_c"]["gmacs_per_image"] == pytest.approx(
        step["hrnet_w18_small (timm)"]["gmacs_per_image"], rel=0.01)
    assert all(positive(step[k]["speed_vs_timm"]) and positive(step[k]["mem_vs_timm"])
               for k in ("hrnet_w18_small_c", "hrnet_w18_small_c compiled"))
    ckpt = s["grad_ckpt"]["sections"]["train_step"]["rows"]["hrnet_tiny_c +grad-ckpt"]
    assert ckpt["grad_ckpt"] and positive(ckpt["time_vs_plain"]) and positive(ckpt["mem_vs_plain"])
    fp16 = s["fp16"]["sections"]["overhead"]["rows"]["hrnet_tiny_c"]
    assert fp16["precision"] == "fp16" and fp16["scaler"] and fp16["loss_finite"] and positive(fp16["final_scale"])
    assert fp16["host_reads_per_step"] >= 0 and math.isfinite(fp16["host_reads_per_step"])
    assert fp16["steps"] == 4 and positive(fp16["bare_ms_per_step"]) and positive(fp16["engine_ms_per_step"])
    val = s["validation"]["sections"]
    assert positive(val["model"]["rows"]["ours"]["vs_timm"]) and "folded" in val["model"]["rows"]["ours"]["setting"]
    e2e = val["e2e"]["rows"]
    assert positive(e2e["ours"]["vs_timm"]) and positive(e2e["timm"]["images_per_s"])
    assert e2e["ours"]["hits_top1_top5_samples"][2] == e2e["timm"]["hits_top1_top5_samples"][2] == 16  # every sample
    pipe = s["input_pipeline"]["sections"]
    assert positive(pipe["pipelines"]["rows"]["train ours"]["vs_demand"])
    assert pipe["pipelines"]["rows"]["train demand"]["source"] == "section 1: hrnet_w18_small_c compiled"
    assert positive(pipe["device_decode"]["rows"]["decode"]["vs_demand"])
    run = s["train_py"]["sections"]["train_py"]["rows"]["train.py"]
    assert run["exit_status"] == 0 and run["epochs_done"] == run["epochs"] == 2 and run["steps_done"] == 4
    assert positive(run["images_per_s"]) and positive(run["wall_s"])
    saves = s["checkpoint"]["sections"]["checkpoint hrnet_tiny_c"]["rows"]
    for name in ("Checkpointer.write, sync: the loop waits for the write",
                 "Checkpointer.write, async: the loop's stall (snapshot)",
                 "Checkpointer.write, async: the background write"):
        assert positive(saves[name]["median_s"]), name


def test_without_cuda_the_full_run_refuses_in_one_line(tmp_path) -> None:
    run = gpu("--out", str(tmp_path / "out"), timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: no CUDA device here (torch.cuda.is_available() is False); run with --smoke for the CPU check"]
    assert not (tmp_path / "out").exists()


def test_a_compiled_train_py_gets_the_compile_time_section_1_measured_or_runs_eager() -> None:
    """Section 6's budget: a cold inductor compile of the w18 train step is a minute or more on a GPU, which a
    fixed 100 s budget could not cover; the check budgets it from section 1's measured compile."""
    from benchmarks.gpu import FULL, plan_train_py

    p = dict(FULL, budgets=dict(FULL["budgets"]))
    assert plan_train_py(p, 60.0, 300.0) == (190.0, "budget 190 s: 100 s + 1.5 x section 1's compile (60 s)")
    assert p["train_compile"] and p["budgets"][6] == 190.0
    p = dict(FULL, budgets=dict(FULL["budgets"]))
    budget, why = plan_train_py(p, 150.0, 200.0)
    assert (budget, p["train_compile"]) == (100.0, False)
    assert why == "train.compile off: its cold compile (section 1: 150 s) does not fit the 200 s left"
    p = dict(FULL, budgets=dict(FULL["budgets"]))
    assert plan_train_py(p, None, 300.0) == (100.0, "train.compile off: no compile time measured in section 1")
