"""Every knob of a distillation run, in one dataclass, read from a JSON or TOML file plus `--key value` overrides.

Defaults follow the ADD paper (Sauer et al. 2023, "Adversarial Diffusion Distillation", arXiv 2311.17042)
where it states them: N = 4 student timesteps (999, 749, 499, 249), λ = 2.5 for the distillation loss,
R1 penalty γ = 1e-5, DINOv2 ViT-S/14 discriminator features at 224 px, hinge loss for D and -D for the student,
c(t) = α_t ("exponential") weighting. The optimiser values (AdamW, lr 1e-5 student, 2e-5 discriminator
heads, betas (0, 0.99)) are *our* defaults written from memory of common ADD/GAN practice, not quoted from
the paper; check the paper's appendix before relying on them. Everything is a field, so nothing is hard-coded.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_fast.params import MAX_FAST_STEPS


@dataclass
class TrainConfig:
    # --- models ---------------------------------------------------------------------------------------
    teacher: str = "stabilityai/stable-diffusion-xl-base-1.0"  # SDXL base: hub id or local diffusers folder
    output_dir: str = "runs/add-student"
    # A student UNet folder to start from instead of the teacher's weights, e.g. an earlier run's export: a new
    # run (fresh student optimiser), unlike --resume, which needs the whole checkpoint. If the folder holds the
    # continuation state its run exported (continuation/: discriminator heads, their optimiser and LR schedule,
    # the raw weights or EMA that the export did not hold), the run goes on with it (continue_discriminator).
    student_init: str = ""
    continue_discriminator: bool = True  # False: fresh heads, optimiser and EMA even if student_init has them
    export_continuation: bool = True  # write student/continuation/ next to the exported student
    # How the student's UNet output is read: "teacher" (the teacher's prediction_type, SDXL: epsilon), "epsilon",
    # "v_prediction" or "sample" (x0). An ε-student's x0 at s = 999 is (x - σ·ε̂)/α with α = sqrt(ᾱ_999) ≈ 0.068
    # for SDXL, which multiplies every error of ε̂ by ~15; v and x0 do not. Recorded in the exported student's
    # sdxl_fast.json, which sdxl_fast's Fast path reads.
    student_prediction: str = "teacher"

    # --- data -----------------------------------------------------------------------------------------
    data: str = ""  # folder of images + .txt, a .jsonl manifest, or a .tar shard / folder of shards / glob
    data_format: str = "auto"  # auto | folder | jsonl | webdataset
    resolution: int = 512  # square training size in pixels (a multiple of 8)
    random_crop: bool = True  # False: centre crop. The crop position goes into SDXL's micro-conditioning.
    random_flip: bool = False
    bucketing: bool = False  # SDXL aspect-ratio buckets scaled to about resolution² pixels, instead of squares
    num_workers: int = 2
    cache_dir: str = ""  # if set: text embeddings and VAE latents are computed once and read from here

    # --- optimisation ---------------------------------------------------------------------------------
    seed: int = 0
    max_steps: int = 4000
    batch_size: int = 4  # per process, per micro-step
    gradient_accumulation_steps: int = 1
    lr_student: float = 1e-5
    lr_discriminator: float = 2e-5
    adam_betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0  # linear warm-up, then constant
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no | fp16 | bf16 (the frozen teacher, VAE and encoders are held in this dtype)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 disables the EMA of the student weights
    max_minutes: float = 0.0  # wall-clock budget of this run (0: none); on reaching it: checkpoint, export, stop
    max_nan_steps: int = 5  # abort after this many non-finite losses in a row

    # --- the ADD objective ----------------------------------------------------------------------------
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    # How often each student timestep is drawn, relative to the others (empty: uniformly, as in the paper). A
    # larger first weight trains the one-step sample (from pure noise at 999) more, e.g. "3,1,1,1".
    student_timestep_weights: tuple[float, ...] = ()
    lambda_distill: float = 2.5
    lambda_adv: float = 1.0  # weight of the adversarial term (0: distillation only, the ablation's first arm)
    # How the distillation loss reduces ‖x̂θ - sg(x̂ψ)‖² per sample: "sum" over the sample's elements (the paper's
    # squared L2 norm, the unit λ = 2.5 is given in) or "mean" over them (the shipped demo student's recipe: its
    # λ values, e.g. 400, are in that unit). Either way, then the mean over the batch.
    distill_reduction: str = "sum"
    # "fixed": L = L_adv + λ·L_distill. "adaptive": λ is set every step so that the distillation gradient at the
    # student's output x̂θ has lambda_distill times the norm of the adversarial one (like VQGAN's adaptive weight).
    lambda_mode: str = "fixed"
    log_grad_norms: bool = True  # on logged steps: ‖∂L_adv/∂x̂θ‖ and ‖∂(λ·L_distill)/∂x̂θ‖ (grad_norm/*)
    r1_gamma: float = 1e-5
    distill_weighting: str = "exponential"  # exponential (c(t) = α_t) | sds
    distill_space: str = "pixel"  # pixel (decode both, as the paper prefers) | latent (low memory)
    teacher_guidance: float = 7.5  # classifier-free guidance of the teacher's target (our default)
    teacher_t_min: int = 20  # teacher timesteps are drawn uniformly from [min, max]
    teacher_t_max: int = 979

    # --- discriminator --------------------------------------------------------------------------------
    disc_backbone: str = "vit_small_patch14_dinov2"  # a timm model name
    disc_weights: str = "hub"  # hub (timm download) | path to a .safetensors/.pth state dict | random (tests only)
    disc_backbone_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (tests: depth, ...)
    disc_image_size: int = 224
    disc_blocks: tuple[int, ...] = (2, 5, 8, 11)  # backbone blocks whose tokens feed one head each
    disc_head: str = "stylegan_t"  # stylegan_t (StyleGAN-T's DiscHead) | plain (the demo student's)
    disc_head_channels: int = 0  # 0: the feature network's width (384 for ViT-S), as StyleGAN-T
    disc_cond_dim: int = 64  # width of the projection-conditioning map
    disc_virtual_batch: int = 8  # BatchNormLocal's group size (stylegan_t heads)
    # DiffAugment policies applied to D's real and fake inputs alike ("": none); any of color,translation,cutout.
    disc_augment: str = "color,translation,cutout"
    # Which samples D judges against the real image's embedding. "all": every one, as in the paper. "noised":
    # only those whose student input showed that image; at s = 999 our input is pure noise, so those get a zero
    # embedding and are judged on the text alone (on the demo family no better: docs/DEMO_MODELS.md).
    disc_image_condition: str = "all"

    # --- logging, checkpoints, validation, export -----------------------------------------------------
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500  # 0 disables
    validation_prompts: tuple[str, ...] = ("a photo of a red fox in the snow", "an astronaut riding a horse")
    validation_seeds: tuple[int, ...] = (0,)
    validation_steps: tuple[int, ...] = (1, 2, MAX_FAST_STEPS)
    export_ema: bool = True  # export the EMA weights when ema_decay > 0

    def validate(self) -> "TrainConfig":
        checks = [
            (self.data_format in ("auto", "folder", "jsonl", "webdataset"), "data_format"),
            (self.resolution % 8 == 0 and self.resolution > 0, "resolution must be a positive multiple of 8"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16"),
            (self.distill_weighting in ("exponential", "sds"), "distill_weighting must be exponential or sds"),
            (self.distill_space in ("pixel", "latent"), "distill_space must be pixel or latent"),
            (self.disc_image_condition in ("all", "noised"), "disc_image_condition must be all or noised"),
            (self.disc_head in ("stylegan_t", "plain"), "disc_head must be stylegan_t or plain"),
            (self.disc_head_channels >= 0 and self.disc_virtual_batch > 0, "disc_head_channels, disc_virtual_batch"),
            (_policy_ok(self.disc_augment), "disc_augment must list color, translation, cutout (or be empty)"),
            (self.distill_reduction in ("sum", "mean"), "distill_reduction must be sum or mean"),
            (self.lambda_mode in ("fixed", "adaptive"), "lambda_mode must be fixed or adaptive"),
            (self.lambda_adv >= 0 and self.lambda_distill >= 0, "lambda_adv and lambda_distill must be >= 0"),
            (self.lambda_mode == "fixed" or self.lambda_adv > 0, "lambda_mode adaptive needs lambda_adv > 0"),
            (self.student_prediction in ("teacher", "epsilon", "v_prediction", "sample"),
             "student_prediction must be teacher, epsilon, v_prediction or sample"),
            (0 <= self.teacher_t_min <= self.teacher_t_max <= 999, "need 0 <= teacher_t_min <= teacher_t_max <= 999"),
            (all(0 <= s <= 999 for s in self.student_timesteps) and self.student_timesteps, "student_timesteps"),
            (not self.student_timestep_weights
             or (len(self.student_timestep_weights) == len(self.student_timesteps)
                 and min(self.student_timestep_weights) >= 0 and sum(self.student_timestep_weights) > 0),
             "student_timestep_weights needs one non-negative weight per student timestep, not all zero"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (not self.cache_dir or not (self.random_crop or self.random_flip),
             "cache_dir needs random_crop and random_flip off (a cached sample is one fixed crop)"),
            (self.max_steps > 0 and self.batch_size > 0 and self.gradient_accumulation_steps > 0, "steps/batch"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"Invalid config: {what}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _policy_ok(policy: str) -> bool:
    from .augment import parse_policy

    try:
        parse_policy(policy)
    except ValueError:
        return False
    return True


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, annotation):
    """Turn a file value or a command-line string into the field's type."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true/false, got {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str):  # command line: "999,749,499,249" or a JSON list
            value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        return tuple(item_type(v) for v in value)
    if annotation is dict or origin is dict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    raise TypeError(f"Unsupported config field type for {name}: {annotation}")


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Config file (JSON or TOML) < command-line overrides < dataclass defaults for anything unset."""
    values: dict = {}
    if path:
        text = Path(path).read_text()
        values = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
    values.update(overrides or {})
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"Unknown config keys: {', '.join(unknown)}. Known keys: {', '.join(types)}")
    return TrainConfig(**{k: _coerce(k, v, types[k]) for k, v in values.items()}).validate()
