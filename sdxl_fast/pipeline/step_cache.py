"""Caching between denoising steps (DeepCache, Ma et al. 2023). Opt-in: it changes the output.

A UNet's deep features change little from one denoising step to the next. So on a full step we keep what
enters the last up block (the work of every level below the outermost), and on the cached steps after it run
only the outermost level: the time embedding, `conv_in`, the first down block without its downsampler, the
last up block fed with the kept features, and the output head. For SDXL that level is 7–9 % of a step's FLOPs.

`GenerationParams.cache_interval` = N runs a full step, then N - 1 cached ones, and so on; each UNet of a
call (base, refiner, student) starts with a full step. N = 1 is the plain UNet. It suits many-step sampling:
at N = 2 the demo teacher's 50-step scores do not move, while its 4-step sampling and the ADD student lose
much accuracy (docs/DEMO_MODELS.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import sampling


class _KeepDeep:
    """Forward pre-hook on the last up block: keeps its input. Under torch.compile it is traced into the
    graph, and setting the attribute is replayed as a side effect."""

    def __init__(self):
        self.deep: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        # Detached: a UNet being trained must not keep its autograd graph alive (nor refuse deepcopy).
        self.deep = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()


def prepare(unet) -> _KeepDeep:
    """The hook of this UNet, registered on first use. `sdxl_fast.accel.apply` registers it before compiling, and
    it stays: adding or removing a hook makes a compiled UNet compile again (minutes at 1024²). A compiled
    UNet's plain calls then leave their last features here: one activation per UNet."""
    keeper = getattr(unet, "_sdxl_fast_keep_deep", None)
    if keeper is None:
        keeper = _KeepDeep()
        unet.up_blocks[-1].register_forward_pre_hook(keeper, with_kwargs=True)
        unet._sdxl_fast_keep_deep = keeper
    return keeper


def full_step(unet, latents, timestep, context, pooled, time_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole UNet, diffusers' own forward: (output [B, 4, h, w], deep features [B, C, h, w])."""
    keeper = prepare(unet)
    out = sampling.unet_forward(unet, latents, timestep, context, pooled, time_ids)
    deep, keeper.deep = keeper.deep, None  # not kept past the call: it belongs to the caller now
    return out, deep


def cached_step(unet, latents, timestep, context, pooled, time_ids, deep) -> torch.Tensor:
    """The outermost level only, with `deep` from an earlier full step in place of everything below it.
    Written after diffusers' UNet2DConditionModel.forward for SDXL's options (text_time embedding, no
    adapters or ControlNet); with `deep` from the same inputs it equals the whole UNet."""
    added = {"text_embeds": pooled, "time_ids": time_ids}
    emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timestep))
    emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)

    x = unet.conv_in(latents)
    skips = [x]
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None) or [None] * len(first.resnets)
    for resnet, attention in zip(first.resnets, attentions):
        x = resnet(x, emb)
        if attention is not None:
            x = attention(x, encoder_hidden_states=context, return_dict=False)[0]
        skips.append(x)

    last = unet.up_blocks[-1]
    cross = {"encoder_hidden_states": context} if getattr(last, "has_cross_attention", False) else {}
    x = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips), **cross)
    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x)


def cached_step_for(unet):
    """`cached_step`, or the compiled version `sdxl_fast.accel` attached to a compiled UNet: compiling the UNet
    does not reach a function that calls its blocks directly."""
    return getattr(unet, "_sdxl_fast_cached_step", None) or cached_step


class StepCache:
    """A denoiser (`sampling.Denoiser`) that runs `full(x, t) -> (output, deep features)` on every
    `interval`-th call, the first included, and `cached(x, t, deep) -> output` on the calls in between.
    One per UNet and generation: it holds that generation's deep features."""

    def __init__(self, full: Callable, cached: Callable, interval: int):
        self.full, self.cached, self.interval = full, cached, interval
        self.calls = 0
        self.deep: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.calls % self.interval == 0:
            out, self.deep = self.full(x, t)
        else:
            out = self.cached(x, t, self.deep)
        self.calls += 1
        return out
