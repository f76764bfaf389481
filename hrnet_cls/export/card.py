"""The model card (README.md) of an exported folder: Hugging Face metadata, results, loading, preprocessing, recipe.

What it holds and why: README "Export", docs/design.md §6.5."""
from __future__ import annotations

from typing import Any, Mapping

import yaml

from hrnet_cls.data import read_info

README_NAME = "README.md"
TAGS = ["image-classification", "timm", "hrnet", "hrnet-cls"]
PLAIN_TIMM = "timm"  # config.json's export.loads_with for a folder under timm's own architecture name


def dataset_name(train_shards: str) -> str:
    """The ``name`` the training shards' _info.json gives, or "" (none, or not reachable)."""
    try:
        return str((read_info(train_shards) or {}).get("name") or "") if train_shards else ""
    except Exception:  # noqa: BLE001 - the shards moved or are remote and unreachable: the card goes without
        return ""


def _metadata(config: Mapping[str, Any], export: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    cfg = config["pretrained_cfg"]
    geometry = f"{cfg['input_size'][-1]} px, crop_pct {cfg['crop_pct']:g}, {cfg['interpolation']}"
    meta: dict[str, Any] = {"library_name": "timm", "license": config["pretrained_cfg"].get("license", "other"),
                            "tags": TAGS, "pipeline_tag": "image-classification"}
    metrics = export.get("metrics") or {}
    if dataset:
        meta["datasets"] = [dataset]
    if dataset and "val_top1" in metrics:
        meta["metrics"] = ["accuracy"]
        meta["model-index"] = [{"name": export["model_name"], "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset, "type": dataset, "split": "validation"},
            "metrics": [{"type": "accuracy", "name": f"top-{k} accuracy ({geometry})",
                         "value": round(metrics.get(f"val_top{k}", float("nan")), 4)} for k in (1, 5)]}]}]
    return meta


def _recipe(train_config: Mapping[str, Any]) -> list[str]:
    """The recipe's main settings, one bullet each, from a checkpoint's config dict."""
    if not train_config:
        return ["- not recorded: the weights did not come from an hrnet-cls training checkpoint"]
    m, d, o = train_config.get("model", {}), train_config.get("data", {}), train_config.get("optim", {})
    s, t = train_config.get("schedule", {}), train_config.get("train", {})
    return [
        f"- data: `{d.get('train_shards')}`, {d.get('img_size')} px random-resized crops, "
        f"{d.get('batch_size')} images per process per step",
        f"- SGD, lr {o.get('lr')}{' (Nesterov)' if o.get('nesterov') else ''}, momentum {o.get('momentum')}, "
        f"weight decay {o.get('weight_decay')}",
        f"- {s.get('epochs')} epochs, lr x {s.get('decay_rate')} at epochs {s.get('decay_epochs')}, "
        f"warm-up {s.get('warmup_epochs')} epochs",
        f"- precision {t.get('precision')}, label smoothing {t.get('label_smoothing')}, drop path "
        f"{m.get('drop_path_rate')}, EMA {'on' if t.get('ema') else 'off'}",
    ]


def render(config: Mapping[str, Any], train_config: Mapping[str, Any], labels_note: str, folder_name: str) -> str:
    """README.md for an export's config.json ``config``; ``train_config``: the recipe ({} for a plain weights file)."""
    export, cfg = config["export"], config["pretrained_cfg"]
    dataset = dataset_name(str((train_config.get("data") or {}).get("train_shards") or ""))
    metrics = export.get("metrics") or {}
    plain = export["loads_with"] == PLAIN_TIMM
    load = [
        "```python",
        *([] if plain else ["import hrnet_cls  # registers the HRNet-C models with timm: this one needs it"]),
        "import timm",
        f"model = timm.create_model('local-dir:{folder_name}', pretrained=True).eval()",
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
        "```",
    ]
    needs = (f"`config.json` names timm's own `{config['architecture']}`: in eval `{export['model_name']}` is that "
             "model, with the same state-dict layout, so the folder loads in any timm installation; hrnet-cls is "
             "only needed to train it further." if plain else
             f"`{export['model_name']}` is not one of timm's models: install hrnet-cls (`pip install hrnet-cls`) and "
             "`import hrnet_cls` before `timm.create_model`, or timm fails with `Unknown model`.")
    result = (f"{metrics['val_top1']:.2f}% top-1, {metrics.get('val_top5', float('nan')):.2f}% top-5 on "
              f"{metrics.get('val_samples', '?')} validation images" if "val_top1" in metrics else "not recorded")
    lines = [
        "---", yaml.safe_dump(_metadata(config, export, dataset), sort_keys=False).rstrip(), "---", "",
        f"# {export['model_name']}{f' on {dataset}' if dataset else ''}", "",
        f"An HRNet-C image classifier ({config['num_classes']} classes) exported by hrnet-cls from "
        f"`{export['source']}` (epoch {export.get('epoch')}, step {export.get('step')}; "
        f"{'sha256 verified' if export.get('verified') else 'UNVERIFIED: no .sha256 beside it'}; "
        f"git commit {export.get('git_commit')}).", "",
        "## Results", "",
        f"{result}, at {cfg['input_size'][-1]} px, crop_pct {cfg['crop_pct']:g}, {cfg['interpolation']}: the "
        "checkpoint's own validation (`python validate.py --model local-dir:FOLDER --data ...` recomputes it).", "",
        "## Loading", "", needs, "", *load, "",
        f"Input: {cfg['input_size'][-1]} x {cfg['input_size'][-1]} RGB, the shorter side resized to "
        f"floor({cfg['input_size'][-1]} / {cfg['crop_pct']:g}) with {cfg['interpolation']} interpolation, "
        f"centre-cropped, normalised with mean {tuple(cfg['mean'])} and std {tuple(cfg['std'])}.", "",
        "## Training recipe", "", *_recipe(train_config), "",
        "## Labels", "", f"{labels_note or 'no label names'}.", "",
    ]
    return "\n".join(lines)
