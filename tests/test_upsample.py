"""The upsampler rewrite (sdxl_fast.accel.upsample) computes what diffusers' Upsample2D computes."""

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from sdxl_fast.accel.upsample import SubpixelUpsample, convert


@pytest.mark.parametrize("in_ch,out_ch,h,w", [(8, 8, 7, 9), (8, 16, 4, 4), (16, 8, 1, 3)])
def test_matches_nearest_upsample_then_conv(in_ch, out_ch, h, w):
    torch.manual_seed(0)
    upsample = Upsample2D(in_ch, use_conv=True, out_channels=out_ch)
    x = torch.randn(2, in_ch, h, w)
    with torch.no_grad():
        want = upsample(x)
        got = SubpixelUpsample(upsample)(x)
        got_channels_last = SubpixelUpsample(upsample).to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last))
    assert got.shape == want.shape == (2, out_ch, 2 * h, 2 * w)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert (got_channels_last - want).abs().max() < 1e-5 * want.abs().max()
    # each keeps its input's layout: an NCHW output after channels_last layers slows every kernel that mixes them
    assert got.is_contiguous() and got_channels_last.is_contiguous(memory_format=torch.channels_last)


def test_an_output_size_other_than_twice_the_input_uses_the_original():
    """diffusers' UNet asks for an explicit size when the latent side is not a multiple of its downsampling."""
    upsample = Upsample2D(8, use_conv=True)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(SubpixelUpsample(upsample)(x, (11, 11)), upsample(x, (11, 11)))
        assert (SubpixelUpsample(upsample)(x, (10, 10)) - upsample(x, (10, 10))).abs().max() < 1e-5


def test_convert_rewrites_a_vae_decoder_once_and_keeps_its_output(tiny_family):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_family["base"], subfolder="vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
        assert convert(vae) == 3 and convert(vae) == 0  # a converted model is left alone
        got = vae.decode(z).sample
    assert sum(isinstance(m, SubpixelUpsample) for m in vae.modules()) == 3
    assert (got - want).abs().max() < 1e-5


def test_other_upsamplers_are_left_alone():
    transpose = torch.nn.Sequential(Upsample2D(8, use_conv_transpose=True), Upsample2D(8, use_conv=False))
    assert convert(transpose) == 0
