"""The Fast path's UNet and VAE decoder compiled ahead of time, each into one file (torch.compile's
`aot_compile`: Dynamo's trace, Inductor's kernels and their guards, saved).

One file covers every batch size and every latent size the module takes (dynamic dimensions: one compiled
function for batch 1, which Dynamo specialises, and one for all larger batches): loading it takes about a
second and no request ever traces or compiles, where torch.compile compiles each shape it meets and traces
each again at every start, even from its caches. It stays in Python (Inductor's own wrapper code around its
Triton or C++ kernels), unlike AOTInductor's packages, whose loader stopped the process on an H100 with torch
2.11 (BENCHMARKS.md). A file holds kernels, not weights: the compiled functions take the module as an argument
and read its weights at each call, so one file serves every model of the same architecture, dtype and device
kind (a student and the base it came from). A module moved to another dtype or device afterwards, or a call
that none of the compiled functions' guards accepts, runs uncompiled.

    aot.compile_unet(models.fast.student, "student.aot")       # minutes, once
    aot.use_unet_package(models.fast.student, "student.aot")   # every start: generate() now calls the package
"""

from __future__ import annotations

import io
import pickle
import threading
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..pipeline.sampling import unet_forward


class _UNetCall(torch.nn.Module):
    """The UNet as `sampling.unet_forward` calls it, with plain tensors in and out, as torch.export takes it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timesteps, context, pooled, time_ids):
        return unet_forward(self.unet, latents, timesteps, context, pooled, time_ids)


class _DecoderCall(torch.nn.Module):
    """The VAE's decode of scaled latents to pixels in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def example_inputs(unet, batch: int = 2, side: int | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs of a UNet call at `side` pixels (default: the model's own size): [B, 4, side/8, side/8]
    latents, [B] timesteps, [B, 77, D] context, [B, P] pooled embeddings, [B, 6] micro-conditioning. D is
    the text width, or that of every layer's keys and values where they are hoisted (`accel.cross_kv`)."""
    c = unet.config
    latent = side // 8 if side else max(16, c.sample_size // 8 * 8)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    hoisted = getattr(unet, "_sdxl_fast_kv_weight", None)
    width = c.cross_attention_dim if hoisted is None else hoisted.shape[0]
    shapes = [(batch, c.in_channels, latent, latent), (batch, 77, width), (batch, pooled), (batch, 6)]
    latents, context, pooled, time_ids = (torch.randn(s, device=unet.device, dtype=unet.dtype) for s in shapes)
    return latents, torch.full((batch,), 999.0, device=unet.device), context, pooled, time_ids.abs() * latent * 8


def _compile(call: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """`call` compiled for `inputs` (batch 2, the first one latents [B, C, H, W]) with dynamic batch, height and
    width, and again for batch 1, both saved in the file `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    compiled = []
    for batch in (1, 2):
        example = tuple(x[:batch].clone() for x in inputs)
        for x in example[1:] if batch == 1 else example:
            torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(example[0], 2)
        torch._dynamo.mark_dynamic(example[0], 3)
        # Guards on the inputs' shapes, dtypes and devices only: not on the module or its weights, which the
        # compiled function reads at each call, whichever module of this architecture it is given. Torch 2.11
        # offers `aot_compile` only with this setting on (later versions have it on by default).
        with torch._dynamo.config.patch(enable_aot_compile=True), torch.no_grad():
            fn = torch.compile(type(call).forward, fullgraph=True,
                               options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
            function = fn.aot_compile(((call, *example), {}))
        saved = Path(f"{path}.batch{batch}")
        try:
            function.save_compiled_function(str(saved))
            compiled.append(saved.read_bytes())
        finally:
            saved.unlink(missing_ok=True)
    Path(path).write_bytes(pickle.dumps(compiled))
    return Path(path)


def _load(call: torch.nn.Module, path: str | Path):
    """The compiled functions in the file `path`, as one function of `call`'s inputs that runs the first whose
    guards accept them on `call`'s module, or returns None when none does; callable from any thread. The file
    is a pickle, as torch's compiled functions are: load only files made here."""
    saved = pickle.loads(Path(path).read_bytes())
    functions = [torch.compiler.load_compiled_function(io.BytesIO(data)) for data in saved]
    lock = threading.Lock()  # the Fast and Quality paths share the VAE

    def run(*inputs):
        with lock:
            for function in functions:
                if function.guard_check(call, *inputs):
                    return function(call, *inputs)
        return None

    return run


def compile_unet(unet, path: str | Path) -> Path:
    """Compile `unet` (as it is now, speed-ups applied) for every batch and latent size into the file `path`."""
    return _compile(_UNetCall(unet), example_inputs(unet), path)


def use_unet_package(unet, path: str | Path) -> None:
    """From now on `unet(...)` runs the package at `path` (from `compile_unet` on a UNet of this architecture)
    on `unet`'s own weights, as long as they stay where they are (dtype and device)."""
    package, uncompiled, dtype, device = _load(_UNetCall(unet), path), unet.forward, unet.dtype, unet.device

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict: bool = True, **kwargs):
        if kwargs or unet.dtype != dtype or unet.device != device:
            return uncompiled(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                              return_dict=return_dict, **kwargs)
        timesteps = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).expand(sample.shape[0])
        out = package(sample, timesteps.contiguous(), encoder_hidden_states, added_cond_kwargs["text_embeds"],
                      added_cond_kwargs["time_ids"])
        if out is None:  # inputs the compiled functions were not made for, e.g. a size not divisible as theirs
            return uncompiled(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                              return_dict=return_dict)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward


def compile_decoder(vae, path: str | Path) -> Path:
    """Compile `vae.decode` for every batch and latent size into the file `path`."""
    example = torch.randn(2, vae.config.latent_channels, 64, 64, device=vae.device, dtype=vae.dtype)
    return _compile(_DecoderCall(vae), (example,), path)


def use_decoder_package(vae, path: str | Path) -> None:
    """From now on `vae.decode(latents)` runs the package at `path` (from `compile_decoder` on a VAE of this
    architecture) on `vae`'s own weights; latents of another dtype (the fp32 retry after an fp16 overflow,
    which moves the VAE to fp32) take the uncompiled decode."""
    package, uncompiled, dtype, device = _load(_DecoderCall(vae), path), vae.decode, vae.dtype, vae.device

    def decode(z, return_dict: bool = True, **kwargs):
        if kwargs or z.dtype != dtype or vae.dtype != dtype or vae.device != device:
            return uncompiled(z, return_dict=return_dict, **kwargs)
        out = package(z)
        if out is None:
            return uncompiled(z, return_dict=return_dict)
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae.decode = decode
