"""The shipped demo models: they load through sdxl_fast, and the 1-step ADD student draws what it is asked for,
as read by the shipped probe. Skipped until the demo weights are trained and shipped (docs/DEMO_MODELS.md)."""

import pytest
import torch

import sdxl_fast
from sdxl_fast.loading import demo_models_available
from shapes.probe import DEFAULT_DIR, load_probe, predict

pytestmark = pytest.mark.skipif(
    not (demo_models_available() and (DEFAULT_DIR / "probe.safetensors").is_file()),
    reason="demo model weights are not shipped yet (trained on GPU, see docs/DEMO_MODELS.md)")


def test_one_step_student_draws_a_red_circle():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = sdxl_fast.load(modes=("fast",), sources=sdxl_fast.resolve_sources(preset="demo"), device="cpu",
                            dtype=torch.float32)
    image = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red circle", mode="fast", steps=1, seed=0,
                                                                  width=128, height=128))[0]
    assert image.size == (128, 128)
    predicted = predict(load_probe(), [image])[0]
    assert (predicted["shape"], predicted["colour"]) == ("circle", "red"), predicted
