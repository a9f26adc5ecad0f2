import torch

from sdxl_fast import GenerationParams, generate
from sdxl_fast.params import SDXL_BUCKETS, nearest_bucket

from recording import record_unet_calls


def test_buckets_are_about_1024_squared_in_multiples_of_64():
    assert (1024, 1024) in SDXL_BUCKETS and (1344, 768) in SDXL_BUCKETS and (768, 1344) in SDXL_BUCKETS
    for width, height in SDXL_BUCKETS:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.85 < width * height / 1024**2 < 1.1
    assert nearest_bucket(1920, 1080) == (1344, 768)


def test_micro_conditioning_reaches_the_unets_as_time_ids(tiny_models):
    q = tiny_models.quality
    params = GenerationParams(
        "a castle", negative_prompt="blurry", mode="quality", steps=4, seed=1, width=64, height=96,
        original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(960, 640),
        negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 0), negative_target_size=(96, 64),
        aesthetic_score=7.5, negative_aesthetic_score=1.5, refiner_switch=0.5,
    )
    with record_unet_calls(base=q.base, refiner=q.refiner) as calls:
        generate(tiny_models, params)
    base_calls = [c for c in calls if c["unet"] == "base"]
    refiner_calls = [c for c in calls if c["unet"] == "refiner"]
    assert base_calls and refiner_calls
    # Rows are [negative; positive] for classifier-free guidance: (orig_h, orig_w, top, left, target_h, target_w).
    expected_base = torch.tensor([[256, 256, 0, 0, 96, 64], [512, 384, 16, 8, 960, 640]], dtype=torch.float32)
    # The refiner reads (orig_h, orig_w, top, left, aesthetic_score).
    expected_refiner = torch.tensor([[256, 256, 0, 0, 1.5], [512, 384, 16, 8, 7.5]], dtype=torch.float32)
    for call in base_calls:
        torch.testing.assert_close(call["time_ids"], expected_base)
        assert call["context"].shape == (2, 77, 80)
    for call in refiner_calls:
        torch.testing.assert_close(call["time_ids"], expected_refiner)
        assert call["context"].shape == (2, 77, 48)


def test_default_micro_conditioning_is_the_output_size(tiny_models):
    f = tiny_models.fast
    with record_unet_calls(student=f.student) as calls:
        generate(tiny_models, GenerationParams("a cat", mode="fast", seed=0, width=72, height=64))
    torch.testing.assert_close(calls[0]["time_ids"], torch.tensor([[64.0, 72, 0, 0, 64, 72]]))
