"""``python -m hrnet_cls.bench gpu``: the smoke run (the same code as on a GPU, tiny, on the CPU) and its refusals."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SECTIONS = ("train_step", "grad_ckpt", "fp16", "validation", "input_pipeline", "train_py")


def bench(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hrnet_cls.bench", "gpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu")
    run = bench("--smoke", "--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"json": json.loads((out / "gpu.json").read_text()), "md": (out / "gpu.md").read_text()}


@pytest.mark.slow  # ~50 s: every section at tiny sizes, train.py in a child process
def test_smoke_runs_every_section_without_an_error_under_three_minutes(smoke) -> None:
    result = smoke["json"]
    assert list(result["sections"]) == list(SECTIONS)
    for key, section in result["sections"].items():
        assert "error" not in section, (key, section["error"])
        assert section["rows"], key
        for name, row in section["rows"].items():
            assert "error" not in row, (key, name, row["error"])
    assert result["seconds"] < 180
    assert result["environment"]["device"] == "cpu" and " gpu --smoke --out " in result["environment"]["command"]
    for n, key in enumerate(SECTIONS, 1):
        assert f"## {n}. " in smoke["md"], key


@pytest.mark.slow
def test_smoke_rows_hold_the_measurements_each_section_promises(smoke) -> None:
    s = smoke["json"]["sections"]
    step = s["train_step"]["rows"]
    assert set(step) == {"timm_w18", "ours_w18_eager", "ours_w18_compile", "ours_w44_eager", "ours_w44_compile",
                         "ours_w48_eager", "ours_w48_compile"}
    for row in step.values():
        assert row["images_per_s"] > 0 and row["peak_mem_mib"] > 0 and row["gmacs_per_image"] > 0
        assert row["mfu"] is None  # no peak FLOP/s for a CPU: no made-up utilisation
    assert step["timm_w18"]["impl"] == "timm" and step["timm_w18"]["layout"] == "NCHW"
    assert step["ours_w18_compile"]["compile"] and step["ours_w18_eager"]["layout"] == "NHWC"
    assert step["timm_w18"]["gmacs_per_image"] == pytest.approx(step["ours_w18_eager"]["gmacs_per_image"], rel=0.01)
    for row in s["grad_ckpt"]["rows"].values():  # checkpointing saves memory (its time cost is noise at this size)
        assert row["ckpt_peak_mem_mib"] < row["peak_mem_mib"] and row["time_ratio"] > 0
    fp16 = s["fp16"]["rows"]["ours_w18_fp16"]
    assert fp16["scaler"] and fp16["loss_finite"] and fp16["final_scale"] > 0
    assert math.isfinite(fp16["host_reads_per_step"]) and fp16["host_reads_per_step"] >= 0
    val = s["validation"]["rows"]
    assert val["ours_w18"]["vs_timm"] > 0 and "folded" in val["ours_w18"]["setting"]
    images = smoke["json"]["shards"]["images"]
    assert val["e2e_ours"]["top1_top5_samples"][2] == val["e2e_timm"]["top1_top5_samples"][2] == images
    pipe = s["input_pipeline"]["rows"]
    assert [e["images"] for e in pipe["cpu_loader"]["epochs"]] == [images, images]
    assert pipe["cpu_loader"]["vs_demand"] > 0 and pipe["gpu_decode"]["images_per_s"] > 0
    run = s["train_py"]["rows"]["train_py"]
    assert run["exit_status"] == 0 and run["epochs_done"] == run["epochs"]
    assert run["steps_done"] >= smoke["json"]["profile"]["train_steps"] and run["images_per_s"] > 0


@pytest.mark.slow  # a fresh interpreter
def test_without_cuda_the_full_run_refuses_in_one_line(tmp_path) -> None:
    run = bench("--out", str(tmp_path), timeout=120, CUDA_VISIBLE_DEVICES="")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: no CUDA device here (torch.cuda.is_available() is False); run with --smoke for the CPU check"]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow  # a fresh interpreter
def test_an_unknown_section_is_refused_naming_it(tmp_path) -> None:
    run = bench("--smoke", "--sections", "1,9", "--out", str(tmp_path), timeout=120)
    assert run.returncode != 0 and "--sections '1,9': no section [9]" in run.stderr
    assert not (tmp_path / "gpu.json").exists()
