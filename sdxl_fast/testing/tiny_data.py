"""Tiny data sets and configs for tests and smoke runs: no downloads, seconds on a CPU."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# A DINOv2-architecture ViT (patch 14, 1 CLS token, layer scale) at toy width.
TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}


def _image_bytes(i: int, size=(80, 64)) -> bytes:
    rng = np.random.default_rng(i)
    # Smooth colour gradients plus a little noise: something a tiny model can fit.
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, np.full_like(xx, (i % 5) / 5, dtype=float)], -1)
    pixels = (base * 200 + rng.uniform(0, 55, (h, w, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not a PNG"


def make_dataset(root: str | Path, fmt: str, n: int = 6, corrupt: tuple[int, ...] = ()) -> str:
    """Write n captioned images in `fmt` (folder | jsonl | webdataset); indices in `corrupt` get broken bytes.
    Returns the path to pass as `data`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    items = [(f"img{i:03d}", CORRUPT if i in corrupt else _image_bytes(i), f"a test image number {i}")
             for i in range(n)]
    if fmt == "folder":
        for name, data, caption in items:
            (root / f"{name}.png").write_bytes(data)
            (root / f"{name}.txt").write_text(caption)
        return str(root)
    if fmt == "jsonl":
        (root / "images").mkdir(exist_ok=True)
        lines = []
        for name, data, caption in items:
            (root / "images" / f"{name}.png").write_bytes(data)
            lines.append(json.dumps({"image": f"images/{name}.png", "text": caption}))
        (root / "train.jsonl").write_text("\n".join(lines) + "\n")
        return str(root / "train.jsonl")
    if fmt == "webdataset":
        shards = [items[: n // 2], items[n // 2 :]]
        for s, shard in enumerate(shards):
            with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
                for name, data, caption in shard:
                    for ext, payload in (("png", data), ("txt", caption.encode())):
                        info = tarfile.TarInfo(f"{name}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        return str(root)
    raise ValueError(fmt)


def tiny_overrides(teacher: str, data: str, output_dir: str) -> dict:
    """Config values for a CPU run on the tiny SDXL family (64 px images, 8x8 latents) and a tiny ViT."""
    return dict(
        teacher=teacher, data=data, output_dir=output_dir, resolution=64, batch_size=2, num_workers=0,
        disc_weights="random", disc_backbone_kwargs=dict(TINY_VIT), disc_image_size=56, disc_blocks=(0, 2),
        disc_head_channels=16, disc_cond_dim=8, lr_student=1e-4, lr_discriminator=1e-4, log_every=1,
        checkpoint_every=0, validate_every=0, validation_prompts=("a fox",), validation_seeds=(0,),
        validation_steps=(1, 2, 4),
    )
