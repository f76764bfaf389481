"""Every reader of our checkpoints checks the .sha256 first: validate.py, model.init_from,
checkpoint.resume (a path or auto) and the export. A flipped byte inside a tensor loads
without complaint in torch.load, so without the check it would give wrong numbers."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DIGITS_VAL as VAL, TINY_RECIPE, load_script, tiny_model
from hrnet_cls.atomic import ChecksumError, sidecar, verify
from hrnet_cls.train.state import Position, build_state, load_checkpoint, save_checkpoint
from hrnet_cls.config import config_to_dict, load_config
from hrnet_cls.export import main as export_main
from hrnet_cls.config import CheckpointConfig
from hrnet_cls.train.checkpointer import Checkpointer

train_script = load_script("train.py")
validate = load_script("validate.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def save_at(path: Path, step: int, seed: int = 0) -> Path:
    """A training checkpoint of the demo recipe at an epoch end (epoch = step), .sha256 beside it."""
    model = tiny_model(10, seed)
    state = build_state(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), position=Position(step, step, 0),
                        config=config_to_dict(load_config("demo_digits.yaml")))
    save_checkpoint(path, state)
    return path


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside a tensor: torch.load still loads it
    path.write_bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """good.pth (verifies), flipped.pth (good's bytes, one flipped, good's .sha256 beside it),
    bare.pth (good's bytes, no .sha256)."""
    root = tmp_path_factory.mktemp("files")
    good = save_at(root / "good.pth", 1)
    flipped, bare = root / "flipped.pth", root / "bare.pth"
    shutil.copy(good, flipped)
    sidecar(flipped).write_text(sidecar(good).read_text().replace("good.pth", "flipped.pth"))
    flip_a_byte(flipped)
    load_checkpoint(flipped)  # the point: it loads
    shutil.copy(good, bare)
    return {"good": good, "flipped": flipped, "bare": bare}


def mismatch(path: Path) -> str:
    return f"{path}: contents do not match {path.name}.sha256 (sha256 "


def test_validate_makes_a_mismatch_an_error_row_and_says_which_rows_were_verified(files, tmp_path) -> None:
    out = tmp_path / "out.csv"
    code = validate.main(["--checkpoint", str(files["good"]), str(files["flipped"]), str(files["bare"]), "--data",
                          VAL, "--workers", "0", "--batch-size", "120", "--results-file", str(out)])
    assert code == 1
    good, flipped, bare = csv.DictReader(out.open())
    assert flipped["error"].startswith(mismatch(files["flipped"])) and "corrupt or half-written" in flipped["error"]
    assert flipped["top1"] == "" and flipped["verified"] == ""
    assert (good["verified"], good["error"], bare["verified"], bare["error"]) == ("True", "", "False", "")
    assert bare["top1"] == good["top1"] != ""  # the same bytes: only the check differs


def test_init_from_a_mismatching_file_is_exit_2_before_any_output(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "never"
    code = train_script.main(["--config", "demo_digits.yaml", *TINY_RECIPE, f"checkpoint.output_dir={out}",
                              f"model.init_from={files['flipped']}"])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and line.startswith(f"train.py: error: model.init_from {files['flipped']}: cannot start from "
                                         f"it: contents do not match flipped.pth.sha256"), line
    assert not out.exists()


def test_resume_from_a_mismatching_path_is_refused_and_the_folder_left_as_it_was(files, tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    out.mkdir()
    resume = out / "last.pth"
    shutil.copy(files["flipped"], resume)
    sidecar(resume).write_text(sidecar(files["good"]).read_text().replace("good.pth", "last.pth"))
    (out / "PREEMPTED").write_text("epoch 1, batch 3, step 14\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = train_script.main(["--config", "demo_digits.yaml", *TINY_RECIPE, f"checkpoint.output_dir={out}",
                              f"checkpoint.resume={resume}"])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and line.startswith(f"train.py: error: checkpoint.resume {resume}: contents do not match "
                                         "last.pth.sha256"), line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_refuses_a_mismatching_file_and_records_whether_it_verified(files, tmp_path, capsys) -> None:
    assert export_main([str(files["flipped"]), str(tmp_path / "x")]) == 2
    assert mismatch(files["flipped"]) in capsys.readouterr().err and not (tmp_path / "x").exists()
    for name, verified in (("good", True), ("bare", False)):
        assert export_main([str(files[name]), str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name / "config.json").read_text())["export"]["verified"] is verified


def test_resume_auto_prefers_a_verified_file_and_takes_an_unverified_one_only_when_it_must(tmp_path, caplog) -> None:
    out = tmp_path / "run"
    out.mkdir()
    save_at(out / "epoch_0001.pth", 2)
    save_at(out / "last.pth", 3, seed=1)
    sidecar(out / "last.pth").unlink()  # the newest: unverifiable (a lost sidecar may hide a flipped byte)
    caplog.set_level(logging.WARNING)
    run = Checkpointer(CheckpointConfig(output_dir=str(out), keep=2))
    try:
        assert run.start(10).checkpoint == out / "epoch_0001.pth"
    finally:
        run.close()
    assert "passed over: last.pth: no .sha256" in caplog.text

    flip_a_byte(out / "epoch_0001.pth")  # now nothing verifies: the unverifiable file that loads in full
    caplog.clear()
    run = Checkpointer(CheckpointConfig(output_dir=str(out), keep=2))
    try:
        assert run.start(10).checkpoint == out / "last.pth"
    finally:
        run.close()
    (warning,) = [r.getMessage() for r in caplog.records if "UNVERIFIED" in r.getMessage()]
    assert f"resuming from {out / 'last.pth'}, which is UNVERIFIED" in warning
    assert "epoch_0001.pth: contents do not match epoch_0001.pth.sha256" in warning
    with pytest.raises(ChecksumError):
        verify(out / "epoch_0001.pth")
