"""train.py end to end: real subprocesses on the bundled digits shards, real torchrun with
2 gloo processes, real W&B offline files, real SIGKILL. CPU only."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (DIGITS_VAL_SAMPLES as VAL_SIZE, REPO, RESUME_RECIPE, TINY_RECIPE, TINY_STEPS_PER_EPOCH,
                      digits_subset, layered, load_script, read_offline_run, read_offline_runs, run_train,
                      subprocess_env)
from hrnet_cls.atomic import verify
from hrnet_cls.config import load_config

train_script = load_script("train.py")
TINY, STEPS_PER_EPOCH = TINY_RECIPE, TINY_STEPS_PER_EPOCH


def train(tmp_path: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return run_train(tmp_path, *overrides, **kw)


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the demo


@pytest.mark.slow  # the full demo recipe: ~40 s on 2 idle cores
def test_demo_reaches_90_percent_top1(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = train(tmp_path, f"checkpoint.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, epochs = summary(out), load_config("demo_digits.yaml").schedule.epochs
    assert len(rows) == epochs and float(rows[-1]["val_top1"]) >= 90.0, rows[-1]
    # the folder README.md lists (W&B disabled here: no wandb_run_id, no wandb/), each .pth with its .sha256
    newest = f"epoch_{epochs - 1:04d}.pth"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["FINISHED", "best.pth", "best.pth.sha256", "config.yaml", newest, f"{newest}.sha256", "last.pth",
         "last.pth.sha256", "summary.csv"])
    assert (out / "FINISHED").read_text() == f"epoch {epochs}, step {rows[-1]['step']}\n"
    # the only print is the final result line, and it agrees with summary.csv
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("final val top-1"), proc.stdout
    assert f"{float(rows[-1]['val_top1']):.2f}%" in lines[0] and f"({VAL_SIZE} images" in lines[0]
    assert load(out / "last.pth")["epoch"] == epochs
    # config.yaml: the resolved recipe with its comments, written once at the start, never rewritten
    assert (out / "config.yaml").read_text().startswith("# Network and its initialisation.")
    assert load_config(str(out / "config.yaml")) == load_config("demo_digits.yaml", [f"checkpoint.output_dir={out}"])


# ---------------------------------------------------------------- config errors


CONFIG_ERRORS = [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("optim.lr=fast", "config key 'optim.lr' expects float"),
    ("data.train_shards=/nonexistent/train-{000000..000003}.tar", "data.train_shards: no shard file matches"),
    ("model.name=hrnet_w18_cc", "model.name: unknown timm model 'hrnet_w18_cc' (did you mean"),
    ("model.init_from=/nonexistent/w18.pth", "model.init_from: no checkpoint file '/nonexistent/w18.pth'"),
    ("train.sync_bn=true", "train.sync_bn=true needs CUDA"),  # as rank 0 of 2, before joining the group
    ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 0 steps"),
]


@pytest.mark.parametrize("override,expected", CONFIG_ERRORS,
                         ids=["unknown-key", "wrong-type", "missing-shards", "unknown-model", "missing-init",
                              "sync-bn-on-cpu", "bad-value"])
def test_config_errors_are_one_line_before_any_output(tmp_path, monkeypatch, capsys, override, expected) -> None:
    out = tmp_path / "never"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as rank 0 of 2: nothing may wait for the other rank
    monkeypatch.setenv("RANK", "0")
    assert train_script.main(["--config", "demo_digits.yaml", f"checkpoint.output_dir={out}", override]) == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith("train.py: error: ") and expected in message, message
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter: the real command line, its stderr and exit status
def test_a_config_error_from_the_command_line_exits_fast_with_one_line(tmp_path) -> None:
    out = tmp_path / "never"
    override, expected = CONFIG_ERRORS[0]
    start = time.monotonic()
    proc = train(tmp_path, f"checkpoint.output_dir={out}", override, timeout=60, WORLD_SIZE="2", RANK="0")
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s"  # importing torch + timm is most of it
    assert not out.exists()


# ---------------------------------------------------------------- one short run, looked at several ways


@pytest.mark.slow
def test_step_schedule_changes_lr_exactly_at_the_decay_epochs(three_epoch_run) -> None:
    rows = summary(three_epoch_run / "run")
    assert [(r["epoch"], float(r["lr"]), int(r["step"])) for r in rows] == [
        ("0", 0.05, 11), ("1", 0.005, 22), ("2", 0.0005, 33)]
    # per step, through the real loop: the step logged as s ran optimizer step s - 1
    history = read_offline_run(three_epoch_run)["history"]
    lrs = {h["train/step"]: h["train/lr"] for h in history if "train/lr" in h}
    assert sorted(lrs) == list(range(1, 34))
    for s, lr in lrs.items():
        assert lr == pytest.approx(0.05 * 0.1 ** ((s - 1) // STEPS_PER_EPOCH), rel=1e-12), s
    assert lrs[11] == 0.05 and lrs[12] == pytest.approx(0.005)  # the last step of epoch 0, the first of 1


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_config_and_name(three_epoch_run) -> None:
    run = read_offline_run(three_epoch_run)
    assert run["name"] == "short-run" and run["tags"] == ["demo"]
    assert run["config"]["schedule"]["decay_epochs"] == [1, 2] and run["config"]["model"]["name"] == "hrnet_tiny_c"
    epochs = [h for h in run["history"] if "epoch/val_top1" in h]
    assert [h["epoch"] for h in epochs] == [0, 1, 2]
    rows = summary(three_epoch_run / "run")
    for h, row in zip(epochs, rows):
        assert h["epoch/val_top1"] == pytest.approx(float(row["val_top1"]), rel=1e-5)
        assert 0 <= h["epoch/val_top5"] <= 100 and h["epoch/val_top5"] >= h["epoch/val_top1"]
        assert h["epoch/train_loss"] > 0 and h["epoch/val_loss"] > 0 and h["epoch/images_per_s"] > 0
        assert h["epoch/val_samples"] == VAL_SIZE
    steps = [h for h in run["history"] if "train/loss" in h]
    assert len(steps) == 3 * STEPS_PER_EPOCH
    assert all(h["train/loss"] > 0 and h["train/images_per_s"] > 0 for h in steps)


@pytest.mark.slow
def test_fine_tune_into_new_num_classes(three_epoch_run, tmp_path) -> None:
    source = load(three_epoch_run / "run" / "best.pth")["model"]
    five = digits_subset(tmp_path / "five", 5)  # digits 0-4: a 5-class dataset
    out = tmp_path / "ft"
    # lr 1e-12 and no decay: one epoch moves no weight by more than ~1e-10
    proc = train(tmp_path, *TINY, f"data.train_shards={five['train']}", f"data.val_shards={five['val']}",
                 f"checkpoint.output_dir={out}", f"model.init_from={three_epoch_run / 'run' / 'best.pth'}",
                 "model.num_classes=5", "schedule.epochs=1", "optim.lr=1e-12", "optim.weight_decay=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classifier re-initialised" in proc.stderr
    tuned = load(out / "last.pth")
    assert tuned["model"]["classifier.weight"].shape == (5, source["classifier.weight"].shape[1])
    assert not torch.allclose(tuned["model"]["classifier.weight"], source["classifier.weight"][:5], atol=1e-3)
    trunk = [k for k, v in source.items() if not k.startswith("classifier.") and v.is_floating_point()
             and "running_" not in k]  # BN running statistics move with every forward pass
    assert len(trunk) > 100
    for k in trunk:
        torch.testing.assert_close(tuned["model"][k], source[k], rtol=0, atol=1e-9, msg=k)
    assert summary(out)[0]["skipped"] == "0"  # every sample of the 5-class data has a label the model has


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(three_epoch_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(three_epoch_run / "run", out)
    before = (out / "last.pth").read_bytes()
    # resumes at epoch 3 (step 33); a mid-epoch save is due at step 36, the first check point
    proc = train(tmp_path, *TINY, f"checkpoint.output_dir={out}", "checkpoint.resume=auto", "schedule.epochs=5",
                 "schedule.decay_epochs=[]", "optim.lr=1e30", "checkpoint.save_interval=4", "train.log_interval=10")
    assert proc.returncode == 3
    (line,) = [line for line in proc.stderr.splitlines() if "non-finite" in line]
    assert "in epoch 3" in line and "stopping without saving" in line, proc.stderr[-3000:]
    assert "resuming at epoch 3, batch 0, step 33" in proc.stderr
    assert (out / "last.pth").read_bytes() == before
    assert not list(out.glob("epoch_0003.pth")) and "final" not in proc.stdout


# ---------------------------------------------------------------- resume after SIGKILL


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(whole_run, tmp_path) -> None:
    common = [*RESUME_RECIPE, "checkpoint.save_interval=1", "train.log_interval=5"]  # background writes at every step
    killed = tmp_path / "killed"
    cmd = [sys.executable, "train.py", "--config", "demo_digits.yaml", *layered(*common, f"checkpoint.output_dir={killed}")]
    victim = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(tmp_path, wandb="offline"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / "last.pth").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a few steps on: most likely inside a background write
    os.killpg(victim.pid, signal.SIGKILL)  # the trainer, its writer thread and its DataLoader worker
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and verify(killed / "last.pth")  # the last complete write
    state = load(killed / "last.pth")
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < STEPS_PER_EPOCH  # killed mid-epoch

    proc = train(tmp_path, *common, f"checkpoint.output_dir={killed}", "checkpoint.resume=auto", wandb="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"batch {state['batch_in_epoch']}, step {state['step']}" in proc.stderr

    # the epoch rows cover whole epochs, the interrupted one included: the checkpoint carried its sums
    for whole, resumed in zip(summary(whole_run), summary(killed), strict=True):
        assert resumed["train_images"] == whole["train_images"] == str(STEPS_PER_EPOCH * 32)
        assert float(resumed["train_loss"]) == pytest.approx(float(whole["train_loss"]), rel=1e-5)
        assert resumed["skipped"] == whole["skipped"] and resumed["step"] == whole["step"]
    # one W&B run: the resumed process continues the killed one's id (whose W&B service died with it,
    # its records unwritten), its steps after the checkpoint's
    first, second = read_offline_runs(tmp_path)
    assert first["id"] == second["id"] == (killed / "wandb_run_id").read_text().strip()
    logged = [h["train/step"] for h in second["history"] if "train/step" in h]  # every 5 steps, from the checkpoint's
    assert logged == list(range(state["step"] // 5 * 5 + 5, 2 * STEPS_PER_EPOCH + 1, 5))
    assert [h["epoch"] for h in second["history"] if "epoch/train_loss" in h] == [0, 1]
    assert second["history"][-1]["epoch/train_images"] == STEPS_PER_EPOCH * 32

    a, b = load(whole_run / "last.pth"), load(killed / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 2 * STEPS_PER_EPOCH)
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    momentum = [(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
                for i, s in a["optimizer"]["state"].items()]
    assert momentum and all(torch.equal(x, y) for x, y in momentum)
    assert [r["val_top1"] for r in summary(whole_run)] == [r["val_top1"] for r in summary(killed)]


MODERN = ["data.auto_augment=rand-m9-mstd0.5", "data.re_prob=0.25", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
          "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05", "schedule.name=cosine",
          "schedule.warmup_epochs=1", "train.grad_accum_steps=2", "train.clip_grad=1.0", "schedule.decay_epochs=[]"]


@pytest.mark.slow  # two runs of 2 x 6 steps and a killed one, one thread each: ~40 s
def test_a_modern_recipe_killed_and_resumed_ends_bit_identical(tmp_path) -> None:
    """RandAugment in the workers, random erasing and mixup / cutmix on the device (their RNG in the
    checkpoint), AdamW (its moments in the checkpoint), cosine, accumulation (saves at step boundaries)
    and clipping: SIGKILL mid-epoch and resume=auto end with the uninterrupted run's weights, bit for bit."""
    common = [*RESUME_RECIPE, *MODERN, "checkpoint.save_interval=1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = train(tmp_path, *common, f"checkpoint.output_dir={whole}", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "train.py", "--config", "demo_digits.yaml", *layered(*common, f"checkpoint.output_dir={killed}")]
    victim = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(tmp_path, OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / "last.pth").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    state = load(killed / "last.pth")
    assert victim.returncode == -signal.SIGKILL and state["epoch"] == 0 and 0 < state["batch_in_epoch"] < 11
    assert state["batch_in_epoch"] % 2 == 0  # saved at a step boundary: micro-batches 2k
    assert "exp_avg" in state["optimizer"]["state"][0]  # AdamW's moments
    proc = train(tmp_path, *common, f"checkpoint.output_dir={killed}", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(whole / "last.pth"), load(killed / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 12)  # 11 micro-batches: 6 steps an epoch
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in moments.items() if torch.is_tensor(v))
    assert [r["val_top1"] for r in summary(whole)] == [r["val_top1"] for r in summary(killed)]


# ---------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--config", "demo_digits.yaml", *layered(*TINY, "data.batch_size=16", "schedule.epochs=1",
           "train.ema=true", f"checkpoint.output_dir={out}", "wandb.name=ddp")]
    env = subprocess_env(tmp_path, wandb="offline")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints, saves and tracks
    finals = [line for line in proc.stdout.splitlines() if line.startswith("final val top-1")]
    assert len(finals) == 1 and f"({VAL_SIZE} images" in finals[0], proc.stdout
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "epoch_0000.pth", "last.pth"]
    state = load(out / "last.pth")
    assert len(state["rng"]) == 2 and state["step"] == STEPS_PER_EPOCH  # 360 images / (16 x 2 processes)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # drop-path RNG per rank
    history = read_offline_run(tmp_path)["history"]
    (epoch,) = [h for h in history if "epoch/val_samples" in h]
    assert epoch["epoch/val_samples"] == VAL_SIZE and epoch["epoch/ema_samples"] == VAL_SIZE  # each once
