"""`generate`: prompt -> encoders -> denoising loop -> decoder -> PIL images with their parameters."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace
from functools import partial

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from .. import metadata
from ..models import Models, Runner, native_side, vae_scale_factor, weight_dtype
from ..params import MODES, GenerationParams, image_seed
from . import conditioning, decoding, prompts, sampling, schedules, step_cache


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(n)]


def _latent_shape(unet, vae, p: GenerationParams) -> tuple[int, int, int]:
    """One image's starting-noise shape [C, h, w]: the output size over the VAE's downsampling factor."""
    factor = vae_scale_factor(vae)
    return unet.config.in_channels, p.height // factor, p.width // factor


def _batched(pos: sampling.UNetInputs, neg: sampling.UNetInputs | None, batch: int) -> sampling.UNetInputs:
    """Repeat the one-prompt inputs to the batch; with a negative (guided sampling), stack [negative; positive]."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:])

    parts = [pos] if neg is None else [neg, pos]
    return sampling.UNetInputs(*(torch.cat([rows(getattr(x, name)) for x in parts])
                                 for name in ("context", "pooled", "time_ids")))


def _inputs(runner: Runner, unet, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor
            ) -> sampling.UNetInputs:
    """One prompt's UNet inputs, the context as the UNet reads it (the runner may project it to every
    cross-attention's keys and values once per call, instead of once per step)."""
    return sampling.UNetInputs(runner.context(unet, context), pooled, time_ids)


def _encode(models: Models, encoders, prompt: str) -> prompts.PromptEmbeddings:
    """Cached prompt embeddings; on a miss the encoders run through the models' runner."""
    def encode(ids_1, ids_2):
        run = partial(prompts.encode_tokens, encoders)
        return models.runner.run(("text encoders", id(encoders)), run, ids_1, ids_2, keep=True)
    return prompts.encode_prompt_cached(encoders, prompt, models.device, encode)


def unet_denoiser(run, unet, name: str, inputs: sampling.UNetInputs, cache_interval: int = 1) -> sampling.Denoiser:
    """`unet` with its text inputs bound, as a denoiser `(x, t) -> output` that calls it through `run` (a
    runner's `run`); with the step cache when cache_interval > 1 (a new one per call: it holds that call's
    features)."""
    key = (name, id(unet), weight_dtype(unet))
    tensors = (inputs.context, inputs.pooled, inputs.time_ids)

    def t_on(x, t):
        return torch.as_tensor(t, device=x.device)

    if cache_interval == 1:
        return lambda x, t: run(key, partial(sampling.unet_forward, unet), x, t_on(x, t), *tensors, keep=True)
    full = partial(step_cache.full_step, unet)
    cached = partial(step_cache.cached_step_for(unet), unet)
    return step_cache.StepCache(
        lambda x, t: run((*key, "full"), full, x, t_on(x, t), *tensors, keep=True),
        lambda x, t, deep: run((*key, "cached"), cached, x, t_on(x, t), *tensors, deep, keep=True),
        cache_interval)


def _quality(models: Models, p: GenerationParams, callback) -> tuple[torch.Tensor, torch.Tensor, dict]:
    q = models.quality
    if q is None:
        raise RuntimeError("The quality models are not loaded; load them with sdxl_fast.load(modes=('quality',))")
    device, dtype, batch = models.device, models.dtype, p.num_images
    use_refiner = p.use_refiner and q.refiner is not None and p.refiner_switch < 1.0
    guided = p.guidance_scale > 1.0

    pos = _encode(models, q.encoders, p.prompt)
    neg = _encode(models, q.encoders, p.negative_prompt)
    # SDXL base was trained with zeroed (not encoded) empty negatives, its refiner was not: each folder's
    # model_index.json says which (force_zeros_for_empty_prompt).
    base_neg = neg.zeros_like() if (q.force_zeros_for_empty_prompt and not p.negative_prompt) else neg
    refiner_neg = neg.zeros_like() if (q.refiner_force_zeros_for_empty_prompt and not p.negative_prompt) else neg
    runner = models.runner
    ids_neg, ids_pos = conditioning.time_ids(p, refiner=False, device=device, dtype=dtype)
    base_inputs = _batched(_inputs(runner, q.base, pos.base_context, pos.pooled, ids_pos),
                           _inputs(runner, q.base, base_neg.base_context, base_neg.pooled, ids_neg) if guided else None,
                           batch)
    base = unet_denoiser(runner.run, q.base, "base", base_inputs, p.cache_interval)
    refiner = None
    if use_refiner:
        ids_neg, ids_pos = conditioning.time_ids(p, refiner=True, device=device, dtype=dtype)
        negative = _inputs(runner, q.refiner, refiner_neg.hidden_2, refiner_neg.pooled, ids_neg) if guided else None
        refiner_inputs = _batched(_inputs(runner, q.refiner, pos.hidden_2, pos.pooled, ids_pos), negative, batch)
        refiner = unet_denoiser(runner.run, q.refiner, "refiner", refiner_inputs, p.cache_interval)
    if guided:
        base = sampling.guided(base, p.guidance_scale)
        refiner = refiner and sampling.guided(refiner, p.guidance_scale)

    # A fresh scheduler per call: schedulers carry a step counter, and the app may run calls side by side.
    scheduler = EulerDiscreteScheduler.from_config(q.scheduler.config)
    timesteps, switch = schedules.quality_timesteps(scheduler, p.steps, p.refiner_switch if use_refiner else None,
                                                    device=device)
    latent_shape = _latent_shape(q.base, q.vae, p)
    latents = sampling.randn(latent_shape, _generators(p.seed, batch), device, dtype) * scheduler.init_noise_sigma
    latents = sampling.sample_quality(base, refiner, scheduler, latents, timesteps, switch, callback)
    names = dict(q.names) if use_refiner else {"base": q.names["base"]}
    return latents, decoding.to_host(decoding.decode(q.vae, latents))[0], names


def fast_call(f, timesteps: list[int], alphas_cumprod: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
              time_ids: torch.Tensor, noise: torch.Tensor, callback=None, cache_interval: int = 1,
              runner: Runner = Runner(), sampler: str = "ADD"):
    """The Fast path after the text encoders, as one function of tensors, so a CUDA graph can record it whole.

    alphas_cumprod [1000]; context [1, 77, D], pooled [1, P], time_ids [1, 6]; noise [steps, B, 4, h, w]: the
    start noise, then the noise of each re-noising (ADD) or ancestral step ("Euler a"; `timesteps` are then
    `schedules.fast_timesteps`'s). Every tensor is an argument, none is closed over: a
    graph reads the memory it was recorded on, and a closed-over tensor of the first call is freed after it.
    Returns (latents [B, 4, h, w], uint8 images [B, H, W, 3], all-finite flag).
    """
    batch = noise.shape[1]
    inputs = _batched(_inputs(runner, f.student, context, pooled, time_ids), None, batch)
    renoise = iter(noise[1:])
    # Inside this function nothing is run through the runner again: a graph of it records the whole call.
    student = unet_denoiser(Runner().run, f.student, "student", inputs, cache_interval)
    prediction_type = f.scheduler.config.prediction_type
    if sampler == "Euler a":
        schedule = schedules.euler_ancestral(f.scheduler.config, len(timesteps))
        latents = sampling.sample_euler_ancestral(student, schedule, prediction_type, noise[0],
                                                  renoise=lambda: next(renoise), callback=callback)
    else:
        latents = sampling.sample_fast(student, alphas_cumprod, prediction_type, noise[0], timesteps,
                                       renoise=lambda: next(renoise), callback=callback)
    pixels = decoding.pixels(f.vae, latents)
    return latents, decoding.to_uint8(pixels), torch.isfinite(pixels).all()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the GPU: a copy from ordinary memory first waits for
    the work already queued (CUDA's rule for pageable memory), one from page-locked memory is queued behind it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_SCHEDULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _schedule_on(scheduler, device: torch.device) -> torch.Tensor:
    """The scheduler's alphas_cumprod [1000] on `device`, copied once, not on every call."""
    on_device = _SCHEDULES.setdefault(scheduler, {})
    if device not in on_device:
        on_device[device] = scheduler.alphas_cumprod.to(device)
    return on_device[device]


def _fast(models: Models, ps: list[GenerationParams], callback) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One Fast call for one or more requests that share steps, size and step cache (`generate_many`); their
    images are stacked along the batch in request order."""
    f = models.fast
    if f is None:
        raise RuntimeError("The fast models are not loaded; load them with sdxl_fast.load(modes=('fast',))")
    device, dtype, p = models.device, models.dtype, ps[0]
    timesteps = schedules.fast_timesteps(p.sampler, p.steps, f.scheduler.config)
    embeddings = [_encode(models, f.encoders, q.prompt) for q in ps]
    # What follows is host work done while the GPU runs the text encoders; its copies must not wait for them.
    time_ids = [conditioning.time_ids(q, refiner=False, device="cpu", dtype=dtype)[1] for q in ps]
    # [1, 77, D], [1, P], [1, 6] for one request, expanded to its images in the call
    context, pooled, ids = embeddings[0].base_context, embeddings[0].pooled, time_ids[0]
    if len(ps) > 1:  # one row per image: request i's rows repeated num_images times
        def rows(tensors):
            return torch.cat([t.expand(q.num_images, *t.shape[1:]) for t, q in zip(tensors, ps)])
        context, pooled = rows([e.base_context for e in embeddings]), rows([e.pooled for e in embeddings])
        ids = rows(time_ids)
    # All the call's noise up front, drawn per image in the order the loop uses it (start, then each
    # re-noising or ancestral step: the order diffusers draws it from a per-image generator list), so image i
    # is the same whatever the batch, graph or not.
    generators = [g for q in ps for g in _generators(q.seed, q.num_images)]
    latent_shape = _latent_shape(f.student, f.vae, p)
    noise = torch.stack([sampling.randn(latent_shape, generators, "cpu", dtype) for _ in timesteps])
    args = (_schedule_on(f.scheduler, device), context, pooled, _to_device(ids, device),
            _to_device(noise, device))
    run = partial(fast_call, f, timesteps, cache_interval=p.cache_interval, runner=models.runner, sampler=p.sampler)
    if callback is None:
        name = ("fast", id(f.student), id(f.vae), weight_dtype(f.vae), p.sampler, tuple(timesteps), p.cache_interval)
        latents, images, finite = models.runner.run(name, run, *args)
    else:  # callbacks need the loop in Python, outside any recorded graph
        latents, images, finite = run(*args, callback=callback)
    images, finite = decoding.to_host(images, finite)
    if not finite:  # decode again the careful way (fp32 VAE fallback, or a clear error)
        images = decoding.to_host(decoding.decode(f.vae, latents))[0]
    return latents, images, dict(f.names)


def _resolved(models: Models, params: GenerationParams) -> GenerationParams:
    """An unset size becomes the loaded models' own (128² for the demo family, not SDXL's 512² or 1024²)."""
    loaded = params.mode in MODES and getattr(models, params.mode) is not None
    sampler = models.fast.sampler if params.mode == "fast" and loaded else None
    return params.resolved(native_side(models, params.mode) if loaded else None, default_sampler=sampler)


@torch.no_grad()  # nothing here is trained: no activations kept for a backward pass, whatever the modules ask
def generate_tensors(models: Models, params: GenerationParams, callback: sampling.StepCallback | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`generate` without the PIL step: (final latents [B, 4, h, w] on the models' device, uint8 images
    [B, H, W, 3] on the CPU, model names). Benchmarks compare the latents; `generate` wraps the images."""
    p = _resolved(models, params)
    return _quality(models, p, callback) if p.mode == "quality" else _fast(models, [p], callback)


def _with_parameters(images: torch.Tensor, p: GenerationParams, names: dict) -> list[Image.Image]:
    """PIL images, image i with the `parameters` text of seed + i in `image.info` (written into PNGs)."""
    out = []
    for i, image in enumerate(decoding.to_pil(images)):
        image.info["parameters"] = metadata.infotext(replace(p, seed=image_seed(p.seed, i), num_images=1), names)
        out.append(image)
    return out


def generate(models: Models, params: GenerationParams, callback: sampling.StepCallback | None = None) -> list[Image.Image]:
    """Make `params.num_images` images. Image i uses seed + i and carries its own `parameters` text in
    `image.info`, which `metadata.save_png` (and Gradio) write into the PNG.

    Raises ValueError for invalid parameters before any work is done. `callback` is called after every
    denoising step; raising from it stops the generation.
    """
    p = _resolved(models, params)
    _, images, names = generate_tensors(models, p, callback)
    return _with_parameters(images, p, names)


def batch_key(params: GenerationParams) -> tuple:
    """Requests with the same key can share one `generate_many` call: Fast, same sampler, steps, size and step
    cache."""
    return params.mode, params.sampler, params.steps, params.width, params.height, params.cache_interval


@torch.no_grad()
def generate_many(models: Models, requests: list[GenerationParams]) -> list[list[Image.Image]]:
    """Several Fast requests (each its own prompt, seed and micro-conditioning) in one batched call: what a
    server does with requests that arrive together. Returns each request's images, each the same as
    `generate` would make for that request alone (up to the rounding of a larger batch)."""
    ps = [_resolved(models, p) for p in requests]
    if len({batch_key(p) for p in ps}) != 1 or ps[0].mode != "fast":
        raise ValueError("generate_many takes Fast requests of one batch_key: the same sampler, steps, size and "
                         "step cache")
    _, images, names = _fast(models, ps, None)
    starts = [0, *itertools.accumulate(p.num_images for p in ps)]
    return [_with_parameters(images[a:b], p, names) for p, a, b in zip(ps, starts, starts[1:])]
