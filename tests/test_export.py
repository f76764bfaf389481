"""python -m hrnet_cls.export: a training checkpoint -> a timm model folder (+ ONNX), read back by
timm, validate.py and onnxruntime, with real checkpoints of hrnet_tiny_c."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import DIGITS, DIGITS_VAL as VAL, REPO, load_script, same_weights, subprocess_env, tiny_model
from hrnet_cls.train.state import Position, build_state, save_checkpoint
from hrnet_cls.config import config_to_dict, load_config
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_val_loader
from hrnet_cls.export import OPSET, main

pytestmark = pytest.mark.usefixtures("one_thread")  # on a busy 2-core machine two threads spin-wait
validate = load_script("validate.py")
IMG, CROP = 64, 0.9  # the checkpoints' data.img_size / data.crop_pct: not hrnet_tiny_c's defaults (32, 1.0)
CLASS_NAMES = json.loads((DIGITS / "_info.json").read_text())["class_names"]


METRICS = {"val_top1": 91.25, "val_top5": 99.5, "val_loss": 0.3, "val_samples": 360}  # what its validation said


def save_ckpt(path: Path, model: torch.nn.Module, model_ema: torch.nn.Module | None = None, name: str = "hrnet_tiny_c",
              **data) -> Path:
    """A training checkpoint as train.py writes it (the demo recipe, trained at IMG px, CROP)."""
    config = config_to_dict(load_config("demo_digits.yaml"))
    config["model"].update(name=name, num_classes=model.num_classes)
    config["data"].update(img_size=IMG, crop_pct=CROP, **data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(path, build_state(model=model, optimizer=optimizer, position=Position(1, 1, 0, metrics=METRICS),
                                      config=config, model_ema=model_ema))
    return path


def digits(n: int = 4) -> torch.Tensor:
    """n real val images, preprocessed as the checkpoints were trained (IMG px, CROP)."""
    loader = build_val_loader(VAL, batch_size=n, img_size=IMG, crop_pct=CROP, workers=0)
    images, _, _ = next(iter(loader))
    return loader.normalize(images)


def calibrated(seed: int, num_classes: int = 10) -> torch.nn.Module:
    """A random hrnet_tiny_c with the BN statistics of the digits and a centred classifier (bias =
    -W mean feature): its predictions vary with the image (a fresh one's nearly all fall in one
    class), so equal accuracies mean something, at no training cost."""
    model = tiny_model(num_classes, seed)
    loader = build_val_loader(VAL, batch_size=120, img_size=IMG, crop_pct=CROP, workers=0)
    batches = [loader.normalize(images) for images, _, _ in loader]
    with torch.no_grad():
        model.train()
        for images in batches:
            model(images)
        model.eval()
        features = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in batches])
        model.classifier.bias.copy_(-model.classifier.weight @ features.mean(0))
    return model


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def from_weights(weights: dict, num_classes: int = 10) -> torch.nn.Module:
    """The model as validate.py builds it from a checkpoint: the registry's default layout, strict load."""
    model = timm.create_model("hrnet_tiny_c", num_classes=num_classes)
    model.load_state_dict(weights)
    return model.eval()


def export(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    model, ema = calibrated(1), calibrated(2)
    torch.save(calibrated(3, num_classes=7).state_dict(), root / "seven_plain.pth")
    torch.save(model.state_dict(), root / "plain.pth")
    return {"ckpt": save_ckpt(root / "ckpt.pth", model, ema), "no_ema": save_ckpt(root / "no_ema.pth", model),
            "moved_shards": save_ckpt(root / "moved.pth", model, train_shards=str(root / "gone/train-{0..3}.tar")),
            "plain": root / "plain.pth", "seven_plain": root / "seven_plain.pth"}


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory) -> dict[str, Path]:
    """ckpt.pth exported twice: its model weights and its EMA weights."""
    root = tmp_path_factory.mktemp("exported")
    assert export(ckpts["ckpt"], root / "model") == 0
    assert export(ckpts["ckpt"], root / "ema", "--use-ema") == 0
    return {"model": root / "model", "ema": root / "ema"}


# ---------------------------------------------------------------- the folder, read back by timm


def test_local_dir_gives_logits_identical_to_the_checkpoint_model_and_its_ema(ckpts, exported) -> None:
    state = torch.load(ckpts["ckpt"], weights_only=True)
    x = digits()
    for kind, key in (("model", "model"), ("ema", "model_ema")):
        folder = exported[kind]
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        reference = from_weights(state[key])
        assert same_weights(load_file(folder / "model.safetensors"), reference.state_dict())  # weights only
        local = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert local.num_classes == 10
        assert torch.equal(logits(local, x), logits(reference, x)), kind
    model_logits = logits(timm.create_model(f"local-dir:{exported['model']}", pretrained=True), x)
    assert not torch.allclose(model_logits, logits(from_weights(state["model_ema"]), x))  # two different nets


def test_config_json_is_timms_with_the_training_preprocessing_and_label_names(exported) -> None:
    config = json.loads((exported["model"] / "config.json").read_text())
    assert config["architecture"] == "hrnet_tiny_c" and config["num_classes"] == 10
    assert config["num_features"] == 256 and config["global_pool"] == "avg"
    assert config["label_names"] == CLASS_NAMES
    assert config["model_args"] == {"num_classes": 10, "in_chans": 3, "global_pool": "avg"}  # no layout recorded
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, IMG, IMG] and cfg["crop_pct"] == CROP and cfg["crop_mode"] == "center"
    assert cfg["interpolation"] == "bilinear" and cfg["classifier"] == "classifier" and cfg["num_classes"] == 10
    assert cfg["mean"] == list(IMAGENET_DEFAULT_MEAN) and cfg["std"] == list(IMAGENET_DEFAULT_STD)
    assert "tag" not in cfg and cfg["pool_size"] is None  # our weights, at another size than the registry's
    assert config["export"]["weights"] == "model" and config["export"]["source"] == "ckpt.pth"
    ema_config = json.loads((exported["ema"] / "config.json").read_text())
    assert ema_config["export"]["weights"] == "ema" and ema_config["pretrained_cfg"] == cfg
    created = timm.create_model(f"local-dir:{exported['model']}", pretrained=True).pretrained_cfg
    assert tuple(created["input_size"]) == (3, IMG, IMG) and created["crop_pct"] == CROP
    assert created["interpolation"] == "bilinear" and tuple(created["mean"]) == tuple(IMAGENET_DEFAULT_MEAN)
    assert tuple(created["std"]) == tuple(IMAGENET_DEFAULT_STD) and list(created["label_names"]) == CLASS_NAMES
    data_cfg = timm.data.resolve_data_config(model=timm.create_model(f"local-dir:{exported['model']}"))
    assert data_cfg["input_size"] == (3, IMG, IMG) and data_cfg["crop_pct"] == CROP


def test_timms_own_readers_take_the_safetensors(ckpts, exported) -> None:
    weights = exported["model"] / "model.safetensors"
    reference, x = from_weights(torch.load(ckpts["ckpt"], weights_only=True)["model"]), digits()
    loaded = tiny_model(10, seed=5)
    timm.models.load_checkpoint(loaded, str(weights))
    assert torch.equal(logits(loaded, x), logits(reference, x))
    # num_classes in the overlay too: else timm drops a classifier of another size than its pretrained_cfg's
    pretrained = timm.create_model("hrnet_tiny_c", pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(weights), num_classes=10))
    assert torch.equal(logits(pretrained, x), logits(reference, x))


def test_a_plain_weights_file_needs_model_and_takes_its_classes_from_the_classifier(ckpts, tmp_path, capsys) -> None:
    assert export(ckpts["seven_plain"], tmp_path / "seven", "--model", "hrnet_tiny_c") == 0
    config = json.loads((tmp_path / "seven" / "config.json").read_text())
    assert config["num_classes"] == 7 and "label_names" not in config
    cfg = config["pretrained_cfg"]  # no training config: hrnet_tiny_c's pretrained_cfg
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    x = digits()
    local = timm.create_model(f"local-dir:{tmp_path / 'seven'}", pretrained=True)
    assert torch.equal(logits(local, x), logits(from_weights(torch.load(ckpts["seven_plain"]), 7), x))
    capsys.readouterr()
    assert export(ckpts["plain"], tmp_path / "plain") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a plain state dict, not a training checkpoint" in err and "--model NAME" in err
    assert not (tmp_path / "plain").exists()


def test_unreachable_shards_cost_the_label_names_only(ckpts, tmp_path, capsys) -> None:
    assert export(ckpts["moved_shards"], tmp_path / "out") == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "label names" in line]
    assert len(notes) == 1 and notes[0].startswith("no label names:") and "gone/train-" in notes[0], out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "label_names" not in config and config["pretrained_cfg"]["crop_pct"] == CROP
    assert "label_names" not in timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).pretrained_cfg


# ---------------------------------------------------------------- validate.py on the folder


def rows(argv: list[str], out: Path) -> list[dict]:
    code = validate.main([*argv, "--data", VAL, "--workers", "0", "--batch-size", "120", "--results-file", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_validate_local_dir_equals_validate_checkpoint(ckpts, exported, tmp_path) -> None:
    (ckpt,) = rows(["--checkpoint", str(ckpts["ckpt"])], tmp_path / "ckpt.json")
    (local,) = rows(["--model", f"local-dir:{exported['model']}"], tmp_path / "local.json")
    same = ("img_size", "crop_pct", "top1", "top5", "samples", "skipped", "param_count", "loss")
    assert (local["img_size"], local["crop_pct"]) == (IMG, CROP) and local["error"] == ""
    assert {k: local[k] for k in same} == {k: ckpt[k] for k in same}
    assert local["model"] == f"local-dir:{exported['model']}"
    # EMA: --use-ema picks the checkpoint's EMA weights; the EMA folder holds only those
    ema_ckpt, ema_local = rows(["--checkpoint", str(ckpts["ckpt"]), "--model", f"local-dir:{exported['ema']}",
                                "--use-ema"], tmp_path / "ema.json")
    assert {k: ema_local[k] for k in same} == {k: ema_ckpt[k] for k in same}
    assert (ema_ckpt["top1"], ema_ckpt["top5"]) != (ckpt["top1"], ckpt["top5"])  # other weights, other counts


# ---------------------------------------------------------------- errors


def test_input_problems_are_one_line_errors_with_nothing_written(ckpts, tmp_path, capsys, monkeypatch) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpts["ckpt"].read_bytes()[:4096])
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases = {
        "no such file": [tmp_path / "missing.pth", tmp_path / "out"],
        "cannot read it": [truncated, tmp_path / "out"],
        "no EMA weights": [ckpts["no_ema"], tmp_path / "out", "--use-ema"],
        "exists and is not empty; pass --force": [ckpts["ckpt"], full],
        "a checkpoint of 'hrnet_tiny_c', not of --model 'resnet18'": [ckpts["ckpt"], tmp_path / "out",
                                                                       "--model", "resnet18"],
        "weights do not fit resnet18": [ckpts["plain"], tmp_path / "out", "--model", "resnet18"],
    }
    for problem, argv in cases.items():
        assert export(*argv) == 2, problem
        err = capsys.readouterr()
        assert err.out == "" and err.err.count("\n") == 1, err
        assert err.err.startswith("python -m hrnet_cls.export: error: ") and problem in err.err, err.err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in full.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "truncated.pth"]  # no staging folder left
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    assert export(ckpts["ckpt"], tmp_path / "out", "--onnx") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(missing: onnxscript)" in err and 'pip install "hrnet-cls[export]"' in err
    assert not (tmp_path / "out").exists()


def test_force_overwrites_an_export_and_keeps_other_files(ckpts, exported, tmp_path) -> None:
    folder = tmp_path / "out"
    assert export(ckpts["ckpt"], folder) == 0
    (folder / "NOTES.txt").write_text("the user's own file")
    (folder / "model.onnx").write_bytes(b"stale")  # of an earlier --onnx export: no longer these weights
    assert export(ckpts["ckpt"], folder, "--use-ema") == 2
    assert export(ckpts["ckpt"], folder, "--use-ema", "--force") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "README.md", "config.json", "model.safetensors"]
    assert same_weights(load_file(folder / "model.safetensors"), load_file(exported["ema"] / "model.safetensors"))


# ---------------------------------------------------------------- plain timm, model card


def test_the_model_card_reads_with_the_hub_parser_and_says_what_loading_needs(exported) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported["model"] / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "mit" and "hrnet-cls" in card.data.tags
    assert card.data.datasets == ["digits"]  # the name in the training shards' _info.json
    (top1, top5) = card.data.eval_results
    assert (top1.metric_value, top5.metric_value) == (METRICS["val_top1"], METRICS["val_top5"])
    assert top1.metric_name == f"top-1 accuracy ({IMG} px, crop_pct {CROP:g}, bilinear)"
    assert top1.dataset_name == "digits"
    assert "`hrnet_tiny_c` is not one of timm's models" in card.text and "import hrnet_cls" in card.text
    assert "91.25% top-1, 99.50% top-5 on 360 validation images" in card.text
    assert "- SGD, lr 0.1 (Nesterov)" in card.text
    config = json.loads((exported["model"] / "config.json").read_text())
    assert config["export"]["loads_with"] == "timm, after import hrnet_cls (pip install hrnet-cls)"


PLAIN_TIMM = """
import sys, timm, torch
assert not [m for m in sys.modules if m.startswith("hrnet_cls")]
folder, tiny, x = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
with torch.no_grad():
    torch.save(model(x), sys.argv[4])
try:
    timm.create_model("local-dir:" + tiny, pretrained=True)
except RuntimeError as e:
    print(e)
"""


@pytest.mark.slow  # a fresh interpreter without hrnet_cls: ~6 s of imports on 2 cores
def test_a_variant_that_is_timms_own_model_exports_a_folder_plain_timm_loads(exported, tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small_c", num_classes=10)
    ckpt = save_ckpt(tmp_path / "w18s.pth", model, name="hrnet_w18_small_c")
    assert export(ckpt, tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "hrnet_w18_small" and config["export"]["model_name"] == "hrnet_w18_small_c"
    assert config["export"]["loads_with"] == "timm"
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(tmp_path / "out"), str(exported["model"]),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Unknown model (hrnet_tiny_c)" in proc.stdout  # the bottleneck/tiny folders need hrnet-cls, as they say
    theirs = torch.load(tmp_path / "y.pt")
    nchw = timm.create_model("hrnet_w18_small_c", num_classes=10, channels_last=False)
    nchw.load_state_dict(model.state_dict())
    assert torch.equal(theirs, logits(nchw, x))  # exactly our NCHW build
    ours = logits(model, x)  # the default NHWC layout: other kernels, the same up to rounding
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "names timm's own `hrnet_w18_small`" in card and "import hrnet_cls" not in card


# ---------------------------------------------------------------- ONNX, fresh interpreter


@pytest.mark.slow  # the torch.export-based ONNX exporter: ~7 s for hrnet_tiny_c on 2 cores
def test_onnx_matches_the_checkpoint_model_at_batch_1_and_3(ckpts, tmp_path, capsys) -> None:
    import onnx
    import onnxruntime

    folder = tmp_path / "out"
    assert export(ckpts["ckpt"], folder, "--onnx") == 0
    assert f"opset {OPSET}, dynamic batch" in capsys.readouterr().out
    graph = onnx.load(folder / "model.onnx")
    assert {o.domain: o.version for o in graph.opset_import}.get("", 0) == OPSET
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, IMG, IMG]  # batch dynamic, image side fixed
    reference = from_weights(torch.load(ckpts["ckpt"], weights_only=True)["model"])
    images = digits(4)
    for batch in (1, 3):
        x = images[:batch]
        expected = logits(reference, x)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert got.shape == (batch, 10)
        assert (got - expected).abs().max() / expected.abs().max() < 1e-4, batch


@pytest.mark.slow  # a fresh interpreter: ~6 s of imports on 2 cores
def test_cli_in_a_fresh_interpreter(ckpts, tmp_path) -> None:
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "hrnet_cls.export", str(ckpts["ckpt"]), str(tmp_path / "out")]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "label names: 10 class names" in proc.stdout and "local-dir:" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert "exists and is not empty" in proc.stderr
