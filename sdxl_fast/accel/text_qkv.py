"""One matmul for the query, key and value of each CLIP text-encoder layer, instead of three.

At batch 1 a prompt is 77 tokens, so each projection is a small matmul whose time is mostly fixed cost:
the second SDXL encoder alone runs 32 layers of them per prompt. transformers has no fused-projection option
for CLIP (diffusers has one for UNets and VAEs, `fuse_qkv_projections`), so this swaps each layer's class for
one whose forward computes the three projections at once.

It also attends with SDPA's `is_causal` instead of a mask. SDXL encodes prompts with no padding mask (the
padding tokens are attended, causally), so the causal pattern is the only mask; but under torch.compile
transformers builds it as a tensor, which costs a kernel and a memset per layer and rules out SDPA's flash
kernels. A fused encoder therefore refuses a padding mask instead of ignoring it. Of those kernels it prefers
FlashAttention-2 to cuDNN's (PyTorch's first choice on Hopper), which needs a memset per call. On an H200 the
second encoder's 32 layers took 1.89 ms with the mask and 1.66 ms with is_causal (cuDNN), and a whole Fast
call took 0.35 ms less with only FlashAttention-2 allowed than with the default choice (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.clip.modeling_clip import CLIPAttention


TEXT_ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class FusedCLIPAttention(CLIPAttention):
    """CLIPAttention with `qkv_proj` ([3·D, D], the three projections stacked); q/k/v_proj are views of it.
    Causal attention only (the module docstring says why)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        # [B, T, 3·D] -> three [B, heads, T, head_dim]
        q, k, v = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        with sdpa_kernel(TEXT_ATTENTION_KERNELS):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, heads, T, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


def _refuse_padding_mask(module, args, kwargs):
    if kwargs.get("attention_mask") is not None or (len(args) > 1 and args[1] is not None):
        raise ValueError("This text encoder's attention is fused for SDXL prompts (sdxl_fast.accel.text_qkv), which have "
                         "no padding mask; load it without sdxl_fast's acceleration to pass an attention_mask.")


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
    if count:
        encoder.register_forward_pre_hook(_refuse_padding_mask, with_kwargs=True)
    return count
