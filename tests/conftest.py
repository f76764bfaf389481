"""Shared helpers and fixtures of the test suite.

Fast lane: ``python -m pytest -q -m "not slow"`` (unit tests, tiny models and inputs);
CI runs everything. Tests marked slow start fresh interpreters (train.py, torchrun, a
killed child), build full-size models at 224 px, or really train.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import tarfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hrnet_cls  # noqa: F401  (registers the HRNet-C models with timm)
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_train_loader

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "shards" / "digits"  # the bundled sample shards: 1,437 train / 360 val images, 10 classes
DIGITS_VAL = str(DIGITS / "val-{000000..000001}.tar")
DIGITS_VAL_SAMPLES = 360  # _info.json, split "val"


# A small, fast recipe on the bundled shards: 2 training shards (360 images) = 11 steps of 32 per epoch.
TINY_RECIPE = [
    "data.train_shards=shards/digits/train-{000000..000001}.tar", "data.batch_size=32", "data.workers=1",
    "data.val_batch_size=128", "train.log_interval=1", "optim.lr=0.05",
]
TINY_STEPS_PER_EPOCH = 11


# 2 epochs of 11 steps, drop path + EMA: RNG and EMA state matter to a resume being exact
RESUME_RECIPE = [*TINY_RECIPE, "schedule.epochs=2", "schedule.decay_epochs=[1]", "model.drop_path_rate=0.1",
                 "train.ema=true", "train.ema_decay=0.9"]


@pytest.fixture(scope="session")
def whole_run(tmp_path_factory) -> Path:
    """The folder of an uninterrupted RESUME_RECIPE run, which every interrupted one must end
    equal to (save and log intervals do not change the weights). Trained once per session."""
    tmp = tmp_path_factory.mktemp("whole")
    proc = run_train(tmp, *RESUME_RECIPE, f"checkpoint.output_dir={tmp / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="session")
def three_epoch_run(tmp_path_factory) -> Path:
    """TINY_RECIPE for 3 epochs, lr /10 at epochs 1 and 2, every epoch file kept, W&B offline
    (name short-run): the run folder is ``ROOT/run``, W&B's files ``ROOT/wandb``; returns ROOT.
    Trained once per session: tests copy the folder before changing anything in it."""
    tmp = tmp_path_factory.mktemp("three")
    proc = run_train(tmp, *TINY_RECIPE, f"checkpoint.output_dir={tmp / 'run'}", "schedule.epochs=3",
                     "schedule.decay_epochs=[1,2]", "wandb.name=short-run", "checkpoint.keep=3", wandb="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def layered(*overrides: str) -> list[str]:
    """Overrides with a later one replacing an earlier one of the same key (train.py refuses a key given twice):
    the tests layer a change on a shared recipe."""
    last = {item.partition("=")[0]: item for item in overrides}
    return list(last.values())


def train_command(*overrides: str, nproc: int = 0) -> list[str]:
    """train.py on the demo recipe; nproc > 0: under torchrun with that many gloo processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*(launcher if nproc else [sys.executable]), "train.py", "--config", "demo_digits.yaml", *layered(*overrides)]


def run_train(tmp_path: Path, *overrides: str, wandb: str = "disabled", timeout: float = 900, nproc: int = 0,
              **env: str) -> subprocess.CompletedProcess:
    """train.py to its end in a fresh interpreter (one thread per process under torchrun)."""
    if nproc:
        env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(train_command(*overrides, nproc=nproc), cwd=REPO, env=subprocess_env(tmp_path, wandb, **env),
                          capture_output=True, text=True, timeout=timeout)


def digits_subset(folder: Path, classes: int, with_count: bool = True) -> dict[str, str]:
    """The bundled digits 0..classes-1 as shards in folder (train, val) with their _info.json;
    with_count=False leaves the class count out of it. Returns {split: brace pattern}."""
    folder.mkdir(parents=True, exist_ok=True)
    info = json.loads((DIGITS / "_info.json").read_text())
    info["splits"], out = {}, {}
    for split in ("train", "val"):
        with tarfile.open(folder / f"{split}-000000.tar", "w") as dst:
            kept = 0
            for src_path in sorted(DIGITS.glob(f"{split}-*.tar")):
                with tarfile.open(src_path) as src:
                    members = src.getmembers()
                    labels = {m.name.rsplit(".", 1)[0]: int(src.extractfile(m).read()) for m in members
                              if m.name.endswith(".cls")}
                    for m in members:
                        if labels[m.name.rsplit(".", 1)[0]] < classes:
                            dst.addfile(m, src.extractfile(m))
                    kept += sum(1 for v in labels.values() if v < classes)
        info["splits"][split] = {"name": split, "num_samples": kept, "filenames": [f"{split}-000000.tar"],
                                 "shard_lengths": [kept]}
        out[split] = str(folder / f"{split}-{{000000..000000}}.tar")
    info.pop("num_classes")
    info.pop("class_names")
    if with_count:
        info.update(num_classes=classes, class_names=[str(c) for c in range(classes)])
    (folder / "_info.json").write_text(json.dumps(info))
    return out


def load_script(name: str):
    """train.py / validate.py as modules: they are scripts at the repository root, not package modules."""
    spec = importlib.util.spec_from_file_location(f"{Path(name).stem}_script", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(num_classes: int = 10, seed: int | None = 0, **kwargs) -> torch.nn.Module:
    """hrnet_tiny_c, seeded (seed=None: whatever the global RNG gives)."""
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model("hrnet_tiny_c", num_classes=num_classes, **kwargs)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def subprocess_env(tmp_path: Path, wandb: str = "disabled", **extra: str) -> dict[str, str]:
    """A clean environment for train.py / validate.py / torchrun children: CPU only, no torchrun
    variables, W&B isolated in tmp_path, the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(CUDA_VISIBLE_DEVICES="", WANDB_MODE=wandb, WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), HOME=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env | extra


# ---------------------------------------------------------------- W&B offline run files


def read_wandb_records(path: Path) -> list:
    """Records of an offline run's .wandb file: wandb's LevelDB-style log of protobufs
    (a 7-byte file header, then 32 KiB blocks of chunks: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items_to_dict(items) -> dict:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_runs(wandb_dir: Path) -> list[dict]:
    """Id, name, config, tags and history of each offline W&B run process under wandb_dir, oldest first
    (a resumed run writes a second folder under the same id). A process killed with its W&B
    service leaves a file with no records: its id is in the file name, and nothing else."""
    out = []
    for run_file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):  # the folders start with a time
        records = read_wandb_records(run_file)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = [_items_to_dict(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        run = {"id": run_file.stem.removeprefix("run-"), "history": history}
        if runs:
            assert runs[0].run_id == run["id"]
            run.update(name=runs[0].display_name, config=_items_to_dict(runs[0].config.update), tags=list(runs[0].tags))
        out.append(run)
    return out


def read_offline_run(wandb_dir: Path) -> dict:
    """read_offline_runs of a folder that holds exactly one."""
    (run,) = read_offline_runs(wandb_dir)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine two threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- synthetic shards for the loader tests

NUM_CLASSES = 10
Sample = tuple[str, dict[str, bytes]]  # (key, {extension: payload})


def id_png(i: int, size: int = 16) -> bytes:
    """Flat colour encoding id i (< 4096) in 16 levels per channel, robust to resampling."""
    colour = [8 + 16 * (i // 256), 8 + 16 * (i // 16 % 16), 8 + 16 * (i % 16)]
    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(colour)).save(buf, "PNG")
    return buf.getvalue()


def ids_of(images: torch.Tensor) -> list[int]:
    """Sample ids back from (B, 3, H, W) flat-colour images: uint8 as the loaders yield them, or normalised."""
    pixels = images[:, :, 0, 0].float()
    if images.is_floating_point():
        pixels = (pixels * torch.tensor(IMAGENET_DEFAULT_STD) + torch.tensor(IMAGENET_DEFAULT_MEAN)) * 255
    levels = (pixels - 8) / 16
    digits = levels.round().long()
    return (digits[:, 0] * 256 + digits[:, 1] * 16 + digits[:, 2]).tolist()


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sample(i: int) -> Sample:
    return f"s{i:05d}", {"png": id_png(i), "cls": str(i % NUM_CLASSES).encode()}


def write_shards(folder: Path, split: str, shards: list[list[Sample]], listed: list[int] | None = None) -> str:
    """Tar shards + _info.json; returns the brace pattern naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for n, samples in enumerate(shards):
        names.append(f"{split}-{n:06d}.tar")
        with tarfile.open(folder / names[-1], "w") as tar:
            for key, members in samples:
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    lengths = listed or [len(s) for s in shards]
    info_path = folder / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": "t", "splits": {}}
    info.update(num_classes=NUM_CLASSES)
    info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": names,
                             "shard_lengths": lengths}
    info_path.write_text(json.dumps(info))
    return str(folder / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar")


def id_shards(folder: Path, split: str, sizes: list[int], first: int = 0) -> str:
    """Clean shards of the given sizes holding consecutive ids from ``first``."""
    shards, i = [], first
    for size in sizes:
        shards.append([sample(j) for j in range(i, i + size)])
        i += size
    return write_shards(folder, split, shards)


def epoch_batches(urls: str, **kw) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    args = dict(batch_size=4, img_size=16, seed=5, epoch=0, workers=0) | kw
    return list(build_train_loader(urls, **args))


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


# ---------------------------------------------------------------- source folders for the shard writer tests

FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))


def encode(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (14, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def image_folder(root: Path, per_class: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    """An ImageFolder tree cycling through JPEG/PNG/WebP; {relative path: (class, bytes)}."""
    files, seed = {}, 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            fmt, ext = FORMATS[seed % 3]
            rel = f"{name}/{name}_{i}{ext}"
            files[rel] = (name, encode(seed, fmt))
            (root / rel).write_bytes(files[rel][1])
            seed += 1
    return files


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over the split's shards listed in _info.json."""
    info = json.loads((out / "_info.json").read_text())["splits"][split]
    samples: dict[str, dict[str, bytes]] = {}
    for name, length in zip(info["filenames"], info["shard_lengths"]):
        with tarfile.open(out / name) as tar:
            keys = set()
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
                keys.add(key)
        assert len(keys) == length
    assert sum(info["shard_lengths"]) == info["num_samples"] == len(samples)
    return samples
