"""validate.py and hrnet_cls.validation on the bundled digits val shards, with real checkpoints.

Exactness is checked against an independent loop (tarfile + PIL + torchvision, no
hrnet_cls.data); distributed runs use 2 real gloo processes under torchrun.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from conftest import DIGITS, DIGITS_VAL as VAL, DIGITS_VAL_SAMPLES as VAL_SAMPLES, REPO, load_script, subprocess_env, tiny_model
from hrnet_cls.atomic import sidecar
from hrnet_cls.train.state import Position, build_state, save_checkpoint
from hrnet_cls.config import config_to_dict, load_config
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_train_loader
from hrnet_cls.distributed import DistInfo
from hrnet_cls.validation import (
    RESULT_COLUMNS,
    SweepSettings,
    build_rows,
    checkpoint_specs,
    describe_all,
    expected_samples,
    model_specs,
    run_sweep,
)

# timm's validate.py results columns, in timm's order (its write_results / results-imagenet.csv)
TIMM_ORDER = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct", "interpolation"]

SIZES, CROPS = ["32", "64"], ["0.875", "1.0"]  # sweep axes; hrnet needs multiples of 32 px


validate = load_script("validate.py")
pytestmark = pytest.mark.usefixtures("one_thread")  # on a busy 2-core machine two threads spin-wait: 5x slower


def save_ckpt(path: Path, model: torch.nn.Module, model_ema: torch.nn.Module | None = None,
              name: str = "hrnet_tiny_c", num_classes: int = 10) -> Path:
    """A training checkpoint as train.py writes it: the demo recipe's resolved config."""
    config = config_to_dict(load_config("demo_digits.yaml"))
    config["model"].update(name=name, num_classes=num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(path, build_state(model=model, optimizer=optimizer, position=Position(1, 1, 0),
                                      config=config, model_ema=model_ema))
    return path


def tiny(seed: int, num_classes: int = 10) -> torch.nn.Module:
    return tiny_model(num_classes, seed)


@pytest.fixture(scope="module")
def random_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Two random-init checkpoints and the first one's weights as plain / wrapped state dicts."""
    root = tmp_path_factory.mktemp("random")
    a, b = tiny(1), tiny(2)
    torch.save(a.state_dict(), root / "a_plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}}, root / "a_wrapped.pth")
    return {"a": save_ckpt(root / "a.pth", a), "b": save_ckpt(root / "b.pth", b),
            "a_plain": root / "a_plain.pth", "a_wrapped": root / "a_wrapped.pth"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """hrnet_tiny_c after 100 SGD steps on the digits train shards (~87% val top-1, ~6 s),
    and a checkpoint holding it only as EMA weights next to a random-init model."""
    root = tmp_path_factory.mktemp("trained")
    model = tiny(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    steps = 0
    for epoch in range(10):
        loader = build_train_loader(str(DIGITS / "train-*.tar"), batch_size=64, img_size=32, seed=0, epoch=epoch,
                                    workers=0)
        for images, targets, *_ in loader:
            loss = torch.nn.functional.cross_entropy(model(loader.normalize(images)), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 100:
                model.eval()
                return {"good": save_ckpt(root / "good.pth", model),
                        "ema": save_ckpt(root / "ema.pth", tiny(3), model_ema=model)}
    raise AssertionError("the digits train shards ran out before 100 steps")


def run(argv: list[str], tmp_path: Path, name: str = "out.json") -> tuple[int, list[dict]]:
    """validate.py in this process: (exit status, rows of its JSON results file)."""
    out = tmp_path / name
    code = validate.main([*argv, "--data", VAL, "--workers", "0", "--batch-size", "100", "--results-file", str(out)])
    return code, json.loads(out.read_text()) if out.suffix == ".json" and out.exists() else []


def counts(row: dict) -> tuple[int, int, int]:
    """(top-1 correct, top-5 correct, samples) back from a row's percentages."""
    n = row["samples"]
    return round(row["top1"] * n / 100), round(row["top5"] * n / 100), n


# ---------------------------------------------------------------- exactness


def independent_counts(path: Path, img_size: int, crop_pct: float) -> tuple[int, int, int]:
    """Top-1/top-5 correct and samples of a checkpoint, by a separate code path: tarfile,
    PIL, torchvision's resize of the PIL image (shorter side to floor(img_size / crop_pct),
    bilinear, as timm's eval transform) + centre crop, plain math."""
    model = timm.create_model("hrnet_tiny_c", num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    model.eval()
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    images, labels = [], []
    for shard in sorted(DIGITS.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            rgb = Image.open(io.BytesIO(files[name])).convert("RGB")
            rgb = TF.resize(rgb, [math.floor(img_size / crop_pct)], InterpolationMode.BILINEAR)
            rgb = TF.center_crop(rgb, [img_size, img_size])
            pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, H, W) uint8
            images.append((pixels.float() / 255 - mean) / std)
            labels.append(int(files[name[:-4] + ".cls"]))
    with torch.no_grad():
        logits = torch.cat([model(torch.stack(images[i:i + 64])) for i in range(0, len(images), 64)])
    top5 = logits.topk(5, dim=1).indices
    targets = torch.tensor(labels)
    return int((top5[:, 0] == targets).sum()), int((top5 == targets[:, None]).any(1).sum()), len(labels)


def timm_validate(checkpoint: Path, img_size: int, crop_pct: float) -> tuple[int, int, int]:
    """What timm's validate.py computes, in this process: timm's load_checkpoint (through
    create_model's checkpoint_path), resolve_data_config, its wds reader over our shards,
    create_loader with its eval transform, timm.utils.accuracy. (top-1, top-5, samples)."""
    model = timm.create_model("hrnet_tiny_c", num_classes=10, checkpoint_path=str(checkpoint)).eval()
    config = timm.data.resolve_data_config({"input_size": (3, img_size, img_size), "crop_pct": crop_pct}, model=model)
    dataset = timm.data.create_dataset("wds/digits", root=str(DIGITS), split="val", is_training=False)
    loader = timm.data.create_loader(dataset, input_size=config["input_size"], batch_size=64, use_prefetcher=False,
                                     interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                                     num_workers=0, crop_pct=config["crop_pct"], crop_mode=config["crop_mode"])
    top1 = top5 = n = 0
    with torch.no_grad():
        for images, targets in loader:
            acc1, acc5 = timm.utils.accuracy(model(images), targets, topk=(1, 5))
            top1, top5, n = top1 + acc1.item() * len(targets) / 100, top5 + acc5.item() * len(targets) / 100, \
                n + len(targets)
    return round(top1), round(top5), n


@pytest.mark.slow  # trains the fixture model (~6 s)
def test_folding_batchnorm_changes_no_count(trained, tmp_path) -> None:
    code, folded = run(["--checkpoint", str(trained["good"]), "--img-size", *SIZES], tmp_path, "folded.json")
    code_plain, plain = run(["--checkpoint", str(trained["good"]), "--img-size", *SIZES, "--no-fold-bn"], tmp_path,
                            "plain.json")
    assert code == code_plain == 0
    assert [counts(r) for r in folded] == [counts(r) for r in plain] and folded[0]["samples"] == VAL_SAMPLES


@pytest.mark.slow  # trains the fixture model (~6 s), then compiles it (~20 s)
def test_compiled_with_frozen_weights_gives_the_eager_counts(trained, tmp_path) -> None:
    code, compiled = run(["--checkpoint", str(trained["good"]), "--compile"], tmp_path, "compiled.json")
    code_eager, eager = run(["--checkpoint", str(trained["good"])], tmp_path, "eager.json")
    assert code == code_eager == 0 and compiled[0]["samples"] == VAL_SAMPLES
    assert counts(compiled[0]) == counts(eager[0])


@pytest.mark.slow  # trains the fixture model (~6 s)
@pytest.mark.parametrize("crop_pct", ["0.875", "0.95"])
def test_timms_own_validation_path_gives_exactly_our_numbers(trained, tmp_path, crop_pct: str) -> None:
    # 128 px: at crop_pct 0.95 timm resizes to floor(134.7) = 134, where a round() would give 135
    code, rows = run(["--checkpoint", str(trained["good"]), "--img-size", "128", "--crop-pct", crop_pct], tmp_path)
    assert code == 0 and rows[0]["samples"] == VAL_SAMPLES
    assert counts(rows[0]) == timm_validate(trained["good"], 128, float(crop_pct))


@pytest.mark.slow  # trains the fixture model (~6 s), then 4 reference passes
def test_counts_equal_an_independent_tarfile_pil_torchvision_loop(trained, tmp_path) -> None:
    code, rows = run(["--checkpoint", str(trained["good"]), "--img-size", *SIZES, "--crop-pct", *CROPS], tmp_path)
    assert code == 0 and len(rows) == 4
    for row in rows:
        expected = independent_counts(trained["good"], row["img_size"], row["crop_pct"])
        assert counts(row) == expected, row
        assert row["top1"] == 100 * expected[0] / expected[2]
        assert row["samples"] == VAL_SAMPLES and row["skipped"] == 0 and row["expected_samples"] == VAL_SAMPLES
    assert max(row["top1"] for row in rows) > 70  # a trained model: the counts are not all chance


# ---------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_sweep_of_two_checkpoints_two_sizes_two_crops_writes_eight_rows(random_ckpts, tmp_path) -> None:
    argv = ["--checkpoint", str(random_ckpts["a"]), str(random_ckpts["b"]), "--img-size", *SIZES, "--crop-pct", *CROPS]
    code, rows = run(argv, tmp_path)
    assert code == 0 and len(rows) == 8
    assert {(r["checkpoint"], r["img_size"], r["crop_pct"]) for r in rows} == {
        (str(random_ckpts[k]), int(s), float(c)) for k in "ab" for s in SIZES for c in CROPS}
    for row in rows:
        assert list(row) == [*TIMM_ORDER, "checkpoint", "loss", "samples", "skipped", "expected_samples", "verified",
                             "precision", "device", "images_per_s", "gmacs", "paper_top1", "top1_minus_paper", "error"]
        assert row["model"] == "hrnet_tiny_c" and row["error"] == "" and row["interpolation"] == "bilinear"
        assert row["samples"] == row["expected_samples"] == VAL_SAMPLES and row["skipped"] == 0
        assert row["param_count"] == 0.61 and row["images_per_s"] > 0  # 605,602 parameters, in millions as timm
        assert 0 <= row["top1"] <= row["top5"] <= 100 and row["loss"] > 0
        assert row["top1"] + row["top1_err"] == pytest.approx(100)
        assert row["top5"] + row["top5_err"] == pytest.approx(100)
        assert (row["precision"], row["device"]) == ("fp32", "cpu")
        assert row["paper_top1"] is None and row["top1_minus_paper"] is None  # no paper number for tiny
    gmacs = {r["img_size"]: r["gmacs"] for r in rows}
    assert 3.9 < gmacs[64] / gmacs[32] <= 4.0  # convs scale with pixels, the classifier does not
    # the same sweep as CSV parses to the same rows
    code, _ = run(argv, tmp_path, "out.csv")
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert code == 0 and [list(r) for r in table] == [list(RESULT_COLUMNS)] * 8
    assert [float(r["top1"]) for r in table] == [r["top1"] for r in rows]
    assert [float(r["loss"]) for r in table] == [r["loss"] for r in rows]
    assert {r["paper_top1"] for r in table} == {""}


def test_paper_figures_only_for_1000_class_models_in_timms_format_and_an_aligned_table(tmp_path, capsys) -> None:
    deep = tmp_path / ("a-long-folder-name-for-the-runs-of-one-sweep" * 2)
    deep.mkdir()
    torch.manual_seed(0)
    digits = save_ckpt(deep / "digits.pth", timm.create_model("hrnet_w18_small_c", num_classes=10),
                       name="hrnet_w18_small_c", num_classes=10)
    imagenet = save_ckpt(deep / "imagenet.pth", timm.create_model("hrnet_w18_small_c"), name="hrnet_w18_small_c",
                         num_classes=1000)
    out = tmp_path / "results.txt"
    code = validate.main(["--checkpoint", str(digits), str(imagenet), "--data", VAL, "--workers", "0",
                          "--results-file", str(out), "--results-format", "json"])
    assert code == 0
    small, large = json.loads(out.read_text())  # json, as asked, whatever the file is called
    assert small["paper_top1"] is None and small["top1_minus_paper"] is None  # 10 classes: not the paper's task
    assert large["paper_top1"] == 72.3 and large["top1_minus_paper"] == pytest.approx(large["top1"] - 72.3)
    assert (small["param_count"], large["param_count"]) == (11.16, 13.19)  # 13,187,464 less 990 classes x 2049
    table = capsys.readouterr().out.splitlines()
    header, rows = table[0], table[2:4]
    assert len({len(line) for line in (header, *rows)}) == 1  # every line as wide: the columns line up
    start = header.index("checkpoint")  # left-aligned: each cell starts under its header
    assert all(row[start - 1] == " " and row[start:].startswith(str(deep)) for row in rows)
    for name in ("top1", "img/s"):  # right-aligned: each number ends under the end of its header
        end = header.index(f" {name} ") + len(name) + 1
        assert all(row[end - 1].isdigit() and row[end] == " " for row in rows), (name, rows)


def test_default_preprocessing_comes_from_the_checkpoint_config(random_ckpts, tmp_path) -> None:
    code, rows = run(["--checkpoint", str(random_ckpts["a"])], tmp_path)
    demo = load_config("demo_digits.yaml").data
    assert code == 0 and [(r["img_size"], r["crop_pct"]) for r in rows] == [(demo.img_size, demo.crop_pct)]


def test_model_with_weights_file_plain_or_wrapped_matches_the_checkpoint(random_ckpts, tmp_path) -> None:
    argv = ["--checkpoint", str(random_ckpts["a"]), "--model", "hrnet_tiny_c", "--img-size", "32", "--crop-pct", "1.0"]
    results = {}
    for kind in ("a_plain", "a_wrapped"):
        code, rows = run([*argv, "--weights", str(random_ckpts[kind])], tmp_path, f"{kind}.json")
        assert code == 0 and [r["checkpoint"] for r in rows] == [str(random_ckpts["a"]), str(random_ckpts[kind])]
        assert rows[1]["model"] == "hrnet_tiny_c" and rows[1]["param_count"] == 0.61  # 10 classes, read from the file
        results[kind] = rows
    for rows in results.values():
        assert counts(rows[0]) == counts(rows[1])


@pytest.mark.slow  # uses the trained fixture
def test_use_ema_validates_the_ema_weights(trained, tmp_path) -> None:
    code, rows = run(["--checkpoint", str(trained["good"]), str(trained["ema"])], tmp_path)
    assert code == 0
    trained_counts, random_counts = counts(rows[0]), counts(rows[1])
    assert trained_counts[0] > 2 * random_counts[0]  # the ema file's 'model' is an untrained net
    code, rows = run(["--checkpoint", str(trained["ema"]), "--use-ema"], tmp_path, "ema.json")
    assert code == 0 and counts(rows[0]) == trained_counts  # exactly the trained weights
    code, rows = run(["--checkpoint", str(trained["good"]), "--use-ema"], tmp_path, "no_ema.json")
    assert code == 1 and "no EMA weights" in rows[0]["error"]


# ---------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def bad_ckpts(random_ckpts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    data = random_ckpts["a"].read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", num_classes=10)
    return {
        "missing": root / "missing.pth",
        "truncated": root / "truncated.pth",
        "resnet_named_hrnet": save_ckpt(root / "resnet.pth", resnet),  # config says hrnet_tiny_c
        "seven_classes": save_ckpt(root / "seven.pth", tiny(4, num_classes=7)),  # config says 10 classes
        "unknown_model": save_ckpt(root / "unknown.pth", tiny(5), name="hrnet_nosuch_c"),
    }


def test_bad_checkpoints_become_error_rows_and_the_sweep_goes_on(random_ckpts, bad_ckpts, tmp_path) -> None:
    code, alone = run(["--checkpoint", str(random_ckpts["a"])], tmp_path, "alone.json")
    assert code == 0
    bad = list(bad_ckpts)
    argv = ["--checkpoint", *[str(bad_ckpts[k]) for k in bad[:3]], str(random_ckpts["a"]),
            *[str(bad_ckpts[k]) for k in bad[3:]], "--model", "no_such_model"]
    code, rows = run(argv, tmp_path)
    assert code == 1 and len(rows) == len(bad) + 2
    good = rows[3]
    assert good["error"] == "" and counts(good) == counts(alone[0])
    errors = dict(zip(bad[:3] + bad[3:], [r["error"] for r in rows[:3] + rows[4:-1]]))
    problems = {"missing": "no such file", "truncated": "central directory", "resnet_named_hrnet": "do not fit",
                "seven_classes": "another shape", "unknown_model": "unknown timm model 'hrnet_nosuch_c'"}
    for kind, error in errors.items():
        assert error.startswith(f"{bad_ckpts[kind]}: ") and "\n" not in error, error
        assert problems[kind] in error, error
    assert "classifier.weight: file [7, 256], model [10, 256]" in errors["seven_classes"]
    assert rows[-1]["model"] == "no_such_model" and "unknown timm model" in rows[-1]["error"]
    assert all(r["top1"] is None for r in rows if r["error"])


def test_missing_shards_are_a_one_line_usage_error_before_loading(random_ckpts, tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO)
    pattern = str(tmp_path / "nowhere" / "val-{000000..000003}.tar")
    code = validate.main(["--checkpoint", str(random_ckpts["a"]), "--data", pattern])
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    assert err.err.count("\n") == 1 and "nowhere/val-" in err.err and "no shard file matches" in err.err
    assert not [r for r in caplog.records if r.name.startswith(("hrnet_cls", "validate"))]  # nothing ran
    for argv in (["--data", VAL], ["--checkpoint", "x.pth", "--data", VAL, "--crop-pct", "1.5"],
                 ["--checkpoint", "x.pth", "--data", VAL, "--batch-size", "0"]):
        assert validate.main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- timm model folders (local-dir:)


def test_local_dir_folders_are_described_from_their_config_json(random_ckpts, tmp_path) -> None:
    from hrnet_cls.export import main as export

    folder, odd = tmp_path / "a", tmp_path / "odd[1]"  # glob characters: a folder, never a pattern
    assert export([str(random_ckpts["a"]), str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, 64, 64], crop_pct=0.95, interpolation="bicubic",
                                    mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    shutil.copytree(folder, odd)
    (odd / "config.json").write_text(json.dumps(config))
    unknown = tmp_path / "unknown"
    shutil.copytree(folder, unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "architecture": "hrnet_nosuch_c"}))
    names = [f"local-dir:{p}" for p in (folder, odd, tmp_path / "nowhere", unknown)]
    a, b, nowhere, bad = describe_all(model_specs(names))
    assert (a.error, a.source, a.model, a.desc.num_classes) == ("", "pretrained", names[0], 10)
    assert (a.desc.img_size, a.desc.crop_pct, a.desc.interpolation) == (32, 1.0, "bilinear")  # the recipe's
    assert (a.desc.mean, a.desc.std) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert (b.error, b.desc.img_size, b.desc.crop_pct, b.desc.interpolation, b.desc.mean, b.desc.std) == (
        "", 64, 0.95, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert nowhere.error == f"{names[2]}: {tmp_path / 'nowhere'}: no such model folder"
    assert bad.error.startswith(f"{names[3]}: unknown timm model 'hrnet_nosuch_c'")
    (with_weights,) = describe_all(model_specs(names[:1], weights=str(random_ckpts["b"])))
    assert (with_weights.error, with_weights.source, with_weights.desc.num_classes) == ("", "weights", 10)


def test_a_local_dir_folder_validates_like_its_checkpoint_in_the_same_pass(random_ckpts, tmp_path, caplog) -> None:
    from hrnet_cls.export import main as export

    assert export([str(random_ckpts["b"]), str(tmp_path / "b")]) == 0
    caplog.set_level(logging.INFO)
    code, rows = run(["--checkpoint", str(random_ckpts["b"]), "--model", f"local-dir:{tmp_path / 'b'}"], tmp_path)
    assert code == 0 and [r["error"] for r in rows] == ["", ""]
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass 1/")]
    assert passes and all(m.startswith("pass 1/1: ") for m in passes)  # same preprocessing: one pass, 2 models
    assert "2 model(s)" in passes[0]
    assert [(r["img_size"], r["crop_pct"]) for r in rows] == [(32, 1.0)] * 2
    assert counts(rows[0]) == counts(rows[1]) and rows[0]["param_count"] == rows[1]["param_count"]


# ---------------------------------------------------------------- decode once


@pytest.mark.slow
def test_a_sweep_decodes_each_sample_once_per_preprocessing_group(random_ckpts, caplog) -> None:
    caplog.set_level(logging.INFO)
    specs = describe_all(checkpoint_specs([str(random_ckpts["a"]), str(random_ckpts["b"])]))
    shards = tuple(sorted(str(p) for p in DIGITS.glob("val-*.tar")))
    assert expected_samples(shards) == (VAL_SAMPLES, "_info.json split 'val'")
    assert expected_samples(shards[:1]) == (180, "_info.json split 'val', 1 of its 2 shards")
    single = DistInfo(0, 0, 1, torch.device("cpu"), True)
    results = {}
    for per_pass in (0, 1):
        rows = build_rows(specs, [32, 64], [0.875, 1.0])
        settings = SweepSettings(shards, VAL_SAMPLES, batch_size=128, workers=0, max_models_per_pass=per_pass)
        passes = run_sweep(rows, settings, single)
        assert all(p.decoded == VAL_SAMPLES and p.skipped == 0 for p in passes)
        results[per_pass] = ([p.models for p in passes], [(r.top1, r.top5, r.samples) for r in rows])
    # 4 groups (size x crop), each one loader pass feeding both models; capped at 1: 8 passes
    assert results[0][0] == [2, 2, 2, 2] and results[1][0] == [1] * 8
    assert results[0][1] == results[1][1]  # sharing batches changes no number
    counted = [r.getMessage() for r in caplog.records if "samples validated" in r.getMessage()]
    assert len(counted) == 12 and all("360 samples validated + 0 bad = 360; 360 expected" in m for m in counted)


# ---------------------------------------------------------------- two processes

WRAPPER = """
import importlib.util, os, sys
rank = os.environ["RANK"]
os.chdir(os.path.join(sys.argv[1], "rank" + rank))  # node-local files: each rank has its own ckpt/
spec = importlib.util.spec_from_file_location("validate_script", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
code = module.main(sys.argv[3:])
open(os.path.join(sys.argv[1], "exit" + rank), "w").write(str(code))
"""


@pytest.mark.slow  # two interpreters under torchrun: ~15 s on 2 cores
def test_two_processes_equal_one_and_agree_on_rows_that_fail_on_one_rank(trained, random_ckpts, tmp_path) -> None:
    good = trained["good"].read_bytes()
    for rank in (0, 1):
        (tmp_path / f"rank{rank}" / "ckpt").mkdir(parents=True)
        (tmp_path / f"rank{rank}" / "ckpt" / "good.pth").write_bytes(good)
    # fine on rank 0; on rank 1 truncated (fails when described), or with 7 classes under
    # a 10-class config (describes alike, fails when loaded)
    (tmp_path / "rank0" / "ckpt" / "flaky_read.pth").write_bytes(good)
    (tmp_path / "rank1" / "ckpt" / "flaky_read.pth").write_bytes(good[: len(good) // 3])
    (tmp_path / "rank0" / "ckpt" / "flaky_load.pth").write_bytes(good)
    save_ckpt(tmp_path / "rank1" / "ckpt" / "flaky_load.pth", tiny(4, num_classes=7))
    sidecar(tmp_path / "rank1" / "ckpt" / "flaky_load.pth").unlink()  # unverified on both ranks, like the copies
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    out = tmp_path / "two.json"
    argv = ["--checkpoint", "ckpt/flaky_read.pth", "ckpt/good.pth", "ckpt/flaky_load.pth", "--img-size", *SIZES,
            "--data", VAL, "--workers", "2", "--batch-size", "50", "--results-file", str(out)]
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1")  # gloo on CPU, one thread per process
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "wrapper.py"), str(tmp_path), str(REPO / "validate.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"exit{r}").read_text() for r in (0, 1)] == ["1", "1"]
    assert proc.stdout.count("img/s") == 1  # only rank 0 prints the table
    rows = json.loads(out.read_text())
    names = [f"ckpt/{name}.pth" for name in ("flaky_read", "good", "flaky_load") for _ in SIZES]
    assert [r["checkpoint"] for r in rows] == names
    for row in rows[:2]:
        assert "central directory" in row["error"] and "(on rank 1 only)" in row["error"]
    for row in rows[4:]:
        assert "another shape" in row["error"] and "(on rank 1 only)" in row["error"]
    code, single = run(["--checkpoint", str(trained["good"]), "--img-size", *SIZES], tmp_path, "single.json")
    assert code == 0
    for two, one in zip(rows[2:4], single):
        assert two["error"] == "" and two["samples"] == VAL_SAMPLES
        assert counts(two) == counts(one) and two["top1"] == one["top1"] and two["top5"] == one["top5"]
