"""sdxl_fast.accel.aot: one ahead-of-time package for every batch size and size of the Fast UNet."""

import torch

from sdxl_fast import GenerationParams, accel, load
from sdxl_fast.accel import aot
from sdxl_fast.pipeline.generate import generate_tensors

SHAPES = [(128, 1), (128, 3), (192, 2)]  # (side, images): sizes and batch sizes other than the export's


def test_one_package_serves_every_batch_and_size_from_its_own_weights_without_compiling(tiny_sources, tmp_path):
    models = load(modes=("fast",), sources=tiny_sources, device="cpu", dtype=torch.float32)
    accel.apply(models, accel.Acceleration.for_device(models.device))

    def images():
        return [generate_tensors(models, GenerationParams("a red circle", mode="fast", steps=2, seed=3, width=side,
                                                          height=side, num_images=n))[1] for side, n in SHAPES]

    eager = images()
    unet = models.fast.student
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):  # a quicker C++ build
        package = aot.compile_unet(unet, tmp_path / "student.pt2", max_batch=4)
    aot.use_package(unet, package)
    with torch.no_grad():
        for p in unet.parameters():  # the package holds its own copy: the module's weights no longer matter
            p.zero_()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = images()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing traced on any shape
    for (side, n), a, b in zip(SHAPES, eager, compiled):
        assert b.shape == (n, side, side, 3)
        assert (a.int() - b.int()).abs().max() <= 2, (side, n)  # uint8 images, up to float rounding
