"""`generate`: prompt -> encoders -> denoising loop -> decoder -> PIL images with their parameters."""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from . import conditioning, decoding, metadata, prompts, sampling, schedules
from .loading import Models
from .params import GenerationParams, image_seed


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(n)]


def _batched(pos: sampling.UNetInputs, neg: sampling.UNetInputs | None, batch: int) -> sampling.UNetInputs:
    """Repeat the one-prompt inputs to the batch; with a negative (guided sampling), stack [negative; positive]."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:])

    parts = [pos] if neg is None else [neg, pos]
    return sampling.UNetInputs(*(torch.cat([rows(getattr(x, name)) for x in parts])
                                 for name in ("context", "pooled", "time_ids")))


def _quality(models: Models, p: GenerationParams, callback) -> tuple[torch.Tensor, dict]:
    q = models.quality
    if q is None:
        raise RuntimeError("The quality models are not loaded; load them with sdxl_fast.load(modes=('quality',))")
    device, dtype, batch = models.device, models.dtype, p.num_images
    use_refiner = p.use_refiner and q.refiner is not None and p.refiner_switch < 1.0
    guided = p.guidance_scale > 1.0

    pos = prompts.encode_prompts(q.encoders, [p.prompt], device)
    neg = prompts.encode_prompts(q.encoders, [p.negative_prompt], device)
    # SDXL base was trained with zeroed (not encoded) empty negatives; the refiner was not (model_index.json).
    base_neg = neg.zeros_like() if (q.force_zeros_for_empty_prompt and not p.negative_prompt) else neg
    ids_neg, ids_pos = conditioning.time_ids(p, refiner=False, device=device, dtype=dtype)
    base_inputs = _batched(sampling.UNetInputs(pos.base_context, pos.pooled, ids_pos),
                           sampling.UNetInputs(base_neg.base_context, base_neg.pooled, ids_neg) if guided else None,
                           batch)
    refiner_inputs = None
    if use_refiner:
        ids_neg, ids_pos = conditioning.time_ids(p, refiner=True, device=device, dtype=dtype)
        refiner_inputs = _batched(sampling.UNetInputs(pos.hidden_2, pos.pooled, ids_pos),
                                  sampling.UNetInputs(neg.hidden_2, neg.pooled, ids_neg) if guided else None, batch)

    # A fresh scheduler per call: schedulers carry a step counter, and the app may run calls side by side.
    scheduler = EulerDiscreteScheduler.from_config(q.scheduler.config)
    timesteps, switch = schedules.quality_timesteps(scheduler, p.steps, p.refiner_switch if use_refiner else None,
                                                    device=device)
    latent_shape = (q.base.config.in_channels, p.height // 8, p.width // 8)
    latents = sampling.randn(latent_shape, _generators(p.seed, batch), device, dtype) * scheduler.init_noise_sigma
    latents = sampling.sample_quality(q.base, q.refiner, scheduler, latents, timesteps, switch, base_inputs,
                                      refiner_inputs, p.guidance_scale, callback)
    names = dict(q.names) if use_refiner else {"base": q.names["base"]}
    return decoding.decode(q.vae, latents), names


def _fast(models: Models, p: GenerationParams, callback) -> tuple[torch.Tensor, dict]:
    f = models.fast
    if f is None:
        raise RuntimeError("The fast models are not loaded; load them with sdxl_fast.load(modes=('fast',))")
    device, dtype, batch = models.device, models.dtype, p.num_images
    pos = prompts.encode_prompts(f.encoders, [p.prompt], device)
    _, ids_pos = conditioning.time_ids(p, refiner=False, device=device, dtype=dtype)
    inputs = _batched(sampling.UNetInputs(pos.base_context, pos.pooled, ids_pos), None, batch)

    generators = _generators(p.seed, batch)
    latent_shape = (f.student.config.in_channels, p.height // 8, p.width // 8)
    noise = sampling.randn(latent_shape, generators, device, dtype)
    latents = sampling.sample_fast(
        f.student, f.scheduler.alphas_cumprod, f.scheduler.config.prediction_type, noise,
        schedules.student_timesteps(p.steps), inputs,
        renoise=lambda: sampling.randn(latent_shape, generators, device, dtype), callback=callback,
    )
    return decoding.decode(f.vae, latents), dict(f.names)


def generate(models: Models, params: GenerationParams, callback: sampling.StepCallback | None = None) -> list[Image.Image]:
    """Make `params.num_images` images. Image i uses seed + i and carries its own `parameters` text in
    `image.info`, which `metadata.save_png` (and Gradio) write into the PNG.

    Raises ValueError for invalid parameters before any work is done. `callback` is called after every
    denoising step; raising from it stops the generation.
    """
    p = params.resolved()
    images, names = (_quality if p.mode == "quality" else _fast)(models, p, callback)
    out = []
    for i, image in enumerate(decoding.to_pil(images)):
        image.info["parameters"] = metadata.infotext(replace(p, seed=image_seed(p.seed, i), num_images=1), names)
        out.append(image)
    return out
