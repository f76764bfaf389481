"""Input pipelines on real tar shards written in tmp_path: determinism, resume, equal batches
per rank, exactly-once evaluation (also under 2 gloo processes), and every kind of bad data.

Most samples are flat-colour PNGs whose colour encodes a sample id, so a batch reveals
which samples it holds whatever the crop (a crop of a flat image is the same flat image).
"""
from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from conftest import (DIGITS, NUM_CLASSES, epoch_batches, id_png, id_shards, ids_of, jpeg, same_batches, sample,
                      write_shards)
from hrnet_cls.data import build_train_loader, build_val_loader, expand_urls, read_info, shard_lengths, sources
from hrnet_cls.data import train_loader
from hrnet_cls.data.transforms import _decode, eval_crop, train_crop
from hrnet_cls.validation.evaluation import accuracy_counts, feed, reduce
from hrnet_cls.precision import Precision

# ---------------------------------------------------------------- shard lists


def test_expand_urls_braces_globs_lists_and_remote(tmp_path: Path) -> None:
    pattern = id_shards(tmp_path, "train", [1, 1, 1])
    names = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_urls(pattern) == names
    assert expand_urls(str(tmp_path / "train-*.tar")) == names
    assert expand_urls([names[2], names[0]]) == [names[2], names[0]]
    assert expand_urls(f"{names[0]}::{names[1]}") == names[:2]
    remote = ["pipe:curl -s http://h/a-{0..1}.tar", "https://h/a-{0..1}.tar"]
    assert expand_urls(remote[0]) == ["pipe:curl -s http://h/a-0.tar", "pipe:curl -s http://h/a-1.tar"]
    assert expand_urls(remote[1]) == ["https://h/a-0.tar", "https://h/a-1.tar"]


def test_a_pattern_matching_nothing_fails_before_training(tmp_path: Path) -> None:
    id_shards(tmp_path, "train", [1])
    for pattern in (str(tmp_path / "tarin-{000000..000003}.tar"), str(tmp_path / "val-*.tar")):
        with pytest.raises(FileNotFoundError, match=re.escape(f"no shard file matches {pattern!r}")):
            build_train_loader(pattern, batch_size=1, img_size=16, seed=0, epoch=0)
    with pytest.raises(FileNotFoundError, match="a directory"):
        build_val_loader(str(tmp_path), batch_size=1, img_size=16, crop_pct=1.0)


def test_read_info_and_lengths_with_and_without_index(tmp_path: Path) -> None:
    pattern = id_shards(tmp_path, "train", [3, 1, 2])
    info = read_info(pattern)
    assert info["splits"]["train"]["shard_lengths"] == [3, 1, 2]
    assert read_info(str(tmp_path)) == info
    urls = expand_urls(pattern)
    (tmp_path / "_info.json").unlink()
    assert read_info(pattern) is None
    assert shard_lengths(urls) == [3, 1, 2]  # counted from the tar headers


# ---------------------------------------------------------------- training


def test_impossible_settings_fail_at_build_time(tmp_path: Path) -> None:
    urls = id_shards(tmp_path, "train", [3, 2])
    with pytest.raises(ValueError, match="5 training samples .* fill no batch of 4 on each of 2"):
        build_train_loader(urls, batch_size=4, img_size=16, seed=0, epoch=0, world_size=2)
    with pytest.raises(ValueError, match="crop_pct"):
        build_val_loader(urls, batch_size=4, img_size=16, crop_pct=1.5)
    with pytest.raises(ValueError, match="rank=2"):
        build_val_loader(urls, batch_size=4, img_size=16, crop_pct=1.0, rank=2, world_size=2)


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 1), (3, 2)])
def test_validation_sees_every_sample_exactly_once(tmp_path: Path, world: int, workers: int) -> None:
    urls = id_shards(tmp_path, "val", [7, 1, 14])  # fewer shards than slots in the last case
    seen = []
    for rank in range(world):
        loader = build_val_loader(urls, batch_size=3, img_size=16, crop_pct=1.0, rank=rank, world_size=world,
                                  workers=workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += [i for images, _, _ in batches for i in ids_of(images)]
    assert sorted(seen) == list(range(22))


def test_eval_crop_matches_torchvision_resize_and_centre_crop() -> None:
    import torchvision.transforms as T

    smooth = np.asarray(Image.open(io.BytesIO(jpeg(3, (40, 30)))).resize((640, 480), Image.Resampling.BICUBIC))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, fmt, quality=95)
        ours = eval_crop(buf.getvalue(), 224, 256).permute(1, 2, 0).numpy()
        reference = T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.open(io.BytesIO(buf.getvalue())))
        assert ours.shape == (224, 224, 3) and np.array_equal(ours, np.asarray(reference))  # exact


def test_jpeg_draft_decode_never_drops_below_the_output_size() -> None:
    data_bytes = jpeg(1, (512, 384))
    full = np.asarray(Image.open(io.BytesIO(data_bytes)).convert("RGB"))
    for keep, factor in ((1.9, 1), (2.0, 2), (3.9, 2), (4.5, 4), (20.0, 8)):
        pixels, got = _decode(Image.open(io.BytesIO(data_bytes)), keep)
        assert got == factor and tuple(pixels.shape) == (-(-384 // factor), -(-512 // factor), 3)
        if factor == 1:
            assert np.array_equal(pixels, full)
    # a 256-px crop of a 512x384 image shrunk to 64 px is decoded at 1/4 scale: 64 px left
    for seed in range(20):
        crop = train_crop(data_bytes, 64, random.Random(seed), scale=(0.3, 1.0))
        assert crop.shape == (3, 64, 64) and crop.dtype == torch.uint8


@pytest.mark.parametrize("keep", [1.0, 4.0], ids=["full-scale", "draft"])
def test_truncated_or_corrupt_jpeg_raises_at_any_decode_scale(keep: float) -> None:
    good = jpeg(2, (256, 192))
    for bad in (good[: len(good) // 2], good[:200] + bytes(len(good) - 200)):
        with pytest.raises(OSError):
            _decode(Image.open(io.BytesIO(bad)), keep)


# ---------------------------------------------------------------- bad data


def broken_dataset(folder: Path) -> tuple[str, set[int], int]:
    """Shards with every kind of bad sample: (pattern, ids of good samples, bad sample count)."""
    truncated_jpeg = jpeg(0)[:300]
    shard0 = [sample(0),
              ("s00001", {"png": b"\x89PNG\r\n\x1a\n garbage", "cls": b"1"}),  # undecodable
              ("s00002", {"jpg": truncated_jpeg, "cls": b"2"}),  # opens, fails at decode
              ("s00003", {"png": id_png(3)}),  # no label
              ("s00004", {"png": id_png(4), "cls": b"four"}),  # non-integer label
              ("s00005", {"txt": b"no image here", "cls": b"5"})]  # no image
    shard1 = [sample(i) for i in range(6, 11)]  # will be cut inside sample 8's image
    shard2 = [sample(i) for i in range(11, 15)]  # will be deleted
    shard3 = [sample(i) for i in range(15, 20)] + [("s00020", {"cls": b"0"})]  # last has no image
    pattern = write_shards(folder, "val", [shard0, shard1, shard2, shard3])
    with tarfile.open(folder / "val-000001.tar") as tar:
        cut = tar.getmember("s00008.png").offset_data + 10
    with open(folder / "val-000001.tar", "r+b") as f:
        f.truncate(cut)
    (folder / "val-000002.tar").unlink()
    return pattern, {0, 6, 7, 15, 16, 17, 18, 19}, 5 + 3 + 4 + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_is_skipped_and_counted_in_validation(tmp_path: Path, workers: int, caplog) -> None:
    pattern, good, bad = broken_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.data"):
        batches = list(build_val_loader(pattern, batch_size=3, img_size=16, crop_pct=1.0, workers=workers))
    assert sorted(i for images, _, _ in batches for i in ids_of(images)) == sorted(good)
    assert sum(skipped for _, _, skipped in batches) == bad
    if workers == 0:  # worker processes log to their own stderr
        assert "truncated" in caplog.text and "does not decode" in caplog.text


def test_a_val_worker_with_only_bad_samples_reports_them_in_an_empty_batch(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "val", [[(f"k{i}", {"png": id_png(i)}) for i in range(3)]])  # no labels
    batches = list(build_val_loader(urls, batch_size=2, img_size=16, crop_pct=1.0, workers=0))
    assert [(images.shape, skipped) for images, _, skipped in batches] == [((0, 3, 16, 16), 3)]


def test_bad_data_never_breaks_training_batches(tmp_path: Path) -> None:
    pattern, good, bad = broken_dataset(tmp_path)
    # 21 listed samples; the cut shard holds 2 of its 5, the deleted one none: the epoch is planned on
    # the 14 there (3 batches of 4, 2 spare). 10 of them pass the label/image checks, so the last 2
    # places are other crops of the reader's own samples, and nothing is read twice
    runs = [epoch_batches(pattern, workers=w, start_batch=s) for w, s in ((0, 0), (0, 0), (0, 2), (2, 0))]
    assert len(runs[0]) == 3 and all(images.shape == (4, 3, 16, 16) for images, *_ in runs[0])
    assert same_batches(runs[0], runs[1]) and same_batches(runs[0][2:], runs[2])
    ids = [i for images, *_ in runs[0] for i in ids_of(images)]
    assert set(ids) <= good  # undecodable images were replaced by decodable ones of their batch
    assert all(int(t) == i % NUM_CLASSES for images, targets, *_ in runs[0]
               for i, t in zip(ids_of(images), targets))
    positions = np.concatenate([p for *_, p in runs[0]])
    assert sorted(positions[positions >= 0]) == sorted(set(positions[positions >= 0])) and sum(positions < 0) == 2
    assert sum(s for _, _, s, _ in runs[0]) == bad == sum(s for _, _, s, _ in runs[3])  # each bad sample once


def test_a_batch_with_no_decodable_image_keeps_its_shape(tmp_path: Path) -> None:
    urls = id_shards(tmp_path, "train", [4])
    plan = build_train_loader(urls, batch_size=2, img_size=16, seed=0, epoch=0, workers=0).plan
    chunk = [("a", b"junk", 1, 0), ("b", b"\xff\xd8 also junk", 2, 1)]
    images, targets, failed, _ = train_loader._decode_train_batch(chunk, plan)
    assert images.shape == (2, 3, 16, 16) and targets.tolist() == [1, 2] and failed == [0, 1]
    assert images.dtype == torch.uint8 and not images.any()  # black, the shape kept


def test_shards_without_any_usable_sample_raise_instead_of_spinning(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, "train", [[(f"k{i}", {"png": id_png(i)}) for i in range(4)]] * 2)
    with pytest.raises(RuntimeError, match=r"no usable sample in the 2 training shard\(s\) read by rank 0, reader 0"):
        epoch_batches(urls, batch_size=2)


def test_warnings_are_rate_limited(caplog) -> None:
    warn = sources._RateLimitedWarning(burst=2, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.data"):
        for n in range(6):
            warn("bad sample %d", n)
    assert [r.getMessage() for r in caplog.records] == ["bad sample 0", "bad sample 1"]
    warn.last -= 3600  # an interval later the next one gets through, saying how many were held
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.data"):
        warn("bad sample %d", 6)
    assert caplog.records[-1].getMessage() == "bad sample 6 (4 similar warnings held back)"


# ---------------------------------------------------------------- bundled data


def test_bundled_digits_shards_feed_both_loaders() -> None:
    folder = DIGITS
    info = read_info(str(folder))
    assert info["class_names"] == [str(d) for d in range(10)] and info["num_classes"] == 10
    assert info["splits"]["train"]["num_samples"] == 1437 and info["splits"]["val"]["num_samples"] == 360
    train = build_train_loader(str(folder / "train-{000000..000007}.tar"), batch_size=64, img_size=32, seed=0,
                               epoch=0, workers=0)
    batches = list(train)
    assert len(batches) == 22 and sum(s for _, _, s, _ in batches) == 0
    assert set(torch.cat([t for _, t, *_ in batches]).tolist()) == set(range(10))
    val = build_val_loader(str(folder / "val-{000000..000001}.tar"), batch_size=256, img_size=32, crop_pct=1.0,
                           workers=0)
    assert sum(t.numel() for _, t, _ in val) == 360


# ---------------------------------------------------------------- two processes


def toy_logits(images: torch.Tensor) -> torch.Tensor:
    """Per-sample logits that depend only on the sample: predicts class (3 * id) % 10."""
    predicted = torch.tensor(ids_of(images)) * 3 % NUM_CLASSES
    return -((torch.arange(NUM_CLASSES).view(1, -1) - predicted.view(-1, 1)) % NUM_CLASSES).float()


class ToyModel(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return toy_logits(images)


def _ddp_job(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    train = build_train_loader(f"{root}/train-*.tar", batch_size=4, img_size=16, seed=7, epoch=1, rank=rank,
                               world_size=world, workers=2)
    steps, train_ids, skipped = 0, [], 0
    for images, _, bad, _ in train:
        dist.all_reduce(torch.ones(1))  # one collective per step as in DDP: unequal counts would hang
        steps, skipped = steps + 1, skipped + bad
        train_ids += ids_of(images)
    val = build_val_loader(f"{root}/val-*.tar", batch_size=5, img_size=16, crop_pct=1.0, rank=rank,
                           world_size=world, workers=2)
    val_ids = []
    batches = [(images, targets, bad) for images, targets, bad in val if not val_ids.extend(ids_of(images))]
    totals = reduce(feed([ToyModel()], batches, normalize=val.normalize, device=torch.device("cpu"),
                         precision=Precision.of("fp32", "cpu")))
    result = {"steps": steps, "train_ids": train_ids, "skipped": skipped, "val_ids": val_ids, "total": totals.counts[0]}
    Path(root, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_train_steps_and_exact_validation(tmp_path: Path) -> None:
    id_shards(tmp_path, "train", [23, 5, 17, 1, 30, 9, 11])  # 96 samples, uneven
    id_shards(tmp_path, "val", [20, 3, 24], first=1000)  # 47 samples, 3 shards for 4 slots
    mp.spawn(_ddp_job, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 96 // (4 * 2)
    train_ids = ranks[0]["train_ids"] + ranks[1]["train_ids"]
    assert len(train_ids) == len(set(train_ids)) == 96
    assert sorted(ranks[0]["val_ids"] + ranks[1]["val_ids"]) == list(range(1000, 1047))
    hits, samples = torch.zeros(2, dtype=torch.int64), 0
    for images, targets, _ in build_val_loader(f"{tmp_path}/val-*.tar", batch_size=7, img_size=16, crop_pct=1.0,
                                               workers=0):
        hits, samples = hits + accuracy_counts(toy_logits(images), targets), samples + len(targets)
    assert ranks[0]["total"] == ranks[1]["total"] == [*hits.tolist(), samples]
    assert 0 < hits[0] < hits[1] < samples == 47


@pytest.mark.slow
def test_two_processes_train_each_sample_of_a_cut_shard_at_most_once_and_count_the_loss_once(tmp_path: Path,
                                                                                            caplog) -> None:
    id_shards(tmp_path, "train", [23, 5, 17, 1, 30, 9, 11])  # 96 samples listed in _info.json
    id_shards(tmp_path, "val", [20, 3, 24], first=1000)
    cut = tmp_path / "train-000004.tar"  # ids 46..75: cut inside sample 12's image, 18 samples lost
    with tarfile.open(cut) as tar:
        offset = tar.getmember(f"s{46 + 12:05d}.png").offset_data + 10
    with open(cut, "r+b") as f:
        f.truncate(offset)
    with caplog.at_level(logging.WARNING, logger="hrnet_cls.data"):
        assert len(build_train_loader(f"{tmp_path}/train-*.tar", batch_size=4, img_size=16, seed=7, epoch=1,
                                      rank=0, world_size=2, workers=2)) == 78 // 8
    assert f"{cut}: holds 12 samples, 18 fewer than the _info.json lists" in caplog.text
    mp.spawn(_ddp_job, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 78 // 8
    trained = ranks[0]["train_ids"] + ranks[1]["train_ids"]
    assert len(trained) == len(set(trained)) == 72  # nothing twice (the listed count would need 96)
    assert set(trained) <= set(range(58)) | set(range(76, 96))
    assert (ranks[0]["skipped"], ranks[1]["skipped"]) == (18, 0)  # counted once, on rank 0
