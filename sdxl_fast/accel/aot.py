"""The Fast path's UNet and VAE decoder compiled ahead of time, each into one package file (torch.export with
dynamic dimensions, AOTInductor).

One package covers every batch size from 1 to `max_batch` and every latent side from 8 to 256 in multiples of
8 (64 to 2048 pixels): loading it takes a fraction of a second and no request ever traces or compiles, where
torch.compile compiles each shape it meets and traces each again at every start, even from its caches.
A package holds kernels, not weights: it runs on the weights of the module it is given, in place, so one
package serves every model of the same architecture, dtype and device kind (a student and the base it came
from). A module moved to another dtype or device afterwards runs uncompiled again.

    aot.compile_unet(models.fast.student, "student.pt2")       # minutes, once
    aot.use_unet_package(models.fast.student, "student.pt2")   # every start: generate() now calls the package
"""

from __future__ import annotations

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


def _dims(max_batch: int) -> tuple[torch.export.Dim, dict]:
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return batch, {0: batch, 2: 8 * torch.export.Dim("h8", min=1, max=32), 3: 8 * torch.export.Dim("w8", min=1, max=32)}


def _compile(call: torch.nn.Module, inputs: tuple, dynamic_shapes: tuple, path: str | Path) -> Path:
    with torch.no_grad():
        exported = torch.export.export(call, inputs, dynamic_shapes=dynamic_shapes)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Weights left out of the package (a full-size UNet's would add gigabytes of disk and minutes of linking),
    # and none folded into the kernels either, so that the package computes with whatever weights it is given.
    configs = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True,
               "joint_graph_constant_folding": False}
    return Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs))


def _load(call: torch.nn.Module, path: str | Path):
    """The package at `path`, reading the parameters and buffers of `call`'s module in place, callable from
    any thread and inside CUDA graph capture."""
    # torch's loader documents run_single_threaded as the way to run a package inside CUDA graphs; without
    # its own thread handling, calls take turns here (the Fast and Quality paths share the VAE).
    package = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    tensors = dict(call.state_dict(keep_vars=True))
    package.load_constants({name: tensors[name].detach() for name in package.get_constant_fqns()},
                           check_full_update=True, user_managed=True)
    lock = threading.Lock()

    def run(*inputs):
        with lock:
            return package(*inputs)

    return run


def compile_unet(unet, path: str | Path, max_batch: int = 16) -> Path:
    """Export `unet` (as it is now, speed-ups applied) for batches 1 to `max_batch` and latent sides 8 to 256
    and compile it into the package `path`."""
    batch, latents = _dims(max_batch)
    return _compile(_UNetCall(unet), example_inputs(unet), (latents, {0: batch}, {0: batch}, {0: batch}, {0: batch}),
                    path)


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
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward


def compile_decoder(vae, path: str | Path, max_batch: int = 16) -> Path:
    """Export `vae.decode` for batches 1 to `max_batch` and latent sides 8 to 256 and compile it into the
    package `path`."""
    batch, latents = _dims(max_batch)
    example = torch.randn(2, vae.config.latent_channels, 64, 64, device=vae.device, dtype=vae.dtype)
    return _compile(_DecoderCall(vae), (example,), (latents,), path)


def use_decoder_package(vae, path: str | Path) -> None:
    """From now on `vae.decode(latents)` runs the package at `path` (from `compile_decoder` on a VAE of this
    architecture) on `vae`'s own weights; latents of another dtype (the fp32 retry after an fp16 overflow,
    which moves the VAE to fp32) take the uncompiled decode."""
    package, uncompiled, dtype, device = _load(_DecoderCall(vae), path), vae.decode, vae.dtype, vae.device

    def decode(z, return_dict: bool = True, **kwargs):
        if kwargs or z.dtype != dtype or vae.dtype != dtype or vae.device != device:
            return uncompiled(z, return_dict=return_dict, **kwargs)
        out = package(z)
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae.decode = decode
