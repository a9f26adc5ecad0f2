"""The `sdxl-fast` command end to end on the saved tiny folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_fast import parse_infotext, read_parameters
from sdxl_fast.cli import main


@pytest.fixture
def tiny_env(monkeypatch, tiny_sources):
    monkeypatch.setenv("SDXL_FAST_BASE", tiny_sources.base)
    monkeypatch.setenv("SDXL_FAST_REFINER", tiny_sources.refiner)
    monkeypatch.setenv("SDXL_FAST_FAST", tiny_sources.fast)


@pytest.mark.parametrize("mode,extra", [
    ("fast", ["--steps", "4", "--cache-interval", "2"]),
    ("quality", ["--steps", "6", "--cfg", "4", "-n", "dark", "--original-size", "512x256", "--crop", "8,16",
                 "--aesthetic-score", "7"]),
])
def test_generate_writes_a_png_that_reproduces_itself(tiny_env, tmp_path, mode, extra, capsys):
    out = tmp_path / f"{mode}.png"
    args = ["generate", "a small house", "--mode", mode, "--seed", "5", "--size", "64x96", "-o", str(out), "-q"]
    assert main(args + extra) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 96)
        first = np.asarray(image.convert("RGB"))
    params, _ = parse_infotext(read_parameters(out))
    assert (params.mode, params.seed, params.width, params.height) == (mode, 5, 64, 96)
    assert params.cache_interval == (2 if mode == "fast" else 1)
    if mode == "quality":
        assert params.original_size == (256, 512) and params.crops_coords_top_left == (8, 16)
        assert params.negative_prompt == "dark" and params.guidance_scale == 4.0 and params.aesthetic_score == 7.0

    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(first, np.asarray(Image.open(again).convert("RGB")))


def test_without_size_the_image_has_the_models_own_size(tiny_env, tiny_sources, tmp_path, monkeypatch, capsys):
    student = tmp_path / "student"  # trained at 64² (8 latents), as the demo family's is at 128²
    shutil.copytree(tiny_sources.fast, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps(dict(config, sample_size=8)))
    monkeypatch.setenv("SDXL_FAST_FAST", str(student))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a small house", "-q"]) == 0
    out = Path(capsys.readouterr().out.strip())
    params, _ = parse_infotext(read_parameters(out))
    assert Image.open(out).size == (64, 64) and (params.width, params.height) == (64, 64)
    assert out.name == f"fast-{params.seed}.png"  # the name and the image share the one seed drawn


def test_several_images_get_numbered_names(tiny_env, tmp_path):
    assert main(["generate", "dots", "--num-images", "2", "--seed", "9", "--size", "64", "-o",
                 str(tmp_path / "dots.png"), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dots-1.png", "dots-2.png"]
    assert parse_infotext(read_parameters(tmp_path / "dots-2.png"))[0].seed == 10


@pytest.mark.parametrize("args,message", [
    (["--size", "100x64"], "multiple of 8"),
    (["--steps", "-2"], "steps"),
    (["--steps", "0"], "steps"),
    (["--mode", "fast", "--steps", "5"], "1 to 4"),
    (["--seed", str(2**32)], "seed"),
    (["--preset", "nope"], "Unknown preset"),
    (["-o", "out.jpg"], ".png"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_env, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a cat", "--size", "64", "-q"] + args if "--size" not in args
                else ["generate", "a cat", "-q"] + args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_malformed_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a cat", "--size", "big"])
    assert exit_.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err


def test_a_10000_character_prompt_is_truncated_not_fatal(tiny_env, tmp_path):
    out = tmp_path / "long.png"
    with pytest.warns(UserWarning, match="tokens"):
        assert main(["generate", "a castle " * 1250, "--size", "64", "-o", str(out), "-q"]) == 0
    assert out.is_file()


def test_console_script_and_missing_weights_message(tmp_path):
    """The installed entry point, run as a user would, with no weights anywhere and no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_FAST_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "sdxl_fast", "generate", "a cat", "--preset", "sdxl",
                             "-o", str(tmp_path / "x.png")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "stabilityai/sdxl-turbo" in result.stderr and "--fast" in result.stderr
    assert not (tmp_path / "x.png").exists()
    help_text = subprocess.run([sys.executable, "-m", "sdxl_fast", "generate", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--from-png" in help_text and "examples:" in help_text


def test_a_folder_of_pickled_weights_is_a_one_line_error(tiny_sources, tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    student = tmp_path / "pickled"
    UNet2DConditionModel.from_pretrained(tiny_sources.fast).save_pretrained(student, safe_serialization=False)
    monkeypatch.setenv("SDXL_FAST_BASE", tiny_sources.base)
    monkeypatch.setenv("SDXL_FAST_FAST", str(student))
    assert main(["generate", "a cat", "--size", "64", "-q", "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only pickled weights" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_an_unwritable_output_is_refused_before_generating(tiny_env, tmp_path, monkeypatch, capsys):
    import sdxl_fast

    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(sdxl_fast, "load", lambda *a, **k: pytest.fail("loaded before checking the output"))
    assert main(["generate", "a cat", "--size", "64", "-q", "-o", str(tmp_path / "a-file" / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the output" in err


def test_an_existing_output_is_kept_unless_overwrite(tiny_env, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    assert main(["generate", "a cat", "--size", "64", "-q", "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["generate", "a cat", "--size", "64", "-q", "-o", str(out), "--overwrite"]) == 0
    assert Image.open(out).size == (64, 64)


def test_from_png_with_a_malformed_size_names_the_field(tmp_path, capsys):
    from sdxl_fast import save_png

    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = "a cat\nSteps: 1, Sampler: Euler a, CFG scale: 1.0, Seed: 3, Size: 64x64x2, Mode: fast"
    save_png(image, tmp_path / "bad.png")
    assert main(["generate", "--from-png", str(tmp_path / "bad.png"), "-o", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "malformed 'Size' field" in err


def test_the_sampler_flag_and_from_png_reproduce_the_sampler(tiny_env, tmp_path):
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", "--size", "64", "--steps", "2", "--sampler", "Euler a", "-q", "-o", str(out)]) == 0
    assert parse_infotext(read_parameters(out))[0].sampler == "Euler a"
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "Sampler: Euler a" in read_parameters(again)
