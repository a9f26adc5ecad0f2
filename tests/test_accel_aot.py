"""sdxl_fast.accel.aot: one file compiled ahead of time for every batch size and size of the Fast UNet, and one
of its VAE decoder, each compiled in another process as the server does (sdxl_fast.serving.packages) and
running on the weights of the module it is given."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from sdxl_fast import GenerationParams, ModelSources, accel, load
from sdxl_fast.accel import aot
from sdxl_fast.pipeline.generate import generate_tensors
from sdxl_fast.serving import packages

SHAPES = [(128, 1), (128, 3), (192, 2)]  # (side, images): sizes and batch sizes other than the exports'


def fast_models(sources: ModelSources):
    models = load(modes=("fast",), sources=sources, device="cpu", dtype=torch.float32)
    # As on a GPU, cross-attention keys and values hoisted out of the UNet: it is called with their wide tensor
    accel.apply(models, replace(accel.Acceleration.for_device(models.device), fuse_qkv=True, hoist_cross_kv=True))
    return models


def test_packages_serve_every_batch_and_size_on_the_modules_weights_without_compiling(tiny_sources, tmp_path):
    models = fast_models(tiny_sources)
    unet, vae = models.fast.student, models.fast.vae
    with ThreadPoolExecutor(2) as pool:  # each compile in a process of its own, both at once (minutes each)
        compiling = {part: pool.submit(packages.compile_elsewhere, part, module, tmp_path / f"{part}.aot")
                     for part, module in (("unet", unet), ("vae-decoder", vae))}

        def images():
            return [generate_tensors(models, GenerationParams("a red circle", mode="fast", steps=2, seed=3, width=side,
                                                              height=side, num_images=n))[1] for side, n in SHAPES]

        exported_weights = images()
        with torch.no_grad():  # other weights of the same architecture: the packages must not have kept their own
            for p in [*unet.parameters(), *vae.parameters()]:
                p.mul_(1 + 0.2 * torch.rand_like(p))
        eager = images()
        assert any((a.int() - b.int()).abs().max() > 8 for a, b in zip(eager, exported_weights))
        for future in compiling.values():
            future.result()

    aot.use_unet_package(unet, tmp_path / "unet.aot")
    aot.use_decoder_package(vae, tmp_path / "vae-decoder.aot")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = images()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing traced on any shape
    for (side, n), a, b in zip(SHAPES, eager, compiled):
        assert b.shape == (n, side, side, 3)
        assert (a.int() - b.int()).abs().max() <= 3, (side, n)  # uint8 images, up to float rounding

    # A module moved to another dtype runs uncompiled again (the package read the weights it had).
    vae.to(torch.float64)
    latents = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    assert vae.decode(latents).sample.dtype == torch.float64


def test_a_module_compiles_where_torch_leaves_aot_compile_off(tmp_path, monkeypatch):
    """Torch 2.11 turns `aot_compile` off by default (later versions on): the compile must not depend on it."""

    class Decoder(torch.nn.Module):  # a VAE's decode, as aot calls it, in one convolution
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 1)

        def decode(self, z):
            return DecoderOutput(sample=self.conv(z))

    monkeypatch.setattr(torch._dynamo.config, "enable_aot_compile", False)
    path = aot._compile(aot._DecoderCall(Decoder()), (torch.randn(2, 4, 8, 8),), tmp_path / "conv.aot")
    assert path.is_file() and torch._dynamo.config.enable_aot_compile is False
