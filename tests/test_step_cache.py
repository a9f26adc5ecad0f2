"""The step cache (DeepCache): the cached step is the UNet's outer level, exactly, and the loops use it on the
steps they should."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from sdxl_fast import GenerationParams, generate
from sdxl_fast.accel.compile import compile_models
from sdxl_fast.pipeline import step_cache
from sdxl_fast.testing import random_weights


@pytest.fixture(scope="module", params=["unet", "refiner_unet"])
def unet_and_inputs(request):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**random_weights.tiny_configs()[request.param]).eval()
    batch, time_ids = 2, 6 if request.param == "unet" else 5
    inputs = (torch.randn(batch, 4, 16, 24), torch.tensor(500),
              torch.randn(batch, 77, unet.config.cross_attention_dim), torch.randn(batch, 40),
              torch.randn(batch, time_ids))
    return unet, inputs


def _unet(unet, latents, t, context, pooled, time_ids):
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


@torch.no_grad()
def test_cached_step_with_the_same_inputs_equals_the_whole_unet(unet_and_inputs):
    unet, inputs = unet_and_inputs
    want = _unet(unet, *inputs)
    out, deep = step_cache.full_step(unet, *inputs)
    assert torch.equal(out, want)
    assert deep.shape[0] == 2 and deep.shape[-2:] == (16, 24)  # the outer level's resolution
    assert torch.allclose(step_cache.cached_step(unet, *inputs, deep), want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_cached_step_reuses_the_deep_features_and_recomputes_the_outer_level(unet_and_inputs):
    unet, (latents, t, *rest) = unet_and_inputs
    _, deep = step_cache.full_step(unet, latents, t, *rest)
    other = latents + 0.5 * torch.randn_like(latents)
    cached = step_cache.cached_step(unet, other, torch.tensor(400), *rest, deep)
    assert not torch.allclose(cached, _unet(unet, latents, t, *rest))  # the new latents and timestep count
    assert not torch.allclose(cached, _unet(unet, other, torch.tensor(400), *rest))  # but not the deep levels


@torch.no_grad()
def test_caching_unet_runs_every_nth_call_in_full(unet_and_inputs, monkeypatch):
    unet, (latents, t, context, pooled, time_ids) = unet_and_inputs
    kinds = []
    caching = step_cache.StepCache(
        lambda x, t: kinds.append("full") or step_cache.full_step(unet, x, t, context, pooled, time_ids),
        lambda x, t, deep: kinds.append("cached") or step_cache.cached_step(unet, x, t, context, pooled, time_ids, deep),
        3)
    for _ in range(7):
        out = caching(latents, t)
        assert out.shape == latents.shape
    assert kinds == ["full", "cached", "cached"] * 2 + ["full"]


def _pixels(models, **kw):
    return [np.asarray(im) for im in generate(models, GenerationParams("a red fox", seed=3, width=64, height=64, **kw))]


@pytest.mark.parametrize("mode,steps", [("quality", 6), ("fast", 4)])
def test_generate_with_the_cache_differs_only_when_a_step_is_cached(tiny_models, mode, steps):
    plain = _pixels(tiny_models, mode=mode, steps=steps)
    assert all(np.array_equal(a, b) for a, b in zip(plain, _pixels(tiny_models, mode=mode, steps=steps,
                                                                    cache_interval=1)))
    cached = _pixels(tiny_models, mode=mode, steps=steps, cache_interval=2)
    assert not all(np.array_equal(a, b) for a, b in zip(plain, cached))
    # Interval >= steps: every UNet's only or first step is a full one, so nothing is cached.
    one_step = dict(mode="fast", steps=1) if mode == "fast" else dict(mode="quality", steps=2, refiner_switch=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(tiny_models, **one_step),
                                                    _pixels(tiny_models, **one_step, cache_interval=4)))


@pytest.mark.parametrize("bad", [0, 11, 2.0, "2"])
def test_a_bad_cache_interval_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="cache_interval"):
        GenerationParams("x", cache_interval=bad).resolved()


def test_the_cached_step_is_compiled_when_the_unet_is(unet_and_inputs):
    unet, _ = unet_and_inputs
    assert step_cache.cached_step_for(unet) is step_cache.cached_step
    compiled = UNet2DConditionModel(**random_weights.tiny_configs()["unet"])
    compile_models([compiled], [], [], mode=None)  # as sdxl_fast.accel compiles; lazy: nothing until a call
    assert step_cache.cached_step_for(compiled) is not step_cache.cached_step
