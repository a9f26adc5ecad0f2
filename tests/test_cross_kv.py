"""Hoisted cross-attention keys and values: one matmul per call gives the UNet's own output, adds no weights,
and the loops pass the projected context."""

from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdxl_fast import GenerationParams, load
from sdxl_fast.accel import cross_kv
from sdxl_fast.testing import random_weights
from sdxl_fast.accel.options import Acceleration, apply
from sdxl_fast.pipeline.generate import generate_tensors


def _unet(unet, latents, context, time_ids):
    added = {"text_embeds": torch.ones(latents.shape[0], 40), "time_ids": time_ids}
    return unet(latents, torch.tensor(500), encoder_hidden_states=context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name, n_time_ids", [("unet", 6), ("refiner_unet", 5)])
@torch.no_grad()
def test_hoisted_unet_equals_the_plain_one_and_shares_its_weights(name, n_time_ids):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**random_weights.tiny_configs()[name]).eval()
    latents, time_ids = torch.randn(2, 4, 16, 16), torch.randn(2, n_time_ids)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    want = _unet(unet, latents, context, time_ids)

    unet.fuse_qkv_projections()
    n_params = sum(p.numel() for p in unet.parameters())
    layers = cross_kv.hoist(unet)
    assert layers == sum(1 for m in unet.modules() if getattr(m, "is_cross_attention", False)) > 0
    assert cross_kv.hoist(unet) == layers  # a second call changes nothing
    assert sum(p.numel() for p in unet.parameters()) == n_params  # the layers' weights are views of one matrix
    wide = cross_kv.project(unet, context)
    assert wide.shape == (2, 77, unet._sdxl_fast_kv_weight.shape[0])
    assert torch.allclose(_unet(unet, latents, wide, time_ids), want, atol=1e-5, rtol=0)
    # Ordinary text states still work: each layer projects them with its own (shared) weight.
    assert torch.allclose(_unet(unet, latents, context, time_ids), want, atol=1e-5, rtol=0)
    assert not any("kv_weight" in name for name in unet.state_dict())  # nothing extra is saved
    unet.to(torch.float64)  # moving the UNet moves the shared matrix with it
    got = _unet(unet, latents.double(), cross_kv.project(unet, context.double()), time_ids.double())
    assert torch.allclose(got.float(), want, atol=1e-5, rtol=0)


def test_hoist_refuses_unfused_projections_and_project_passes_plain_unets_through():
    unet = UNet2DConditionModel(**random_weights.tiny_configs()["unet"])
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        cross_kv.hoist(unet)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    assert cross_kv.project(unet, context) is context


@pytest.mark.parametrize("params", [
    GenerationParams("a tower", mode="fast", steps=3, seed=2, width=64, height=64),
    GenerationParams("a tower", mode="quality", steps=6, seed=2, width=64, height=64, refiner_switch=0.5),
    GenerationParams("a tower", mode="quality", steps=6, seed=2, width=64, height=64, cache_interval=2),
])
def test_generate_with_hoisted_keys_and_values_matches_without(tiny_sources, params):
    hoisted_options = Acceleration(channels_last=False, subpixel_upsample=False, cuda_graphs=False, compile=False)
    plain, hoisted = load(sources=tiny_sources, device="cpu"), load(sources=tiny_sources, device="cpu")
    apply(plain, replace(hoisted_options, hoist_cross_kv=False))
    apply(hoisted, hoisted_options)
    widths = []
    for unet in (hoisted.quality.base, hoisted.quality.refiner, hoisted.fast.student):
        unet.register_forward_pre_hook(lambda m, args, kwargs: widths.append(
            kwargs["encoder_hidden_states"].shape[-1] == m._sdxl_fast_kv_weight.shape[0]), with_kwargs=True)
    want, _, _ = generate_tensors(plain, params)
    got, _, _ = generate_tensors(hoisted, params)
    assert widths and all(widths)  # every step got the projected keys and values, not the text states
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
