"""Input pipelines over webdataset shards (docs/design.md sections 4 and 5).

Training (``build_train_loader``) is a pure function of (shards, seed, epoch, rank, world
size, workers): every rank yields the same number of batches, batch ``k`` is the same
tensors whether the epoch ran through or was resumed with ``start_batch=k``.

- The shards, in an order permuted per (seed, epoch), are laid end to end as one sequence
  of samples. Each (rank, worker) *slot* reads its own contiguous stretch of that sequence,
  sized to its exact quota of batches, so slots never overlap and a shard may be shared
  by slots (fewer shards than slots is fine). Quota per rank = total // (batch x world).
- A slot shuffles its samples through a buffer seeded by (seed, epoch, rank, slot), cuts
  batches, and decodes them with per-sample randomness seeded by (seed, epoch, key).
- Rank batch ``b`` comes from slot ``b % workers``; DataLoader worker ``w`` plays slot
  ``(w + start_batch) % workers`` so its round robin starts at batch ``start_batch``, and
  skipped batches are cut from raw bytes without decoding.
- Resuming under another layout (world size, workers, batch size): the loader is given the
  positions the epoch already trained on and plans the rest of the epoch over the others
  (a *remainder plan*): nothing is replayed or skipped, beyond the last partial global batch.
- Bad data: a sample with no image, a missing or unreadable label, a truncated tar or a
  missing shard is skipped before the shuffle (the slot reads on into the next stretch to
  fill its quota); an image that fails to decode is replaced by another sample of its batch
  with a fresh crop, so batches always hold ``batch_size`` images. Both are counted. A label
  outside 0..num_classes-1 is not bad data but a mismatch: LabelError, naming shard and key.

Evaluation (``build_val_loader``) splits the sequence of samples, in the given shard
order, into contiguous stretches across all (rank, worker) slots: every readable sample is
seen exactly once; ranks may yield different numbers of batches.

Evaluation batches are ``(images, targets, skipped)``: float32 (B, 3, S, S) normalised, int64
(B,), and the number of bad samples this worker skipped since its previous batch;
hrnet_cls.validation.evaluation turns them into exact counts. Training batches add the samples'
positions in the epoch, int64 (B,).

Modules: ``sources`` (shard lists, _info.json, reading and checking samples), ``transforms``
(decode + crop + normalise one image), ``train_loader`` and ``val_loader`` (the plans above),
``workers`` (their DataLoader).
"""
from __future__ import annotations

from hrnet_cls.data.sources import LabelError, expand_urls, read_info, shard_lengths
from hrnet_cls.data.train_loader import TrainLoader, build_train_loader
from hrnet_cls.data.val_loader import ValLoader, build_val_loader
from hrnet_cls.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "LabelError", "TrainLoader", "ValLoader", "build_train_loader",
    "build_val_loader", "expand_urls", "read_info", "shard_lengths",
]
