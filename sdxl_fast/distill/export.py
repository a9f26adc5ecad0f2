"""The trained student as a UNet-only diffusers folder (config.json + diffusion_pytorch_model.safetensors),
which `sdxl_fast`'s Fast path and `UNet2DConditionModel.from_pretrained` both load, plus a README card.

`scheduler_config.json` next to the UNet's config records how to read the student's output: the teacher's
noise schedule with the student's `prediction_type` (epsilon, v_prediction or sample). `sdxl_fast.load` uses
it for a UNet-only student's Fast path; diffusers reads it with `EulerDiscreteScheduler.from_pretrained(folder)`.
A folder without it (students exported before issue 27) is read with the base model's scheduler, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEDULER_CONFIG = "scheduler_config.json"

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


def student_scheduler(teacher_scheduler, prediction_type: str):
    """The teacher's scheduler (same class and noise schedule) reading outputs as `prediction_type`."""
    return type(teacher_scheduler).from_config(teacher_scheduler.config, prediction_type=prediction_type)


def student_prediction_type(folder: str | Path) -> str | None:
    """The prediction_type an exported student folder records, None for a folder without one."""
    path = Path(folder) / SCHEDULER_CONFIG
    return json.loads(path.read_text()).get("prediction_type") if path.is_file() else None


def export_student(student, folder: str | Path, config: dict, step: int, ema_used: bool, scheduler=None) -> Path:
    """Save `student` (an unwrapped UNet2DConditionModel) to `folder` with safetensors and a README card; with
    `scheduler` (see `student_scheduler`) also its scheduler_config.json."""
    folder = Path(folder)
    student.save_pretrained(folder, safe_serialization=True)
    if scheduler is not None:
        scheduler.save_config(folder)  # writes scheduler_config.json
    (folder / "README.md").write_text(CARD.format(
        teacher=config["teacher"], timesteps=tuple(config["student_timesteps"]), step=step,
        weights="EMA of the student weights" if ema_used else "the student's final weights",
        config=json.dumps(config, indent=2),
    ))
    (folder / "training_config.json").write_text(json.dumps(config, indent=2))
    return folder
