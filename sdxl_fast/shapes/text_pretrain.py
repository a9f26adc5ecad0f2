"""The demo text encoders, trained on caption labels before any UNet (stage `encoders` of train_demo).

Why: at random initialisation the two small CLIP encoders map captions that differ in one colour word to
pooled embeddings with cosine ~0.95, and linear read-outs of the object colour from what the UNets read are
right for 42-52 % of held-out captions (8 colours; docs/DEMO_MODELS.md). UNets trained on those embeddings
learnt position and count but hardly colour, not even the background's. So both encoders are
trained to make every label a caption states linearly readable from exactly what the UNets read:

  text_encoder    penultimate hidden states (the context): at the end-of-text token, and their mean
                  over the caption's tokens
  text_encoder_2  the same, plus the projected pooled embedding (SDXL's `text_embeds`)

one linear head per (feature, label), summed cross-entropy, captions of the training seeds padded to 77 tokens
as at inference. The heads are thrown away; the encoders are saved and stay frozen from then on, as SDXL's.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .probe import IGNORE, label_targets

FEATURES = {"text_encoder": ("eos", "mean"), "text_encoder_2": ("eos", "mean", "pooled")}


def captions_and_labels(seeds) -> tuple[list[str], list[dict]]:
    """Captions and the labels they state (None where a caption leaves one out, which the heads then ignore),
    without drawing the images (a few microseconds per seed)."""
    captions, labels = [], []
    for seed in seeds:
        lab, _, _ = data.sample_labels(seed)
        captions.append(data.caption_of(lab))
        labels.append(data.stated_labels(lab))
    return captions, labels


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def features(encoder, ids: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The vectors the heads read, each [B, width]."""
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-2]  # [B, 77, width]: what the UNets' cross-attention reads
    eos_index = (ids == encoder.config.eos_token_id).int().argmax(dim=1)  # first end-of-text token
    in_caption = (torch.arange(ids.shape[1], device=ids.device)[None] <= eos_index[:, None]).unsqueeze(-1)
    found = {"eos": hidden[torch.arange(len(ids), device=ids.device), eos_index],
             "mean": (hidden * in_caption).sum(1) / in_caption.sum(1)}
    if "pooled" in names:
        found["pooled"] = out.text_embeds
    return {name: found[name] for name in names}


class Heads(nn.Module):
    def __init__(self, widths: dict[str, int]):
        super().__init__()
        self.linear = nn.ModuleDict({
            f"{enc}:{feat}:{label}": nn.Linear(widths[f"{enc}:{feat}"], len(classes))
            for enc, feats in FEATURES.items() for feat in feats for label, classes in data.LABELS.items()})

    def forward(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: head(vectors[key.rsplit(":", 1)[0]]) for key, head in self.linear.items()}


def _all_features(encoders: dict, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{enc}:{name}": v for enc, model in encoders.items()
            for name, v in features(model, ids[enc], FEATURES[enc]).items()}


def _widths(encoders: dict) -> dict[str, int]:
    widths = {}
    for enc, model in encoders.items():
        for feat in FEATURES[enc]:
            widths[f"{enc}:{feat}"] = model.config.projection_dim if feat == "pooled" else model.config.hidden_size
    return widths


@torch.no_grad()
def accuracy(encoders: dict, heads: Heads, ids: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict:
    """Held-out accuracy per "encoder:feature:label"."""
    logits = heads(_all_features(encoders, ids))
    result = {}
    for key, value in logits.items():
        target = targets[key.rsplit(":", 1)[1]]
        stated = target != IGNORE
        result[key] = float((value.argmax(1) == target)[stated].float().mean())
    return result


def train_encoders(encoders: dict, tokenizers: dict, *, steps: int, batch_size: int, lr: float, seed: int,
                   pool_size: int, eval_captions: int, deadline: float, log_every: int = 100,
                   tune_encoders: bool = True) -> dict:
    """Train `encoders` ({"text_encoder": model, "text_encoder_2": model}) in place; returns the summary.
    With tune_encoders=False only the heads learn: the read-out accuracy of the encoders as they are."""
    torch.manual_seed(seed)
    device = next(encoders["text_encoder"].parameters()).device
    train_captions, train_labels = captions_and_labels(range(pool_size))
    test_captions, test_labels = captions_and_labels(data.heldout_seeds(eval_captions))
    ids = {enc: tokenize(tok, train_captions).to(device) for enc, tok in tokenizers.items()}
    test_ids = {enc: tokenize(tok, test_captions).to(device) for enc, tok in tokenizers.items()}
    targets = {k: v.to(device) for k, v in label_targets(train_labels, data.LABELS).items()}
    test_targets = {k: v.to(device) for k, v in label_targets(test_labels, data.LABELS).items()}

    heads = Heads(_widths(encoders)).to(device)
    for m in encoders.values():
        m.train(tune_encoders).requires_grad_(tune_encoders)
    params = [p for m in (*encoders.values(), heads) for p in m.parameters() if p.requires_grad]
    # No weight decay: most token embeddings never get a gradient and must keep their initial values.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    started, step, losses = time.time(), 0, []
    while step < steps and time.time() < deadline:
        idx = torch.randint(pool_size, (batch_size,), generator=gen).to(device)
        logits = heads(_all_features(encoders, {enc: v[idx] for enc, v in ids.items()}))
        loss = sum(F.cross_entropy(value, targets[key.rsplit(":", 1)[1]][idx], ignore_index=IGNORE)
                   for key, value in logits.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step} loss {sum(losses) / len(losses):.4f} "
                  f"{step / (time.time() - started):.1f} steps/s", flush=True)
            losses = []
    for m in encoders.values():
        m.eval().requires_grad_(False)
    heads.eval()
    return {"steps": step, "seconds": time.time() - started,
            "heldout_accuracy": accuracy(encoders, heads, test_ids, test_targets), "eval_captions": eval_captions}
