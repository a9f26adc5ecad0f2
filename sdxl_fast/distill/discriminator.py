"""The ADD discriminator: a frozen DINOv2 ViT feature network with one small trainable head per chosen block.

Each head reads its block's tokens [B, N, C] as a 1-D sequence (channels C, length N) and gives one logit per
token, conditioned by projection (Miyato & Koyama 2018) on a map computed from the text embedding (pooled)
and an image embedding. Two head designs (`disc_head`):

* "stylegan_t" (default): StyleGAN-T's DiscHead (Sauer et al. 2023, the discriminator ADD uses): a kernel-1
  block and a residual kernel-9 block, each a spectrally normalised Conv1d, BatchNormLocal (batch statistics
  over virtual batches of `disc_virtual_batch` samples) and LeakyReLU(0.2), the residual sum scaled by
  1/sqrt(2); a spectrally normalised kernel-1 projection to the conditioning width; full width (the feature
  network's, 384 for ViT-S) by default.
* "plain": plain Conv1d, no normalisation, an unscaled residual: the shipped demo student's recipe, and an
  ablation arm.

Because BatchNormLocal mixes samples, real and fake images must never share a virtual batch:
`discriminate_real_fake` runs the heads on each half separately.

Only the heads train. The backbone is kept outside the heads module, so it is never handed to an optimiser
or wrapped by DDP, and its parameters have requires_grad False: gradients flow *through* it to the images
(for the student and for R1) but never *into* it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment

# DINOv2 was trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNetworkError(RuntimeError):
    """The discriminator's feature network weights could not be found."""


def load_backbone(name: str, weights: str, image_size: int, **kwargs) -> nn.Module:
    """A frozen timm ViT. `weights`: "hub" (timm's pretrained download), a local state-dict file
    (.safetensors, or .pth/.bin read with weights_only), or "random" (tests and benchmarks only)."""
    import timm

    if weights == "random":
        model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0, **kwargs)
    elif weights == "hub":
        cached = _hub_cached_weights(name)
        if cached is not None:  # already downloaded once: no network needed
            return load_backbone(name, cached, image_size, **kwargs)
        why = _hub_unavailable()
        if why is None:
            try:
                model = timm.create_model(name, pretrained=True, img_size=image_size, num_classes=0, **kwargs)
            except Exception as exc:  # network errors come in many types (OSError, HTTP, hub errors)
                why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            raise FeatureNetworkError(
                f"Could not get the discriminator feature network {name!r} from the Hugging Face Hub ({why}). "
                "Pass a local weights file with --disc_weights PATH (a timm state dict, .safetensors or .pth)."
            )
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FeatureNetworkError(
                f"Discriminator weights file {str(path)!r} does not exist. Use --disc_weights hub to download "
                f"{name!r} with timm, or point at a local timm state dict (.safetensors or .pth)."
            )
        model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0, **kwargs)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # timm's own checkpoint filter maps DINOv2's original key names and resizes position embeddings.
        from timm.models.vision_transformer import checkpoint_filter_fn

        model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    return model.eval().requires_grad_(False)


def _hub_cached_weights(name: str) -> str | None:
    """The timm checkpoint in the local Hugging Face cache, if it was downloaded before."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not repo:
        return None
    path = try_to_load_from_cache(repo, "model.safetensors")
    return path if isinstance(path, str) else None


def _hub_unavailable() -> str | None:
    """Why a download cannot work, decided in seconds rather than after huggingface_hub's retries."""
    from sdxl_fast.loading import hub_offline, hub_reachable

    if hub_offline():
        return "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "not in the Hugging Face cache, and the Hugging Face Hub is unreachable"
    return None


class DiscriminatorHead(nn.Module):
    """The "plain" head: tokens [B, N, C] + condition [B, E] -> logits [B, N]."""

    def __init__(self, in_channels: int, channels: int, cond_dim: int, cond_in: int):
        super().__init__()
        self.inp = nn.Conv1d(in_channels, channels, kernel_size=1)
        # A residual conv with a wide kernel mixes neighbouring tokens (StyleGAN-T uses kernel 9, circular).
        self.mix = nn.Conv1d(channels, channels, kernel_size=9, padding=4, padding_mode="circular")
        self.out = nn.Conv1d(channels, cond_dim, kernel_size=1)
        self.cond = nn.Linear(cond_in, cond_dim)
        self.cond_dim = cond_dim

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor, parts: int = 1) -> torch.Tensor:
        h = F.leaky_relu(self.inp(tokens.transpose(1, 2)), 0.2)  # [B, channels, N]; no batch statistics
        h = h + F.leaky_relu(self.mix(h), 0.2)
        h = self.out(h)  # [B, cond_dim, N]
        cmap = self.cond(condition)  # [B, cond_dim]
        # Projection conditioning: logit_n = <h_n, cmap> / sqrt(cond_dim).
        return torch.einsum("bcn,bc->bn", h, cmap) / self.cond_dim**0.5


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv1d:
    """A Conv1d whose weight (viewed as [out, in·kernel]) is divided by its largest singular value, estimated by
    one power iteration per training forward (Miyato et al. 2018; torch's parametrization, as StyleGAN-T's
    SpectralConv1d). Circular padding keeps the sequence length, as in StyleGAN-T."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.parametrizations.spectral_norm(conv)


class BatchNormLocal(nn.Module):
    """Batch normalisation over virtual batches: each of `parts` equal slices of the batch (1: the whole batch)
    is cut into ceil(size / virtual_batch) groups of about equal size, and each group is normalised per channel
    with its own mean and variance over samples and tokens. No running statistics: training and evaluation
    both use the batch at hand. [B, C, N] -> [B, C, N]."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:
        out = []
        for part in x.chunk(parts):
            for group in torch.tensor_split(part, -(-part.shape[0] // self.virtual_batch)):  # ceil
                mean = group.mean(dim=(0, 2), keepdim=True)
                var = group.var(dim=(0, 2), keepdim=True, unbiased=False)
                out.append((group - mean) * torch.rsqrt(var + self.eps))
        x = torch.cat(out) if len(out) > 1 else out[0]
        return x * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


class ConvBlock(nn.Module):
    """Spectrally normalised Conv1d -> BatchNormLocal -> LeakyReLU(0.2); with `residual`,
    (x + block(x)) / sqrt(2), which keeps the variance of the sum that of its terms."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int, virtual_batch: int, residual: bool):
        super().__init__()
        if residual and in_channels != channels:
            raise ValueError("a residual block keeps its width")
        self.conv = spectral_conv1d(in_channels, channels, kernel_size)
        self.norm = BatchNormLocal(channels, virtual_batch)
        self.residual = residual

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:
        h = F.leaky_relu(self.norm(self.conv(x), parts), 0.2)
        return (x + h) / math.sqrt(2) if self.residual else h


class StyleGANTHead(nn.Module):
    """StyleGAN-T's DiscHead: tokens [B, N, C] + condition [B, E] -> logits [B, N].

    A kernel-1 block from the feature width C to `channels` (StyleGAN-T: channels = C), a residual kernel-9
    block, and a kernel-1 spectral convolution to the conditioning width. `parts`: the batch is that many
    equal slices that BatchNormLocal normalises apart (real and fake images)."""

    def __init__(self, in_channels: int, channels: int, cond_dim: int, cond_in: int, virtual_batch: int = 8):
        super().__init__()
        self.inp = ConvBlock(in_channels, channels, 1, virtual_batch, residual=False)
        self.mix = ConvBlock(channels, channels, 9, virtual_batch, residual=True)
        self.out = spectral_conv1d(channels, cond_dim, 1)
        # The conditioning map is an ordinary linear layer (StyleGAN-T's cmapper is not spectrally normalised).
        self.cond = nn.Linear(cond_in, cond_dim)
        self.cond_dim = cond_dim

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor, parts: int = 1) -> torch.Tensor:
        h = self.mix(self.inp(tokens.transpose(1, 2), parts), parts)  # [B, channels, N]
        h = self.out(h)  # [B, cond_dim, N]
        cmap = self.cond(condition)  # [B, cond_dim]
        # Projection conditioning: logit_n = <h_n, cmap> / sqrt(cond_dim).
        return torch.einsum("bcn,bc->bn", h, cmap) / self.cond_dim**0.5


HEADS = ("stylegan_t", "plain")


class DiscriminatorHeads(nn.Module):
    """The trainable part: one head per feature block. Features: list of [B, N, C]; output [B, sum N].

    The condition is cat(text embedding, image embedding) mapped by one linear layer, i.e. the sum of a text
    projection and an image projection."""

    def __init__(self, n_heads: int, feature_dim: int, channels: int, cond_dim: int, cond_in: int,
                 kind: str = "stylegan_t", virtual_batch: int = 8):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"Unknown disc_head {kind!r} ({' | '.join(HEADS)})")
        channels = channels or feature_dim  # 0: the feature network's own width, as StyleGAN-T
        if kind == "plain":
            make = lambda: DiscriminatorHead(feature_dim, channels, cond_dim, cond_in)  # noqa: E731
        else:
            make = lambda: StyleGANTHead(feature_dim, channels, cond_dim, cond_in, virtual_batch)  # noqa: E731
        self.kind = kind
        self.heads = nn.ModuleList(make() for _ in range(n_heads))

    def forward(self, features: list[torch.Tensor], condition: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """`parts`: the batch is that many equal slices whose batch statistics are kept apart."""
        return torch.cat([head(f, condition, parts) for head, f in zip(self.heads, features)], dim=1)


class FeatureNetwork(nn.Module):
    """Frozen ViT: images in [-1, 1] at any size -> tokens of the chosen blocks, and a CLS image embedding."""

    def __init__(self, backbone: nn.Module, blocks: tuple[int, ...], image_size: int):
        super().__init__()
        depth = len(backbone.blocks)
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"disc_blocks {bad} out of range for a backbone with {depth} blocks")
        self.backbone, self.blocks, self.image_size = backbone, tuple(blocks), image_size
        # R1 differentiates D's input gradient again (double backward), which PyTorch's fused SDPA kernels
        # do not implement; timm's plain attention does. At 224 px (256 tokens) the cost is small.
        for block in backbone.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        return ((x + 1) / 2 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (tokens of each chosen block [B, N, C] without the prefix (CLS) tokens, final CLS [B, C])."""
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(self.preprocess(images)))))
        prefix = getattr(vit, "num_prefix_tokens", 1)
        features = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in self.blocks:
                features.append(x[:, prefix:])
        return features, vit.norm(x)[:, 0]

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The CLS embedding [B, C] of (real) images, used to condition the heads; no gradient."""
        return self.forward(images)[1]


def build_discriminator(cfg, text_dim: int) -> tuple[FeatureNetwork, DiscriminatorHeads]:
    """(frozen feature network, trainable heads) from the config; heads are conditioned on
    cat(pooled text embedding [text_dim], image embedding [feature dim])."""
    backbone = load_backbone(cfg.disc_backbone, cfg.disc_weights, cfg.disc_image_size, **cfg.disc_backbone_kwargs)
    features = FeatureNetwork(backbone, cfg.disc_blocks, cfg.disc_image_size)
    heads = DiscriminatorHeads(len(cfg.disc_blocks), features.dim, cfg.disc_head_channels, cfg.disc_cond_dim,
                               cond_in=text_dim + features.dim, kind=cfg.disc_head,
                               virtual_batch=cfg.disc_virtual_batch)
    return features, heads


def image_condition(image_emb: torch.Tensor, saw_image: torch.Tensor, mode: str) -> torch.Tensor:
    """The image embedding D is conditioned on, per sample: image_emb [B, C] where the student's input showed
    the real image (saw_image [B], bool) or mode is "all", zeros elsewhere. A student that started from pure
    noise cannot match one particular image, so conditioning D on it only teaches D to tell such fakes by it."""
    if mode == "all":
        return image_emb
    return image_emb * saw_image.view(-1, 1).to(image_emb.dtype)


def discriminate(features: FeatureNetwork, heads: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                 image_emb: torch.Tensor, augmentation: augment.Draw | None = None) -> torch.Tensor:
    """D(augmented images | text, image embedding) -> logits [B, K]. All B images share the heads' batch
    statistics (stylegan_t heads): pass real and fake images through `discriminate_real_fake` instead."""
    if augmentation is not None:
        images = augment.apply(images, augmentation)
    tokens, _ = features(images)
    return heads(tokens, torch.cat([text_emb.float(), image_emb.float()], dim=1))


def discriminate_real_fake(features: FeatureNetwork, heads: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                           text_emb: torch.Tensor, image_emb: torch.Tensor,
                           augmentation: augment.Draw | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(real), D(fake)), logits [B, K] each, for B real and B fake images with the same conditioning [B, ...];
    real image i and fake image i get the same augmentation (one `augment.draw` for B samples).

    One forward pass of [real; fake] (so DDP sees one forward per backward), in which BatchNormLocal normalises
    the two halves apart: batch statistics over a mix of reals and fakes would let D tell them apart by the
    batch they are in rather than by what they show."""
    images = torch.cat([real, fake])
    if augmentation is not None:
        images = augment.apply(images, augment.repeat(augmentation, 2))
    tokens, _ = features(images)
    condition = torch.cat([text_emb.float(), image_emb.float()], dim=1).repeat(2, 1)
    return heads(tokens, condition, 2).chunk(2)
