"""A checkpoint written by the flat-module layout (tests/data/pre_move) still resumes, validates
and exports: the same numbers as the code that wrote it gave (expected.json beside it)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS_VAL, REPO, subprocess_env

DATA = REPO / "tests" / "data" / "pre_move"
EXPECTED = json.loads((DATA / "expected.json").read_text())
# the command that wrote the file (tests/data/pre_move/README.md), one thread: bit-exact on CPU
RECIPE = ["schedule.epochs=2", "checkpoint.save_interval=4", "checkpoint.async_save=false", "train.ema=true",
          "data.workers=0"]


def run(tmp_path, *command: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=subprocess_env(tmp_path, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("ema", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["model", "ema"])
def test_validates_to_the_rows_of_the_code_that_wrote_it(tmp_path, ema) -> None:
    results = tmp_path / "rows.csv"
    run(tmp_path, "validate.py", "--checkpoint", str(DATA / "last.pth"), "--data", DIGITS_VAL, "--workers", "0",
        "--results-file", str(results), *(["--use-ema"] if ema else []))
    (row,) = csv.DictReader(results.open())
    want = EXPECTED["validate_ema" if ema else "validate"]
    assert row["verified"] == "True"
    assert (float(row["top1"]), float(row["top5"]), int(row["samples"])) == (want["top1"], want["top5"],
                                                                               want["samples"])
    assert float(row["loss"]) == pytest.approx(want["loss"], rel=1e-6)


@pytest.mark.slow
def test_resumes_to_the_row_of_the_code_that_wrote_it(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pth", "last.pth.sha256"):
        shutil.copy(DATA / name, out / name)
    proc = run(tmp_path, "train.py", "--config", "demo_digits.yaml", *RECIPE, f"checkpoint.output_dir={out}")
    assert "resuming at epoch 1, batch 11" in proc.stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]  # epoch 0's row was the old run's; this one covers all of epoch 1
    assert {k: rows[0][k] for k in EXPECTED["resumed_summary_row"]} == EXPECTED["resumed_summary_row"]


@pytest.mark.slow
def test_exports_its_weights(tmp_path) -> None:
    run(tmp_path, "-m", "hrnet_cls.export", str(DATA / "last.pth"), str(tmp_path / "out"))
    state = torch.load(DATA / "last.pth", map_location="cpu", weights_only=True)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == state["model"].keys()
    assert all(torch.equal(exported[k], state["model"][k]) for k in exported)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "hrnet_tiny_c" and config["num_classes"] == 10
