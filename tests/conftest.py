"""The offline test bed: a tiny random-weight SDXL family saved as diffusers folders once per session."""

import os

import pytest
import torch

from sdxl_fast import accel
from sdxl_fast.loading import ENV_VARS, PRESET_ENV_VAR, ModelSources, load
from sdxl_fast.testing.random_weights import save_random_family


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path_factory):
    """No test may see the developer's model env vars or Hugging Face cache."""
    for var in (*ENV_VARS.values(), PRESET_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict:
    """{"base", "refiner", "student", "turbo"} -> folder of a tiny SDXL-shaped model."""
    return save_random_family(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sources(tiny_family) -> ModelSources:
    return ModelSources(base=str(tiny_family["base"]), refiner=str(tiny_family["refiner"]),
                        fast=str(tiny_family["student"]))


@pytest.fixture(scope="session")
def tiny_models(tiny_sources):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    models = load(sources=tiny_sources, device="cpu", dtype=torch.float32)
    accel.apply(models, accel.Acceleration.for_device(models.device))  # as the app and the CLI do
    return models


@pytest.fixture(scope="module")
def served(tiny_models):
    """The app on the tiny models, served on a free port for one test module: (url, studio)."""
    from test_app_helpers import running_app

    with running_app(tiny_models) as (url, studio):
        yield url, studio


@pytest.fixture
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False, download_files=True)
