import logging

import torch
from diffusers import AutoencoderKL

from sdxl_fast.pipeline.decoding import decode, latent_preview


def test_fp16_overflow_is_decoded_again_in_fp32(tiny_family, caplog):
    vae = AutoencoderKL.from_pretrained(tiny_family["base"], subfolder="vae", torch_dtype=torch.float16)
    with torch.no_grad():  # large activations in the first decoder conv overflow fp16, not fp32
        vae.decoder.conv_in.weight.mul_(3e4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    raw = vae.decode((latents / vae.config.scaling_factor).half()).sample
    assert not torch.isfinite(raw).all()  # the VAE really overflows

    with caplog.at_level(logging.WARNING):
        images = decode(vae, latents)
    assert "overflowed" in caplog.text
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.uint8
    assert vae.dtype == torch.float32
    assert images.float().std() > 0  # a real image, not a constant fill


def test_previews_are_images_of_the_requested_size():
    latents = torch.randn(2, 4, 8, 12)
    previews = latent_preview(latents, size=(96, 64))
    assert len(previews) == 2 and previews[0].size == (96, 64) and previews[0].mode == "RGB"
    assert latent_preview(latents)[0].size == (12, 8)


@torch.no_grad()
def test_vae_attention_as_matmuls_decodes_like_sdpa():
    """acceleration's vae_matmul_attention: diffusers' AttnProcessor in place of SDPA, same images."""
    from diffusers.models.attention_processor import AttnProcessor

    from sdxl_fast.testing import random_weights

    torch.manual_seed(0)
    vae = AutoencoderKL(**random_weights.tiny_configs()["vae"]).eval()
    latents = torch.randn(2, 4, 8, 8)
    want = vae.decode(latents).sample
    assert vae.attn_processors  # the mid block's attention
    vae.set_attn_processor(AttnProcessor())
    assert torch.allclose(vae.decode(latents).sample, want, atol=1e-5, rtol=0)
