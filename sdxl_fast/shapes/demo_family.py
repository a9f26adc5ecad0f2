"""The demo model family's architecture, in one place: small SDXL-shaped models for 128² shapes images.

Sizes are set by the shipping budget (all five models in fp16 ≤ 25 MB, see docs/DEMO_MODELS.md):

| part | what | parameters |
|---|---|---|
| text_encoder | CLIPTextModel, hidden 32, 4 layers, trained on caption labels, then frozen | ~1.6 M (1.58 M of it the 49408-token embedding) |
| text_encoder_2 | CLIPTextModelWithProjection, hidden 32, 4 layers, projection 32, likewise | ~1.6 M |
| vae | AutoencoderKL, 4 latent channels, 8x down (128² -> 16²) | ~0.6 M |
| unet (base, student) | UNet2DConditionModel, SDXL layout (down: plain, attn, attn), text_time conditioning | ~2.6 M |
| refiner_unet | same layout, narrower, context = text_encoder_2 only, 5 time ids | ~1.2 M |

The text encoders are trained once on the captions' labels and then frozen (shapes/text_pretrain.py says
why: at random init, UNets trained on their embeddings hardly followed colour words).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_fast.testing.random_weights import clip_tokenizer

RESOLUTION = 128  # the shapes data resolution; latents are RESOLUTION // 8 = 16 px
LATENT_SIZE = RESOLUTION // 8
TEXT_HIDDEN = 32  # each encoder's width; the base context is their concatenation (64)
POOLED_DIM = 32  # text_encoder_2's projection: the pooled embedding both UNets read
TIME_EMBED_DIM = 32  # sinusoidal width of each micro-conditioning id (SDXL: 256)
ENCODER_SEED = 0  # the text encoders' initialisation, before their label training


def text_encoder_config(act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=POOLED_DIM, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 48, 48), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=RESOLUTION,
        scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents at the end of the vae stage
        force_upcast=False,  # a small VAE trained with bf16 autocast decodes fine in fp16
    )


def _unet_common(block_out_channels, layers_per_block, heads) -> dict:
    # SDXL's layout at toy width: no attention at the highest resolution, cross-attention below it.
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=heads,  # diffusers reads this as the number of heads (the SDXL config quirk)
        transformer_layers_per_block=1, use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
    )


def base_unet_config() -> dict:
    """Context = cat(hidden_1, hidden_2); added embedding = pooled + 6 time ids (size, crop, target)."""
    return dict(_unet_common((32, 64, 64), 2, (1, 2, 2)), cross_attention_dim=2 * TEXT_HIDDEN,
                projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM)


def refiner_unet_config() -> dict:
    """SDXL refiner conditioning: context = hidden_2 only; 5 time ids (size, crop, aesthetic score)."""
    return dict(_unet_common((32, 48, 64), 1, (1, 2, 2)), cross_attention_dim=TEXT_HIDDEN,
                projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_EMBED_DIM)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**vae_config())


def build_base_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**base_unet_config())


def build_refiner_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**refiner_unet_config())


def build_text_encoders(seed: int = ENCODER_SEED) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """The two encoders at their random initialisation (SDXL: quick_gelu CLIP-L, gelu OpenCLIP-bigG), frozen;
    the encoders stage trains them (shapes/text_pretrain.py)."""
    torch.manual_seed(seed)
    te1 = CLIPTextModel(text_encoder_config("quick_gelu"))
    te2 = CLIPTextModelWithProjection(text_encoder_config("gelu"))
    return te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


def tokenizers():
    """(tokenizer, tokenizer_2): the real CLIP BPE; the second pads with "!" as SDXL's does."""
    return clip_tokenizer(), clip_tokenizer(pad_token="!")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
