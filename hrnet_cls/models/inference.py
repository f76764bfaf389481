"""For validation: BatchNorm folded into the convolution before it, on a copy, and MAC counts (docs/design.md §7.1).

Pairs are found by structure, not tracing: a BatchNorm2d right after a Conv2d in an ``nn.Sequential``, and the
children ``convK`` / ``bnK`` of any module (HRNet and ResNet-style units apply ``bnK(convK(x))``); others stay."""
from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "fold_batchnorm"]

_PAIR = re.compile(r"^conv(\d*)$")


def _fused(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    layout = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
        not conv.weight.is_contiguous() else torch.contiguous_format
    fused = fuse_conv_bn_eval(conv, bn)
    fused.weight.data = fused.weight.data.contiguous(memory_format=layout)
    return fused


def _fold_children(module: nn.Module) -> int:
    """Fold the pairs among module's direct children; returns how many."""
    folded = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                module._modules[a], module._modules[b] = _fused(conv, bn), nn.Identity()
                folded += 1
        return folded
    for name, conv in list(module.named_children()):
        match = _PAIR.match(name)
        bn = getattr(module, f"bn{match.group(1)}", None) if match else None
        if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
            setattr(module, name, _fused(conv, bn))
            setattr(module, f"bn{match.group(1)}", nn.Identity())
            folded += 1
    return folded


@torch.no_grad()
def fold_batchnorm(model: nn.Module, check: torch.Tensor | None = None, tolerance: float = 1e-5) -> nn.Module:
    """An eval-mode copy of ``model`` with its conv + BatchNorm pairs folded.

    check: a batch to run both on; a difference above ``tolerance`` times the output scale raises ValueError
    (e.g. a convK / bnK pair that the forward does not chain directly)."""
    folded = copy.deepcopy(model).eval()
    count = sum(_fold_children(m) for m in list(folded.modules()))
    folded.folded_batchnorms = count
    if check is not None:
        was_training = model.training
        expected, got = model.eval()(check), folded(check)
        model.train(was_training)
        error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
        if error > tolerance:
            raise ValueError(f"folding BatchNorm changed the outputs by {error:.2e} of their scale")
    return folded


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-adds of one image's eval forward, counted on a meta-device copy that copies no weight
    (milliseconds for any model and size); an input size the model cannot take still raises."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device='meta'), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device='meta') for b in model.buffers()})
    meta = copy.deepcopy(model, memo).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.zeros(1, *input_size, device='meta'))
    return counter.get_total_flops() // 2
