"""Write a range of seeds in the image-folder format `distill` reads: NNNNNN.png + NNNNNN.txt (the caption),
plus metadata.jsonl with one row per image (file_name, text, seed and the labels), which `distill` can also
read as a JSONL manifest."""

from __future__ import annotations

import json
from pathlib import Path

from .data import DEFAULT_SIZE, sample


def write_folder(out: str | Path, count: int, start: int = 0, size: int = DEFAULT_SIZE,
                 metadata: bool = True) -> list[Path]:
    """Write seeds start .. start+count-1; file names count from 000000 so a folder reads in seed order."""
    if count < 0 or start < 0:
        raise ValueError("count and start must be non-negative")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(count - 1)))
    written, rows = [], []
    for i in range(count):
        seed = start + i
        image, caption, labels = sample(seed, size)
        name = f"{i:0{digits}d}"
        image.save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append(out / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": caption, "seed": seed, **labels})
    if metadata:
        with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return written
