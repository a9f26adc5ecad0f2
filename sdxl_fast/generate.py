"""`generate`: prompt -> encoders -> denoising loop -> decoder -> PIL images with their parameters."""

from __future__ import annotations

import weakref
from dataclasses import replace
from functools import partial

import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from . import conditioning, cross_kv, decoding, metadata, prompts, sampling, schedules, step_cache
from .loading import Models, native_side, weight_dtype
from .params import MODES, GenerationParams, image_seed


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(n)]


def _batched(pos: sampling.UNetInputs, neg: sampling.UNetInputs | None, batch: int) -> sampling.UNetInputs:
    """Repeat the one-prompt inputs to the batch; with a negative (guided sampling), stack [negative; positive]."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.expand(batch, *t.shape[1:])

    parts = [pos] if neg is None else [neg, pos]
    return sampling.UNetInputs(*(torch.cat([rows(getattr(x, name)) for x in parts])
                                 for name in ("context", "pooled", "time_ids")))


def _inputs(unet, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> sampling.UNetInputs:
    """One prompt's UNet inputs; the context already projected to every cross-attention's keys and values when
    the UNet is hoisted (sdxl_fast.cross_kv): once per call, not once per step."""
    return sampling.UNetInputs(cross_kv.project(unet, context), pooled, time_ids)


def _encode(models: Models, encoders, prompt: str) -> prompts.PromptEmbeddings:
    """Cached prompt embeddings; on a miss the encoders run through a CUDA graph when graphs are on."""
    encode = None
    if models.graphs is not None and encoders.text_encoder is not None:
        def encode(ids_1, ids_2):
            run = partial(prompts.encode_tokens, encoders)
            return models.graphs.run(("text encoders", id(encoders)), run, ids_1, ids_2).clone()
    return prompts.encode_prompt_cached(encoders, prompt, models.device, encode)


def _unets(models: Models, cache_interval: int):
    """The Quality UNets, each replayed from a CUDA graph per step when graphs are on, and with the step
    cache when asked for (a new one per call: it holds that call's features)."""
    q = models.quality

    def wrap(unet, name):
        if unet is None:
            return None
        if cache_interval > 1:
            if models.graphs is None:
                return step_cache.CachingUNet(unet, cache_interval)
            return models.graphs.caching_unet(unet, name, cache_interval)
        return unet if models.graphs is None else models.graphs.unet(unet, name)

    return wrap(q.base, "base"), wrap(q.refiner, "refiner")


def _quality(models: Models, p: GenerationParams, callback) -> tuple[torch.Tensor, torch.Tensor, dict]:
    q = models.quality
    if q is None:
        raise RuntimeError("The quality models are not loaded; load them with sdxl_fast.load(modes=('quality',))")
    device, dtype, batch = models.device, models.dtype, p.num_images
    use_refiner = p.use_refiner and q.refiner is not None and p.refiner_switch < 1.0
    guided = p.guidance_scale > 1.0

    pos = _encode(models, q.encoders, p.prompt)
    neg = _encode(models, q.encoders, p.negative_prompt)
    # SDXL base was trained with zeroed (not encoded) empty negatives; the refiner was not (model_index.json).
    base_neg = neg.zeros_like() if (q.force_zeros_for_empty_prompt and not p.negative_prompt) else neg
    ids_neg, ids_pos = conditioning.time_ids(p, refiner=False, device=device, dtype=dtype)
    base_inputs = _batched(_inputs(q.base, pos.base_context, pos.pooled, ids_pos),
                           _inputs(q.base, base_neg.base_context, base_neg.pooled, ids_neg) if guided else None,
                           batch)
    refiner_inputs = None
    if use_refiner:
        ids_neg, ids_pos = conditioning.time_ids(p, refiner=True, device=device, dtype=dtype)
        refiner_inputs = _batched(_inputs(q.refiner, pos.hidden_2, pos.pooled, ids_pos),
                                  _inputs(q.refiner, neg.hidden_2, neg.pooled, ids_neg) if guided else None, batch)

    # A fresh scheduler per call: schedulers carry a step counter, and the app may run calls side by side.
    scheduler = EulerDiscreteScheduler.from_config(q.scheduler.config)
    timesteps, switch = schedules.quality_timesteps(scheduler, p.steps, p.refiner_switch if use_refiner else None,
                                                    device=device)
    latent_shape = (q.base.config.in_channels, p.height // 8, p.width // 8)
    latents = sampling.randn(latent_shape, _generators(p.seed, batch), device, dtype) * scheduler.init_noise_sigma
    base, refiner = _unets(models, p.cache_interval)
    latents = sampling.sample_quality(base, refiner, scheduler, latents, timesteps, switch, base_inputs,
                                      refiner_inputs, p.guidance_scale, callback)
    names = dict(q.names) if use_refiner else {"base": q.names["base"]}
    return latents, decoding.to_host(decoding.decode(q.vae, latents))[0], names


def fast_call(f, timesteps: list[int], alphas_cumprod: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
              time_ids: torch.Tensor, noise: torch.Tensor, callback=None, cache_interval: int = 1):
    """The Fast path after the text encoders, as one function of tensors, so a CUDA graph can record it whole.

    alphas_cumprod [1000]; context [1, 77, D], pooled [1, P], time_ids [1, 6]; noise [steps, B, 4, h, w]: the
    start noise, then the noise of each re-noising. Every tensor is an argument, none is closed over: a
    graph reads the memory it was recorded on, and a closed-over tensor of the first call is freed after it.
    Returns (latents [B, 4, h, w], uint8 images [B, H, W, 3], all-finite flag).
    """
    batch = noise.shape[1]
    inputs = _batched(_inputs(f.student, context, pooled, time_ids), None, batch)
    renoise = iter(noise[1:])
    student = f.student if cache_interval == 1 else step_cache.CachingUNet(f.student, cache_interval)
    latents = sampling.sample_fast(student, alphas_cumprod, f.scheduler.config.prediction_type, noise[0],
                                   timesteps, inputs, renoise=lambda: next(renoise), callback=callback)
    pixels = f.vae.decode((latents / f.vae.config.scaling_factor).to(weight_dtype(f.vae))).sample
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


def _fast(models: Models, p: GenerationParams, callback) -> tuple[torch.Tensor, torch.Tensor, dict]:
    f = models.fast
    if f is None:
        raise RuntimeError("The fast models are not loaded; load them with sdxl_fast.load(modes=('fast',))")
    device, dtype, batch = models.device, models.dtype, p.num_images
    timesteps = schedules.student_timesteps(p.steps)
    pos = _encode(models, f.encoders, p.prompt)
    # What follows is host work done while the GPU runs the text encoders; its copies must not wait for them.
    _, ids_pos = conditioning.time_ids(p, refiner=False, device="cpu", dtype=dtype)
    # All the call's noise up front, drawn per image in the order the loop uses it (start, then each
    # re-noising), so image i is the same whatever the batch, graph or not.
    generators = _generators(p.seed, batch)
    latent_shape = (f.student.config.in_channels, p.height // 8, p.width // 8)
    noise = torch.stack([sampling.randn(latent_shape, generators, "cpu", dtype) for _ in timesteps])
    args = (_schedule_on(f.scheduler, device), pos.base_context, pos.pooled, _to_device(ids_pos, device),
            _to_device(noise, device))
    if models.graphs is not None and callback is None:  # callbacks need the loop in Python
        name = ("fast", id(f.student), id(f.vae), weight_dtype(f.vae), tuple(timesteps), p.cache_interval)
        run = partial(fast_call, f, timesteps, cache_interval=p.cache_interval)
        latents, images, finite = models.graphs.run(name, run, *args)
    else:
        latents, images, finite = fast_call(f, timesteps, *args, callback=callback, cache_interval=p.cache_interval)
    images, finite = decoding.to_host(images, finite)
    if not finite:  # decode again the careful way (fp32 VAE fallback, or a clear error)
        images = decoding.to_host(decoding.decode(f.vae, latents))[0]
    return latents, images, dict(f.names)


def _resolved(models: Models, params: GenerationParams) -> GenerationParams:
    """An unset size becomes the loaded models' own (128² for the demo family, not SDXL's 512² or 1024²)."""
    loaded = params.mode in MODES and getattr(models, params.mode) is not None
    return params.resolved(native_side(models, params.mode) if loaded else None)


@torch.no_grad()  # nothing here is trained: no activations kept for a backward pass, whatever the modules ask
def generate_tensors(models: Models, params: GenerationParams, callback: sampling.StepCallback | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`generate` without the PIL step: (final latents [B, 4, h, w] on the models' device, uint8 images
    [B, H, W, 3] on the CPU, model names). Benchmarks compare the latents; `generate` wraps the images."""
    p = _resolved(models, params)
    return (_quality if p.mode == "quality" else _fast)(models, p, callback)


def generate(models: Models, params: GenerationParams, callback: sampling.StepCallback | None = None) -> list[Image.Image]:
    """Make `params.num_images` images. Image i uses seed + i and carries its own `parameters` text in
    `image.info`, which `metadata.save_png` (and Gradio) write into the PNG.

    Raises ValueError for invalid parameters before any work is done. `callback` is called after every
    denoising step; raising from it stops the generation.
    """
    p = _resolved(models, params)
    _, images, names = generate_tensors(models, p, callback)
    out = []
    for i, image in enumerate(decoding.to_pil(images)):
        image.info["parameters"] = metadata.infotext(replace(p, seed=image_seed(p.seed, i), num_images=1), names)
        out.append(image)
    return out
