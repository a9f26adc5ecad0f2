"""`distill`: Adversarial Diffusion Distillation (ADD) of the SDXL base into a few-step student.

    python -m sdxl_fast.distill --config configs/add-sdxl.json --data /data/images --output_dir runs/add
    accelerate launch --num_processes 8 -m sdxl_fast.distill --config configs/add-sdxl.json ...

Modules, in the order a step uses them: config -> data -> discriminator -> losses -> train (the loop)
-> checkpoints (atomic save, exact resume) -> export (the student as a diffusers folder). See docs/DISTILL.md.
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
