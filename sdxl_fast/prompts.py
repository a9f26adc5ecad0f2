"""Prompt text -> SDXL text embeddings from both CLIP encoders."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .loading import TextEncoders


class PromptTruncatedWarning(UserWarning):
    """The prompt is longer than the 77 tokens the CLIP encoders read; the rest is ignored."""


@dataclass
class PromptEmbeddings:
    """hidden_1: [B, 77, D1] (None without a first encoder), hidden_2: [B, 77, D2], pooled: [B, P2].

    The base UNet reads cat(hidden_1, hidden_2) as cross-attention context; the refiner reads hidden_2 only.
    Both read `pooled` (the second encoder's projected end-of-text token) in their added embedding.
    """

    hidden_1: torch.Tensor | None
    hidden_2: torch.Tensor
    pooled: torch.Tensor

    @property
    def base_context(self) -> torch.Tensor:
        return torch.cat([self.hidden_1, self.hidden_2], dim=-1)

    def zeros_like(self) -> "PromptEmbeddings":
        return PromptEmbeddings(
            None if self.hidden_1 is None else torch.zeros_like(self.hidden_1),
            torch.zeros_like(self.hidden_2), torch.zeros_like(self.pooled),
        )


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    for prompt in prompts:
        n_tokens = len(tokenizer(prompt, truncation=False).input_ids)
        if n_tokens > max_len:
            kept = tokenizer.decode(ids[0, 1:-1], skip_special_tokens=True)
            warnings.warn(
                f"Prompt has {n_tokens} tokens; the text encoders read {max_len}, so only the start is used: "
                f"{kept[:80]!r}...", PromptTruncatedWarning, stacklevel=3,
            )
            break
    return ids.to(device)


@torch.no_grad()
def encode_prompts(encoders: TextEncoders, prompts: list[str], device: torch.device) -> PromptEmbeddings:
    """Encode a batch of prompts. SDXL uses each encoder's penultimate hidden state, not the last."""
    hidden_1 = None
    if encoders.text_encoder is not None:
        out_1 = encoders.text_encoder(_tokenize(encoders.tokenizer, prompts, device), output_hidden_states=True)
        hidden_1 = out_1.hidden_states[-2]
    out_2 = encoders.text_encoder_2(_tokenize(encoders.tokenizer_2, prompts, device), output_hidden_states=True)
    return PromptEmbeddings(hidden_1=hidden_1, hidden_2=out_2.hidden_states[-2], pooled=out_2.text_embeds)
