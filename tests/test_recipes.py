"""Recipes beyond the paper in timm's vocabulary, with timm's own parts: augmentation, mixup / cutmix,
random erasing, BCE, optimizers, cosine, layer decay, gradient accumulation and clipping."""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.scheduler import CosineLRScheduler
from torch import nn

from conftest import REPO, subprocess_env, tiny_model
from hrnet_cls.config import Config, ConfigError, OptimConfig, ScheduleConfig, load_config
from hrnet_cls.data.augment import augment_crop, build_augment, seeded
from hrnet_cls.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Normalize
from hrnet_cls.distributed import DistInfo
from hrnet_cls.precision import Precision
from hrnet_cls.train.engine import build_parts, train_one_epoch
from hrnet_cls.train.optim import build_optimizer, build_scheduler
from hrnet_cls.train.preemption import StopRequest
from hrnet_cls.train.checkpointer import Checkpointer
from hrnet_cls.train.tracking import Tracker

CPU = torch.device("cpu")
BAD = [  # (override, the start of the one line it gives)
    ("data.auto_augment=rand-q9", "data.auto_augment: timm cannot parse 'rand-q9'"),
    ("data.scale=[0.5,0.2]", "data.scale must be [min, max]"),
    ("data.ratio=[0.75]", "data.ratio must be [min, max]"),
    ("data.hflip=1.5", "data.hflip must be in [0, 1]"),
    ("data.interpolation=nearest", "data.interpolation must be one of"),
    ("data.color_jitter=-0.1", "data.color_jitter must be >= 0"),
    ("data.re_prob=2", "data.re_prob must be in [0, 1]"),
    ("data.re_mode=noise", "data.re_mode must be one of"),
    ("data.re_count=0", "data.re_count must be >= 1"),
    ("optim.name=adamx", "optim.name: 'adamx' is not an optimizer timm knows (did you mean"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two values in [0, 1)"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.layer_decay=1.5", "optim.layer_decay must be in [0, 1]"),
    ("schedule.name=linear", "schedule.name must be one of"),
    ("schedule.min_lr=5", "schedule.min_lr must be in [0, optim.lr="),
    ("schedule.warmup_lr=-1", "schedule.warmup_lr must be in [0, optim.lr="),
    ("train.mixup_alpha=-1", "train.mixup_alpha must be >= 0"),
    ("train.cutmix_alpha=-1", "train.cutmix_alpha must be >= 0"),
    ("train.mixup_prob=2", "train.mixup_prob must be in [0, 1]"),
    ("train.mixup_switch_prob=-1", "train.mixup_switch_prob must be in [0, 1]"),
    ("train.mixup_mode=row", "train.mixup_mode must be one of"),
    ("train.bce_loss=maybe", "config key 'train.bce_loss' expects bool"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps must be >= 1"),
    ("train.clip_grad=-1", "train.clip_grad must be >= 0"),
]


@pytest.mark.parametrize("override, line", BAD, ids=[b[0].split("=")[0] for b in BAD])
def test_a_bad_value_of_every_new_key_is_one_line_naming_it(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("demo_digits.yaml", [override])
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_mixup_needs_an_even_batch_and_train_py_exits_2_writing_nothing(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^data.batch_size must be even with train.mixup_alpha"):
        load_config("demo_digits.yaml", ["train.mixup_alpha=0.2", "data.batch_size=63"])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--config", "demo_digits.yaml", "optim.name=adamx",
                           f"checkpoint.output_dir={out}"], cwd=REPO, env=subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: optim.name: 'adamx' is not an optimizer")


def test_the_paper_recipes_defaults_are_todays() -> None:
    """Every new key defaults to the paper recipe: plain cross-entropy, SGD, the step schedule, no mixing."""
    cfg = load_config("hrnet_w18_c.yaml")
    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    assert (d.auto_augment, d.re_prob, d.color_jitter, d.scale, d.hflip) == ("", 0.0, 0.0, [0.08, 1.0], 0.5)
    assert (o.name, s.name, t.mixup_alpha, t.cutmix_alpha, t.bce_loss, t.grad_accum_steps, t.clip_grad) == (
        "sgd", "step", 0.0, 0.0, False, 1, 0.0)
    parts = build_parts(cfg, DistInfo(0, 0, 1, CPU, True), tiny_model(), Precision.of("fp32", CPU))
    assert type(parts.criterion) is nn.CrossEntropyLoss and type(parts.optimizer) is torch.optim.SGD
    assert parts.mixup is None and parts.erase is None and parts.accum == 1


def test_cosine_follows_timms_cosine_lr_scheduler() -> None:
    """Per step, from the samples seen: fractional epochs are timm's t (t_in_epochs), warm-up included."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    cfg = ScheduleConfig(name="cosine", epochs=10, decay_epochs=[], warmup_epochs=2, warmup_lr=0.01, min_lr=0.001)
    ours = build_scheduler(opt, cfg, 0.5)
    theirs = CosineLRScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5), t_initial=10, lr_min=0.001,
                               warmup_t=2, warmup_lr_init=0.01, t_in_epochs=True)
    for t in [0, 0.25, 1, 1.999, 2, 2.5, 5, 7.75, 9.99, 10]:
        assert ours.step(t, t + 0.01) == pytest.approx(theirs._get_lr(t)[0], rel=1e-12, abs=1e-15), t
        assert opt.param_groups[0]["lr"] == ours.lr_at(t, t + 0.01)


def test_layer_decay_scales_each_groups_lr_from_the_models_group_matcher() -> None:
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5,
                                             wd_on_norm_and_bias=False))
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.5 ** 2  # the stem decays most
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if all(p.ndim <= 1 for p in g["params"]))
    build_scheduler(opt, ScheduleConfig(name="cosine", epochs=4, decay_epochs=[]), 1e-3).step(0.0, 0.1)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3 * s for s in scales])


def test_timms_optimizers_get_the_configured_betas_and_eps() -> None:
    model = tiny_model()
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.8, 0.95], eps=1e-6))
    lamb = build_optimizer(model, OptimConfig(name="lamb", lr=1e-3, weight_decay=0.02, wd_on_norm_and_bias=False))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    assert type(lamb).__name__ == "Lamb" and lamb.defaults["betas"] == (0.9, 0.999)
    assert {g["weight_decay"] for g in lamb.param_groups} == {0.0, 0.02}  # norms and biases exempt


def test_augmentation_is_timms_transform_drawn_per_sample() -> None:
    """Our crop, then timm's own RandAugment as create_transform builds it for the same size and mean, each
    sample's draw a function of its seed only (not of the process's RNG, not of the worker)."""
    rng = np.random.default_rng(0)
    crop = torch.from_numpy(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    ours = build_augment("rand-m9-mstd0.5-inc1", 0.0, 40, IMAGENET_DEFAULT_MEAN, "bilinear")
    _, timms, _ = create_transform(40, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", separate=True)
    outs = []
    for seed in range(6):
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        got = augment_crop(crop, ours, seed)
        drawn = (torch.rand(1).item(), np.random.rand(), random.random())
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        assert drawn == (torch.rand(1).item(), np.random.rand(), random.random())  # the process's streams untouched
        with seeded(seed):
            expected = np.asarray(timms(Image.fromarray(crop.permute(1, 2, 0).numpy())))
        assert torch.equal(got, torch.from_numpy(expected.copy()).permute(2, 0, 1)), seed
        assert torch.equal(augment_crop(crop, ours, seed), got)
        outs.append(got)
    assert len({o.numpy().tobytes() for o in outs}) > 1  # the seeds draw different ops


class Batches(list):
    """In-memory uint8 batches with the interface train_one_epoch uses."""

    normalize = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    batches_per_epoch = property(len)
    bad_shards: dict = {}

    def progress(self, batch: int) -> tuple[float, float]:
        return batch / len(self), (batch + 1) / len(self)


def one_epoch(cfg: Config, batches: list) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))  # no BatchNorm: micro-batches see the same maths
    parts = build_parts(cfg, DistInfo(0, 0, 1, CPU, True), net, Precision.of("fp32", CPU))
    tracker = Tracker(cfg.wandb, Checkpointer(cfg.checkpoint, is_main=False))
    train_one_epoch(parts, Batches(batches), epoch=0, global_step=0, tracker=tracker, checkpointer=None,
                    stop=StopRequest())
    return net


def test_two_accumulated_micro_batches_are_one_step_of_their_union_and_clipping_bounds_it() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (16,), generator=g)
    cfg = Config()
    cfg.train.log_interval = 100
    whole = one_epoch(cfg, [(images[:8], targets[:8], 0, None), (images[8:], targets[8:], 0, None)])
    cfg.train.grad_accum_steps = 2
    micro = [(images[i:i + 4], targets[i:i + 4], 0, None) for i in range(0, 16, 4)]
    accumulated = one_epoch(cfg, micro)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cfg.train.clip_grad = 1e-3  # a norm far below the gradients': each step moves the weights by about lr x 1e-3
    start = one_epoch(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-12)), micro)
    clipped = one_epoch(cfg, micro)
    moved = torch.cat([(p - q).flatten() for p, q in zip(clipped.parameters(), start.parameters())]).norm()
    m = cfg.optim.momentum  # two Nesterov steps of clipped gradients: (1 + m) g1, then (1 + m) g2 + m^2 g1
    assert 0 < moved <= (2 * (1 + m) + m * m) * cfg.optim.lr * 1e-3 * 1.01


def _accumulating_rank(rank: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = Config()
    cfg.train.grad_accum_steps, cfg.train.log_interval = 2, 100
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    micro = [(torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8, generator=g),
              torch.randint(0, 10, (4,), generator=g), 0, None) for _ in range(4)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    parts = build_parts(cfg, DistInfo(rank, rank, 2, CPU, rank == 0), net, Precision.of("fp32", CPU))
    tracker = Tracker(cfg.wandb, Checkpointer(cfg.checkpoint, is_main=False))
    result = train_one_epoch(parts, Batches(micro), epoch=0, global_step=0, tracker=tracker, checkpointer=None,
                             stop=StopRequest())
    weights = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    torch.save({"step": result.step, "equal": torch.equal(*gathered)}, f"{root}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # 2 gloo processes
def test_accumulation_under_ddp_reduces_on_each_steps_last_micro_batch(tmp_path) -> None:
    """DDP's no_sync on all but a step's last micro-batch: the gradients are still averaged over the ranks
    once per step, so ranks fed different data end with the same weights (2 steps of 2 micro-batches)."""
    import torch.multiprocessing as mp

    mp.spawn(_accumulating_rank, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out == {"step": 2, "equal": True}
