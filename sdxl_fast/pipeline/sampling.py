"""The denoising loops: Quality (Euler, classifier-free guidance, base -> refiner hand-off) and Fast (the ADD
sampler of our students, or Euler-ancestral as diffusers runs SDXL-Turbo).

Each loop is a plain function over a denoiser, `model(latents [B, 4, h, w], timestep) -> model output`, the
way k-diffusion writes samplers: the UNet's text inputs, classifier-free guidance and the step cache are
wrappers of the model, not branches inside the loop. We write the loops ourselves rather than call diffusers'
pipelines because we need the expert switch inside one schedule, per-step previews and, on GPUs, CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UNetInputs:
    """What an SDXL UNet reads besides latents and timestep. All share the batch dimension B."""

    context: torch.Tensor  # [B, 77, D] cross-attention states
    pooled: torch.Tensor  # [B, P] pooled text embedding
    time_ids: torch.Tensor  # [B, 6] base, [B, 5] refiner

    def __call__(self, unet, latents: torch.Tensor, timestep) -> torch.Tensor:
        return unet_forward(unet, latents, timestep, self.context, self.pooled, self.time_ids)


def unet_forward(unet, latents, timestep, context, pooled, time_ids) -> torch.Tensor:
    """One diffusers UNet call with SDXL's added conditioning, every tensor an argument (so it can be graphed)."""
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return unet(latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample


@dataclass
class Step:
    """Progress report after each denoising step; `denoised` is the current estimate of the clean latents."""

    index: int  # 1-based
    total: int
    timestep: int
    latents: torch.Tensor
    denoised: torch.Tensor


StepCallback = Callable[[Step], None]


def randn(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """One noise tensor per image, each from its own CPU generator, so image i of a batch equals the single
    image made with seed + i, on any device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: move the conditional prediction away from the unconditional one."""
    return uncond + scale * (cond - uncond)


def guided(model: Denoiser, scale: float) -> Denoiser:
    """A denoiser with classifier-free guidance: `model` reads [negative; positive] along the batch, so both
    predictions come from one call of twice the batch."""
    def call(x: torch.Tensor, t) -> torch.Tensor:
        uncond, cond = model(torch.cat([x, x]), t).chunk(2)
        return cfg(uncond, cond, scale)
    return call


def predicted_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The clean-sample estimate from a UNet output at noise level alpha_bar = ᾱ_t."""
    alpha_bar = alpha_bar.to(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε."""
    alpha_bar = alpha_bar.to(x0.dtype)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


@torch.no_grad()
def sample_quality(base: Denoiser, refiner: Denoiser | None, scheduler, latents: torch.Tensor,
                   timesteps: torch.Tensor, switch_index: int, callback: StepCallback | None = None) -> torch.Tensor:
    """Euler sampling from pure noise; `base` for timesteps[:switch_index], `refiner` after."""
    for i, t in enumerate(timesteps):
        model = base if i < switch_index else refiner
        out = scheduler.step(model(scheduler.scale_model_input(latents, t), t), t, latents)
        latents = out.prev_sample
        if callback is not None:
            callback(Step(i + 1, len(timesteps), int(t), latents, out.pred_original_sample))
    return latents


@torch.no_grad()
def sample_fast(student: Denoiser, alphas_cumprod: torch.Tensor, prediction_type: str, noise: torch.Tensor,
                timesteps: list[int], renoise: Callable[[], torch.Tensor],
                callback: StepCallback | None = None) -> torch.Tensor:
    """ADD sampling: the student maps x_t to a clean sample; between steps it is noised again to the next
    student timestep with fresh noise from `renoise()`. The first input is pure noise, as in training.

    `alphas_cumprod` must be on the latents' device: then the loop copies nothing from the host and can be
    recorded in a CUDA graph.
    """
    x = noise
    for i, t in enumerate(timesteps):
        t_tensor = torch.full((), t, device=x.device, dtype=torch.long)
        x0 = predicted_x0(student(x, t_tensor), x, alphas_cumprod[t], prediction_type)
        if i + 1 < len(timesteps):
            x = add_noise(x0, renoise(), alphas_cumprod[timesteps[i + 1]])
        else:
            x = x0
        if callback is not None:
            callback(Step(i + 1, len(timesteps), t, x, x0))
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, schedule, prediction_type: str, noise: torch.Tensor,
                           renoise: Callable[[], torch.Tensor], callback: StepCallback | None = None) -> torch.Tensor:
    """Euler-ancestral sampling, diffusers' `EulerAncestralDiscreteScheduler` as its SDXL pipeline runs it, the
    same float operations in the same order (`schedules.euler_ancestral` gives the constants): the starting
    noise times the initial sigma; each step the model reads x / sqrt(sigma² + 1), the Euler step goes down to
    sigma_down in float32 and `renoise()` (the noise diffusers' step draws) adds sigma_up of fresh noise. The
    last step's sigma_up is 0, so its noise is not drawn: `renoise` is called steps - 1 times.
    """
    x = noise * schedule.init_sigma
    n = len(schedule.steps)
    for i, s in enumerate(schedule.steps):
        t_tensor = torch.full((), s.timestep, device=x.device, dtype=torch.long)
        output = model(x / s.input_scale, t_tensor)
        sample = x.to(torch.float32)
        if prediction_type == "epsilon":
            x0 = sample - s.sigma * output
        elif prediction_type == "v_prediction":
            x0 = output * s.v_out + (sample / s.v_skip)
        else:
            raise ValueError(f"Euler a supports epsilon and v_prediction models, not {prediction_type!r}")
        derivative = (sample - x0) / s.sigma
        x = sample + derivative * s.dt
        if i + 1 < n:
            x = x + renoise() * s.sigma_up
        x = x.to(output.dtype)
        if callback is not None:
            callback(Step(i + 1, n, s.timestep, x, x0))
    return x
