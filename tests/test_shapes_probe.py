"""The probe classifier: it learns from real images, scores captions correctly, saves and loads."""

import json

import numpy as np
import pytest
import torch

from sdxl_fast.shapes import data
from sdxl_fast.shapes.probe import (DEFAULT_DIR, HEADS, IGNORE, evaluate_real, features, label_targets, load_probe,
                          predict, predict_indices, render, save_probe, score, train_probe)

CHANCE = {"shape": 1 / 6, "colour": 1 / 8, "position": 1 / 9, "count": 1 / 3}


@pytest.fixture(scope="module")
def quick_probe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return train_probe(steps=120, train_images=400, batch_size=32, seed=0)


def test_short_training_beats_chance_on_heldout_images(quick_probe):
    acc = evaluate_real(quick_probe, n=300)
    for name in ("colour", "position", "count"):
        assert acc[name] > CHANCE[name] + 0.15, (name, acc)
    # Shape is the slowest head to learn (small objects are a few pixels at 64 px): after 120 steps it is only
    # a few points above chance. The shipped-probe test below checks the fully trained accuracy.
    assert acc["shape"] > CHANCE["shape"] + 0.03, acc


def test_score_counts_only_stated_attributes():
    targets = label_targets([
        {"shape": "circle", "colour": "red", "position": "center", "count": 1},
        {"shape": "star", "colour": "blue", "position": None, "count": 2},
    ])
    assert targets["position"].tolist() == [data.POSITIONS.index("center"), IGNORE]
    predicted = {k: v.clone() for k, v in targets.items()}
    predicted["position"][1] = 0  # any position is fine where the caption names none
    assert score(predicted, targets) == {"shape": 1.0, "colour": 1.0, "position": 1.0, "count": 1.0, "all": 1.0}
    predicted["colour"][0] = data.COLOUR_NAMES.index("green")
    out = score(predicted, targets)
    assert out["colour"] == 0.5 and out["all"] == 0.5 and out["shape"] == 1.0


def test_features_shape_and_save_load_round_trip(quick_probe, tmp_path):
    images = [data.sample(s)[0] for s in data.heldout_seeds(5)]
    f = features(quick_probe, images)
    assert f.shape == (5, quick_probe.config.feature_dim) and np.isfinite(f).all()
    save_probe(quick_probe, tmp_path, {"note": "test"})
    assert json.loads((tmp_path / "probe.json").read_text())["note"] == "test"
    loaded = load_probe(tmp_path)
    assert np.allclose(features(loaded, images), f, atol=1e-6)
    assert predict(loaded, images) == predict(quick_probe, images)
    with pytest.raises(FileNotFoundError):
        load_probe(tmp_path / "missing")


def test_training_refuses_heldout_seeds():
    with pytest.raises(ValueError):
        train_probe(steps=1, train_images=10, first_seed=data.HELDOUT_START - 5)


@pytest.mark.skipif(not (DEFAULT_DIR / "probe.safetensors").is_file(), reason="no shipped probe weights")
def test_shipped_probe_is_accurate_on_heldout_real_images():
    probe = load_probe()
    assert sum(p.numel() * p.element_size() for p in probe.state_dict().values()) < 2 * 1024 * 1024
    x, labels = render(data.heldout_seeds(300))
    acc = score(predict_indices(probe, x), label_targets(labels))
    for name in HEADS:
        assert acc[name] > 0.9, acc
    assert acc["all"] > 0.85, acc
