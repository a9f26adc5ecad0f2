"""SDXL micro-conditioning: the `time_ids` the UNets receive, and the aspect-ratio buckets SDXL was trained on."""

from __future__ import annotations

import torch

from .params import GenerationParams

# (width, height) of SDXL's multi-aspect training buckets: about 1024² pixels, sides multiples of 64
# (SDXL paper, appendix I). The list is symmetric, so it reads the same as (height, width).
SDXL_BUCKETS: list[tuple[int, int]] = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    """The training bucket whose aspect ratio is closest to width/height."""
    return min(SDXL_BUCKETS, key=lambda b: abs(b[0] / b[1] - width / height))


def bucket_label(width: int, height: int) -> str:
    from math import gcd

    g = gcd(width, height)
    return f"{width}×{height} ({width // g}:{height // g})"


def base_time_ids(original_size, crops_coords_top_left, target_size) -> list[float]:
    """The base UNet's 6 ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return [*original_size, *crops_coords_top_left, *target_size]


def refiner_time_ids(original_size, crops_coords_top_left, aesthetic_score: float) -> list[float]:
    """The refiner's 5 ids: (orig_h, orig_w, crop_top, crop_left, aesthetic_score)."""
    return [*original_size, *crops_coords_top_left, aesthetic_score]


def time_ids(params: GenerationParams, refiner: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative, positive) time ids, each [1, 6] for the base or [1, 5] for the refiner."""
    if refiner:
        pos = refiner_time_ids(params.original_size, params.crops_coords_top_left, params.aesthetic_score)
        neg = refiner_time_ids(params.negative_original_size, params.negative_crops_coords_top_left,
                               params.negative_aesthetic_score)
    else:
        pos = base_time_ids(params.original_size, params.crops_coords_top_left, params.target_size)
        neg = base_time_ids(params.negative_original_size, params.negative_crops_coords_top_left,
                            params.negative_target_size)
    as_tensor = lambda ids: torch.tensor([ids], device=device, dtype=dtype)  # noqa: E731
    return as_tensor(neg), as_tensor(pos)
