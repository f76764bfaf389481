"""Exact accuracy over batches and processes: integer counts, summed, never averaged."""
from __future__ import annotations

from typing import Sequence

import torch

from hrnet_cls.distributed import all_reduce_sum


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """int64 [correct in top-k for each k, number of samples], on the logits' device.

    logits: (N, C); targets: (N,). k above C counts as C (every sample is then correct).
    Counts, unlike averages, add up exactly over batches and processes.
    """
    maxk = min(max(topk), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(targets.view(-1, 1))  # (N, maxk)
    counts = [hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk]
    counts.append(torch.tensor(targets.shape[0], device=logits.device))
    return torch.stack(counts).to(torch.int64)


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum of ``counts`` over all processes when torch.distributed is initialised (a copy)."""
    return all_reduce_sum(counts.clone())
