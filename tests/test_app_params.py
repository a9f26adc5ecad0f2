"""Studio.params: the UI's fields -> GenerationParams."""

import app


def params(**micro):
    fields = dict(orig_w=0, orig_h=0, crop_top=0, crop_left=0, target_w=0, target_h=0)
    fields.update(micro)
    return app.Studio(None).params("quality", dict(
        prompt="a cat", negative_prompt="", steps=4, seed=1, randomize_seed=False, size="256x128", guidance_scale=5.0, refiner_switch=0.8,
        num_images=1, aesthetic_score=6.0, negative_aesthetic_score=2.5, cache_interval=1, **fields))


def test_one_side_of_a_micro_conditioning_pair_means_the_output_size_for_the_other():
    assert params(orig_w=512).original_size == (128, 512)  # (height, width): the height is the output's
    assert params(orig_h=64).original_size == (64, 256)
    assert params(target_w=1024, target_h=None).target_size == (128, 1024)
    assert params().original_size == (128, 256) and params().target_size == (128, 256)
