"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020), as StyleGAN-T
uses it in front of its frozen ViT: "color" (brightness, saturation, contrast), "translation" (shift by up to
1/8 of the side, zero fill) and "cutout" (a zeroed square of half the side).

Every transform is drawn once per step (`draw`) and applied by `apply` to real and fake images alike: image i
of the real batch and image i of the fake batch get the same brightness, shift and hole. Each transform is
differentiable in the images, so the student's adversarial gradient and R1's input gradient pass through it.
Images are [B, 3, H, W] in about [-1, 1]; real and fake batches have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # largest shift, as a share of the side (DiffAugment's default)
CUTOUT_RATIO = 0.5  # side of the hole, as a share of the image side


def parse_policy(policy: str) -> tuple[str, ...]:
    """"color,translation,cutout" -> ("color", "translation", "cutout"); "" -> () (off)."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"Unknown disc_augment policy {unknown} (choose from {', '.join(POLICIES)}; empty: off)")
    return names


@dataclass
class Draw:
    """One step's random transform, per sample; None for a policy that is off. Shifts and hole centres are
    shares of the side in [-1, 1] and [0, 1), turned into pixels by `apply` for the images' size."""

    brightness: torch.Tensor | None = None  # [B] added, in [-0.5, 0.5)
    saturation: torch.Tensor | None = None  # [B] factor, in [0, 2)
    contrast: torch.Tensor | None = None  # [B] factor, in [0.5, 1.5)
    shift: torch.Tensor | None = None  # [B, 2] (y, x) as a share of TRANSLATION_RATIO·side, in [-1, 1]
    hole: torch.Tensor | None = None  # [B, 2] (y, x) centre of the cutout as a share of the side, in [0, 1)


def draw(policy: tuple[str, ...] | str, batch: int, device) -> Draw:
    """A random transform for `batch` samples from the global torch generator (so checkpoints restore it)."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    d = Draw()
    if "color" in policy:
        d.brightness = torch.rand(batch, device=device) - 0.5
        d.saturation = torch.rand(batch, device=device) * 2
        d.contrast = torch.rand(batch, device=device) + 0.5
    if "translation" in policy:
        d.shift = torch.rand(batch, 2, device=device) * 2 - 1
    if "cutout" in policy:
        d.hole = torch.rand(batch, 2, device=device)
    return d


def apply(images: torch.Tensor, d: Draw) -> torch.Tensor:
    """images [B, 3, H, W] transformed by `d` (drawn for B samples); differentiable in `images`."""
    x = images
    if d.brightness is not None:
        x = x + d.brightness.view(-1, 1, 1, 1).to(x.dtype)
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * d.saturation.view(-1, 1, 1, 1).to(x.dtype) + gray
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * d.contrast.view(-1, 1, 1, 1).to(x.dtype) + mean
    if d.shift is not None:
        x = _translate(x, d.shift)
    if d.hole is not None:
        x = _cutout(x, d.hole)
    return x


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels (up to TRANSLATION_RATIO of its side); uncovered pixels become 0."""
    b, _, h, w = x.shape
    max_shift = torch.tensor([int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)], device=x.device)
    pixels = torch.round(shift * max_shift).long()  # [B, 2]
    # Output pixel (i, j) reads input pixel (i - dy, j - dx); index 0 of the padded image is the zero border.
    rows = (torch.arange(h, device=x.device).view(1, h) - pixels[:, :1] + 1).clamp(0, h + 1)  # [B, H]
    cols = (torch.arange(w, device=x.device).view(1, w) - pixels[:, 1:] + 1).clamp(0, w + 1)  # [B, W]
    padded = F.pad(x, (1, 1, 1, 1))  # [B, C, H + 2, W + 2]
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Zero a square of CUTOUT_RATIO of the side centred at `hole` (it may reach past the border)."""
    _, _, h, w = x.shape
    size = torch.tensor([int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)], device=x.device)
    centre = (hole * torch.tensor([h, w], device=x.device)).long()  # [B, 2]
    start = centre - size // 2
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    inside_y = (ys >= start[:, :1]) & (ys < start[:, :1] + size[0])  # [B, H]
    inside_x = (xs >= start[:, 1:]) & (xs < start[:, 1:] + size[1])  # [B, W]
    keep = ~(inside_y.unsqueeze(2) & inside_x.unsqueeze(1))  # [B, H, W]
    return x * keep.unsqueeze(1).to(x.dtype)


def repeat(d: Draw, times: int) -> Draw:
    """The same draw for `times` stacked copies of the batch (e.g. [real; fake] in one forward pass)."""
    def rep(t):
        return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))
    return Draw(*(rep(getattr(d, f)) for f in ("brightness", "saturation", "contrast", "shift", "hole")))
