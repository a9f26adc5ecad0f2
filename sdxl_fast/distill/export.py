"""The trained student as a UNet-only diffusers folder (config.json + diffusion_pytorch_model.safetensors),
which `sdxl_fast`'s Fast path and `UNet2DConditionModel.from_pretrained` both load, plus a README card and
sdxl_fast.json, which `sdxl_fast.load` reads: the Fast sampler it was trained for ("ADD") and how its output is
read (`prediction_type`: epsilon, v_prediction or sample; the noise schedule is the teacher's). A folder without
the file runs the ADD sampler with the base model's scheduler (SDXL: epsilon).
"""

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

Or `UNet2DConditionModel.from_pretrained("<this folder>")`, with the teacher's noise schedule: its output is read
as {prediction} (recorded in sdxl_fast.json; in diffusers, the teacher's scheduler with that `prediction_type`).

- Steps trained: {step}
- Weights: {weights}

## Training config

```json
{config}
```
"""


def export_student(student, folder: str | Path, config: dict, step: int, ema_used: bool,
                   prediction_type: str | None = None) -> Path:
    """Save `student` (an unwrapped UNet2DConditionModel) to `folder` with safetensors, a README card and
    sdxl_fast.json (the sampler, and `prediction_type`: how the student's output is read; None records none, so
    the base model's scheduler decides)."""
    folder = Path(folder)
    student.save_pretrained(folder, safe_serialization=True)
    # diffusers records the folder the weights were loaded from, a path on the training machine only.
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(CARD.format(
        teacher=config["teacher"], timesteps=tuple(config["student_timesteps"]), step=step,
        weights="EMA of the student weights" if ema_used else "the student's final weights",
        prediction=prediction_type or "the teacher's scheduler says", config=json.dumps(config, indent=2),
    ))
    (folder / "training_config.json").write_text(json.dumps(config, indent=2))
    # The sampler it was trained for (the Fast path's default for it) and its parametrisation.
    write_student_config(folder, sampler="ADD", prediction_type=prediction_type)
    return folder
