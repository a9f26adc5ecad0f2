"""One matmul for the query, key and value of each CLIP text-encoder layer, instead of three.

At batch 1 a prompt is 77 tokens, so each projection is a small matmul whose time is mostly fixed cost:
the second SDXL encoder alone runs 32 layers of them per prompt. transformers has no fused-projection option
for CLIP (diffusers has one for UNets and VAEs, `fuse_qkv_projections`), so this swaps each layer's class for
one whose forward differs from `CLIPAttention.forward` only in computing the three projections at once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import ALL_ATTENTION_FUNCTIONS, CLIPAttention, eager_attention_forward


class FusedCLIPAttention(CLIPAttention):
    """CLIPAttention with `qkv_proj` ([3·D, D], the three projections stacked); q/k/v_proj are views of it."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        # [B, T, 3·D] -> three [B, heads, T, head_dim]
        q, k, v = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scale,
                              dropout=self.dropout if self.training else 0.0, **kwargs)
        return self.out_proj(out.reshape(batch, tokens, -1).contiguous()), weights


@torch.no_grad()
def fuse(encoder: nn.Module) -> int:
    """Fuse every CLIPAttention of `encoder` in place; returns how many. Adds no weights: the separate
    projections become views of the fused one (they are no longer called)."""
    count = 0
    for attention in encoder.modules():
        if type(attention) is not CLIPAttention:
            continue
        parts = (attention.q_proj, attention.k_proj, attention.v_proj)
        fused = nn.Linear(attention.embed_dim, 3 * attention.embed_dim, device=parts[0].weight.device,
                          dtype=parts[0].weight.dtype)
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        for i, p in enumerate(parts):
            rows = slice(i * attention.embed_dim, (i + 1) * attention.embed_dim)
            p.weight, p.bias = nn.Parameter(fused.weight[rows], False), nn.Parameter(fused.bias[rows], False)
        attention.qkv_proj = fused
        attention.__class__ = FusedCLIPAttention
        count += 1
    return count
