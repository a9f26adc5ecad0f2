"""sdxl_fast.accel.aot: one ahead-of-time package for every batch size and size of the Fast UNet, and one of
its VAE decoder, each running on the weights of the module it is given."""

from dataclasses import replace

import torch

from sdxl_fast import GenerationParams, accel, load
from sdxl_fast.accel import aot
from sdxl_fast.pipeline.generate import generate_tensors

SHAPES = [(128, 1), (128, 3), (192, 2)]  # (side, images): sizes and batch sizes other than the exports'


def test_packages_serve_every_batch_and_size_on_the_modules_weights_without_compiling(tiny_sources, tmp_path):
    models = load(modes=("fast",), sources=tiny_sources, device="cpu", dtype=torch.float32)
    # As on a GPU, cross-attention keys and values hoisted out of the UNet: it is called with their wide tensor
    accel.apply(models, replace(accel.Acceleration.for_device(models.device), fuse_qkv=True, hoist_cross_kv=True))
    unet, vae = models.fast.student, models.fast.vae

    def images():
        return [generate_tensors(models, GenerationParams("a red circle", mode="fast", steps=2, seed=3, width=side,
                                                          height=side, num_images=n))[1] for side, n in SHAPES]

    exported_weights = images()
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # a quicker C++ build
        unet_package = aot.compile_unet(unet, tmp_path / "unet.pt2", max_batch=4)
        decoder_package = aot.compile_decoder(vae, tmp_path / "decoder.pt2", max_batch=4)
    with torch.no_grad():  # other weights of the same architecture: the packages must not have kept their own
        for p in [*unet.parameters(), *vae.parameters()]:
            p.mul_(1 + 0.2 * torch.rand_like(p))
    eager = images()
    assert any((a.int() - b.int()).abs().max() > 8 for a, b in zip(eager, exported_weights))

    aot.use_unet_package(unet, unet_package)
    aot.use_decoder_package(vae, decoder_package)
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
