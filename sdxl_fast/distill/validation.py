"""Validation images: what users of the student will see, made by sdxl_fast's own Fast path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

import sdxl_fast
from sdxl_fast.loading import student_scheduler
from sdxl_fast.models import FastModels

from .config import TrainConfig

log = logging.getLogger("distill")


@torch.no_grad()
def validate(cfg: TrainConfig, accelerator, student, frozen, step: int, weight_dtype, tag: str = "",
             prediction_type: str | None = None) -> list[Path]:
    """Fast-path images at each of `validation_steps` for the fixed prompts and seeds (main process only),
    made by sdxl_fast.pipeline.generate itself, so they are exactly what users of the student will see: with the
    teacher's noise schedule, the student's output read as `prediction_type` (None: the teacher's)."""
    if not accelerator.is_main_process:
        return []
    fast = FastModels(encoders=frozen.encoders, vae=frozen.vae, student=student,
                      scheduler=student_scheduler(frozen.scheduler, prediction_type), names={"fast": "student"})
    models = sdxl_fast.Models(device=accelerator.device, dtype=weight_dtype, fast=fast)
    folder = Path(cfg.output_dir) / "validation" / f"step-{step:08d}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = student.training
    student.eval()
    paths, grid = [], []
    with accelerator.autocast():
        for p, prompt in enumerate(cfg.validation_prompts):
            for seed in cfg.validation_seeds:
                for steps in cfg.validation_steps:
                    params = sdxl_fast.GenerationParams(prompt, mode="fast", steps=steps, seed=seed,
                                                        width=cfg.resolution, height=cfg.resolution)
                    image = sdxl_fast.generate(models, params)[0]
                    path = folder / f"p{p}-seed{seed}-{steps}step.png"
                    sdxl_fast.save_png(image, path)
                    paths.append(path)
                    grid.append(torch.from_numpy(np.array(image)))
    student.train(was_training)
    try:
        tracker = accelerator.get_tracker("tensorboard")
        tracker.log_images({f"validation{tag}": torch.stack(grid).numpy()}, step=step, dataformats="NHWC")
    except Exception as exc:  # logging images must never stop training
        log.warning("Could not log validation images to tensorboard: %s", exc)
    return paths
