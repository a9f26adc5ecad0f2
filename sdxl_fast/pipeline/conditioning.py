"""SDXL micro-conditioning: the `time_ids` the UNets receive."""

from __future__ import annotations

import torch

from ..params import GenerationParams

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
        neg = refiner_time_ids(params.negative_original_size, params.negative_crop(refiner=True),
                               params.negative_aesthetic_score)
    else:
        pos = base_time_ids(params.original_size, params.crops_coords_top_left, params.target_size)
        neg = base_time_ids(params.negative_original_size, params.negative_crop(refiner=False),
                            params.negative_target_size)
    as_tensor = lambda ids: torch.tensor([ids], device=device, dtype=dtype)  # noqa: E731
    return as_tensor(neg), as_tensor(pos)
