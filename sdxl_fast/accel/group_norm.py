"""Group norm written as per-channel reductions, for channels_last tensors at small batch.

At batch 1 a group norm has only 32 statistics to compute (one per group), each over a group's channels at
every pixel, and in channels_last memory a group's values are strided by the channel count. In a profiler
trace of a Fast 1-step 512² call (BENCHMARKS.md) Inductor's group-norm kernels took ~2.7 ms of the VAE
decoder's ~6 ms: about a fifth of the H200's memory bandwidth, for the bytes a group norm must move. Here the
statistics come from each channel's mean and variance over the pixels (one pass, the reduction batch norm
uses, which reads channels_last memory in order); a group's are then those of its channels combined, exactly,
by the law of total variance (equal counts per channel). The output equals nn.GroupNorm's up to rounding.
Compiled on an H200 this took the decoder from 6.2 to 5.3 ms at 512² and from 28.5 to 20.7 ms at 1024²
(BENCHMARKS.md). Eager on a CPU it is slower, being more operations, so it is a GPU default only.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the same parameters, computed from per-channel statistics. Input [B, C, *]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, g = x.shape[0], x.shape[1], self.num_groups
        pixels = tuple(range(2, x.dim()))
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=pixels, correction=0)  # per channel: [B, C] each
        var, mean = var.view(b, g, c // g), mean.view(b, g, c // g)
        group_mean = mean.mean(-1, keepdim=True)  # [B, G, 1]
        group_var = var.mean(-1, keepdim=True) + ((mean - group_mean) ** 2).mean(-1, keepdim=True)
        scale = torch.rsqrt(group_var + self.eps).expand(b, g, c // g)  # per channel: [B, G, C / G]
        shift = -group_mean * scale
        if self.affine:
            weight = self.weight.float().view(g, c // g)
            scale, shift = scale * weight, shift * weight + self.bias.float().view(g, c // g)
        per_channel = (b, c) + (1,) * len(pixels)
        return (xf * scale.reshape(per_channel) + shift.reshape(per_channel)).to(x.dtype)


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
