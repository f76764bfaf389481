"""The training loader: deterministic plans, equal batches per rank, resume on the same layout
(bit-identical) and on another one (nothing replayed or skipped), labels that do not fit."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, NUM_CLASSES, epoch_batches, id_png, id_shards,
                      ids_of, jpeg, same_batches, sample, write_shards)
from hrnet_cls.data import LabelError, build_train_loader, build_val_loader


def test_batches_are_uint8_normalised_on_the_device_with_int64_targets(tmp_path: Path) -> None:
    grey = io.BytesIO()
    Image.new("RGB", (20, 20), (128, 128, 128)).save(grey, "PNG")
    urls = write_shards(tmp_path, "train", [[(f"g{i}", {"png": grey.getvalue(), "cls": b"3"}) for i in range(4)]])
    images, targets, skipped, positions = epoch_batches(urls, batch_size=4, img_size=8)[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8) and (images == 128).all()
    assert targets.dtype == torch.int64 and targets.tolist() == [3] * 4 and skipped == 0
    assert sorted(positions.tolist()) == [0, 1, 2, 3]  # one shard: positions are its sample indices
    expected = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    loader = build_train_loader(urls, batch_size=4, img_size=8, seed=0, epoch=0, workers=0)
    normalised = loader.normalize(images, torch.channels_last)  # as the train step does after the copy
    assert normalised.dtype == torch.float32 and normalised.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(normalised, expected.view(1, 3, 1, 1).expand_as(normalised), atol=1e-5)


def test_epoch_order_is_deterministic_differs_across_epochs_and_repeats_nothing(tmp_path: Path) -> None:
    urls = id_shards(tmp_path, "train", [9, 4, 7, 12])  # 32 samples
    first, again, second = (epoch_batches(urls, epoch=e) for e in (0, 0, 1))
    assert same_batches(first, again)
    order = [ids_of(b[0]) for b in first]
    assert order != [ids_of(b[0]) for b in second]
    flat = [i for batch in order for i in batch]
    assert len(flat) == 32 and sorted(flat) == list(range(32))  # one whole pass, no repeats
    assert all(int(t) == i % NUM_CLASSES for b in first for i, t in zip(ids_of(b[0]), b[1]))


def test_crops_depend_on_the_sample_not_on_worker_count(tmp_path: Path) -> None:
    photos = [[(f"p{i:03d}", {"jpg": jpeg(i), "cls": b"1"}) for i in range(j, j + 6)] for j in (0, 6, 12)]
    urls = write_shards(tmp_path, "train", photos)
    crops = {}
    for workers in (0, 2):  # 1 vs 2 slots: different batches, the same 18 samples
        batches = epoch_batches(urls, batch_size=3, img_size=24, workers=workers)
        crops[workers] = {image.numpy().tobytes() for images, *_ in batches for image in images}
    # each sample gets the same crop and flip in both runs (a crop identifies its sample)
    assert crops[0] == crops[2] and len(crops[0]) == 18


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_resumes_the_epoch_bit_identically(tmp_path: Path, workers: int) -> None:
    urls = id_shards(tmp_path, "train", [11, 3, 8, 6, 4])  # 32 samples: 8 batches of 4
    full = epoch_batches(urls, workers=workers, epoch=2)
    assert len(full) == 8
    for start in (1, 3, 7, 8):
        loader = build_train_loader(urls, batch_size=4, img_size=16, seed=5, epoch=2, workers=workers,
                                    start_batch=start)
        assert len(loader) == 8 - start
        assert same_batches(list(loader), full[start:])


@pytest.mark.parametrize("sizes, workers", [([23, 5, 17, 1, 30, 9, 11], 0), ([23, 5, 17, 1, 30, 9, 11], 2),
                                            ([19, 6], 2)], ids=["uneven", "uneven-workers", "fewer-shards"])
def test_every_rank_gets_the_same_batches_and_no_sample_twice(tmp_path: Path, sizes: list[int],
                                                               workers: int) -> None:
    urls = id_shards(tmp_path, "train", sizes)
    total, world, batch = sum(sizes), 2, 4
    seen: list[int] = []
    for rank in range(world):
        loader = build_train_loader(urls, batch_size=batch, img_size=16, seed=1, epoch=3, rank=rank,
                                    world_size=world, workers=workers)
        batches = list(loader)
        assert len(batches) == len(loader) == total // (batch * world)
        assert all(images.shape[0] == batch for images, *_ in batches)
        seen += [i for images, *_ in batches for i in ids_of(images)]
    assert len(seen) == len(set(seen)) == (total // (batch * world)) * batch * world


def take(loader, n: int) -> list[int]:
    """Sample ids of the first n batches, asking for no more (the loader marks a batch consumed
    when it hands it out, as the training loop trains on every batch it asks for)."""
    ids, batches = [], iter(loader)
    for _ in range(n):
        images, *_ = next(batches, (None,))
        if images is None:
            break
        ids += ids_of(images)
    return ids


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_under_another_layout_continues_without_replay_or_skip(tmp_path: Path, workers: int) -> None:
    urls = id_shards(tmp_path, "train", [23, 5, 17, 1, 30, 9, 11])  # 96 samples
    kw = dict(img_size=16, seed=1, epoch=3)
    # 2 processes x 4 images, stopped after 5 of their 12 steps: 40 samples trained on
    before = [build_train_loader(urls, batch_size=4, rank=r, world_size=2, workers=1, **kw) for r in (0, 1)]
    seen = [i for loader in before for i in take(loader, 5)]
    consumed = before[0].consumed | before[1].consumed
    state = before[0].state([loader.packed_consumed() for loader in before])  # what a save gathers
    assert len(seen) == len(set(seen)) == 40 == consumed.sum()
    # continued on 3 processes x 5 images: 56 left, 3 steps of 15; the last partial global batch is dropped
    after = [build_train_loader(urls, batch_size=5, rank=r, world_size=3, workers=workers, **kw) for r in range(3)]
    for loader in after:
        assert "another layout" in loader.resume(3, 5, state)
        assert loader.batches_per_epoch == 56 // 15 and loader.progress(0)[0] == pytest.approx(3 + 40 / 85)
        assert loader.progress(loader.batches_per_epoch - 1)[1] == 4.0  # the epoch ends on its last step
    rest = [i for loader in after for i in take(loader, 99)]
    assert len(rest) == 45 and not set(rest) & set(seen)  # nothing replayed
    assert 96 - len(set(seen) | set(rest)) < 15  # nothing skipped beyond the last partial global batch


def test_resuming_under_the_same_layout_is_bit_identical(tmp_path: Path) -> None:
    urls = id_shards(tmp_path, "train", [11, 3, 8, 6, 4])  # 32 samples: 8 batches of 4
    full = epoch_batches(urls, workers=2, epoch=2)
    loader = build_train_loader(urls, batch_size=4, img_size=16, seed=5, epoch=2, workers=2)
    take(loader, 3)
    state = loader.state([loader.packed_consumed()])
    resumed = build_train_loader(urls, batch_size=4, img_size=16, seed=5, epoch=0, workers=2)
    assert resumed.resume(2, 3, state) == "epoch 2, batch 3"
    assert same_batches(list(resumed), full[3:])
    assert resumed.consumed.all()  # the restored positions plus the rest of the epoch


def test_resume_refuses_other_shards_mid_epoch(tmp_path: Path) -> None:
    loader = build_train_loader(id_shards(tmp_path / "a", "train", [8, 8]), batch_size=4, img_size=16, seed=0,
                                epoch=0, workers=0)
    take(loader, 1)
    other = build_train_loader(id_shards(tmp_path / "b", "train", [8, 9]), batch_size=4, img_size=16, seed=0,
                               epoch=0, workers=0)
    with pytest.raises(ValueError, match="data.train_shards: the checkpoint stopped inside epoch 0 of other shards"):
        other.resume(0, 1, loader.state([loader.packed_consumed()]))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_out_of_range_label_is_an_error_naming_shard_and_key(tmp_path: Path, workers: int) -> None:
    shard = [sample(i) for i in range(6)] + [("s00099", {"png": id_png(99), "cls": b"12"})]
    urls = write_shards(tmp_path, "train", [shard])
    pattern = r"train-000000.tar: sample s00099: label 12 outside 0..9 \(num_classes=10\)"
    with pytest.raises(LabelError, match=pattern):
        list(build_train_loader(urls, batch_size=7, img_size=16, seed=0, epoch=0, workers=workers))
    with pytest.raises(LabelError, match=pattern):
        list(build_val_loader(urls, batch_size=7, img_size=16, crop_pct=1.0, workers=workers))


def test_set_epoch_retargets_the_loader(tmp_path: Path) -> None:
    urls = id_shards(tmp_path, "train", [8, 8])
    loader = build_train_loader(urls, batch_size=4, img_size=16, seed=5, epoch=0, workers=0)
    loader.set_epoch(1, start_batch=2)
    assert same_batches(list(loader), epoch_batches(urls, epoch=1)[2:])
    with pytest.raises(ValueError, match="start_batch=5 outside 0..4"):
        loader.set_epoch(1, start_batch=5)


# A loader left unfinished at exit (its workers ignore SIGTERM) next to another library's
# daemonic child that cleans up on SIGTERM: the exit must not hang, and only our workers
# may be killed outright.
EXIT_CHILD = """
import multiprocessing, pathlib, signal, sys, time
from hrnet_cls.data import build_train_loader

def foreign(marker):
    def on_term(*_):
        pathlib.Path(marker).write_text("terminated")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    time.sleep(60)

if __name__ == "__main__":
    other = multiprocessing.get_context("fork").Process(target=foreign, args=(sys.argv[2],), daemon=True)
    other.start()
    batches = iter(build_train_loader(sys.argv[1], batch_size=8, img_size=16, seed=0, epoch=0, workers=2))
    next(batches)
    print("left unfinished", flush=True)
"""


@pytest.mark.slow  # a child interpreter importing torch: ~5 s
def test_exit_kills_only_our_unfinished_workers(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import DIGITS, REPO
    marker = tmp_path / "foreign"
    child = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(DIGITS / "train-000000.tar"), str(marker)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and "left unfinished" in child.stdout, child.stderr[-2000:]
    assert marker.read_text() == "terminated"  # multiprocessing's own SIGTERM, not our SIGKILL
