"""Multiply-accumulate counts of conv and linear layers, the way the HRNet paper reports GFLOPs."""
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ['count_macs']


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-adds of every Conv2d and Linear for one image (the paper's "GFLOPs" = this / 2^30).

    Counted from the output shapes seen in a real forward pass, so strides, padding and the
    input resolution are taken into account; BN, ReLU, pooling and additions are not counted.
    """
    total: List[int] = [0]

    def conv_hook(m: nn.Conv2d, inp: Tuple[torch.Tensor], out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp: Tuple[torch.Tensor], out: torch.Tensor) -> None:
        total[0] += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]
