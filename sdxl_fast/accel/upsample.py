"""Nearest 2x upsampling followed by a 3x3 convolution, computed without the upsampled tensor.

Every output pixel of that pair reads a 3x3 window of the upsampled image, which covers only a 2x2 window of
the input, with some taps landing on the same input pixel. Adding those taps' weights turns the pair into one
2x2 convolution of the input per output phase (even/odd row, even/odd column): 4 multiply-adds per output
pixel and input channel instead of 9. In SDXL's VAE decoder these convolutions are 28 % of the FLOPs (0.70 of
2.52 TFLOP at 512²), the largest at 256² and 512²; the UNets have two. The result equals the original up to
rounding (the weights are added in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Which 3x3 kernel rows (columns) each of the two 2x2 taps adds, per output phase: an even output row reads
# input rows (i-1, i) with kernel rows (0 | 1+2), an odd one rows (i, i+1) with kernel rows (0+1 | 2).
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # [phase, tap, kernel row]


class SubpixelUpsample(nn.Module):
    """Drop-in for a diffusers `Upsample2D` (nearest 2x, then a 3x3 convolution with padding 1)."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        conv = upsample.conv
        out_ch, in_ch = conv.out_channels, conv.in_channels
        w = conv.weight.detach().float()  # [O, I, 3, 3]
        folded = torch.einsum("ayk,oikl,bxl->aboiyx", _TAPS.to(w.device), w, _TAPS.to(w.device))  # [2, 2, O, I, 2, 2]
        self.register_buffer("weight", folded.reshape(4 * out_ch, in_ch, 2, 2).to(conv.weight.dtype))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().repeat(4))
        self.original = upsample  # for an output size that is not exactly twice the input
        self.channels, self.out_channels = in_ch, out_ch

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        b, _, h, w = x.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.original(x, output_size)
        # Output (i', j') of the padded 2x2 convolution reads input rows (i'-1, i'): phase a takes i' = i + a.
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)  # [B, 4 * O, h + 1, w + 1]
        y = y.unflatten(1, (2, 2, self.out_channels))  # [B, 2 (row phase), 2 (column phase), O, h + 1, w + 1]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Interleave with the channels innermost, so the output is channels_last like the input. Built as
            # [B, O, h, 2, w, 2] it came out NCHW, and the norms and residual adds after it mixed the two
            # layouts: SDXL's VAE decoder at 512², batch 16, 90.3 -> 84.0 ms on an H200 (BENCHMARKS.md).
            phase = [[y[:, a, c, :, a:a + h, c:c + w].permute(0, 2, 3, 1) for c in (0, 1)] for a in (0, 1)]
            rows = [torch.stack(phase[a], dim=3) for a in (0, 1)]  # [B, h, w, 2, O] each
            nhwc = torch.stack(rows, dim=2).reshape(b, 2 * h, 2 * w, self.out_channels)  # [B, h, 2, w, 2, O]
            return nhwc.permute(0, 3, 1, 2)
        rows = [torch.stack([y[:, a, c, :, a:a + h, c:c + w] for c in (0, 1)], dim=-1) for a in (0, 1)]
        return torch.stack(rows, dim=-3).reshape(b, self.out_channels, 2 * h, 2 * w)  # [B, O, h, 2, w, 2] -> image


def convertible(module: nn.Module) -> bool:
    from diffusers.models.upsampling import Upsample2D

    if type(module) is not Upsample2D or not module.use_conv or module.use_conv_transpose:
        return False
    conv = getattr(module, "conv", None)
    return (module.interpolate and module.norm is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def convert(model: nn.Module) -> int:
    """Replace the model's convertible upsamplers in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, SubpixelUpsample):  # already converted
            continue
        for name, child in list(parent.named_children()):
            if convertible(child):
                setattr(parent, name, SubpixelUpsample(child))
                count += 1
    return count
