"""The GPU speed-ups as options, and `apply`, which runs each enabled one over the loaded models.

The defaults keep the numerics of the eager model (fused projections, hoisted cross-attention keys and
values, matmul attention in the VAE, channels_last and the upsampler rewrite change only rounding);
options that change numerics more, such as fp8 matmuls, are off unless asked for and labelled as such.
Each speed-up is a swap (modules replaced or re-laid in place) that reports what it changed; `apply` is a loop
over the table of them, in an order where each sees the modules as the ones before left them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..models import Models
from ..pipeline import step_cache
from . import cross_kv, fp8, group_norm, text_qkv, upsample
from .compile import compile_models
from .cuda_graphs import AcceleratedRunner, CudaGraphs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    channels_last: bool = True  # NHWC convolutions: the layout cuDNN's fastest fp16 kernels use
    fuse_qkv: bool = True  # one matmul for Q, K, V instead of three (diffusers' fuse_qkv_projections)
    fuse_text_qkv: bool = True  # the same for each CLIP text-encoder layer (sdxl_fast.accel.text_qkv)
    # Upsample-then-3x3-conv as 2x2 convolutions of the input (sdxl_fast.accel.upsample): 4/9 of those FLOPs. On CPU
    # too: the demo's Fast 1-step call 22.8 -> 21.9 ms (BENCHMARKS.md).
    subpixel_upsample: bool = True
    # The VAE's attention (one layer, heads of 512 channels, which only PyTorch's memory-efficient SDPA kernel
    # takes) as two matmuls and a softmax, which Inductor fuses.
    vae_matmul_attention: bool = True
    # Every cross-attention's text keys and values in one matmul per call instead of two small ones per layer
    # and step (sdxl_fast.accel.cross_kv); needs fuse_qkv.
    hoist_cross_kv: bool = True
    # Group norms from per-channel statistics (sdxl_fast.accel.group_norm), for Inductor's slow channels_last group
    # norms: a Fast 1-step 512² call 16.8 -> 16.0 ms on an H200 (VAE decode 6.1 -> 5.3 ms). Slower on CPU.
    group_norm_rewrite: bool = True
    fp8: bool = False  # opt-in, changes numerics: fp8 matmuls in the UNets' transformer blocks (sdxl_fast.accel.fp8)
    cuda_graphs: bool = True  # replay recorded kernels: the whole Fast call, each Quality UNet step (CUDA only)
    compile: bool = True  # torch.compile the UNets, VAE decoder, text encoders (CUDA only; minutes at start-up)
    # "default": measured 46 -> 18 ms for a Fast 1-step 512² call on an H200 (BENCHMARKS.md), compiling in
    # about a minute. Never a mode with CUDA graphs inside torch.compile: ours record more than one module.
    compile_mode: str = "default"
    # False for a server: a shape not compiled yet runs eagerly (through CUDA graphs) until a background thread
    # has compiled it (sdxl_fast.serving.compiler), instead of stalling its first request for minutes.
    compile_new_shapes: bool = True
    # Inductor's combo kernels: independent small kernels (norms, elementwise) launched as one. Exact; a Fast
    # 1-step 512² call 17.0 -> 16.6 ms, 4-step 40.6 -> 40.3 ms on an H200, in both orders (BENCHMARKS.md).
    combo_kernels: bool = True

    @classmethod
    def none(cls) -> "Acceleration":
        return cls(channels_last=False, fuse_qkv=False, subpixel_upsample=False, fuse_text_qkv=False,
                   vae_matmul_attention=False, hoist_cross_kv=False, group_norm_rewrite=False, cuda_graphs=False,
                   compile=False)

    @classmethod
    def for_device(cls, device: torch.device) -> "Acceleration":
        """Everything on a CUDA GPU; on CPU only the upsampler rewrite, the one option measured faster there."""
        if torch.device(device).type == "cuda":
            return cls()
        return replace(cls.none(), subpixel_upsample=True)


def _unique_modules(models: Models) -> tuple[list[torch.nn.Module], list[torch.nn.Module], list[torch.nn.Module]]:
    """(UNets, VAEs, text encoders) without duplicates: the fast path may share the base's VAE and encoders,
    or even its UNet."""
    unets, vaes, encoders = [], [], []
    if models.quality:
        q = models.quality
        unets += [q.base, q.refiner]
        vaes.append(q.vae)
        encoders += [q.encoders.text_encoder, q.encoders.text_encoder_2]
    if models.fast:
        f = models.fast
        unets.append(f.student)
        vaes.append(f.vae)
        encoders += [f.encoders.text_encoder, f.encoders.text_encoder_2]

    def unique(modules):
        return list({id(m): m for m in modules if m is not None}.values())

    return unique(unets), unique(vaes), unique(encoders)


@dataclass
class Target:
    """What a pass works on: the models, the options asked for, and their modules without duplicates."""

    models: Models
    options: "Acceleration"
    unets: list
    vaes: list
    text_encoders: list


def _subpixel_upsample(t: Target) -> str:
    return f"{sum(upsample.convert(m) for m in t.unets + t.vaes)} upsamplers"


def _channels_last(t: Target) -> str:
    for module in t.unets + t.vaes:
        module.to(memory_format=torch.channels_last)
    return "applied"


def _fuse_qkv(t: Target) -> str:
    for module in t.unets + t.vaes:
        module.fuse_qkv_projections()
    return "applied"


def _group_norm_rewrite(t: Target) -> str:
    return f"{sum(group_norm.convert(m) for m in t.unets + t.vaes)} group norms"


def _fp8(t: Target) -> str:
    from .startup import sample_calls

    why_not = fp8.supported(t.models.device)
    if why_not:
        return why_not
    count = sum(fp8.convert_unet(unet) for unet in t.unets)
    fixed = fp8.calibrate(t.unets, lambda: sample_calls(t.models))
    return (f"{count} linear layers of the UNets' transformer blocks, {fixed} with input scales calibrated on "
            "sample calls (opt-in; changes numerics)")


def _fuse_text_qkv(t: Target) -> str:
    return f"{sum(text_qkv.fuse(encoder) for encoder in t.text_encoders)} layers"


def _vae_matmul_attention(t: Target) -> str:
    from diffusers.models.attention_processor import AttnProcessor

    for vae in t.vaes:
        vae.set_attn_processor(AttnProcessor())
    return "applied"


def _hoist_cross_kv(t: Target) -> str:
    if not t.options.fuse_qkv:
        return "skipped (needs fuse_qkv)"
    count = sum(cross_kv.hoist(unet) for unet in t.unets)
    if not isinstance(t.models.runner, AcceleratedRunner):
        t.models.runner = AcceleratedRunner()
    return f"{count} cross-attentions"


def _compile(t: Target) -> str:
    if t.models.device.type != "cuda":
        return (f"skipped on {t.models.device.type} (CUDA only: Inductor's CPU kernels are no faster than eager "
                "for these models, and compiling costs minutes)")
    for unet in t.unets:  # now, so that using the opt-in step cache later compiles nothing again
        step_cache.prepare(unet)
    compile_models(t.unets, t.vaes, t.text_encoders, t.options.compile_mode, combo_kernels=t.options.combo_kernels,
                   compile_new=t.options.compile_new_shapes)
    return f"applied (mode={t.options.compile_mode}, static shapes{', combo kernels' if t.options.combo_kernels else ''})"


def _cuda_graphs(t: Target) -> str:
    if t.models.device.type != "cuda":
        return f"skipped on {t.models.device.type} (CUDA only)"
    t.models.runner = AcceleratedRunner(CudaGraphs())
    return "on (recorded on first use per shape)"


# (option, pass) in the order they run: the upsampler rewrite first, so channels_last also reaches its new
# weights; fp8 after the layouts and before the graphs that would record its layers.
PASSES: list[tuple[str, Callable[[Target], str]]] = [
    ("subpixel_upsample", _subpixel_upsample),
    ("channels_last", _channels_last),
    ("fuse_qkv", _fuse_qkv),
    ("group_norm_rewrite", _group_norm_rewrite),
    ("fp8", _fp8),
    ("fuse_text_qkv", _fuse_text_qkv),
    ("vae_matmul_attention", _vae_matmul_attention),
    ("hoist_cross_kv", _hoist_cross_kv),
    ("compile", _compile),
    ("cuda_graphs", _cuda_graphs),
]


def apply(models: Models, options: Acceleration, leave: Models | None = None) -> list[str]:
    """Apply `options` to the loaded models in place; returns one line per enabled option: what it changed, or
    why it was skipped. Modules that are also in `leave` are left as they are: models loaded later and sharing
    modules with models already served (`sdxl_fast.load(..., share=)`) get their own modules changed only."""
    served = {id(m) for group in _unique_modules(leave) for m in group} if leave is not None else set()
    unets, vaes, encoders = ([m for m in group if id(m) not in served] for group in _unique_modules(models))
    target = Target(models, options, unets, vaes, encoders)
    notes = []
    for name, swap in PASSES:
        if getattr(options, name):
            result = swap(target)
            # fp8's reasons for skipping name the option themselves
            notes.append(result if result.startswith(f"{name}: ") else f"{name}: {result}")
            log.info("acceleration %s", notes[-1])
    return notes
