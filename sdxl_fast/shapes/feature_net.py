"""The ADD discriminator's frozen feature network for the demo student, pretrained by us on shapes images.

ADD's discriminator reads features of a frozen DINOv2 ViT-S/14. Real DINOv2 weights are neither small nor
ours, so the demo family uses the same timm architecture (`vit_small_patch14_dinov2`) at a small width,
trained from scratch with *supervised* heads on the shapes labels of real training-seed images (seeds
0 .. train_images-1, never held-out ones): shape, colour, position cell, count, size, background colour and
texture, one linear head each on the final CLS token and one on the flattened final patch tokens,
cross-entropy summed over all heads (position masked for multi-object images, as in the probe). The features it learns are exactly what tells one shapes image from
another, which is what the discriminator needs to compare.

Images take the discriminator's own path: `distill.discriminator.FeatureNetwork` (bilinear antialiased resize
to img_size, ImageNet normalisation), so the pretrained weights see the same inputs in training and in distill.

The result is a timm state dict (the backbone without heads) in `vit.safetensors`, which
`python -m sdxl_fast.distill --disc_weights sdxl_fast/shapes/vit_weights/vit.safetensors --disc_backbone_kwargs '{...}'` loads,
and `vit.json` with the architecture kwargs, the command and the held-out accuracy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .demo_config import PretrainConfig
from .probe import IGNORE, label_targets, normalise, score


def backbone_kwargs(cfg: PretrainConfig) -> dict:
    """The timm.create_model kwargs (besides img_size) that distill's disc_backbone_kwargs must repeat."""
    return {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads}


def build_backbone(cfg: PretrainConfig, for_training: bool = False) -> nn.Module:
    """As distill builds it (`for_training` False), or with `cfg.init_values` layer scale for training."""
    import timm

    extra = {"init_values": cfg.init_values} if for_training else {}
    return timm.create_model(cfg.model, pretrained=False, img_size=cfg.img_size, num_classes=0,
                             **backbone_kwargs(cfg), **extra)


class Classifier(nn.Module):
    """FeatureNetwork (distill's input path) + two linear heads per label: one on the final CLS embedding (what
    distill conditions its heads on) and one on the flattened final patch tokens (what distill's heads read;
    the flatten keeps the layout, so position is learnt in hundreds of steps rather than thousands)."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        from sdxl_fast.distill.discriminator import FeatureNetwork

        backbone = build_backbone(cfg, for_training=True)
        self.features = FeatureNetwork(backbone, (cfg.depth - 1,), cfg.img_size)
        n_tokens = (cfg.img_size // 14) ** 2
        self.heads = nn.ModuleDict({k: nn.Linear(backbone.embed_dim, len(v)) for k, v in data.LABELS.items()})
        self.token_heads = nn.ModuleDict({k: nn.Linear(n_tokens * backbone.embed_dim, len(v))
                                          for k, v in data.LABELS.items()})

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """-> (CLS logits per label, patch-token logits per label)."""
        (tokens,), cls = self.features(images)
        flat = self.features.backbone.norm(tokens).flatten(1)
        return ({k: head(cls) for k, head in self.heads.items()},
                {k: head(flat) for k, head in self.token_heads.items()})


def _draw(seeds, workers: int) -> tuple[torch.Tensor, list[dict]]:
    from .pool import draw_pool

    seeds = list(seeds)
    images, _, labels = draw_pool(len(seeds), start=seeds[0], workers=workers)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


@torch.no_grad()
def accuracy(model: Classifier, x_uint8: torch.Tensor, labels: list[dict], which: int = 0) -> dict[str, float]:
    """Held-out accuracy of the CLS heads (which=0) or the patch-token heads (which=1)."""
    model.eval()
    preds = [model(normalise(x_uint8[i:i + 128]))[which] for i in range(0, len(x_uint8), 128)]
    predicted = {k: torch.cat([p[k] for p in preds]).argmax(1).cpu() for k in data.LABELS}
    return score(predicted, label_targets(labels, data.LABELS), data.LABELS)


def pretrain(cfg: PretrainConfig, command: str = "") -> dict:
    if cfg.train_images > data.HELDOUT_START:
        raise ValueError("training seeds must stay below HELDOUT_START")
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    started = time.time()
    x, labels = _draw(range(cfg.train_images), cfg.workers)
    x, y = x.to(device), {k: v.to(device) for k, v in label_targets(labels, data.LABELS).items()}
    print(f"drew {len(x)} training images in {time.time() - started:.0f} s; training on {device}", flush=True)
    model = Classifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = cfg.minutes * 60
    t0 = time.time()
    model.train()
    step = 0
    while True:
        # Warm-up then cosine over the run's progress: steps done, or the time budget spent if that is further.
        progress = max(step / cfg.steps, (time.time() - t0) / budget if budget else 0.0)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, 20 * progress + 1 / cfg.steps) * 0.5 * (1 + math.cos(math.pi * progress))
        idx = torch.randint(len(x), (cfg.batch_size,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_logits, token_logits = model(normalise(x[idx]))
            loss = sum(F.cross_entropy(logits[k].float(), y[k][idx], ignore_index=IGNORE)
                       for logits in (cls_logits, token_logits) for k in data.LABELS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.log_every and step % cfg.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    print(f"trained {step} steps", flush=True)
    train_seconds = time.time() - t0
    held_x, held_labels = _draw(data.heldout_seeds(cfg.eval_images), cfg.workers)
    held_x = held_x.to(device)
    acc = accuracy(model, held_x, held_labels)
    token_acc = accuracy(model, held_x, held_labels, which=1)
    for name, a in (("CLS heads", acc), ("patch-token heads", token_acc)):
        print("held-out accuracy, %s (%d seeds from 10**9): %s" % (
            name, cfg.eval_images, ", ".join(f"{k} {v:.4f}" for k, v in a.items())), flush=True)
    info = {
        "command": command, "model": cfg.model, "img_size": cfg.img_size, "backbone_kwargs": backbone_kwargs(cfg),
        "init_values_for_training": cfg.init_values,
        "training": {"train_seeds": [0, cfg.train_images], "steps": step, "batch_size": cfg.batch_size,
                     "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
                     "device": str(device), "torch_threads": torch.get_num_threads(),
                     "train_seconds": round(train_seconds, 1),
                     "labels": {k: list(map(str, v)) for k, v in data.LABELS.items()}},
        "heldout_accuracy": {"n": cfg.eval_images, **{k: round(v, 4) for k, v in acc.items()}},
        "heldout_accuracy_patch_tokens": {"n": cfg.eval_images, **{k: round(v, 4) for k, v in token_acc.items()}},
    }
    path = save_backbone(model.features.backbone.cpu(), cfg.out, info)
    missing = check_loads(path, cfg)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB); loads into distill's backbone with no missing keys"
          if not missing else f"WARNING: missing keys when loading {path}: {missing}", flush=True)
    return info


def save_backbone(backbone: nn.Module, out: str | Path, info: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(out / "vit.safetensors"))
    (out / "vit.json").write_text(json.dumps(info, indent=2) + "\n")
    return out / "vit.safetensors"


def check_loads(path: str | Path, cfg: PretrainConfig) -> list[str]:
    """Load the file the way distill.discriminator.load_backbone does (timm's checkpoint_filter_fn,
    strict=False) and return the keys it would leave at their random init (must be none)."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = build_backbone(cfg)
    result = model.load_state_dict(checkpoint_filter_fn(load_file(str(path)), model), strict=False)
    return list(result.missing_keys) + list(result.unexpected_keys)
