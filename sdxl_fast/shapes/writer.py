"""Write a range of seeds in the image-folder format `distill` reads: NNNNNN.png + NNNNNN.txt (the caption),
plus metadata.jsonl with one row per image (file_name, text, seed and the labels), which `distill` can also
read as a JSONL manifest. With `workers > 1` the seeds are split into chunks written by parallel processes
(each draws and writes its own files); the output is identical to a serial run."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from .data import DEFAULT_SIZE, OMIT_PROBABILITY, sample


def _write_chunk(args) -> list[dict]:
    out, first, start, count, size, digits, omit_probability = args
    rows = []
    for i in range(first, first + count):
        seed = start + i
        image, caption, labels = sample(seed, size, omit_probability)
        name = f"{i:0{digits}d}"
        image.save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        rows.append({"file_name": f"{name}.png", "text": caption, "seed": seed, **labels})
    return rows


def write_folder(out: str | Path, count: int, start: int = 0, size: int = DEFAULT_SIZE,
                 metadata: bool = True, workers: int = 1, chunk: int = 500,
                 omit_probability: float = OMIT_PROBABILITY) -> list[Path]:
    """Write seeds start .. start+count-1; file names count from 000000 so a folder reads in seed order.
    `omit_probability`: as in `data.sample`, e.g. higher for a set with more short captions."""
    if not 0 <= omit_probability <= 1:
        raise ValueError(f"omit_probability must be within [0, 1], got {omit_probability}")
    if count < 0 or start < 0:
        raise ValueError("count and start must be non-negative")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(count - 1)))
    jobs = [(out, first, start, min(chunk, count - first), size, digits, omit_probability)
            for first in range(0, count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_write_chunk, jobs, chunksize=1)
    else:
        parts = [_write_chunk(job) for job in jobs]
    rows = [row for part in parts for row in part]
    if metadata:
        with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return [out / row["file_name"] for row in rows]
