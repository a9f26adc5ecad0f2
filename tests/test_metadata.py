import json
import re

import pytest
from PIL import Image

from sdxl_fast import GenerationParams, infotext, metadata, parse_infotext, read_parameters, save_png


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


def test_jpeg_carries_the_parameters_in_exif_user_comment(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    image.info["parameters"] = "a prompt ünïcode\nSteps: 1, Seed: 3, Size: 8x8, Mode: fast"
    path = tmp_path / "x.jpeg"
    path.write_bytes(metadata.jpeg_bytes(image))
    with Image.open(path) as read:
        assert read.format == "JPEG" and read.size == (8, 8)
    assert read_parameters(path) == image.info["parameters"]
    bare = tmp_path / "bare.jpeg"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(ValueError, match="no 'parameters' text"):
        read_parameters(bare)


def test_jpeg_bytes_are_the_same_where_the_os_refuses_an_in_memory_file(monkeypatch):
    image = Image.effect_noise((64, 48), 40).convert("RGB")
    image.info["parameters"] = "a red fox\nSteps: 1, Seed: 7"
    in_memory = metadata.jpeg_bytes(image)

    def refused(name):
        raise OSError("memfd_create is not allowed here")

    monkeypatch.setattr(metadata.os, "memfd_create", refused)
    assert metadata.jpeg_bytes(image) == in_memory and in_memory[:2] == b"\xff\xd8"


def test_an_unset_negative_crop_keeps_diffusers_defaults_through_the_metadata():
    crop_only = GenerationParams("x", mode="quality", steps=2, seed=1, crops_coords_top_left=(16, 8)).resolved()
    assert crop_only.negative_crops_coords_top_left is None
    assert crop_only.negative_crop(refiner=False) == (16, 8) and crop_only.negative_crop(refiner=True) == (0, 0)
    with_sizes = GenerationParams("x", mode="quality", steps=2, seed=1, crops_coords_top_left=(16, 8),
                                  negative_original_size=(512, 512)).resolved()
    assert with_sizes.negative_crop(refiner=False) == with_sizes.negative_crop(refiner=True) == (0, 0)
    for params in (crop_only, with_sizes):
        assert parse_infotext(infotext(params, {"base": "b", "refiner": "r"}))[0] == params


TRICKY = [
    "a cat\nNegative prompt: a dog",
    "Negative prompt: everything",
    "  spaces around  \n\tand tabs\t",
    'Steps: 20, Sampler: Euler, Seed: 1\n"quoted", commas, and: colons',
    "windows\r\nline ends\n\nand an empty line",
    "\nleading newline",
    "ünïcode ✓ and \\ backslashes \\n",
]


def a1111_reader(text: str) -> tuple[str, str]:
    """AUTOMATIC1111's parse_generation_parameters, the prompt part: lines, then the last line's fields."""
    import re

    re_param = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, lastline = text.strip().split("\n")
    prompt, negative, done = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res = {"Prompt": prompt, "Negative prompt": negative}
    for k, v in re_param.findall(lastline):
        res[k] = json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v
    return res["Prompt"], res["Negative prompt"]


@pytest.mark.parametrize("text", TRICKY)
def test_any_prompt_text_reads_back_exactly(text):
    for prompt, negative in ((text, "blurry"), ("a fox", text), (text, text)):
        params = GenerationParams(prompt, negative_prompt=negative, mode="quality", steps=3, seed=1).resolved()
        written = infotext(params, {"base": "b", "refiner": "r"})
        assert parse_infotext(written)[0] == params
        assert a1111_reader(written) == (prompt, negative)


def test_ordinary_prompts_carry_no_extra_fields():
    written = infotext(GenerationParams("a fox, in snow", negative_prompt="blurry", mode="quality", steps=3,
                                        seed=1).resolved(), {"base": "b"})
    assert "Prompt: " not in written.split("\n")[-1]


def test_samplers_are_written_in_names_other_tools_read():
    def fields(sampler):
        params = GenerationParams("x", mode="fast", steps=2, seed=0, sampler=sampler).resolved()
        text = infotext(params, {"fast": "m"})
        assert parse_infotext(text)[0] == params
        return text.split("\n")[-1]

    assert "Sampler: Euler a, CFG scale" in fields("Euler a")
    assert "Sampler: LCM, Schedule type: ADD, CFG scale" in fields("ADD")
    old = "x\nSteps: 1, Sampler: ADD, CFG scale: 1.0, Seed: 3, Size: 512x512, Model: m, Mode: fast"
    assert parse_infotext(old)[0].sampler == "ADD"


@pytest.mark.parametrize("field,value", [("Size", "512x512x3"), ("Size", "big"), ("Steps", "many"),
                                         ("Crop top left", "[1, 2, 3]")])
def test_a_malformed_field_is_a_clear_error_naming_it(field, value):
    text = "x\nSteps: 4, Sampler: Euler, CFG scale: 5.0, Seed: 3, Size: 512x512, Model: m, Mode: quality"
    text = re.sub(rf"{field}: [^,]*", f"{field}: {value}", text) if field in text else text + f", {field}: {json.dumps(value)}"
    with pytest.raises(ValueError, match=f"malformed '{field}' field"):
        parse_infotext(text)
