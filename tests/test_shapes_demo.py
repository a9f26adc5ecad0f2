"""The shipped demo models: they load through sdxl_fast, and the 1-step ADD student draws what it is asked for,
as read by the shipped probe. Skipped only in a copy without demo_models/ (docs/DEMO_MODELS.md trains them)."""

import pytest
import torch

import sdxl_fast
from sdxl_fast.loading import demo_models_available
from sdxl_fast.shapes.probe import DEFAULT_DIR, load_probe, predict

pytestmark = pytest.mark.skipif(
    not (demo_models_available() and (DEFAULT_DIR / "probe.safetensors").is_file()),
    reason="no demo_models/ in this copy (docs/DEMO_MODELS.md says how to train them)")


def test_one_step_student_draws_a_red_circle():
    """Most of ten seeds, not one picked seed: one image is a coin toss for a 2.6 M-parameter student."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = sdxl_fast.load(modes=("fast",), sources=sdxl_fast.resolve_sources(preset="demo"), device="cpu",
                            dtype=torch.float32)
    # No size given: the models' own, 128², as in the app and the CLI.
    images = [sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red circle", mode="fast", steps=1, seed=seed))[0]
              for seed in range(10)]
    assert all(image.size == (128, 128) for image in images)
    read = [(p["shape"], p["colour"]) for p in predict(load_probe(), images)]
    assert read.count(("circle", "red")) > len(read) // 2, read
