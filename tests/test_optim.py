"""Optimizer parameter groups and the exact step-schedule boundaries."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import hrnet_cls
from conftest import tiny_model
from hrnet_cls.config import OptimConfig, ScheduleConfig
from hrnet_cls.train.optim import build_optimizer, build_scheduler


class HRNetNamed(nn.Module):
    """Parameters named the way HRNet names them: the BN weight is 'transition1.0.1.weight'."""

    def __init__(self) -> None:
        super().__init__()
        self.transition1 = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))])
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.downsamp = nn.Conv2d(4, 4, 3)  # conv with bias, as in the C head
        self.classifier = nn.Linear(4, 3)


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


SGD = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, wd_on_norm_and_bias=True)


def test_paper_default_decays_every_parameter() -> None:
    model = HRNetNamed()
    opt = build_optimizer(model, SGD)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4 and group["nesterov"] and group["momentum"] == 0.9
    assert len(group["params"]) == len(list(model.parameters()))


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, exempt) parameters of the optimizer built with the norm/bias exemption."""
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, wd_on_norm_and_bias=False)
    groups = build_optimizer(model, cfg).param_groups
    return ([p for g in groups if g["weight_decay"] > 0 for p in g["params"]],
            [p for g in groups if g["weight_decay"] == 0 for p in g["params"]])


def by_module_type(model: nn.Module) -> set[int]:
    """The paper-faithful exemption rule: parameters of normalisation layers, and biases,
    chosen by the owning module's type and attribute (never by dotted names)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() for attr, p in m.named_parameters(recurse=False)
            if isinstance(m, norms) or attr == "bias"}


def test_exempt_groups_are_chosen_by_module_type() -> None:
    model = HRNetNamed()
    decay, no_decay = decay_groups(model)
    assert names(model, no_decay) == {
        "transition1.0.1.weight", "transition1.0.1.bias", "gn.weight", "gn.bias",
        "ln.weight", "ln.bias", "downsamp.bias", "classifier.bias",
    }
    assert names(model, decay) == {"transition1.0.0.weight", "downsamp.weight", "classifier.weight"}


def test_exempt_parameters_really_get_no_decay() -> None:
    model = HRNetNamed()
    cfg = OptimConfig(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.5, wd_on_norm_and_bias=False)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves parameters
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"transition1.0.0.weight", "downsamp.weight", "classifier.weight"}


def test_real_model_exempts_all_norm_and_bias_tensors() -> None:
    model = tiny_model()
    decay, no_decay = decay_groups(model)
    assert {id(p) for p in no_decay} == by_module_type(model)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert all(p.dim() > 1 for p in decay)  # conv and linear weights only


@pytest.mark.slow  # builds all 12 full-size variants
@pytest.mark.parametrize("name", sorted(hrnet_cls.VARIANTS))
def test_timm_grouping_equals_the_module_type_rule_on_every_variant(name: str) -> None:
    model = timm.create_model(name)
    _, no_decay = decay_groups(model)
    assert {id(p) for p in no_decay} == by_module_type(model)


def schedule(decay=(30, 60, 90), warmup=0, epochs=100) -> ScheduleConfig:
    return ScheduleConfig(epochs=epochs, decay_epochs=list(decay), decay_rate=0.1, warmup_epochs=warmup)


def at(step: int, steps_per_epoch: int) -> tuple[float, float]:
    """The epoch progress a step covers when every step trains steps_per_epoch-th of an epoch."""
    return step / steps_per_epoch, (step + 1) / steps_per_epoch


def test_step_boundaries_are_at_the_milestone_not_before() -> None:
    opt = build_optimizer(nn.Linear(2, 2), SGD)
    sched = build_scheduler(opt, schedule(), SGD.lr)
    assert sched.factor_at(0.0) == 1.0
    assert sched.factor_at(29.0) == 1.0 and sched.factor_at(29.999) == 1.0
    assert sched.factor_at(30.0) == pytest.approx(0.1, rel=1e-12)
    assert sched.factor_at(59.99) == pytest.approx(0.1, rel=1e-12)
    assert sched.factor_at(60.0) == pytest.approx(0.01, rel=1e-12)
    assert sched.factor_at(90.0) == pytest.approx(1e-3, rel=1e-12)
    # per step: the last step of epoch 29 and the first of epoch 30
    assert sched.step(*at(30 * 100 - 1, 100)) == 0.1
    assert sched.step(*at(30 * 100, 100)) == pytest.approx(0.01, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-12)


def test_linear_warmup_is_per_step() -> None:
    opt = build_optimizer(nn.Linear(2, 2), SGD)
    sched = build_scheduler(opt, schedule(decay=[5], warmup=2, epochs=10), SGD.lr)
    lrs = [sched.step(*at(s, 10)) for s in range(60)]
    assert lrs[0] == pytest.approx(0.1 / 20)  # first step is not wasted at lr 0
    assert lrs[9] == pytest.approx(0.1 * 10 / 20)
    assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:20]))  # strictly rising during warm-up
    assert lrs[49] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.01)


def test_every_group_follows_the_schedule() -> None:
    cfg = OptimConfig(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4, wd_on_norm_and_bias=False)
    opt = build_optimizer(HRNetNamed(), cfg)
    sched = build_scheduler(opt, schedule(decay=[1]), cfg.lr)
    sched.step(*at(4, 4))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.02)] * 2


def test_resume_needs_only_the_epoch_progress() -> None:
    """A rebuilt scheduler at step k gives what an uninterrupted one gives, whatever the
    loaded optimizer state says about lr, and whether it is built before or after the load."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, SGD)
    sched = build_scheduler(opt, schedule(decay=[2, 3], epochs=4), SGD.lr)
    uninterrupted = [sched.step(*at(s, 7)) for s in range(28)]
    state = opt.state_dict()  # saved with the lr of step 27
    opt2 = build_optimizer(model, SGD)
    sched2 = build_scheduler(opt2, schedule(decay=[2, 3], epochs=4), SGD.lr)
    opt2.load_state_dict(state)
    assert [sched2.step(*at(s, 7)) for s in range(15, 28)] == uninterrupted[15:]
    # built after the restore, from an optimizer whose groups hold the decayed lr of step 27
    opt3 = build_optimizer(model, SGD)
    opt3.load_state_dict(state)
    assert opt3.param_groups[0]["lr"] != SGD.lr
    sched3 = build_scheduler(opt3, schedule(decay=[2, 3], epochs=4), SGD.lr)
    assert [sched3.step(*at(s, 7)) for s in range(15, 28)] == uninterrupted[15:]


def test_the_lr_of_a_sample_does_not_depend_on_the_global_batch() -> None:
    """Warm-up over 1 epoch then /10 at 1: 8 steps of 32 samples or 2 steps of 128 give the
    lr each sample is trained at, up to the step it falls in (the warm-up rises per step)."""
    opt = build_optimizer(nn.Linear(2, 2), SGD)
    sched = build_scheduler(opt, schedule(decay=[1], warmup=1, epochs=3), SGD.lr)
    small = [sched.step(*at(s, 8)) for s in range(16)]
    large = [sched.step(*at(s, 2)) for s in range(4)]
    assert small[7] == large[1] == pytest.approx(0.1)  # the step ending epoch 0
    assert small[3] == large[0] == pytest.approx(0.05)  # both end at half an epoch
    assert small[8:] == [pytest.approx(0.01)] * 8 and large[2:] == [pytest.approx(0.01)] * 2


def test_the_ema_over_prebuilt_lists_equals_timms_model_ema_v3() -> None:
    """ListEma keeps ModelEmaV3's update (foreach lerp of float tensors, copies of the rest) but builds
    its tensor lists once; after steps that change weights and BN buffers the two are bit-identical,
    and a state loaded into the EMA in place (a resume) is followed, not a stale copy."""
    from timm.utils import ModelEmaV3

    from hrnet_cls.train.optim import ListEma

    torch.manual_seed(0)
    model = tiny_model()
    ours, timms = ListEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        timms.update(model)
        if step == 0:  # a resume loads the EMA weights in place
            ours.module.load_state_dict(model.state_dict())
            timms.module.load_state_dict(model.state_dict())
    a, b = ours.module.state_dict(), timms.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["bn1.num_batches_tracked"]) == 3 and not torch.equal(a["conv1.weight"], model.state_dict()["conv1.weight"])
