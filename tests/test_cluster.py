"""train.py on a shared cluster: preemption signals, resuming on another number of processes,
labels that do not fit, one run per folder, independent checkpoints, full and read-only disks.

Real train.py processes on the bundled shards, real signals, real torchrun with 2 gloo
processes, a real tmpfs where the machine lets us mount one. CPU only.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import (DIGITS, REPO, RESUME_RECIPE, TINY_RECIPE, TINY_STEPS_PER_EPOCH as STEPS, digits_subset,
                      load_script, run_train, subprocess_env, train_command)
from hrnet_cls.atomic import ChecksumError, verify
from hrnet_cls.data import build_train_loader, transforms
from hrnet_cls.train.preemption import PREEMPTED_EXIT, REPEAT_S
from hrnet_cls.train.checkpointer import PREEMPTED as PREEMPTED_MARKER

train_script = load_script("train.py")
RECIPE = RESUME_RECIPE


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_training_state(a: dict, b: dict) -> bool:
    tensors = [(a[p][k], b[p][k]) for p in ("model", "model_ema") for k in a[p]]
    momentum = [(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
                for i, s in a["optimizer"]["state"].items()]
    return (a["step"], a["epoch"]) == (b["step"], b["epoch"]) and all(torch.equal(x, y) for x, y in tensors + momentum)


def start(tmp_path: Path, out: Path, *overrides: str, nproc: int = 0) -> tuple[subprocess.Popen, Path]:
    """train.py in the background, its output in a log file; its own session, as a job is."""
    log = out.with_suffix(".log")
    env = subprocess_env(tmp_path, **({"OMP_NUM_THREADS": "1"} if nproc else {}))
    proc = subprocess.Popen(train_command(*RECIPE, f"checkpoint.output_dir={out}", *overrides, nproc=nproc),
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


@pytest.fixture
def whole(whole_run) -> dict:
    """The last state of the uninterrupted run every interrupted one must end equal to."""
    return load(whole_run / "last.pth")


# ---------------------------------------------------------------- preemption


@pytest.mark.slow
# SIGUSR1 (sbatch --signal) reaches every rank in test_sigusr1_to_every_rank_then_two_processes_continue_...
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_saves_at_the_next_step_and_the_rerun_ends_bit_identical(tmp_path, whole, whole_run, sig) -> None:
    out = tmp_path / "run"
    # with SIGTERM, a background write is in flight at nearly every step (a save at every step)
    proc, log = start(tmp_path, out, *(["checkpoint.save_interval=1"] if sig == signal.SIGTERM else []))
    wait_for(proc, log, "epoch 1/2  batch 2/11")
    workers = children(proc.pid)
    os.killpg(proc.pid, sig)  # the whole process group, as Ctrl+C or a scheduler does: workers too
    assert proc.wait(timeout=60) == PREEMPTED_EXIT, log.read_text()[-3000:]
    text = log.read_text()
    assert f"{sig.name} received: stopping at the next step boundary" in text and "preempted at epoch 1" in text
    state = load(out / "last.pth")
    assert state["epoch"] == 1 and 2 <= state["batch_in_epoch"] < STEPS  # mid-epoch, at a step boundary
    assert (out / PREEMPTED_MARKER).read_text().startswith(f"epoch 1, batch {state['batch_in_epoch']}")
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # DataLoader workers are gone
    assert not (out / ".lock").exists() and verify(out / "last.pth") and not list(out.glob(".*.tmp"))  # written whole

    resumed = run_train(tmp_path, *RECIPE, f"checkpoint.output_dir={out}")  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch 1, batch {state['batch_in_epoch']}, step {state['step']}" in resumed.stderr
    assert same_training_state(load(out / "last.pth"), whole) and not (out / PREEMPTED_MARKER).exists()
    rows = [[(r["train_images"], round(float(r["train_loss"]), 4)) for r in csv.DictReader(open(run / "summary.csv"))]
            for run in (whole_run, out)]
    assert rows[0] == rows[1]  # the stopped epoch's row covers all of it
    first = next(csv.DictReader(open(out / "summary.csv")))  # epoch 0, before the stop: the loop's time in saves
    assert float(first["checkpoint_s"]) > 0 if sig == signal.SIGTERM else float(first["checkpoint_s"]) == 0


@pytest.mark.slow
def test_save_interval_min_saves_at_step_boundaries_every_rank_agrees_on(tmp_path) -> None:
    out = tmp_path / "run"  # 2 processes, rank 0's clock asks every 30 ms: a save every step or two
    proc = run_train(tmp_path, *TINY_RECIPE, "data.batch_size=16", "schedule.epochs=1",
                     "checkpoint.save_interval_min=0.0005", f"checkpoint.output_dir={out}", nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a save only one rank joined would hang its collective
    lines = proc.stderr.splitlines()
    saves = [int(line.split(" step ")[1].split()[0]) for line in lines if "saved last.pth at" in line]
    assert len(saves) >= 2 and saves == sorted(set(saves)) and all(0 < s < STEPS for s in saves), proc.stderr[-3000:]
    assert verify(out / "last.pth") and load(out / "last.pth")["batch_in_epoch"] == 0  # the epoch end's, last


@pytest.mark.slow
def test_signals_that_keep_coming_after_the_stop_do_not_change_exit_75(tmp_path) -> None:
    out = tmp_path / "run"
    proc, log = start(tmp_path, out)
    wait_for(proc, log, "epoch 0/2  batch 2/11")
    first = time.monotonic()
    while proc.poll() is None and time.monotonic() - first < REPEAT_S * 0.75:  # repeats of the first signal
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    if proc.poll() is None:
        wait_for(proc, log, "every rank stops here")
    while proc.poll() is None:  # the scheduler and torchrun signal again while the stopped process exits
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    assert proc.returncode == PREEMPTED_EXIT, log.read_text()[-3000:]
    assert "stopping now, without saving" not in log.read_text()
    assert verify(out / "last.pth") and (out / PREEMPTED_MARKER).exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_one_process_continues(tmp_path, whole) -> None:
    out = tmp_path / "run"
    proc, log = start(tmp_path, out, nproc=2)  # 2 x 32 images: 5 steps per epoch
    wait_for(proc, log, "epoch 0/2  batch 2/5")
    proc.send_signal(signal.SIGTERM)  # the launcher only: torchrun forwards it to its workers
    assert proc.wait(timeout=90) == 1  # torchrun reports any worker exit as 1: the marker tells why
    state = load(out / "last.pth")
    assert len(state["rng"]) == 2 and (out / PREEMPTED_MARKER).exists(), log.read_text()[-3000:]
    assert log.read_text().count("received: stopping at the next step boundary") == 2  # rank 0 and rank 1
    seen = sum(bin(b).count("1") for b in state["data"]["consumed"].tolist())  # the packed positions trained on
    assert seen == state["batch_in_epoch"] * 64  # both ranks' samples, none twice

    resumed = run_train(tmp_path, *RECIPE, f"checkpoint.output_dir={out}")  # one process now, 32 per step
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "part-way under another layout (2 x 32 (workers 1) then, 1 x 32 (workers 1) now)" in resumed.stderr
    assert "global batch 32 (1 x 32) differs from the checkpoint's 64 (2 x 32)" in resumed.stderr
    after = load(out / "last.pth")
    rest = (360 - seen) // 32  # the epoch's samples not yet trained on, in steps of the new global batch
    assert after["epoch"] == 2 and after["step"] == state["step"] + rest + STEPS


@pytest.mark.slow
def test_sigusr1_to_every_rank_then_two_processes_continue_a_one_process_run(tmp_path) -> None:
    out = tmp_path / "run"
    proc, log = start(tmp_path, out)
    wait_for(proc, log, "epoch 0/2  batch 3/11")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT
    stopped = load(out / "last.pth")
    resumed = run_train(tmp_path, *RECIPE, f"checkpoint.output_dir={out}", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "part-way under another layout (1 x 32 (workers 1) then, 2 x 32 (workers 1) now)" in resumed.stderr
    assert resumed.stderr.count("differs from the checkpoint's 32 (1 x 32)") == 1  # said once, not once per rank
    done = load(out / "last.pth")
    left = (360 - stopped["batch_in_epoch"] * 32) // 64
    assert done["epoch"] == 2 and done["step"] == stopped["step"] + left + 5 and len(done["rng"]) == 2


# ---------------------------------------------------------------- labels


def test_num_classes_below_the_datasets_is_an_error_before_anything_is_written(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    argv = ["--config", "demo_digits.yaml", f"checkpoint.output_dir={out}", "model.num_classes=5"]
    assert train_script.main(argv) == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert "model.num_classes=5, but the _info.json of data.train_shards lists 10 classes" in message
    assert not out.exists()


@pytest.mark.slow
def test_a_label_out_of_range_without_a_class_count_stops_training_naming_shard_and_key(tmp_path) -> None:
    five = digits_subset(tmp_path / "uncounted", 5, with_count=False)  # labels 0-4, _info.json without a count
    out = tmp_path / "run"
    proc = run_train(tmp_path, *TINY_RECIPE, f"data.train_shards={five['train']}", f"data.val_shards={five['val']}",
                     "model.num_classes=3", f"checkpoint.output_dir={out}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert "train-000000.tar: sample " in line and "outside 0..2 (num_classes=3)" in line, line
    assert not list(out.glob("*.pth"))  # stopped in the first epoch, before any checkpoint


def damaged_copy(folder: Path, every: int) -> str:
    """TINY_RECIPE's two digits shards with every ``every``-th image of the second replaced by junk
    bytes, with their _info.json; returns the brace pattern."""
    folder.mkdir()
    for n in (0, 1):
        with tarfile.open(DIGITS / f"train-00000{n}.tar") as src, \
                tarfile.open(folder / f"train-00000{n}.tar", "w") as dst:
            for i, member in enumerate(m for m in src.getmembers()):
                data = src.extractfile(member).read()
                if n == 1 and member.name.endswith(".jpg") and (i // 2) % every == 0:
                    data = b"\xff\xd8 not a jpeg"
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    info = json.loads((DIGITS / "_info.json").read_text())
    train = info["splits"]["train"]
    train.update(filenames=train["filenames"][:2], shard_lengths=train["shard_lengths"][:2])
    train["num_samples"] = sum(train["shard_lengths"])
    (folder / "_info.json").write_text(json.dumps(info))
    return str(folder / "train-{000000..000001}.tar")


@pytest.mark.slow
def test_past_the_bad_sample_budget_the_run_stops_naming_the_shard_and_under_it_trains_on(tmp_path) -> None:
    shards = damaged_copy(tmp_path / "damaged", every=4)  # 45 of the second shard's 180 images
    out = tmp_path / "run"
    proc = run_train(tmp_path, *TINY_RECIPE, f"data.train_shards={shards}", f"checkpoint.output_dir={out}",
                     "schedule.epochs=1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert line.startswith("train.py: error: data.max_bad_fraction: 45 bad samples for 352 images trained in epoch 0 "
                           "(12.8%, the limit is 1.0%); worst shards: train-000001.tar (45);"), line
    assert not list(out.glob("*.pth"))  # the epoch-end check comes before its checkpoint
    proc = run_train(tmp_path, *TINY_RECIPE, f"data.train_shards={shards}", f"checkpoint.output_dir={tmp_path / 'ok'}",
                     "data.max_bad_fraction=0.2", "schedule.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "ok" / "summary.csv") as f:
        assert [row["skipped"] for row in csv.DictReader(f)] == ["45"]


def test_an_error_in_our_own_crop_code_propagates_instead_of_replacing_samples(tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in crop_resize")
    monkeypatch.setattr(transforms, "crop_resize", broken)  # the bug injected; the decoder and the loader are real
    loader = build_train_loader(str(DIGITS / "train-{000000..000001}.tar"), batch_size=8, img_size=32, seed=0,
                                epoch=0, workers=0)
    with pytest.raises(ZeroDivisionError, match="a bug in crop_resize"):
        next(iter(loader))


# ---------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_run_in_the_folder_fails_at_once_and_a_dead_ones_lock_is_taken_over(tmp_path) -> None:
    out = tmp_path / "run"
    first, log = start(tmp_path, out)
    wait_for(first, log, "batch 1/11")
    began = time.monotonic()
    second = run_train(tmp_path, *RECIPE, f"checkpoint.output_dir={out}")
    assert second.returncode == 2 and time.monotonic() - began < 30
    (line,) = [line for line in second.stderr.splitlines() if "error" in line]
    assert f"{out} is in use by another run: pid {first.pid} on " in line, line
    os.killpg(first.pid, signal.SIGKILL)  # the holder dies without clean-up: its lock file stays
    first.wait()
    assert (out / ".lock").exists()
    third = run_train(tmp_path, *RECIPE, f"checkpoint.output_dir={out}", "schedule.epochs=1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over {out / '.lock'} from a run that is gone: pid {first.pid}" in third.stderr


@pytest.mark.slow
def test_a_finished_run_is_reported_not_retrained_and_never_overwritten(tmp_path, three_epoch_run) -> None:
    out = tmp_path / "run"
    shutil.copytree(three_epoch_run / "run", out)  # a run that ended its 3 epochs
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_train(tmp_path, *TINY_RECIPE, "schedule.epochs=3", f"checkpoint.output_dir={out}")
    assert again.returncode == 0 and again.stdout.startswith("already finished: ") and "new checkpoint.output_dir" \
        in again.stdout
    fresh = run_train(tmp_path, *TINY_RECIPE, "schedule.epochs=3", f"checkpoint.output_dir={out}",
                      "checkpoint.resume=")
    assert fresh.returncode == 2 and f"{out} holds a run" in fresh.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- checkpoints that fail independently


@pytest.fixture
def three_epochs(three_epoch_run) -> Path:
    return three_epoch_run / "run"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load would still load it
    path.write_bytes(data)


@pytest.mark.slow
def test_a_corrupt_checkpoint_takes_no_other_with_it_and_resume_takes_the_newest_good_one(three_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_epochs, out)
    assert all(verify(p) for p in out.glob("*.pth"))
    flip_a_byte(out / "last.pth")
    with pytest.raises(ChecksumError, match="last.pth: contents do not match last.pth.sha256"):
        verify(out / "last.pth")
    assert verify(out / "epoch_0002.pth") and verify(out / "best.pth")  # copies, not links: intact
    assert load(out / "epoch_0002.pth")["step"] == 3 * STEPS
    proc = run_train(tmp_path, *TINY_RECIPE, "schedule.epochs=4", f"checkpoint.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passed over: last.pth: contents do not match last.pth.sha256" in proc.stderr
    assert f"resuming at epoch 3, batch 0, step {3 * STEPS}" in proc.stderr


@pytest.mark.slow
def test_when_no_checkpoint_verifies_resume_stops_with_one_line_and_overwrites_nothing(three_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_epochs, out)
    for path in out.glob("*.pth"):
        flip_a_byte(path)
    (out / PREEMPTED_MARKER).write_text("epoch 3, batch 2, step 35\n")  # a refused folder keeps its marker
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_train(tmp_path, *TINY_RECIPE, "schedule.epochs=4", f"checkpoint.output_dir={out}")
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert "no checkpoint in" in line and "last.pth: contents do not match" in line and "best.pth" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_temp_files_are_removed_only_when_their_writer_is_gone(tmp_path) -> None:
    from hrnet_cls.atomic import _HOST_TAG, stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_path / f".last.pth.{_HOST_TAG}.{os.getpid()}.abc.tmp"
    gone = tmp_path / f".last.pth.{_HOST_TAG}.{dead.pid}.abc.tmp"
    other_host = tmp_path / f".last.pth.elsewhere.{dead.pid}.abc.tmp"
    for path in (mine, gone, other_host):
        path.write_bytes(b"partial")
    assert stale_temps(tmp_path) == [gone]


# ---------------------------------------------------------------- file-system errors


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))  # below one 5 MB checkpoint


@pytest.fixture
def in_process(monkeypatch):
    """train.main() in this process: W&B off, and torch's global flags put back afterwards."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield train_script.main
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_last_good_checkpoint_stays_loadable(tmp_path) -> None:
    # the saves are asynchronous (the default): each failure below happens in the background writer
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "size=64m")
    out, recipe = disk / "run", [*TINY_RECIPE, "checkpoint.keep=0"]
    first = tmp_path / "first"  # the very first save fails: there is no previous checkpoint to speak of
    proc = subprocess.run(train_command(*recipe, "schedule.epochs=1", f"checkpoint.output_dir={first}"), cwd=REPO,
                          env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].endswith(
        "File too large (EFBIG); no checkpoint was written"), proc.stderr[-3000:]
    assert not list(first.glob("*.pth*")) and not list(first.glob(".*.tmp"))
    assert run_train(tmp_path, *recipe, "schedule.epochs=1", f"checkpoint.output_dir={out}").returncode == 0
    good = (out / "last.pth").read_bytes()  # epoch 1's checkpoint; last.pth + best.pth take ~10 MB
    try:
        if mounted:  # the disk is now full but for ~1 MB: the next 5 MB checkpoint cannot fit
            subprocess.run(["mount", "-o", "remount,size=11m", str(disk)], check=True)
        # no mount here: the kernel refuses a write past RLIMIT_FSIZE instead (EFBIG)
        proc = subprocess.run(train_command(*recipe, "schedule.epochs=3", f"checkpoint.output_dir={out}"), cwd=REPO,
                              env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300,
                              preexec_fn=None if mounted else file_size_limit)
        assert proc.returncode == 1, proc.stderr[-3000:]
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
        reason = "No space left on device (ENOSPC)" if mounted else "File too large (EFBIG)"
        assert f"cannot write {out / 'last.pth'}: {reason}; the previous checkpoint is intact" in line, line
        assert (out / "last.pth").read_bytes() == good and verify(out / "last.pth")  # intact and loadable
        assert load(out / "last.pth")["epoch"] == 1
        assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()  # nothing left behind
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def test_unusable_output_dirs_and_init_files_are_one_line_errors(tmp_path, in_process, capsys) -> None:
    (tmp_path / "file").write_text("x")
    for out, reason in ((tmp_path / "file", "exists and is not a directory"),
                        (tmp_path / "file" / "sub", "Not a directory (ENOTDIR)")):
        assert in_process(["--config", "demo_digits.yaml", *TINY_RECIPE, f"checkpoint.output_dir={out}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith("train.py: error: checkpoint.output_dir") and str(out) in line and reason in line
    truncated = tmp_path / "half.pth"
    truncated.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert in_process(["--config", "demo_digits.yaml", f"checkpoint.output_dir={tmp_path / 'x'}",
                       f"model.init_from={truncated}"]) == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"train.py: error: model.init_from {truncated}: cannot start from it") and \
        not (tmp_path / "x").exists()


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, in_process, capsys) -> None:
    ro = tmp_path / "ro"
    mounted = mount_tmpfs(ro, "size=1m,ro")
    if not mounted:  # no mount here: the OS call that would meet the read-only file system fails instead
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kw):
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kw)
        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        status = in_process(["--config", "demo_digits.yaml", *TINY_RECIPE, f"checkpoint.output_dir={ro / 'run'}"])
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == (f"train.py: error: checkpoint.output_dir: cannot create {ro / 'run'}: "
                                       "Read-only file system (EROFS)")


# ---------------------------------------------------------------- torchrun restarts


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint_after_a_crash(tmp_path) -> None:
    out = tmp_path / "run"
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = train_command(*RECIPE, "checkpoint.save_interval=2", f"checkpoint.output_dir={out}", nproc=2)
    cmd.insert(cmd.index("train.py"), "--max-restarts=1")
    log = tmp_path / "log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for(proc, log, "epoch 0/2  batch 3/5")
    victim = max(children(proc.pid))  # a worker dies as on an OOM kill: no save, no clean-up
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resuming at epoch 0, batch 2, step 2" in text or "resuming at epoch 0, batch 4, step 4" in text, text[-3000:]
    final = load(out / "last.pth")
    assert final["epoch"] == 2 and final["step"] == 10
    with open(out / "summary.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
