"""Small contract breaks a cluster user met: each now one line and the documented exit status, found
before any work or output, and nothing converted without a word."""
from __future__ import annotations

import csv
import logging
import subprocess
import sys

import pytest
import timm
import torch

from conftest import DIGITS_VAL, REPO, id_png, id_shards, subprocess_env, tiny_model, write_shards
from hrnet_cls.config import ConfigError, load_config
from hrnet_cls.models.weights import load_strict


@pytest.mark.parametrize("overrides, line", [
    (["data.batch_size=16", "data.batch_size=8"], "override 'data.batch_size' given twice ('16', then '8'): give it once"),
    (["optim=3"], "override 'optim=3': 'optim' is a config section; set its keys, e.g. optim.name=..."),
    (["data.img_size=8"], "data.img_size must be >= 32 pixels (the lowest stream's stride), got 8"),
])
def test_overrides_that_would_be_silently_wrong_are_one_line(overrides, line) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo_digits.yaml", overrides)
    assert str(err.value) == line


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True,
                          text=True, timeout=300)


def test_validate_refuses_a_size_hrnet_cannot_take_and_an_unwritable_results_file_before_the_sweep(tmp_path) -> None:
    ckpt = str(REPO / "tests" / "data" / "pre_move" / "last.pth")
    small = run(tmp_path, "validate.py", "--checkpoint", ckpt, "--data", DIGITS_VAL, "--img-size", "8")
    assert small.returncode == 2 and small.stderr.strip().splitlines() == [
        "validate.py: error: --img-size must be >= 32 pixels (HRNet's lowest stream has stride 32), got [8]"]
    for target, why in ((tmp_path / "missing" / "rows.csv", f"{tmp_path / 'missing'} is not a writable directory"),
                        (tmp_path, "is a directory")):
        proc = run(tmp_path, "validate.py", "--checkpoint", ckpt, "--data", DIGITS_VAL, "--results-file", str(target))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"validate.py: error: --results-file {target}: {why}"]
        assert "top1" not in proc.stdout  # nothing validated first


def test_an_unloadable_resume_file_leaves_no_new_folder(tmp_path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "runs" / "new"
    proc = run(tmp_path, "train.py", "--config", "demo_digits.yaml", f"checkpoint.resume={junk}",
               f"checkpoint.output_dir={out}")
    assert proc.returncode == 2 and f"checkpoint.resume {junk}:" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # neither the folder nor the parent it created


def test_weights_of_other_dtypes_load_with_a_warning_naming_the_conversion(caplog) -> None:
    model, other = tiny_model(), tiny_model(seed=1)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in other.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.models.weights"):
        load_strict(model, weights, "half.pth")
    assert "half.pth: tensors converted to the model's dtypes (torch.float16 -> torch.float32)" in caplog.text
    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight, other.conv1.weight.half().float())


def test_an_integer_buffer_that_would_change_value_is_an_error() -> None:
    model, weights = tiny_model(), dict(tiny_model().state_dict())
    weights["bn1.num_batches_tracked"] = torch.tensor(3, dtype=torch.int32)  # fits int64: converted, with a warning
    load_strict(model, weights, "ok.pth")
    assert int(model.bn1.num_batches_tracked) == 3
    weights["bn1.num_batches_tracked"] = torch.tensor(-1, dtype=torch.int64)
    load_strict(model, weights, "ok.pth")
    into = tiny_model()
    into.bn1.num_batches_tracked = torch.tensor(0, dtype=torch.uint8)  # a model holding uint8: -1 would become 255
    with pytest.raises(ValueError, match=r"^1 integer tensors would change value as torch.uint8 \(e.g. bn1.num_"):
        load_strict(into, weights, "bad.pth")


@pytest.mark.slow  # trains one epoch
def test_an_epoch_validated_on_part_of_the_set_never_picks_best(tmp_path) -> None:
    train = id_shards(tmp_path / "data", "train", [64])
    good = [(f"v{i:03d}", {"png": id_png(i), "cls": str(i % 10).encode()}) for i in range(30)]
    val = write_shards(tmp_path / "data", "val", [good + [("junk", {"jpg": b"\xff\xd8 not a jpeg", "cls": b"1"})]])
    out = tmp_path / "run"
    proc = run(tmp_path, "train.py", "--config", "demo_digits.yaml", f"data.train_shards={train}",
               f"data.val_shards={val}", "data.batch_size=16", "data.workers=0", "schedule.epochs=1",
               "data.max_bad_fraction=1", f"checkpoint.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 0 validated on 30 of the 31 listed images: best.pth is not chosen on it" in proc.stderr
    assert not (out / "best.pth").exists() and (out / "last.pth").exists()
    (row,) = list(csv.DictReader((out / "summary.csv").open()))
    assert row["val_samples"] == "30" and row["skipped"] == "1"


def test_a_wrong_shape_init_from_is_exit_2_and_leaves_no_folder(tmp_path) -> None:
    weights = tmp_path / "w18.pth"
    torch.save(timm.create_model("hrnet_w18_small_c", num_classes=10).state_dict(), weights)
    out = tmp_path / "runs" / "new"
    proc = run(tmp_path, "train.py", "--config", "demo_digits.yaml", f"model.init_from={weights}",
               f"checkpoint.output_dir={out}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: model.init_from {weights}: cannot start from it: weights do not fit")
    assert not (tmp_path / "runs").exists()
