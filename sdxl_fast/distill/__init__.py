"""`distill`: Adversarial Diffusion Distillation (ADD) of the SDXL base into a few-step student.

    python -m sdxl_fast.distill --config configs/add-sdxl.json --data /data/images --output_dir runs/add
    accelerate launch --num_processes 8 -m sdxl_fast.distill --config configs/add-sdxl.json ...

Modules, in the order a run uses them: config -> data (+ cache) -> discriminator (+ augment: DiffAugment) ->
losses (+ balance: the two terms' gradients) -> step (one micro-step: student_step, discriminator_step) -> train
(the loop; fsdp.py holds what FSDP needs besides) -> checkpoints (atomic save, exact resume, the EMA) ->
validation, export (the student as a diffusers folder) + continuation (what a student_init continuation
carries). See docs/DISTILL.md.
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
