"""Multiply-accumulate counts the way the HRNet paper reports "GFLOPs" (MACs / 2^30).

torch's FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix
products (a Linear's bias add is not counted), from the shapes of a real forward pass:
half of its total is exactly the paper's conv + linear multiply-adds for these networks.
"""
import copy
from typing import Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_macs']


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-adds of one image's forward pass (eval mode, no gradients).

    Counted on a meta-device copy of the model: shapes only, no arithmetic, so a large model
    at a large size costs milliseconds, and an input size the model cannot take still raises.
    """
    # the copy shares nothing with the model and copies no weight: each tensor maps to a meta twin
    memo = {id(p): nn.Parameter(torch.empty_like(p, device='meta'), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device='meta') for b in model.buffers()})
    meta = copy.deepcopy(model, memo).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.zeros(1, *input_size, device='meta'))
    return counter.get_total_flops() // 2
