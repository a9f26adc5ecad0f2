"""Settings of the demo-family training runs, as dataclasses: `DemoTrainConfig` for `python -m sdxl_fast.shapes train-demo`
(shapes/train_demo.py) and `PretrainConfig` for `python -m sdxl_fast.shapes pretrain-vit` (shapes/feature_net.py).
No torch import here, so the command line builds its options from these fields in milliseconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STAGES = ("encoders", "vae", "base", "refiner")
ORIGINAL_SIZE = (128, 128)  # every shapes image: 128², no crop


@dataclass
class DemoTrainConfig:
    stage: str
    work: str = "runs/demo"
    minutes: float = 4.0  # wall-clock budget of this run, from process start (data drawing included)
    max_steps: int = 0  # stop at this total step count as well (0: only the time budget stops the run)
    device: str = ""  # "" picks cuda when available
    seed: int = 0
    # --- data ---
    pool_size: int = 100_000  # training seeds 0 .. pool_size-1
    workers: int = 16  # processes drawing the pool
    pool_cache: str = ""  # folder to keep the drawn pool in (.npy), for the next stage on the same machine
    # --- optimisation (None: the stage's default below) ---
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int = 300  # linear warm-up of a fresh optimiser (also after a resume without optimizer.pt)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999  # UNets only
    # --- objectives ---
    kl_weight: float = 1e-4  # vae: weight of the per-element KL against N(0, 1)
    eval_images: int = 256  # vae: held-out images for the final reconstruction error and probe accuracy;
    # encoders: held-out captions for the read-out accuracy
    caption_dropout: float = 0.1  # base/refiner: fraction of captions replaced by the "empty prompt"
    refiner_t_max: int = 199  # refiner: trains on t in 0 .. refiner_t_max (the quality path's last 20%)
    aesthetic_range: tuple[float, float] = (2.0, 7.0)  # refiner: the score carries no information in our
    # data, so it is drawn uniformly; any value a user passes (the defaults included) is in distribution
    # --- logging, checkpoints ---
    log_every: int = 100
    checkpoint_minutes: float = 2.0  # also checkpoint every this many minutes (a kill loses little)
    reserve_seconds: float = 15.0  # stop this long before the budget ends, to write the checkpoint

    # Batches sized for one H200, where these small models are launch-bound: a 4x larger batch cost ~20 % more
    # time per step in the first run (base: 10.7 steps/s at 256, 8.5 at 1024).
    STAGE_DEFAULTS = {"vae": dict(batch_size=256, lr=5e-4), "base": dict(batch_size=1024, lr=1e-3),
                      "refiner": dict(batch_size=1024, lr=1e-3), "encoders": dict(batch_size=256, lr=1e-3)}

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for key, value in self.STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PretrainConfig:
    """The discriminator's feature network: timm's DINOv2 ViT architecture at small width, trained from scratch
    to classify the shapes labels of real training-seed images (supervised, like the probe)."""

    out: str = "sdxl_fast/shapes/vit_weights"  # writes vit.safetensors (timm state dict) + vit.json
    model: str = "vit_small_patch14_dinov2"
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 2
    init_values: float = 1.0  # layer-scale init for training from scratch: timm's DINOv2 default (1e-5, made for
    # fine-tuning) leaves every block's output ~0 for hundreds of steps (position stayed at chance). Only an
    # initial value: the trained gammas are saved, and distill builds the model with its default and loads them.
    img_size: int = 112  # 8x8 patches of 14 px; the shapes images (128²) are resized to this, as in distill
    train_images: int = 10_000  # seeds 0 .. train_images-1 (never held-out seeds)
    eval_images: int = 1000  # held-out seeds from 10**9, for the reported accuracy
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    workers: int = 1  # processes drawing the images
    log_every: int = 50
    device: str = "auto"  # "auto": the GPU when there is one
    minutes: float = 0.0  # > 0: a training-time budget; the learning-rate schedule follows whichever of steps and
    # minutes runs out first, so a budgeted run still ends its cosine decay
