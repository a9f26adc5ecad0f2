"""Latents -> pixels: the VAE decode with SDXL's fp16 overflow fallback, and cheap RGB previews."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from ..models import weight_dtype

log = logging.getLogger(__name__)

# A linear map from SDXL's 4 latent channels to RGB (least-squares fit of decoded colours, the factors
# ComfyUI and others use for SDXL previews): previews cost a matmul, not a VAE pass.
LATENT_RGB_FACTORS = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])
LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def pixels(vae, latents: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SDXL latents [B, 4, h, w] -> images [B, 3, H, W] in about [-1, 1], in the VAE's dtype (or `dtype`).
    Differentiable: training decodes the student's samples through it."""
    return vae.decode((latents / vae.config.scaling_factor).to(dtype or weight_dtype(vae))).sample


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode [B, 4, h, w] latents to uint8 images [B, H, W, 3] (on the latents' device).

    SDXL's VAE overflows in fp16 on some images (NaN/inf output). When that happens the VAE is moved to
    fp32 for good and the batch decoded again, so the caller always gets a finite image.
    """
    dtype = weight_dtype(vae)
    images = pixels(vae, latents, dtype)
    if not torch.isfinite(images).all():
        if dtype == torch.float32:
            raise FloatingPointError("The VAE produced NaN/inf in fp32: the latents themselves are not finite.")
        log.warning("VAE decode in %s overflowed (NaN/inf); decoding again in fp32", dtype)
        vae.to(torch.float32)
        images = pixels(vae, latents, torch.float32)
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats [B, 3, H, W] -> uint8 [B, H, W, 3], converted where the images are: on a GPU this sends
    a quarter of the bytes of fp32 pixels over PCIe, and the CPU does no per-pixel work."""
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors on one GPU -> the CPU, waiting once for all of them. Each goes into page-locked memory: one
    DMA, where a copy to ordinary memory goes through a staging buffer and waits on its own."""
    if not tensors[0].is_cuda:
        return list(tensors)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 [B, H, W, 3] on the CPU -> PIL images."""
    return [Image.fromarray(image.numpy()) for image in images]


@torch.no_grad()
def latent_preview(latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Approximate RGB previews of [B, 4, h, w] latents; `size` (width, height) to scale them for display."""
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), LATENT_RGB_FACTORS) + LATENT_RGB_BIAS[:, None, None]
    images = to_pil(to_uint8(rgb.clamp(-1, 1)))
    return [im.resize(size, Image.BILINEAR) for im in images] if size else images
