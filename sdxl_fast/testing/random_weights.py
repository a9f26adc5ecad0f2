"""Random-weight SDXL-shaped model families, saved as real diffusers folders.

No weights can be downloaded on our CI machines, so tests, benchmarks and the demo-model training start from
models built here: `tiny` shapes for CPU tests (seconds), `full` shapes read from the public SDXL configs for
GPU benchmarks (timing depends on shapes, not on weight values). Everything is saved with `save_pretrained`
so the code under test loads it through the same `from_pretrained` calls users hit.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# SDXL's scheduler (base and refiner) and SDXL-Turbo's, as published in their model repos.
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
)
TURBO_SCHEDULER = dict(SDXL_SCHEDULER, timestep_spacing="trailing")
TURBO_SAMPLE_SIZE = 64  # SDXL-Turbo's UNet config: 64 latents = 512² px


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table that the BPE vocabulary is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_files() -> tuple[str, str]:
    """Write CLIP's vocab.json/merges.txt from the BPE file that ships inside open_clip_torch."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(tempfile.mkdtemp(prefix="clip-vocab-"))
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(out / "vocab.json"), str(out / "merges.txt")


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, 77 positions). SDXL's second tokenizer pads with "!"."""
    vocab, merges = _clip_vocab_files()
    return CLIPTokenizer(vocab, merges, model_max_length=77, pad_token=pad_token)


def _text_encoder_config(hidden: int, layers: int, heads: int, projection: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def tiny_configs() -> dict:
    """SDXL's structure at toy width. The two text encoders have different widths on purpose, so that a
    mix-up between them (or between hidden states and pooled output) fails loudly in tests."""
    te1 = _text_encoder_config(hidden=32, layers=2, heads=4, projection=32, act="quick_gelu")
    te2 = _text_encoder_config(hidden=48, layers=2, heads=4, projection=40, act="gelu")
    time_dim = 8
    # sample_size only names the training size (compute does not depend on it): SDXL's 128 latents = 1024² px,
    # so `native_side` and every default size behave as with SDXL (the saved student and turbo: 512²).
    unet_common = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim, norm_num_groups=8,
    )
    base = dict(unet_common, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=40 + 6 * time_dim)
    # The refiner sees only the second encoder and 5 time ids (size, crop, aesthetic score).
    refiner = dict(unet_common, cross_attention_dim=48, projection_class_embeddings_input_dim=40 + 5 * time_dim)
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    return dict(text_encoder=te1, text_encoder_2=te2, unet=base, refiner_unet=refiner, vae=vae)


def full_configs(reference_dir: str | Path) -> dict:
    """The real SDXL shapes, read from the public configs in `benchmarks/sdxl-configs`."""
    ref = Path(reference_dir)

    def read(path: str) -> dict:
        cfg = json.loads((ref / path / "config.json").read_text())
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}

    return dict(
        text_encoder=CLIPTextConfig(**read("base/text_encoder")),
        text_encoder_2=CLIPTextConfig(**read("base/text_encoder_2")),
        unet=read("base/unet"), refiner_unet=read("refiner/unet"), vae=read("base/vae"),
    )


def build_random_components(configs: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> dict:
    """Random-weight SDXL components in memory: text_encoder(_2), tokenizer(_2), vae, unet, refiner_unet.
    Building on the GPU (`device="cuda"`) makes full-size models in seconds instead of minutes."""
    configs = configs or tiny_configs()
    torch.manual_seed(seed)
    with torch.device(device):
        parts = dict(
            text_encoder=CLIPTextModel(configs["text_encoder"]),
            text_encoder_2=CLIPTextModelWithProjection(configs["text_encoder_2"]),
            vae=AutoencoderKL(**configs["vae"]),
            unet=UNet2DConditionModel(**configs["unet"]),
            refiner_unet=UNet2DConditionModel(**configs["refiner_unet"]),
        )
    if dtype != torch.float32:
        for model in parts.values():
            model.to(dtype)
    return dict(parts, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"))


FAMILY = ("base", "refiner", "student", "turbo")


def save_random_family(out_dir: str | Path, configs: dict | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       names: tuple[str, ...] = FAMILY) -> dict[str, Path]:
    """Save base, refiner, UNet-only student and a Turbo-style full pipeline under `out_dir` (those in `names`).

    Returns {"base", "refiner", "student", "turbo"} -> folder. The student starts as a copy of the base
    UNet, as an ADD student does; the turbo folder is a complete few-step pipeline (like sdxl-turbo).
    """
    out = Path(out_dir)
    c = build_random_components(configs, seed, dtype, device)
    te1, te2, tok1, tok2 = c["text_encoder"], c["text_encoder_2"], c["tokenizer"], c["tokenizer_2"]
    vae, unet, refiner_unet = c["vae"], c["unet"], c["refiner_unet"]

    paths = {name: out / name for name in names}
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    ).save_pretrained(paths["base"], safe_serialization=True)
    if "refiner" in names:
        StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2, unet=refiner_unet,
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        ).save_pretrained(paths["refiner"], safe_serialization=True)
    unet.register_to_config(sample_size=TURBO_SAMPLE_SIZE)  # trained at 512², like SDXL-Turbo
    if "student" in names:
        unet.save_pretrained(paths["student"], safe_serialization=True)
    if "turbo" in names:
        StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
            scheduler=EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER),
        ).save_pretrained(paths["turbo"], safe_serialization=True)
    return paths
