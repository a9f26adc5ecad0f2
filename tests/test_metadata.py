from PIL import Image

from sdxl_fast import GenerationParams, infotext, parse_infotext, read_parameters, save_png


def test_infotext_is_in_the_format_other_sdxl_tools_read():
    params = GenerationParams("a fox, in snow", negative_prompt="blurry", mode="quality", steps=30, seed=42,
                              width=1152, height=896, guidance_scale=7.0).resolved()
    text = infotext(params, {"base": "sdxl-base", "refiner": "sdxl-refiner"})
    lines = text.split("\n")
    assert lines[0] == "a fox, in snow" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 1152x896, Model: sdxl-base")
    assert "Refiner: sdxl-refiner" in lines[2] and "Refiner switch at: 0.8" in lines[2]
    assert "Original size" not in text  # defaults are left out


def test_parse_round_trips_every_parameter():
    params = GenerationParams(
        "line one\nline two: with, commas", negative_prompt="bad, ugly", mode="quality", steps=12, seed=7,
        width=640, height=1536, guidance_scale=3.5, refiner_switch=0.7, original_size=(2048, 1024),
        crops_coords_top_left=(32, 64), target_size=(1536, 640), negative_original_size=(512, 512),
        negative_crops_coords_top_left=(8, 8), negative_target_size=(1024, 1024), aesthetic_score=7.0,
        negative_aesthetic_score=2.0, cache_interval=3,
    ).resolved()
    parsed, names = parse_infotext(infotext(params, {"base": "b", "refiner": "r"}))
    assert parsed == params and names["refiner"] == "r"
    fast = GenerationParams("x", mode="fast", steps=2, seed=0, width=512, height=768).resolved()
    assert parse_infotext(infotext(fast, {"fast": "student"}))[0] == fast


def test_png_carries_the_text_chunk(tmp_path):
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = "a prompt ünïcode\nSteps: 1, Seed: 3, Size: 8x8, Mode: fast"
    path = save_png(image, tmp_path / "sub" / "x.png")
    assert read_parameters(path) == image.info["parameters"]
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_an_unset_negative_crop_keeps_diffusers_defaults_through_the_metadata():
    crop_only = GenerationParams("x", mode="quality", steps=2, seed=1, crops_coords_top_left=(16, 8)).resolved()
    assert crop_only.negative_crops_coords_top_left is None
    assert crop_only.negative_crop(refiner=False) == (16, 8) and crop_only.negative_crop(refiner=True) == (0, 0)
    with_sizes = GenerationParams("x", mode="quality", steps=2, seed=1, crops_coords_top_left=(16, 8),
                                  negative_original_size=(512, 512)).resolved()
    assert with_sizes.negative_crop(refiner=False) == with_sizes.negative_crop(refiner=True) == (0, 0)
    for params in (crop_only, with_sizes):
        assert parse_infotext(infotext(params, {"base": "b", "refiner": "r"}))[0] == params
