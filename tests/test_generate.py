import numpy as np
import pytest
import torch

from sdxl_fast import GenerationParams, generate, native_side, parse_infotext


def pixels(image):
    return np.asarray(image)


@pytest.mark.parametrize("mode,steps", [("fast", 2), ("quality", 6)])
def test_same_inputs_and_seed_give_the_same_pixels(tiny_models, mode, steps):
    params = GenerationParams("a lighthouse", negative_prompt="fog", mode=mode, steps=steps, seed=11,
                              width=64, height=80)
    a, b = generate(tiny_models, params)[0], generate(tiny_models, params)[0]
    assert a.size == (64, 80)
    assert np.array_equal(pixels(a), pixels(b))
    other = generate(tiny_models, GenerationParams("a lighthouse", negative_prompt="fog", mode=mode, steps=steps,
                                                   seed=12, width=64, height=80))[0]
    assert not np.array_equal(pixels(a), pixels(other))


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_batch_image_i_is_the_single_image_of_seed_plus_i(tiny_models, mode):
    params = GenerationParams("two birds", mode=mode, steps=3, seed=100, width=64, height=64, num_images=3)
    batch = generate(tiny_models, params)
    assert len(batch) == 3
    single = generate(tiny_models, GenerationParams("two birds", mode=mode, steps=3, seed=102, width=64, height=64))[0]
    # Same noise; only the kernels' batch-size-dependent float rounding may move a pixel by a level or two.
    diff = np.abs(pixels(batch[2]).astype(int) - pixels(single).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.05
    assert [parse_infotext(im.info["parameters"])[0].seed for im in batch] == [100, 101, 102]


def test_metadata_reproduces_the_image(tiny_models):
    first = generate(tiny_models, GenerationParams("a tree", mode="quality", steps=5, width=64, height=64,
                                                   crops_coords_top_left=(8, 0), guidance_scale=4.0))[0]
    params, _ = parse_infotext(first.info["parameters"])
    again = generate(tiny_models, params)[0]
    assert np.array_equal(pixels(first), pixels(again))


def test_progress_callback_sees_every_step_with_previewable_latents(tiny_models):
    steps = []
    generate(tiny_models, GenerationParams("a boat", mode="quality", steps=5, seed=1, width=64, height=64),
             callback=steps.append)
    assert [s.index for s in steps] == [1, 2, 3, 4, 5] and all(s.total == 5 for s in steps)
    assert steps[0].denoised.shape == (1, 4, 8, 8)


def test_raising_from_the_callback_stops_generation(tiny_models):
    class Stop(Exception):
        pass

    seen = []

    def stop_after_two(step):
        seen.append(step.index)
        if step.index == 2:
            raise Stop

    with pytest.raises(Stop):
        generate(tiny_models, GenerationParams("a boat", mode="quality", steps=8, width=64, height=64),
                 callback=stop_after_two)
    assert seen == [1, 2]


@pytest.mark.parametrize("field,value,message", [
    ("width", 100, "multiple of 8"), ("height", 30, "multiple of 8"), ("steps", -3, "steps"),
    ("seed", 2**32, "seed"), ("seed", -1, "seed"), ("mode", "turbo", "mode"), ("num_images", 0, "num_images"),
    ("refiner_switch", 1.5, "refiner_switch"), ("crops_coords_top_left", (-1, 0), "crops"),
])
def test_bad_parameters_are_clear_errors(tiny_models, field, value, message):
    kwargs = dict(mode="quality", width=64, height=64)
    kwargs[field] = value
    params = GenerationParams("x", **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_models, params)


def test_an_unset_size_is_the_models_own(tiny_models):
    # The tiny family declares SDXL's sizes: the base 1024² (128 latents), the student 512² like SDXL-Turbo.
    assert native_side(tiny_models, "quality") == 1024 and native_side(tiny_models, "fast") == 512
    student = tiny_models.fast.student
    student.register_to_config(sample_size=8)  # as if trained at 64², as the demo family is at 128²
    try:
        image = generate(tiny_models, GenerationParams("a small house", mode="fast", seed=0))[0]
    finally:
        student.register_to_config(sample_size=64)
    assert image.size == (64, 64) and "Size: 64x64" in image.info["parameters"]


def test_the_fast_schedule_is_copied_to_the_device_once(tiny_models):
    from sdxl_fast.pipeline.generate import _schedule_on

    scheduler = tiny_models.fast.scheduler
    first = _schedule_on(scheduler, tiny_models.device)
    assert _schedule_on(scheduler, tiny_models.device) is first  # not a new copy per call
    assert torch.equal(first, scheduler.alphas_cumprod)


def test_requests_batched_together_get_the_images_each_gets_alone(tiny_models):
    """A server batches the Fast requests that arrive together: each keeps its own prompt, seed, image count and
    micro-conditioning, and gets the images `generate` makes for it alone (up to a batch's rounding)."""
    from sdxl_fast.pipeline.generate import generate_many

    requests = [GenerationParams("a red fox", mode="fast", steps=2, seed=3, width=64, height=64),
                GenerationParams("a blue bird", mode="fast", steps=2, seed=9, width=64, height=64, num_images=2),
                GenerationParams("a tree", mode="fast", steps=2, seed=1, width=64, height=64, original_size=(32, 48))]
    together = generate_many(tiny_models, requests)
    assert [len(images) for images in together] == [1, 2, 1]
    for params, images in zip(requests, together):
        alone = generate(tiny_models, params)
        for got, want in zip(images, alone):
            assert np.abs(np.asarray(got).astype(int) - np.asarray(want).astype(int)).max() <= 1
            assert got.info["parameters"] == want.info["parameters"]
    with pytest.raises(ValueError, match="batch_key"):
        generate_many(tiny_models, [requests[0], GenerationParams("x", mode="fast", steps=1, width=64, height=64)])


def test_the_latent_size_follows_the_vaes_downsampling_factor(tiny_models):
    """A VAE with 3 blocks downsamples by 4, not SDXL's 8: the noise, the latents and the image follow it."""
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from sdxl_fast.models import vae_scale_factor
    from sdxl_fast.pipeline.generate import generate_tensors

    config = dict(tiny_models.fast.vae.config)
    vae = AutoencoderKL.from_config({**config, "block_out_channels": [8, 16, 16],
                                     "down_block_types": ["DownEncoderBlock2D"] * 3,
                                     "up_block_types": ["UpDecoderBlock2D"] * 3}).eval().requires_grad_(False)
    assert vae_scale_factor(vae) == 4 and vae_scale_factor(tiny_models.fast.vae) == 8
    models = replace(tiny_models, fast=replace(tiny_models.fast, vae=vae))
    assert native_side(models, "fast") == tiny_models.fast.student.config.sample_size * 4
    latents, images, _ = generate_tensors(models, GenerationParams("a cat", mode="fast", seed=0, width=96, height=64))
    assert latents.shape == (1, 4, 16, 24) and images.shape == (1, 64, 96, 3)
