"""Group norm written as per-channel reductions, for channels_last tensors at small batch.

At batch 1 a group norm has only 32 statistics to compute (one per group), each over a group's channels at
every pixel, and in channels_last memory a group's values are strided by the channel count. In session 12's
trace of a Fast 1-step 512² call (BENCHMARKS.md) Inductor's group-norm kernels took ~2.7 ms of the VAE
decoder's ~6 ms: about a fifth of the H200's memory bandwidth, for the bytes a group norm must move. Here the
statistics come from sums over the pixels per channel, the reduction batch norm uses, which reads
channels_last memory in order; the 32 group statistics are then sums of their channels'. The output equals
nn.GroupNorm's up to rounding: fp32 sums, and the variance from a second pass over the centred values, not
from E[x²] - E[x]².
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the same parameters, computed from per-channel sums. Input [B, C, *]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, g = x.shape[0], x.shape[1], self.num_groups
        pixels = tuple(range(2, x.dim()))
        per_channel = (b, c) + (1,) * len(pixels)
        affine = (c,) + (1,) * len(pixels)
        count = (c // g) * math.prod(x.shape[2:])  # values per group

        def group_mean(per_channel_sums: torch.Tensor) -> torch.Tensor:  # [B, C] -> [B, C], each its group's mean
            means = per_channel_sums.view(b, g, c // g).sum(-1, keepdim=True) / count
            return means.expand(b, g, c // g).reshape(per_channel)

        xf = x.float()
        mean = group_mean(xf.sum(pixels))
        var = group_mean(((xf - mean) ** 2).sum(pixels))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float().view(affine)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float().view(affine)
        return (xf * scale + shift).to(x.dtype)


def convert(module: nn.Module) -> int:
    """Replace every nn.GroupNorm inside `module` by a ChannelsLastGroupNorm sharing its parameters; returns
    how many. Idempotent."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                norm = ChannelsLastGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine,
                                             device="meta")
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
                count += 1
    return count
