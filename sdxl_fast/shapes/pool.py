"""Draw many seeds in parallel: a uint8 image pool for training, or png/txt files for `distill`.

Drawing one 128² image costs ~5 ms of one CPU core, so 100k images take ~8 minutes serially but ~30 s over
16 worker processes. Workers are started with "spawn" so that a parent which has already initialised CUDA
is never forked.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np

from .data import DATA_VERSION, DEFAULT_SIZE, HELDOUT_START, sample


def _draw_chunk(args) -> tuple[np.ndarray, list[str], list[dict]]:
    first, count, size = args
    images, captions, labels = np.empty((count, size, size, 3), np.uint8), [], []
    for i in range(count):
        image, caption, lab = sample(first + i, size)
        images[i] = np.asarray(image)
        captions.append(caption)
        labels.append(lab)
    return images, captions, labels


def _chunks(start: int, count: int, chunk: int, size: int) -> list[tuple[int, int, int]]:
    return [(s, min(chunk, start + count - s), size) for s in range(start, start + count, chunk)]


def draw_pool(count: int, start: int = 0, size: int = DEFAULT_SIZE, workers: int = 1,
              chunk: int = 500) -> tuple[np.ndarray, list[str], list[dict]]:
    """Seeds start .. start+count-1 -> (images [N, size, size, 3] uint8, captions, labels), in seed order."""
    if start + count > HELDOUT_START and start < HELDOUT_START:
        raise ValueError("a pool must not mix training seeds and held-out seeds (>= 10**9)")
    jobs = _chunks(start, count, chunk, size)
    if workers <= 1:
        parts = [_draw_chunk(job) for job in jobs]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_draw_chunk, jobs, chunksize=1)
    images = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, size, size, 3), np.uint8)
    return images, [c for p in parts for c in p[1]], [lab for p in parts for lab in p[2]]


def load_or_draw_pool(count: int, workers: int, cache_dir: str | None = None, size: int = DEFAULT_SIZE):
    """`draw_pool(count)` from seed 0, kept in `cache_dir` (an .npy and a .json) so that later stages on the
    same machine read it back in seconds instead of drawing it again."""
    import json

    if cache_dir:
        base = Path(cache_dir) / f"pool-v{DATA_VERSION}-{count}-{size}"
        if base.with_suffix(".npy").is_file() and base.with_suffix(".json").is_file():
            meta = json.loads(base.with_suffix(".json").read_text())
            return np.load(base.with_suffix(".npy")), meta["captions"], meta["labels"]
    images, captions, labels = draw_pool(count, 0, size, workers)
    if cache_dir:
        base.parent.mkdir(parents=True, exist_ok=True)
        np.save(base.with_suffix(".npy"), images)
        base.with_suffix(".json").write_text(json.dumps({"captions": captions, "labels": labels}))
    return images, captions, labels
