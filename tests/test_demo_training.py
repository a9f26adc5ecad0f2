"""The demo-family training pipeline on the CPU at tiny pools and a few steps: every stage from its command
line, checkpoints and resume, the wall-clock budget, the fp16 export loading through sdxl_fast (fast 1 step,
quality 2 steps with the refiner), the distill config with the shipped ViT feature network, parallel drawing."""

import json
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import sdxl_fast
from sdxl_fast.shapes.cli import main as shapes_main

ROOT = Path(__file__).resolve().parent.parent
VIT = ROOT / "sdxl_fast" / "shapes" / "vit_weights" / "vit.safetensors"
TINY = ["--pool-size", "12", "--workers", "1", "--batch-size", "2", "--log-every", "1", "--threads", "1",
        "--eval-images", "16"]


def _state(work: Path, stage: str) -> dict:
    return json.loads((work / stage / "state.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work dir with every stage trained a few steps, each run twice (the second resumes)."""
    torch.set_num_threads(1)
    w = tmp_path_factory.mktemp("demo")
    shapes_main(["train-demo", "--stage", "encoders", "--work", str(w), "--max-steps", "2", *TINY])
    for stage in ("vae", "base", "refiner"):
        shapes_main(["train-demo", "--stage", stage, "--work", str(w), "--max-steps", "2", *TINY])
        w.joinpath(f"{stage}-first.json").write_text((w / stage / "state.json").read_text())
        shapes_main(["train-demo", "--stage", stage, "--work", str(w), "--max-steps", "3", *TINY])
    return w


@pytest.mark.parametrize("stage", ["vae", "base", "refiner"])
def test_stage_checkpoints_and_resumes(work, stage):
    first = json.loads((work / f"{stage}-first.json").read_text())
    assert first["step"] == 2
    assert _state(work, stage)["step"] == 3  # the second run continued from step 2
    files = {"model.safetensors", "state.json", "optimizer.pt"} | ({"ema.safetensors"} if stage != "vae" else set())
    assert files <= {p.name for p in (work / stage).iterdir()}
    for name in ("model.safetensors", "ema.safetensors"):
        if (work / stage / name).is_file():
            assert (work / stage / name).stat().st_size < 16 * 2**20  # fits one returned file of the GPU tool
    if stage == "vae":
        assert 0.05 < _state(work, "vae")["scaling_factor"] < 50


def test_resume_without_optimizer_state_restarts_warmup(work, capsys):
    """Checkpoints come back from the GPU machine without optimizer.pt: a resume still works."""
    (work / "refiner" / "optimizer.pt").unlink()
    shapes_main(["train-demo", "--stage", "refiner", "--work", str(work), "--max-steps", "4", *TINY])
    assert _state(work, "refiner")["step"] == 4
    assert _state(work, "refiner")["opt_steps"] == 1
    assert "warms up again" in capsys.readouterr().out


def test_time_budget_stops_the_run(work):
    before = _state(work, "vae")["step"]
    started = time.time()
    shapes_main(["train-demo", "--stage", "vae", "--work", str(work), "--minutes", "0.05", "--reserve-seconds", "0",
                 *TINY])
    assert time.time() - started < 20
    assert _state(work, "vae")["step"] > before


def test_export_loads_and_generates(work, tmp_path):
    from safetensors import safe_open

    from sdxl_fast.shapes.export_demo import export_demo

    student = tmp_path / "student"  # stands in for distill's output: a UNet-only fp32 folder
    from sdxl_fast.shapes import demo_family
    from sdxl_fast.shapes.train_demo import load_weights

    unet = demo_family.build_base_unet()
    load_weights(unet, work / "base", ema=True)
    unet.save_pretrained(student)
    out = export_demo(work, tmp_path / "demo_models", student=student)
    for folder in out.values():
        for path in folder.rglob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, path
    assert not (out["refiner"] / "vae").exists() and not (out["refiner"] / "text_encoder_2").exists()

    models = sdxl_fast.load(modes=("quality", "fast"), sources=sdxl_fast.ModelSources(
        base=str(out["base"]), refiner=str(out["refiner"]), fast=str(out["student"])), device="cpu")
    assert models.quality.vae.config.scaling_factor == pytest.approx(_state(work, "vae")["scaling_factor"])
    calls = []
    models.quality.refiner.register_forward_hook(lambda *a: calls.append(1))
    fast = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a red circle", mode="fast", steps=1, seed=0,
                                                                 width=128, height=128))[0]
    quality = sdxl_fast.generate(models, sdxl_fast.GenerationParams(
        "a red circle", mode="quality", steps=2, seed=0, width=128, height=128, refiner_switch=0.5))[0]
    assert fast.size == quality.size == (128, 128)
    assert calls, "the refiner never ran"


def test_caption_encoding_matches_inference(work):
    from sdxl_fast.models import TextEncoders
    from sdxl_fast.pipeline.prompts import encode_prompts
    from sdxl_fast.shapes.train_demo import encode_captions, load_encoders

    enc = load_encoders(work, "cpu")
    caps = ["a red circle", "", "two small green squares on a gray gradient background", "a red circle"]
    context, pooled, index = encode_captions(enc, caps, "cpu")
    ref = encode_prompts(TextEncoders(enc[2], enc[0], enc[3], enc[1]), caps, torch.device("cpu"))
    torch.testing.assert_close(context[index], ref.base_context)
    torch.testing.assert_close(pooled[index], ref.pooled)
    assert len(context) == 3


def test_shipped_vit_loads_into_the_discriminator_with_no_missing_keys():
    from safetensors.torch import load_file

    from sdxl_fast.distill.discriminator import load_backbone
    from sdxl_fast.shapes.demo_config import PretrainConfig
    from sdxl_fast.shapes.feature_net import check_loads

    cfg = tomllib.loads((ROOT / "configs" / "demo-student.toml").read_text())
    assert cfg["disc_weights"] == "sdxl_fast/shapes/vit_weights/vit.safetensors"
    info = json.loads(VIT.with_suffix(".json").read_text())
    assert info["backbone_kwargs"] == cfg["disc_backbone_kwargs"] and info["img_size"] == cfg["disc_image_size"]
    assert info["training"]["train_seeds"][1] <= 10**9  # never trained on held-out seeds
    assert check_loads(VIT, PretrainConfig(**cfg["disc_backbone_kwargs"], img_size=cfg["disc_image_size"])) == []
    backbone = load_backbone(cfg["disc_backbone"], str(VIT), cfg["disc_image_size"], **cfg["disc_backbone_kwargs"])
    loaded = backbone.state_dict()
    for key, value in load_file(str(VIT)).items():
        torch.testing.assert_close(loaded[key], value)
    # The features know the shapes labels (chance: colour 1/8, background 1/9).
    assert info["heldout_accuracy"]["colour"] > 0.8 and info["heldout_accuracy"]["background"] > 0.8


def test_pretrain_vit_writes_a_backbone_distill_loads(tmp_path):
    """`pretrain-vit` end to end at a few images and steps: accuracy per label, a loadable backbone."""
    from sdxl_fast.shapes.data import LABELS
    from sdxl_fast.shapes.demo_config import PretrainConfig
    from sdxl_fast.shapes.feature_net import check_loads

    out = tmp_path / "vit"
    shapes_main(["pretrain-vit", "--out", str(out), "--train-images", "16", "--eval-images", "8", "--steps", "2",
                 "--batch-size", "4", "--log-every", "1", "--threads", "1"])
    info = json.loads((out / "vit.json").read_text())
    assert set(LABELS) <= set(info["heldout_accuracy"])
    assert check_loads(out / "vit.safetensors", PretrainConfig()) == []


def test_pretrain_vit_time_budget_ends_the_run_early(tmp_path):
    """`--minutes` stops a run long before its step count, and the record says how many steps it made."""
    out = tmp_path / "vit"
    shapes_main(["pretrain-vit", "--out", str(out), "--train-images", "16", "--eval-images", "8", "--steps", "100000",
                 "--batch-size", "4", "--log-every", "0", "--threads", "1", "--minutes", "0.02"])
    info = json.loads((out / "vit.json").read_text())
    assert 1 <= info["training"]["steps"] < 100000 and info["training"]["train_seconds"] < 10


def test_demo_student_config_runs_with_distill(work, tmp_path):
    """configs/demo-student.toml as the GPU call uses it, shrunk to 1 step of batch 2 on the CPU."""
    from sdxl_fast.distill.config import load_config
    from sdxl_fast.distill.train import train
    from sdxl_fast.shapes.export_demo import export_demo
    from sdxl_fast.shapes.writer import write_folder

    export_demo(work, tmp_path / "teacher", parts=("base",))
    write_folder(tmp_path / "data", 4, metadata=False)
    cfg = load_config(ROOT / "configs" / "demo-student.toml", {
        "teacher": str(tmp_path / "teacher" / "base"), "data": str(tmp_path / "data"), "output_dir": str(tmp_path / "st"),
        "batch_size": "2", "num_workers": "0", "max_steps": "1", "mixed_precision": "no",
        "disc_weights": str(VIT), "checkpoint_every": "0"})
    summary = train(cfg)
    assert summary["step"] == 1 and (tmp_path / "st" / "student" / "diffusion_pytorch_model.safetensors").is_file()

    # The exported student's card points its usage at the exported base, and keeps the training record as it was.
    out = export_demo(work, tmp_path / "demo", parts=("student",), student=tmp_path / "st" / "student")
    usage, _, record = (out["student"] / "README.md").read_text().partition("## Training config")
    assert f'base="{tmp_path / "demo" / "base"}"' in usage and cfg.teacher not in usage
    assert f'"teacher": "{cfg.teacher}"' in record


def test_parallel_drawing_equals_serial(tmp_path):
    from sdxl_fast.shapes.pool import draw_pool
    from sdxl_fast.shapes.writer import write_folder

    serial = draw_pool(6, start=3, workers=1, chunk=2)
    parallel = draw_pool(6, start=3, workers=2, chunk=2)
    assert np.array_equal(serial[0], parallel[0]) and serial[1:] == parallel[1:]
    write_folder(tmp_path / "a", 5, workers=1, chunk=2)
    write_folder(tmp_path / "b", 5, workers=2, chunk=2)
    for name in ("000004.png", "000004.txt", "metadata.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError):
        draw_pool(2, start=10**9 - 1)
