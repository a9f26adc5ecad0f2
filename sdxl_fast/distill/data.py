"""Training data: image + caption records from a folder, a JSONL manifest or webdataset tar shards, turned into
SDXL training samples with the real micro-conditioning (original size, crop coordinates, target size).

Every format is indexed up front into a list of records, so the data set is map-style: shuffling is a seeded
permutation per epoch and the "data position" of a run is just the number of batches drawn, which makes
resuming exact. Unreadable images are skipped (logged, counted in the batch's "skipped"), never fatal.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdxl_fast.params import SDXL_BUCKETS, nearest_bucket
from sdxl_fast.pipeline.conditioning import base_time_ids

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Record:
    """Where one image lives. For tar shards, `offset`/`size` locate the member's bytes inside `path`."""

    path: str
    caption: str
    offset: int = -1
    size: int = -1

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


# ---------------------------------------------------------------------------------------------------------
# Indexing the three formats.

def detect_format(source: str) -> str:
    path = Path(source)
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".tar" or any(ch in source for ch in "*?[") or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    if path.is_dir():
        return "folder"
    raise ValueError(f"Cannot tell the data format of {source!r}: expected a folder, a .jsonl or .tar shards")


def index_folder(folder: str) -> list[Record]:
    """Every image under `folder` (recursively, sorted); the caption is the same-name .txt ("" if none)."""
    root = Path(folder)
    records = []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        txt = image.with_suffix(".txt")
        records.append(Record(str(image), txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""))
    return records


def index_jsonl(manifest: str) -> list[Record]:
    """One JSON object per line with the image path ("image", "file_name" or "path"; relative to the manifest's
    folder) and the caption ("text" or "caption")."""
    base = Path(manifest).parent
    records = []
    for n, line in enumerate(Path(manifest).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        image = next((row[k] for k in ("image", "file_name", "path") if k in row), None)
        if image is None:
            raise ValueError(f"{manifest}:{n}: no image path (keys image, file_name or path)")
        caption = next((row[k] for k in ("text", "caption") if k in row), "")
        records.append(Record(str(base / image), str(caption)))
    return records


def _shards(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    return sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]


def index_webdataset(source: str) -> list[Record]:
    """webdataset shards: samples are members sharing a key (path up to the first dot of the file name); the
    image is the key's image member, the caption its .txt (or .json "caption"/"text"). Read by byte offset."""
    records = []
    for shard in _shards(source):
        samples: dict[str, dict] = {}
        with tarfile.open(shard, "r:") as tar:  # uncompressed shards only: byte offsets must be seekable
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                sample = samples.setdefault(key, {})
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    sample["image"] = (member.offset_data, member.size)
                elif ext == ".txt":
                    sample["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                elif ext == ".json" and "caption" not in sample:
                    meta = json.loads(tar.extractfile(member).read())
                    sample["caption"] = str(meta.get("caption", meta.get("text", "")))
        for key in sorted(samples):
            if "image" in samples[key]:
                offset, size = samples[key]["image"]
                records.append(Record(shard, samples[key].get("caption", ""), offset, size))
    return records


def index_records(source: str, data_format: str = "auto") -> list[Record]:
    fmt = detect_format(source) if data_format == "auto" else data_format
    records = {"folder": index_folder, "jsonl": index_jsonl, "webdataset": index_webdataset}[fmt](source)
    if not records:
        raise ValueError(f"No images found in {source!r} (format {fmt})")
    return records


# ---------------------------------------------------------------------------------------------------------
# Samples.

def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def preprocess(image: Image.Image, size: int | tuple[int, int], random_crop: bool, random_flip: bool,
               generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Resize to cover `size` (an int for a square, or (width, height) of a bucket), crop, record SDXL's
    micro-conditioning.

    Returns (pixels [3, H, W] in [-1, 1], time_ids: original (h, w), crop (top, left), target (H, W)), the
    same preprocessing SDXL itself was trained with (diffusers' train_text_to_image_sdxl does the same).
    """
    width, height = (size, size) if isinstance(size, int) else size
    original = (image.height, image.width)
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.BICUBIC)
    if random_crop:
        top = int(torch.randint(0, image.height - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.width - width + 1, (1,), generator=generator))
    else:
        top, left = (image.height - height) // 2, (image.width - width) // 2
    image = image.crop((left, top, left + width, top + height))
    if random_flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = resized[0] - left - width  # where the crop sits in the flipped image
    return _pil_to_tensor(image), base_time_ids(original, (top, left), (height, width))


def buckets_for(resolution: int) -> list[tuple[int, int]]:
    """SDXL's aspect-ratio buckets (about 1024² pixels) scaled to about resolution² pixels, sides multiples of 64
    (so latents stay divisible by 8), as (width, height)."""
    scale = resolution / 1024
    return sorted({(max(64, round(w * scale / 64) * 64), max(64, round(h * scale / 64) * 64)) for w, h in SDXL_BUCKETS})


def image_size(record: Record) -> tuple[int, int] | None:
    """(width, height) from the image header only; None if it cannot be read (the sample is skipped later)."""
    try:
        with Image.open(io.BytesIO(record.read_bytes())) as image:
            return image.size
    except Exception:
        return None


class ImageCaptionDataset(torch.utils.data.Dataset):
    """records[i] -> {"pixels", "caption", "time_ids", "index"}, or None when the image cannot be read.

    Random crops and flips use a generator seeded from (seed, epoch, index), so a sample is the same whichever
    worker loads it and whether or not the run was resumed. Call `set_epoch` as epochs advance (the batch
    sampler's items carry the epoch, so this happens automatically).
    """

    def __init__(self, records: list[Record], resolution: int, random_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, sizes: list[tuple[int, int]] | None = None):
        self.records, self.resolution, self.seed = records, resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        self.sizes = sizes  # per record (width, height) of its bucket; None: all resolution² squares

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        epoch, index = key
        record = self.records[index]
        try:
            image = Image.open(io.BytesIO(record.read_bytes()))
            image.load()
            image = image.convert("RGB")
        except Exception as exc:  # PIL raises many types for corrupt files; none may stop training
            log.warning("Skipping unreadable image %s (%s: %s)", record.path, type(exc).__name__, exc)
            return None
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
        size = self.sizes[index] if self.sizes else self.resolution
        pixels, time_ids = preprocess(image, size, self.random_crop, self.random_flip, generator)
        return {"pixels": pixels, "caption": record.caption, "time_ids": torch.tensor(time_ids), "index": index}


def collate(samples: list[dict | None]) -> dict:
    """Stack the readable samples; "skipped" counts the unreadable ones (the batch may be smaller, or empty)."""
    good = [s for s in samples if s is not None]
    return {
        "pixels": torch.stack([s["pixels"] for s in good]) if good else None,
        "captions": [s["caption"] for s in good],
        "time_ids": torch.stack([s["time_ids"] for s in good]) if good else None,
        "indices": [s["index"] for s in good],
        "skipped": len(samples) - len(good),
    }


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) batches for one process, starting at batch number `start`.

    Each epoch is a permutation seeded by (seed, epoch). Without buckets, process `rank` of `world` takes every
    world-th index of it. With `groups` (a bucket id per index), the permutation is cut into same-bucket
    batches, the batches are shuffled, and process `rank` takes every world-th batch. Incomplete batches are
    dropped so every process draws the same number of batches per epoch. Batch number b is therefore a pure
    function of (seed, rank, world, b): that is the data position.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                 groups: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.groups = groups
        self.per_epoch = len(self._epoch_batches(0))
        if self.per_epoch == 0:
            raise ValueError(f"{n} images are too few for batch size {batch_size} on {world} process(es)"
                             + (" with aspect-ratio buckets" if groups else ""))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.groups is None:
            count = (self.n // self.world) // self.batch_size  # the same on every process
            mine = order[self.rank :: self.world]
            return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(count)]
        by_group: dict[int, list[int]] = {}
        for i in order:
            by_group.setdefault(self.groups[i], []).append(i)
        batches = [members[k : k + self.batch_size] for _, members in sorted(by_group.items())
                   for k in range(0, len(members) - self.batch_size + 1, self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        per_rank = len(batches) // self.world
        return batches[self.rank :: self.world][:per_rank]

    def __iter__(self):
        b = self.start
        while True:
            epoch, pos = divmod(b, self.per_epoch)
            batches = self._epoch_batches(epoch)
            for batch in batches[pos:]:
                yield [(epoch, j) for j in batch]
            b = (epoch + 1) * self.per_epoch


def make_loader(cfg, rank: int = 0, world: int = 1, start_batch: int = 0) -> torch.utils.data.DataLoader:
    records = index_records(cfg.data, cfg.data_format)
    sizes = groups = None
    if cfg.bucketing:  # reads every image header once, at start-up
        buckets = buckets_for(cfg.resolution)
        square = nearest_bucket(1, 1, buckets)
        sizes = [nearest_bucket(*wh, buckets) if (wh := image_size(r)) else square for r in records]
        groups = [buckets.index(size) for size in sizes]
    dataset = ImageCaptionDataset(records, cfg.resolution, cfg.random_crop, cfg.random_flip, cfg.seed, sizes)
    sampler = ResumableBatchSampler(len(records), cfg.batch_size, cfg.seed, rank, world, start_batch, groups)
    # Its own generator: a DataLoader otherwise draws its worker base seed from the global RNG, which would make
    # a resumed run's random stream differ from the uninterrupted run's.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed))
