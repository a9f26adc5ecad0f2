"""The trained student as a UNet-only diffusers folder (config.json + diffusion_pytorch_model.safetensors),
which `sdxl_fast`'s Fast path and `UNet2DConditionModel.from_pretrained` both load, plus a README card and
sdxl_fast.json (the Fast sampler it was trained for, "ADD", which `sdxl_fast.load` reads)."""

from __future__ import annotations

import json
from pathlib import Path

from ..loading import write_student_config

CARD = """---
library_name: diffusers
tags: [sdxl, adversarial-diffusion-distillation, text-to-image]
---
# ADD student of `{teacher}`

A UNet-only SDXL student trained with Adversarial Diffusion Distillation (Sauer et al. 2023, arXiv 2311.17042)
by `python -m sdxl_fast.distill` (sdxl-fast). It samples in 1 to 4 steps at timesteps {timesteps}, starting from pure
noise, and borrows the teacher's text encoders and VAE.

    import sdxl_fast
    models = sdxl_fast.load(modes=("fast",), sources=sdxl_fast.ModelSources(base="{teacher}", refiner=None,
                            fast="<this folder>"))
    image = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red fox", mode="fast", steps=1))[0]

Or `UNet2DConditionModel.from_pretrained("<this folder>")`.

- Steps trained: {step}
- Weights: {weights}

## Training config

```json
{config}
```
"""


def export_student(student, folder: str | Path, config: dict, step: int, ema_used: bool) -> Path:
    """Save `student` (an unwrapped UNet2DConditionModel) to `folder` with safetensors and a README card."""
    folder = Path(folder)
    student.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(CARD.format(
        teacher=config["teacher"], timesteps=tuple(config["student_timesteps"]), step=step,
        weights="EMA of the student weights" if ema_used else "the student's final weights",
        config=json.dumps(config, indent=2),
    ))
    (folder / "training_config.json").write_text(json.dumps(config, indent=2))
    write_student_config(folder, sampler="ADD")  # the sampler it was trained for: the Fast path's default for it
    return folder
