"""GPU speed options, each with a CPU fallback.

The defaults keep the numerics of the eager model (fused projections, hoisted cross-attention keys and
values, matmul attention in the VAE, channels_last and the upsampler rewrite change only rounding);
options that change numerics more, such as fp8 matmuls, are off unless asked for and labelled as such.
`apply` returns one line per option saying what was done or why it was skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import step_cache
from .loading import Models

log = logging.getLogger(__name__)


# Graphs torch.compile may keep per frame. The UNets share one frame (diffusers' forward), and each
# (model, batch, size) served is a graph of its own; torch's default of 8 would send later shapes to eager.
RECOMPILE_LIMIT = 64


def compile_models(unets, vaes, text_encoders, mode: str | None, backend="inductor", combo_kernels=False) -> None:
    """torch.compile with static shapes: one graph per shape. With torch's default (dynamic after the first
    recompile) the second shape served, e.g. the 1024² base after the 512² student, compiled as a
    dynamic-shape graph that had not finished after minutes on an H200, where the same shapes compiled
    alone took three minutes (BENCHMARKS.md)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    how = {"mode": mode}
    if backend == "inductor":  # torch.compile takes a mode or options, not both: the mode's options, and ours
        how = {"options": {**torch._inductor.list_mode_options(mode or "default"), "combo_kernels": combo_kernels}}
    for unet in unets:
        unet.compile(fullgraph=True, dynamic=False, backend=backend, **how)
    for vae in vaes:
        vae.decoder.compile(dynamic=False, backend=backend, **how)
    for encoder in text_encoders:  # fuses the many small kernels of a batch-1 prompt: 3.3 -> 2.7 ms (H200)
        encoder.compile(dynamic=False, backend=backend, **how)


@dataclass(frozen=True)
class Acceleration:
    channels_last: bool = True  # NHWC convolutions: the layout cuDNN's fastest fp16 kernels use
    fuse_qkv: bool = True  # one matmul for Q, K, V instead of three (diffusers' fuse_qkv_projections)
    fuse_text_qkv: bool = True  # the same for each CLIP text-encoder layer (sdxl_fast.text_qkv)
    # Upsample-then-3x3-conv as 2x2 convolutions of the input (sdxl_fast.upsample): 4/9 of those FLOPs. On CPU
    # too: the demo's Fast 1-step call 22.8 -> 21.9 ms (BENCHMARKS.md).
    subpixel_upsample: bool = True
    # The VAE's attention (one layer, heads of 512 channels, which only PyTorch's memory-efficient SDPA kernel
    # takes) as two matmuls and a softmax, which Inductor fuses.
    vae_matmul_attention: bool = True
    # Every cross-attention's text keys and values in one matmul per call instead of two small ones per layer
    # and step (sdxl_fast.cross_kv); needs fuse_qkv.
    hoist_cross_kv: bool = True
    # Group norms from per-channel statistics (sdxl_fast.group_norm), for Inductor's slow channels_last group
    # norms: a Fast 1-step 512² call 16.8 -> 16.0 ms on an H200 (VAE decode 6.1 -> 5.3 ms). Slower on CPU.
    group_norm_rewrite: bool = True
    fp8: bool = False  # opt-in, changes numerics: fp8 matmuls in the UNets' transformer blocks (sdxl_fast.fp8)
    cuda_graphs: bool = True  # replay recorded kernels: the whole Fast call, each Quality UNet step (CUDA only)
    compile: bool = True  # torch.compile the UNets, VAE decoder, text encoders (CUDA only; minutes at start-up)
    # "default": measured 46 -> 18 ms for a Fast 1-step 512² call on an H200 (BENCHMARKS.md), compiling in
    # about a minute. Never a mode with CUDA graphs inside torch.compile: ours record more than one module.
    compile_mode: str = "default"
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


def apply(models: Models, options: Acceleration) -> list[str]:
    """Apply `options` to the loaded models in place; returns what was applied or skipped, and why."""
    unets, vaes, text_encoders = _unique_modules(models)
    notes = []
    if options.subpixel_upsample:  # first, so channels_last also reaches the new weights
        from . import upsample

        count = sum(upsample.convert(module) for module in unets + vaes)
        notes.append(f"subpixel_upsample: {count} upsamplers")
    if options.channels_last:
        for module in unets + vaes:
            module.to(memory_format=torch.channels_last)
        notes.append("channels_last: applied")
    if options.fuse_qkv:
        for module in unets + vaes:
            module.fuse_qkv_projections()
        notes.append("fuse_qkv: applied")
    if options.group_norm_rewrite:
        from . import group_norm

        notes.append(f"group_norm_rewrite: {sum(group_norm.convert(module) for module in unets + vaes)} group norms")
    if options.fp8:
        from . import fp8

        why_not = fp8.supported(models.device)
        if why_not:
            notes.append(why_not)
        else:
            count = sum(fp8.convert_unet(unet) for unet in unets)
            fixed = fp8.calibrate(unets, lambda: _sample_calls(models))
            notes.append(f"fp8: {count} linear layers of the UNets' transformer blocks, {fixed} with input scales "
                         "calibrated on sample calls (opt-in; changes numerics)")
    if options.fuse_text_qkv:
        from . import text_qkv

        notes.append(f"fuse_text_qkv: {sum(text_qkv.fuse(encoder) for encoder in text_encoders)} layers")
    if options.vae_matmul_attention:
        from diffusers.models.attention_processor import AttnProcessor

        for vae in vaes:
            vae.set_attn_processor(AttnProcessor())
        notes.append("vae_matmul_attention: applied")
    if options.hoist_cross_kv:
        if not options.fuse_qkv:
            notes.append("hoist_cross_kv: skipped (needs fuse_qkv)")
        else:
            from . import cross_kv

            count = sum(cross_kv.hoist(unet) for unet in unets)
            notes.append(f"hoist_cross_kv: {count} cross-attentions")
    if options.compile:
        if models.device.type != "cuda":
            notes.append(f"compile: skipped on {models.device.type} (CUDA only: Inductor's CPU kernels are no "
                         "faster than eager for these models, and compiling costs minutes)")
        else:
            # Inductor's compiled kernels persist here, so a restarted app compiles in seconds, not minutes
            # (its default, /tmp, is wiped with many containers).
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "sdxl-fast" / "inductor"))
            for unet in unets:  # now, so that using the opt-in step cache later compiles nothing again
                step_cache.prepare(unet)
            compile_models(unets, vaes, text_encoders, options.compile_mode, combo_kernels=options.combo_kernels)
            notes.append(f"compile: applied (mode={options.compile_mode}, static shapes"
                         f"{', combo kernels' if options.combo_kernels else ''})")
    if options.cuda_graphs:
        if models.device.type != "cuda":
            notes.append(f"cuda_graphs: skipped on {models.device.type} (CUDA only)")
        else:
            from .cuda_graphs import CudaGraphs

            models.graphs = CudaGraphs()
            notes.append("cuda_graphs: on (recorded on first use per shape)")
    for note in notes:
        log.info("acceleration %s", note)
    return notes


def _sample_calls(models: Models) -> None:
    """Eager calls at the models' own size that reach every UNet: the student at each of its 4 timesteps,
    base and refiner over a 10-step schedule with both guidance branches. fp8's calibration watches them."""
    from .generate import generate
    from .params import GenerationParams

    graphs, models.graphs = models.graphs, None  # recorded graphs would replay the layers as they were
    try:
        with torch.compiler.set_stance("force_eager"):  # a compiled UNet would trace the watching hooks
            for mode, steps in (("fast", 4), ("quality", 10)):
                if getattr(models, mode) is not None:
                    generate(models, GenerationParams("a photograph of a city street", mode=mode, steps=steps,
                                                      seed=0))
    finally:
        models.graphs = graphs


def warmup(models: Models) -> None:
    """Run each loaded path once at the models' own size (generate's default), so compilation, autotuning and
    graph recording happen now: Fast at 1 step; Quality at 2 steps (one on the base, one on the refiner), then
    at 4 with the step cache, which the app offers for Quality (a whole and a cached step on each UNet)."""
    from .generate import generate
    from .params import GenerationParams

    calls = {"fast": [dict(steps=1)], "quality": [dict(steps=2), dict(steps=4, refiner_switch=0.5, cache_interval=2)]}
    for mode, kwargs in calls.items():
        if getattr(models, mode) is None:
            continue
        for kw in kwargs:
            generate(models, GenerationParams("warm-up", mode=mode, seed=0, **kw))
