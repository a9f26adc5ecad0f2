"""The loaded models: what `sdxl_fast.load` returns and the pipeline reads, and the device/dtype helpers.

The pipeline calls its models through `Models.runner`. The plain `Runner` here calls them directly;
`sdxl_fast.accel` installs one that replays CUDA graphs and projects text for hoisted cross-attention keys and
values. So the pipeline never imports the speed-ups, and the speed-ups change nothing the pipeline says.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


class Runner:
    """Runs the pipeline's tensor functions as they are."""

    def run(self, name: tuple, fn: Callable, *inputs: torch.Tensor, keep: bool = False):
        """fn(*inputs). `name` identifies fn apart from its inputs' shapes (the modules it calls, their dtypes,
        Python constants such as timesteps). With `keep` the caller keeps the outputs past the next call of
        the same name; without it, a runner may overwrite them then (a replayed graph's output buffers)."""
        return fn(*inputs)

    def context(self, unet, context: torch.Tensor) -> torch.Tensor:
        """Text states [B, 77, D] -> what `unet` reads as its `encoder_hidden_states`."""
        return context


@dataclass
class TextEncoders:
    """SDXL's two CLIP encoders. `text_encoder` is None for a refiner-only family."""

    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextModel | None
    tokenizer_2: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection
    # prompt -> embeddings, filled by prompts.encode_prompt_cached
    cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)


@dataclass
class QualityModels:
    encoders: TextEncoders
    vae: AutoencoderKL
    base: UNet2DConditionModel
    refiner: UNet2DConditionModel | None
    scheduler: SchedulerMixin
    force_zeros_for_empty_prompt: bool  # the base's, from its model_index.json: empty negative -> zeros
    names: dict[str, str]
    # The refiner's own flag, from its folder (False for SDXL's refiner: it reads the encoded empty prompt).
    refiner_force_zeros_for_empty_prompt: bool = False


@dataclass
class FastModels:
    encoders: TextEncoders
    vae: AutoencoderKL
    student: UNet2DConditionModel
    # Only its noise schedule (alphas_cumprod) and prediction type are used; for our students the base's schedule
    # with the prediction type their sdxl_fast.json records.
    scheduler: SchedulerMixin
    names: dict[str, str]
    # The sampler used when GenerationParams.sampler is unset: "ADD" for our students (recorded in their
    # sdxl_fast.json), "Euler a" for full few-step pipelines such as stabilityai/sdxl-turbo (diffusers' recipe).
    sampler: str = "ADD"


@dataclass
class Models:
    """Everything `generate` needs; either path may be absent when only the other was loaded."""

    device: torch.device
    dtype: torch.dtype
    quality: QualityModels | None = None
    fast: FastModels | None = None
    offload_hooks: list = field(default_factory=list)
    # Every module and tokenizer `sdxl_fast.load` read, by (folder, subfolder): a later `load(..., share=models)`
    # takes the ones it needs from here (the base's encoders and VAE) instead of reading a second copy.
    components: dict = field(default_factory=dict, repr=False)
    # How the pipeline calls the models; sdxl_fast.accel.apply replaces it (CUDA graphs, hoisted cross-attention
    # keys and values).
    runner: Runner = field(default_factory=Runner)


def native_side(models: Models, mode: str) -> int:
    """The image side the loaded `mode` models were trained at: UNet sample size × the VAE's downsampling
    (SDXL base 1024, SDXL-Turbo 512, the demo family 128). What `generate` and the app use by default."""
    family = getattr(models, mode)
    if family is None:
        raise RuntimeError(f"The {mode} models are not loaded")
    unet = family.student if mode == "fast" else family.base
    return unet.config.sample_size * vae_scale_factor(family.vae)


def vae_scale_factor(vae) -> int:
    """Pixels per latent along each side: 2 per VAE down block after the first (8 for SDXL's VAE), as
    diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (SDXL's published weights are fp16; bf16 is a choice), fp32 on CPU where fp16 is slow."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's first weight, what diffusers' `module.dtype` returns, for per-call code: that
    property walks every submodule first (0.3 ms for SDXL's VAE, 2.6 ms for its UNet on our CPU)."""
    return next(module.parameters()).dtype


def pick_device_dtype(device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: the given ones (dtype as a torch dtype or "fp32"/"fp16"/"bf16"),
    else the best available device and its default dtype."""
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    return device, dtype or default_dtype(device)
