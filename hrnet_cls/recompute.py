"""Exact activation checkpointing for networks with BatchNorm.

``torch.utils.checkpoint`` runs a segment's forward twice; in training mode every BatchNorm
inside would then fold its batch statistics into the running statistics twice. During the
recomputation we set each BN's momentum to 0 (running stats unchanged: 1 * old + 0 * batch)
and restore ``num_batches_tracked`` afterwards, so a checkpointed model ends a step with
gradients *and* buffers identical to the unchecked one.
"""
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ['checkpoint_module']


@contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpoint_module(module: nn.Module, *args: Any) -> Any:
    """module(*args), keeping only the inputs; the forward is recomputed in backward."""
    return checkpoint(
        module, *args, use_reentrant=False,
        context_fn=lambda: (nullcontext(), _frozen_running_stats(module)))
