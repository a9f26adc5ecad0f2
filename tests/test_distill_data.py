"""Data: the three formats, SDXL micro-conditioning, corrupt images skipped and counted, resumable order."""

import pytest
import torch
from PIL import Image

from sdxl_fast.distill import data
from sdxl_fast.testing.tiny_data import make_dataset


@pytest.mark.parametrize("fmt", ["folder", "jsonl", "webdataset"])
def test_formats_index_and_load_with_captions(tmp_path, fmt):
    source = make_dataset(tmp_path / fmt, fmt, n=4)
    assert data.detect_format(source) == fmt
    records = data.index_records(source)
    assert [r.caption for r in records] == [f"a test image number {i}" for i in range(4)]
    ds = data.ImageCaptionDataset(records, resolution=32, random_crop=False)
    item = ds[(0, 1)]
    assert item["pixels"].shape == (3, 32, 32)
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    # 80x64 image, short side 64 -> 32: resized 40x32, centre crop left = 4
    assert item["time_ids"].tolist() == [64, 80, 0, 4, 32, 32]


def test_preprocess_records_real_crop_coordinates():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    g = torch.Generator().manual_seed(0)
    pixels, ids = data.preprocess(image, 50, random_crop=True, random_flip=False, generator=g)
    assert pixels.shape == (3, 50, 50) and torch.allclose(pixels[0], torch.ones(50, 50))
    orig_h, orig_w, top, left, th, tw = ids
    assert (orig_h, orig_w, top, th, tw) == (100, 300, 0, 50, 50) and 0 <= left <= 100


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_corrupt_image_is_skipped_and_counted(tmp_path, fmt, caplog):
    source = make_dataset(tmp_path / fmt, fmt, n=4, corrupt=(2,))
    ds = data.ImageCaptionDataset(data.index_records(source), resolution=16)
    with caplog.at_level("WARNING"):
        batch = data.collate([ds[(0, i)] for i in range(4)])
    assert batch["skipped"] == 1 and batch["indices"] == [0, 1, 3] and batch["pixels"].shape[0] == 3
    assert "Skipping unreadable image" in caplog.text


def test_batch_sampler_is_a_function_of_position():
    full = iter(data.ResumableBatchSampler(10, 3, seed=1))
    straight = [next(full) for _ in range(7)]  # 3 batches per epoch -> crosses two epoch boundaries
    resumed = iter(data.ResumableBatchSampler(10, 3, seed=1, start=4))
    assert [next(resumed) for _ in range(3)] == straight[4:]
    epoch0 = sorted(j for batch in straight[:3] for _, j in batch)
    assert len(set(epoch0)) == 9  # no repeats inside an epoch
    r0 = next(iter(data.ResumableBatchSampler(10, 2, seed=1, rank=0, world=2)))
    r1 = next(iter(data.ResumableBatchSampler(10, 2, seed=1, rank=1, world=2)))
    assert not set(r0) & set(r1)  # processes see disjoint samples


def test_random_crop_is_reproducible_per_epoch_and_index(tmp_path):
    ds = data.ImageCaptionDataset(data.index_records(make_dataset(tmp_path, "folder", n=2)), 32, random_crop=True)
    assert torch.equal(ds[(3, 1)]["pixels"], ds[(3, 1)]["pixels"])


def test_aspect_ratio_buckets(tmp_path):
    from sdxl_fast.distill.config import TrainConfig

    root = tmp_path / "mixed"
    root.mkdir()
    shapes = [(200, 100)] * 4 + [(100, 200)] * 4 + [(120, 120)] * 2  # wide, tall, square
    for i, (w, h) in enumerate(shapes):
        Image.new("RGB", (w, h), (i * 20, 0, 0)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"image {i}")
    assert data.buckets_for(128) == [(64, 192), (64, 256), (128, 128), (128, 192), (192, 64), (192, 128), (256, 64)]
    cfg = TrainConfig(data=str(root), resolution=128, batch_size=2, num_workers=0, bucketing=True)
    loader = iter(data.make_loader(cfg))
    seen = set()
    for _ in range(8):  # two epochs of 4 batches (the two squares form one batch)
        batch = next(loader)
        _, _, h, w = batch["pixels"].shape
        seen.add((w, h))
        assert all(ids[4:].tolist() == [h, w] for ids in batch["time_ids"])  # target size = the bucket
    assert seen == {(192, 128), (128, 192), (128, 128)}
    # Per process: same number of same-bucket batches, disjoint, and resumable by position.
    groups = [0] * 4 + [1] * 4 + [2] * 2
    r0 = data.ResumableBatchSampler(10, 2, seed=3, rank=0, world=2, groups=groups)
    r1 = data.ResumableBatchSampler(10, 2, seed=3, rank=1, world=2, groups=groups)
    assert r0.per_epoch == r1.per_epoch == 2
    it0, it1 = iter(r0), iter(r1)
    b0, b1 = [next(it0) for _ in range(4)], [next(it1) for _ in range(4)]
    for batch in b0 + b1:
        assert len({groups[j] for _, j in batch}) == 1
    assert not {j for _, j in b0[0] + b0[1]} & {j for _, j in b1[0] + b1[1]}
    resumed = iter(data.ResumableBatchSampler(10, 2, seed=3, rank=0, world=2, start=3, groups=groups))
    assert next(resumed) == b0[3]


def test_uneven_split_gives_every_process_the_same_number_of_batches():
    counts = [data.ResumableBatchSampler(5, 1, seed=0, rank=r, world=2).per_epoch for r in range(2)]
    assert counts == [2, 2]
