"""Opt-in fp8 matmuls for the UNets' linear layers (Hopper and Ada GPUs: twice the fp16 tensor-core rate).

This changes numerics more than the default options: weights are stored in float8 e4m3 with one scale per
tensor, and each call quantises its input the same way, so expect relative errors near 1e-2 where fp16 gives
1e-3 (BENCHMARKS.md reports both). Only `nn.Linear` layers inside the UNets' transformer blocks are converted:
convolutions, norms, the cross-attentions' text projections and the VAE stay in fp16.

An input's scale is either found on every call (its largest magnitude: a reduction over the activations
before each matmul, which made the option slower than fp16 on an H200) or fixed by `calibrate` from calls
on sample inputs, leaving a plain scale-and-cast that the compiler can fuse into the layer before.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x / scale in e4m3, scale): one fp32 scale for the tensor, from its largest magnitude. Computed on
    the device, with no host synchronisation, so it can run inside a CUDA graph."""
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """`nn.Linear` computed by `torch._scaled_mm` on e4m3 weights and inputs, output in the layer's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, weight_scale = _quantise(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in] e4m3
        self.register_buffer("weight_scale", weight_scale)  # a buffer, so it moves with the module
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("input_scale", None)  # set by `calibrate`; None: found on every call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            x8, x_scale = _quantise(rows)
        else:  # values beyond the calibrated range saturate
            x_scale = self.input_scale
            x8 = (rows.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major: the transpose of our row-major weight is. Fast
        # accumulation (Hopper's fp8 mode that promotes partial sums less often) is part of what fp8 trades.
        # The bias goes into the matmul's epilogue, which cuBLAS offers for fp16 and bf16 outputs only.
        fused_bias = self.bias if self.out_dtype != torch.float32 else None
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=fused_bias,
                               out_dtype=self.out_dtype, use_fast_accum=x.is_cuda)
        if self.bias is not None and fused_bias is None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def calibrate(modules: list[nn.Module], run: Callable[[], object], headroom: float = 2.0) -> int:
    """Fix the input scale of every Fp8Linear in `modules` that `run()` calls: the largest input magnitude seen
    during `run()` (eager calls on sample inputs), times `headroom` for inputs larger than those, maps to e4m3's
    largest value. Returns how many layers got a fixed scale; the others keep finding theirs per call."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, Fp8Linear)]
    seen: dict[Fp8Linear, torch.Tensor] = {}

    def watch(layer, args):
        amax = args[0].detach().abs().amax().float()
        seen[layer] = torch.maximum(seen[layer], amax) if layer in seen else amax

    for layer in layers:
        layer.input_scale = None
    handles = [layer.register_forward_pre_hook(watch) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    for layer, amax in seen.items():
        layer.input_scale = (amax * headroom / E4M3_MAX).clamp(min=1e-12)
    return len(seen)


def convertible(linear: nn.Linear) -> bool:
    """_scaled_mm needs both matrix sides to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def _unused_or_text_side(attention: nn.Module) -> tuple[str, ...]:
    if getattr(attention, "is_cross_attention", False):
        return ("to_k", "to_v", "to_kv")
    return ("to_q", "to_k", "to_v") if getattr(attention, "fused_projections", False) else ()


def convert_unet(unet: nn.Module) -> int:
    """Replace the convertible linear layers of the UNet's transformer blocks in place; returns how many.

    The cross-attentions' key and value projections stay in fp16: they see the 77 text tokens, where fp8 saves
    nothing, and `cross_kv.hoist` moves them out of the steps altogether. So do the separate projections that
    diffusers keeps, unused, beside the fused ones after `fuse_qkv_projections`."""
    from diffusers.models.attention import BasicTransformerBlock

    from .cross_kv import KVColumns

    count = 0
    for block in unet.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for parent in block.modules():
            if isinstance(parent, KVColumns):  # already hoisted
                continue
            skip = _unused_or_text_side(parent)
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and convertible(child) and name not in skip:
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
    return count


def supported(device: torch.device) -> str | None:
    """None if fp8 matmuls run fast on `device`, else why not."""
    if device.type != "cuda":
        return f"fp8: skipped on {device.type} (fp8 tensor cores are on CUDA GPUs of compute capability 8.9+)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"fp8: skipped on {torch.cuda.get_device_name(device)} (needs compute capability 8.9+, Ada or Hopper)"
    return None
