"""Cross-attention keys and values of every transformer block in one matmul, once per call.

Each cross-attention layer of an SDXL UNet (70 in the base) projects the same 77 text tokens to its keys and
values, on every denoising step, though the text does not change between steps. At batch 1 those are 140
small matmuls per step of a few microseconds each. `hoist` concatenates the layers' fused key/value weights
into one matrix; `project` computes every layer's keys and values with it once, before the denoising loop,
and the loop passes that wide tensor to the UNet as its `encoder_hidden_states`, from which each layer takes
its own columns. The arithmetic is the same matmul per element, so the output changes only by rounding.

Needs diffusers' fused projections (`fuse_qkv_projections`, which gives each cross-attention one `to_kv`).
A hoisted UNet still accepts the ordinary text context: its layers then project it themselves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class KVColumns(nn.Module):
    """Stands in for one cross-attention's `to_kv`: given the wide tensor of every layer's keys and values,
    returns this layer's columns; given ordinary text states, projects them with its own weight, which is a
    view into the shared matrix."""

    def __init__(self, linear: nn.Linear, start: int, total: int):
        super().__init__()
        self.linear, self.start, self.total = linear, start, total

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[-1] == self.total:
            return states[..., self.start:self.start + self.linear.out_features]
        return self.linear(states)


def _cross_attentions(unet) -> list:
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]


@torch.no_grad()
def hoist(unet) -> int:
    """Put the key/value weights of the UNet's cross-attentions into one matrix; returns how many layers.
    Each layer's weight becomes a view into that matrix, so no memory is added."""
    layers = _cross_attentions(unet)
    if not layers or getattr(unet, "_sdxl_fast_kv_weight", None) is not None:  # nothing to do, or done already
        return len(layers)
    if any(not isinstance(getattr(a, "to_kv", None), nn.Linear) or a.to_kv.bias is not None for a in layers):
        raise ValueError("cross_kv.hoist needs fused, bias-free key/value projections (fuse_qkv_projections)")
    weight = torch.cat([a.to_kv.weight for a in layers])  # [sum of 2·inner, text width]
    start = 0
    for a in layers:
        linear = a.to_kv
        linear.weight = nn.Parameter(weight[start:start + linear.out_features], requires_grad=False)
        a.to_kv = KVColumns(linear, start, weight.shape[0])
        start += linear.out_features
    # A buffer, so that moving the UNet (`.to()`) moves it too; not persistent, so never saved with the UNet.
    unet.register_buffer("_sdxl_fast_kv_weight", weight, persistent=False)
    return len(layers)


def project(unet, context: torch.Tensor) -> torch.Tensor:
    """Text states [B, 77, D] -> the UNet's `encoder_hidden_states`: every layer's keys and values
    [B, 77, sum of 2·inner] for a hoisted UNet, the states themselves otherwise."""
    weight = getattr(unet, "_sdxl_fast_kv_weight", None)
    return context if weight is None else F.linear(context.to(weight.dtype), weight)
