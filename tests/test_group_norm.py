import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdxl_fast.accel import group_norm
from sdxl_fast.testing import random_weights
from sdxl_fast.accel.options import Acceleration, apply
from benchmarks.bench import build_models


@pytest.mark.parametrize("shape, channels_last, affine", [((2, 64, 8, 8), True, True), ((2, 64, 8, 8), False, False),
                                                          ((1, 32, 100), False, True)])
def test_equals_torch_group_norm(shape, channels_last, affine):
    torch.manual_seed(0)
    # Channel means far from zero, as after a convolution with a bias.
    x = torch.randn(shape) * 3 + torch.randn(1, shape[1], *[1] * (len(shape) - 2)) * 50
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    reference = nn.GroupNorm(8, shape[1], eps=1e-6, affine=affine)
    if affine:
        nn.init.normal_(reference.weight)
        nn.init.normal_(reference.bias)
    model = nn.Sequential(copy.deepcopy(reference))
    assert group_norm.convert(model) == 1 and group_norm.convert(model) == 0  # converts once
    assert isinstance(model[0], group_norm.ChannelsLastGroupNorm)
    out = model(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    half = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), F.group_norm(x, 8, reference.weight, reference.bias, 1e-6),
                               rtol=0.02, atol=0.05)


def test_shares_the_parameters_and_survives_torch_compile():
    model = nn.Sequential(nn.GroupNorm(4, 16))
    weight = model[0].weight
    group_norm.convert(model)
    assert model[0].weight is weight and [p for p in model.parameters()] == [weight, model[0].bias]
    x = torch.randn(1, 16, 6, 6).to(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_acceleration_option_converts_the_unets_and_vae_and_keeps_the_output():
    device = torch.device("cpu")
    models = build_models(random_weights.build_random_components(), device, torch.float32)
    latents = torch.randn(1, 4, 8, 8)
    before = models.fast.vae.decode(latents).sample
    expected = sum(isinstance(m, nn.GroupNorm) for m in models.fast.vae.modules())
    notes = apply(models, replace(Acceleration.none(), group_norm_rewrite=True))
    assert any(note.startswith("group_norm_rewrite: ") for note in notes)
    assert sum(isinstance(m, group_norm.ChannelsLastGroupNorm) for m in models.fast.vae.modules()) == expected > 0
    assert not any(type(m) is nn.GroupNorm for m in models.fast.student.modules())
    torch.testing.assert_close(models.fast.vae.decode(latents).sample, before, rtol=1e-4, atol=1e-4)


def test_unet_probe_counts_inductor_kernels_named_after_convolutions_as_triton():
    from benchmarks.unet_probe import category
    assert category("triton_per_fused_clone_convolution_native_group_norm_silu_50") == "triton (fused elementwise/norm)"
    assert category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert category("pytorch_flash::flash_fwd_kernel") == "attention"
