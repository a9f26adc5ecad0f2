"""sdxl_fast.accel.aot: one file compiled ahead of time for every batch size and size of the Fast UNet, and one
of its VAE decoder, each running on the weights of the module it is given, loaded in another process."""

import copy
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch

from sdxl_fast import GenerationParams, ModelSources, accel, load
from sdxl_fast.accel import aot
from sdxl_fast.pipeline.generate import generate_tensors

SHAPES = [(128, 1), (128, 3), (192, 2)]  # (side, images): sizes and batch sizes other than the exports'


def fast_models(sources: ModelSources):
    models = load(modes=("fast",), sources=sources, device="cpu", dtype=torch.float32)
    # As on a GPU, cross-attention keys and values hoisted out of the UNet: it is called with their wide tensor
    accel.apply(models, replace(accel.Acceleration.for_device(models.device), fuse_qkv=True, hoist_cross_kv=True))
    return models


def compile_part(sources: ModelSources, part: str, path) -> str:
    """In a process of its own (the two compiles take minutes of one core each): a copy of the part compiled,
    as the server does (sdxl_fast.serving.packages)."""
    torch.set_num_threads(1)
    fast = fast_models(sources).fast
    if part == "unet":
        return str(aot.compile_unet(copy.deepcopy(fast.student), path))
    return str(aot.compile_decoder(copy.deepcopy(fast.vae), path))


def test_packages_serve_every_batch_and_size_on_the_modules_weights_without_compiling(tiny_sources, tmp_path):
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiling = {part: pool.submit(compile_part, tiny_sources, part, tmp_path / f"{part}.aot")
                     for part in ("unet", "decoder")}
        models = fast_models(tiny_sources)
        unet, vae = models.fast.student, models.fast.vae

        def images():
            return [generate_tensors(models, GenerationParams("a red circle", mode="fast", steps=2, seed=3, width=side,
                                                              height=side, num_images=n))[1] for side, n in SHAPES]

        exported_weights = images()
        with torch.no_grad():  # other weights of the same architecture: the packages must not have kept their own
            for p in [*unet.parameters(), *vae.parameters()]:
                p.mul_(1 + 0.2 * torch.rand_like(p))
        eager = images()
        assert any((a.int() - b.int()).abs().max() > 8 for a, b in zip(eager, exported_weights))
        packages = {part: future.result() for part, future in compiling.items()}

    aot.use_unet_package(unet, packages["unet"])
    aot.use_decoder_package(vae, packages["decoder"])
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
