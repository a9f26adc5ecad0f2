"""The training job end to end on the tiny SDXL family and a tiny DINOv2-shaped ViT (CPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import sdxl_fast
from sdxl_fast.pipeline import decoding
from sdxl_fast.distill import losses
from sdxl_fast.distill.checkpoints import list_checkpoints
from sdxl_fast.distill.config import load_config
from sdxl_fast.testing.tiny_data import make_dataset, tiny_overrides
from sdxl_fast.distill.train import NonFiniteLossError, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def _cli(args: list[str], timeout=300) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "sdxl_fast.distill", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _as_cli(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(list(value) if isinstance(value, tuple) else value)
        args += [f"--{key}", str(value)]
    return args


def _runs_on_the_fast_path(student_dir: Path, tiny_family) -> None:
    """Training changed the weights, and both loaders read them."""
    trained = UNet2DConditionModel.from_pretrained(student_dir)
    teacher = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), teacher.state_dict().values()))
    models = sdxl_fast.load(modes=("fast",), sources=sdxl_fast.ModelSources(
        base=str(tiny_family["base"]), refiner=None, fast=str(student_dir)), device="cpu", dtype=torch.float32)
    image = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a fox", mode="fast", steps=2, width=64,
                                                                  height=64, seed=0))[0]
    assert image.size == (64, 64)


def test_cli_trains_and_writes_a_student_the_fast_path_runs(tmp_path, tiny_family):
    source = make_dataset(tmp_path / "data", "folder", n=4, corrupt=(1,))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_steps": 2, "gradient_accumulation_steps": 2}))
    overrides = tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run"))
    # validation and the other loss variants run too
    overrides.update(validate_every=2, distill_space="latent", distill_weighting="sds", disc_image_condition="noised")
    summary, stderr = _cli(["--config", str(config), *_as_cli(overrides)])

    assert summary["step"] == 2 and summary["skipped_images"] >= 1
    assert "Skipping unreadable image" in stderr
    assert not re.search(r"distill: +\d+%\|", stderr), stderr  # no bar into a pipe: log lines stand alone
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in stderr.splitlines() if " distill INFO " in line)
    student_dir = Path(summary["student"])
    assert (student_dir / "diffusion_pytorch_model.safetensors").is_file()
    card = (student_dir / "README.md").read_text()
    assert '"max_steps": 2' in card and str(tiny_family["base"]) in card
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # tensorboard logs
    _runs_on_the_fast_path(student_dir, tiny_family)
    assert len(list((tmp_path / "run" / "validation").rglob("*.png"))) == 3  # 1/2/4 steps at step 2


@pytest.mark.parametrize("fmt", ["jsonl", "webdataset"])
def test_each_data_format_trains_a_student_the_fast_path_runs(tmp_path, tiny_family, fmt):
    source = make_dataset(tmp_path / "data", fmt, n=4, corrupt=(1,))
    overrides = tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run"))
    summary = train(load_config(None, dict(overrides, max_steps=2, gradient_accumulation_steps=2)))
    assert summary["step"] == 2 and summary["skipped_images"] >= 1
    _runs_on_the_fast_path(Path(summary["student"]), tiny_family)


def test_kill_and_resume_is_bit_identical(tmp_path, tiny_family):
    source = make_dataset(tmp_path / "data", "folder", n=5, corrupt=(2,))
    base = tiny_overrides(str(tiny_family["base"]), source, "")
    base.update(ema_decay=0.9, random_crop=True, random_flip=True, checkpoint_every=2, keep_checkpoints=1)

    straight = train(load_config(None, dict(base, output_dir=str(tmp_path / "straight"), max_steps=4)))
    first = train(load_config(None, dict(base, output_dir=str(tmp_path / "resumed"), max_steps=2)))
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-00000002"]
    resumed = train(load_config(None, dict(base, output_dir=str(tmp_path / "resumed"), max_steps=4)),
                    resume="latest")

    assert first["weight_digests"] != straight["weight_digests"]
    assert resumed["weight_digests"] == straight["weight_digests"]  # raw student weights
    assert resumed["skipped_images"] == straight["skipped_images"] > 0  # same data position
    a = load_file(tmp_path / "straight" / "student" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "student" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exported EMA weights too
    # keep_checkpoints=1: only the newest remains, and no temp folder is left behind.
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["checkpoint-00000004"]


def test_nan_loss_is_skipped_and_logged_then_aborts_when_repeated(tmp_path, tiny_family, monkeypatch, caplog):
    source = make_dataset(tmp_path / "data", "folder", n=4)
    real = losses.distillation_loss
    calls = {"n": 0}

    def nan_on_second_call(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(losses, "distillation_loss", nan_on_second_call)
    cfg = load_config(None, dict(tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "a")), max_steps=3))
    with caplog.at_level("WARNING"):
        summary = train(cfg)
    assert summary["nan_steps"] == 1 and summary["step"] == 3
    assert "non-finite loss" in caplog.text and "update skipped" in caplog.text

    monkeypatch.setattr(losses, "distillation_loss", lambda *args: real(*args) * float("nan"))
    cfg = load_config(None, dict(tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "b")),
                                 max_steps=10, max_nan_steps=2))
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        train(cfg)


def test_encoding_cache_is_used_and_changes_nothing(tmp_path, tiny_family):
    source = make_dataset(tmp_path / "data", "folder", n=4)
    base = dict(tiny_overrides(str(tiny_family["base"]), source, ""), random_crop=False, max_steps=4)
    plain = train(load_config(None, dict(base, output_dir=str(tmp_path / "plain"))))
    cached = train(load_config(None, dict(base, output_dir=str(tmp_path / "cached"), cache_dir=str(tmp_path / "c"))))
    # 4 images, batch 2: epoch 1 encodes and stores all four, epoch 2 reads them back.
    assert (cached["cache_misses"], cached["cache_hits"]) == (4, 4)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 4
    assert cached["weight_digests"] == plain["weight_digests"]
    with pytest.raises(ValueError, match="cache_dir needs random_crop"):
        load_config(None, dict(base, cache_dir=str(tmp_path / "c"), random_crop=True))


def test_aspect_ratio_bucketing_trains_on_non_square_latents(tmp_path, tiny_family, monkeypatch):
    from PIL import Image

    from sdxl_fast.distill import step as step_module

    root = tmp_path / "mixed"
    root.mkdir()
    for i, (w, h) in enumerate([(200, 100)] * 2 + [(100, 200)] * 2):
        Image.new("RGB", (w, h), (60 * i, 90, 30)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a shape")
    seen = []
    real_pixels = step_module.decoding.pixels
    monkeypatch.setattr(step_module.decoding, "pixels",
                        lambda vae, z, *a: seen.append(tuple(z.shape[2:])) or real_pixels(vae, z, *a))
    cfg = load_config(None, dict(tiny_overrides(str(tiny_family["base"]), str(root), str(tmp_path / "run")),
                                 resolution=128, bucketing=True, max_steps=2))
    assert train(cfg)["step"] == 2
    assert set(seen) == {(16, 24), (24, 16)}  # latents of the 192x128 and 128x192 buckets


def test_student_init_starts_from_an_earlier_student(tmp_path, tiny_family):
    earlier = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet")
    with torch.no_grad():
        for p in earlier.parameters():
            p.add_(0.01)  # not the teacher any more
    earlier.save_pretrained(tmp_path / "earlier")
    source = make_dataset(tmp_path / "data", "folder", n=2)
    overrides = tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run"))
    summary = train(load_config(None, dict(overrides, student_init=str(tmp_path / "earlier"), max_steps=1,
                                           lr_student=0.0, ema_decay=0.0)))
    exported = load_file(Path(summary["student"]) / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in earlier.state_dict().items())  # lr 0: the init, untouched


def test_gradient_accumulation_divides_each_micro_step_once(tiny_family):
    """accelerator.backward divides by gradient_accumulation_steps itself, so one micro-step of k leaves ∇L/k on
    the weights (the accumulated gradient is the mean over micro-steps, and max_grad_norm keeps its meaning);
    the steps must not divide the loss as well."""
    import dataclasses
    from types import SimpleNamespace

    from accelerate import Accelerator

    from sdxl_fast.distill import augment, step
    from sdxl_fast.distill.discriminator import build_discriminator
    from sdxl_fast.distill.train import _frozen_models, _student

    k = 4
    cfg = load_config(None, dict(tiny_overrides(str(tiny_family["base"]), "unused", "unused"),
                                 gradient_accumulation_steps=k, disc_head="plain", distill_space="latent"))
    frozen = _frozen_models(cfg, torch.device("cpu"), torch.float32)
    student = _student(cfg, frozen.base, None, "epsilon")
    torch.manual_seed(0)
    features, heads = build_discriminator(cfg, text_dim=frozen.encoders.text_encoder_2.config.projection_dim)
    schedule = step.NoiseSchedule(frozen.scheduler.alphas_cumprod, "epsilon", "epsilon", torch.tensor([999, 499]),
                                  torch.ones(2), 20, 980)
    x0 = torch.randn(2, 4, 8, 8)
    images = decoding.pixels(frozen.vae, x0).float()
    real = step.RealBatch(torch.randn(2, 77, frozen.base.config.cross_attention_dim),
                          torch.randn(2, frozen.encoders.text_encoder_2.config.projection_dim),
                          torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2), x0, images, features.image_embedding(images))

    def micro_step(accelerator, cfg):
        for p in [*student.parameters(), *heads.parameters()]:
            p.grad = None
        torch.manual_seed(1)
        aug = augment.draw(cfg.disc_augment, 2, "cpu")
        heads.requires_grad_(False)
        g = step.student_step(accelerator, cfg, student, frozen.base, frozen.vae, features, heads, real, schedule,
                              aug, measure_grad_norms=True)
        heads.requires_grad_(True)
        assert g.ok and step.discriminator_step(accelerator, cfg, features, heads, real, g.fake_images, g.image_emb,
                                                aug)[0]
        return [p.grad.clone() for p in student.parameters() if p.grad is not None], \
            [p.grad.clone() for p in heads.parameters()]

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
    assert accelerator.gradient_accumulation_steps == k
    scaled = micro_step(accelerator, cfg)
    # The reference: the gradient of the micro-step's losses themselves (no accumulation, no division anywhere).
    plain = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, _: t,
                            backward=lambda t, **kw: t.backward(**kw))
    unscaled = micro_step(plain, dataclasses.replace(cfg, gradient_accumulation_steps=1))
    for got, want in zip(scaled, unscaled):
        assert len(got) == len(want) > 0
        got, want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
        assert want.norm() > 0 and ((got * k - want).norm() / want.norm()).item() < 1e-4
