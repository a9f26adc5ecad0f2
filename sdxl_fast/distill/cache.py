"""Optional on-disk cache of what the frozen text encoders and VAE compute per training image.

With `cache_dir` set, sample i's text embeddings (context [77, D], pooled [P]) and VAE posterior (mean and std
[4, h, w]) are computed the first time the sample is drawn and read from `cache_dir/{i:08d}.safetensors`
afterwards, so later epochs (and reruns on the same data) skip both encoders. The latent is still *sampled*
from the cached posterior each time, exactly as without the cache. A cached sample is tied to one crop, so
caching requires `random_crop` and `random_flip` off (checked by TrainConfig).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdxl_fast.files import atomic_write
from sdxl_fast.pipeline.prompts import encode_prompts


class EncodingCache:
    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, index: int) -> Path:
        return self.folder / f"{index:08d}.safetensors"

    @torch.no_grad()
    def encode(self, encoders, vae, captions: list[str], pixels: torch.Tensor, indices: list[int], device):
        """-> (context [B, 77, D], pooled [B, P], latent mean [B, 4, h, w], latent std [B, 4, h, w]), fp32."""
        rows: list[dict | None] = [None] * len(indices)
        if self.folder:
            for k, index in enumerate(indices):
                if self._path(index).is_file():
                    rows[k] = load_file(str(self._path(index)), device=str(device))
        missing = [k for k, row in enumerate(rows) if row is None]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if missing:
            emb = encode_prompts(encoders, [captions[k] for k in missing], device)
            posterior = vae.encode(pixels[missing].to(device, vae.dtype)).latent_dist
            for j, k in enumerate(missing):
                rows[k] = {"context": emb.base_context[j].float(), "pooled": emb.pooled[j].float(),
                           "mean": posterior.mean[j].float(), "std": posterior.std[j].float()}
                if self.folder:  # several processes may write the same sample at once; each file stays whole
                    with atomic_write(self._path(indices[k])) as tmp:
                        save_file({n: t.contiguous().cpu() for n, t in rows[k].items()}, str(tmp))
        stack = lambda name: torch.stack([row[name] for row in rows]).to(device)  # noqa: E731
        return stack("context"), stack("pooled"), stack("mean"), stack("std")
