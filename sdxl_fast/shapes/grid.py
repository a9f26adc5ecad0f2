"""The one-step images the docs show for a student: three prompts (columns) at seed 7, one row per student."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

PROMPTS = ("a red circle", "two blue squares on a yellow background", "a large green star at the top left")


def student_grid(base: str | Path, students: list[str | Path], prompts: tuple[str, ...] = PROMPTS, seed: int = 7,
                 steps: int = 1, size: int = 128) -> Image.Image:
    """Row i holds students[i]'s Fast images of `prompts` (columns), each `size`² through sdxl_fast.generate on
    the CPU in fp32, as the evaluation makes them."""
    import sdxl_fast

    grid = Image.new("RGB", (size * len(prompts), size * len(students)))
    for row, student in enumerate(students):
        models = sdxl_fast.load(modes=("fast",), device="cpu", dtype=torch.float32,
                                sources=sdxl_fast.ModelSources(base=str(base), refiner=None, fast=str(student)))
        for col, prompt in enumerate(prompts):
            params = sdxl_fast.GenerationParams(prompt, mode="fast", steps=steps, seed=seed, width=size, height=size)
            (image,) = sdxl_fast.generate(models, params)
            grid.paste(image, (col * size, row * size))
    return grid
