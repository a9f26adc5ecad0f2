"""On the tiny family: the student's parametrisation through export (sdxl_fast.json) and the Fast path, and one
logical run over `--student_init` continuations (heads, their optimiser and the EMA carried bit for bit)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file

import sdxl_fast
from sdxl_fast.distill import continuation
from sdxl_fast.distill.config import load_config
from sdxl_fast.distill.export import export_student
from sdxl_fast.loading import STUDENT_CONFIG, student_prediction_type
from sdxl_fast.distill.train import train
from sdxl_fast.pipeline.generate import generate_tensors
from sdxl_fast.testing.tiny_data import make_dataset, tiny_overrides


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def _fast_models(base, student_dir):
    return sdxl_fast.load(modes=("fast",), sources=sdxl_fast.ModelSources(base=str(base), refiner=None,
                                                                          fast=str(student_dir)),
                          device="cpu", dtype=torch.float32)


def _one_step(models):
    """(final latents, the student's input x and output at its one call) of a 1-step Fast call."""
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["t"], seen["out"] = args[0].clone(), args[1], output.sample.clone()

    handle = models.fast.student.register_forward_hook(hook)
    try:
        latents, _, _ = generate_tensors(
            models, sdxl_fast.GenerationParams("a fox", mode="fast", steps=1, width=64, height=64, seed=3))
    finally:
        handle.remove()
    return latents, seen


@pytest.mark.parametrize("prediction", ["sample", "v_prediction", "epsilon"])
def test_the_exported_parametrisation_is_the_one_the_fast_path_applies(tmp_path, tiny_family, prediction):
    unet = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet")
    teacher_scheduler = EulerDiscreteScheduler.from_pretrained(tiny_family["base"], subfolder="scheduler")
    folder = export_student(unet, tmp_path / "student", {"teacher": "t", "student_timesteps": [999]}, 1, False,
                            prediction_type=prediction)
    assert student_prediction_type(folder) == prediction
    assert json.loads((folder / STUDENT_CONFIG).read_text()) == {"sampler": "ADD", "prediction_type": prediction}
    models = _fast_models(tiny_family["base"], folder)
    assert models.fast.scheduler.config.prediction_type == prediction
    assert torch.equal(models.fast.scheduler.alphas_cumprod, teacher_scheduler.alphas_cumprod)  # same schedule
    latents, seen = _one_step(models)
    assert int(seen["t"]) == 999
    ab = teacher_scheduler.alphas_cumprod[999]
    x, out = seen["x"], seen["out"]
    expected = {"sample": out, "v_prediction": ab.sqrt() * x - (1 - ab).sqrt() * out,
                "epsilon": (x - (1 - ab).sqrt() * out) / ab.sqrt()}[prediction]
    assert torch.allclose(latents, expected, atol=1e-5)
    if prediction == "epsilon":  # an ε-student samples exactly as a folder without the record
        (folder / STUDENT_CONFIG).unlink()
        old, _ = _one_step(_fast_models(tiny_family["base"], folder))
        assert torch.equal(old, latents)


def test_an_x0_student_trains_exports_and_samples_with_its_parametrisation(tmp_path, tiny_family):
    source = make_dataset(tmp_path / "data", "folder", n=2)
    cfg = load_config(None, dict(tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run")),
                                 max_steps=1, student_prediction="sample", validate_every=1,
                                 validation_steps=(1,)))
    summary = train(cfg)
    student_dir = Path(summary["student"])
    assert json.loads((student_dir / STUDENT_CONFIG).read_text()) == {"sampler": "ADD", "prediction_type": "sample"}
    models = _fast_models(tiny_family["base"], student_dir)
    latents, seen = _one_step(models)
    assert torch.allclose(latents, seen["out"], atol=1e-6)  # x0 read directly, no division by sqrt(ᾱ_999)
    assert list((tmp_path / "run" / "validation").rglob("*.png"))
    # A continuation must keep the parametrisation it was trained with.
    with pytest.raises(ValueError, match="student_prediction sample"):
        train(load_config(None, dict(cfg.to_dict(), student_init=str(student_dir), student_prediction="epsilon",
                                     output_dir=str(tmp_path / "again"))))


def test_a_continuation_carries_heads_optimiser_and_ema_bit_identically(tmp_path, tiny_family, monkeypatch):
    source = make_dataset(tmp_path / "data", "folder", n=4)
    base = dict(tiny_overrides(str(tiny_family["base"]), source, ""), ema_decay=0.9, checkpoint_every=2,
                keep_checkpoints=1)
    first = train(load_config(None, dict(base, output_dir=str(tmp_path / "a"), max_steps=2)))
    carried_dir = Path(first["student"]) / "continuation"
    assert {p.name for p in carried_dir.iterdir()} == {"heads.safetensors", "heads_optimizer.pt",
                                                       "student.safetensors", "state.json"}
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-00000002"  # accelerate's own record of step 2

    seen = {}
    real_restore = continuation.restore

    def recording_restore(config, init, student, heads, optimizer, scheduler, load_optimizer=True):
        carried = real_restore(config, init, student, heads, optimizer, scheduler, load_optimizer)
        seen.update(heads=copy.deepcopy(heads.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
                    scheduler=scheduler.state_dict(), student=copy.deepcopy(student.state_dict()))
        real_ema = carried.restore_ema

        def recording_ema(ema):
            real_ema(ema)
            seen["ema"] = {k: v.clone() for k, v in ema.shadow.items()}

        carried.restore_ema = recording_ema
        return carried

    monkeypatch.setattr(continuation, "restore", recording_restore)
    second = train(load_config(None, dict(base, output_dir=str(tmp_path / "b"), max_steps=1,
                                          student_init=first["student"])))

    heads = load_file(checkpoint / "model_1.safetensors")
    assert seen["heads"].keys() == heads.keys()
    assert all(torch.equal(seen["heads"][k], heads[k]) for k in heads)  # incl. spectral-norm vectors
    opt = torch.load(checkpoint / "optimizer_1.bin", weights_only=True)
    assert seen["optimizer"]["state"].keys() == opt["state"].keys()
    for i, state in opt["state"].items():
        assert all(torch.equal(seen["optimizer"]["state"][i][k], v) for k, v in state.items())
    assert seen["scheduler"]["last_epoch"] == 2  # the heads' LR schedule goes on (no second warm-up)
    raw = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(seen["student"][k], raw[k]) for k in raw)  # the raw weights, not the exported EMA
    exported = load_file(Path(first["student"]) / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)
    assert all(torch.equal(seen["ema"][k], exported[k]) for k in seen["ema"])  # the EMA goes on from the export
    state = json.loads((Path(second["student"]) / "continuation" / "state.json").read_text())
    assert (state["steps"], state["steps_this_run"]) == (3, 1)  # one logical run of 2 + 1 steps


def test_continuation_refuses_other_heads_and_can_be_switched_off(tmp_path, tiny_family):
    from sdxl_fast.distill.config import TrainConfig
    from sdxl_fast.distill.discriminator import build_discriminator
    from sdxl_fast.testing.tiny_data import TINY_VIT

    cfg = TrainConfig(disc_weights="random", disc_backbone_kwargs=TINY_VIT, disc_image_size=56,
                      disc_blocks=(0, 2), disc_head_channels=16, disc_cond_dim=8)
    _, heads = build_discriminator(cfg, text_dim=4)
    opt = torch.optim.AdamW(heads.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    student = torch.nn.Linear(2, 2)
    continuation.save(tmp_path, cfg.to_dict(), 5, heads, opt, sched)
    other = dict(cfg.to_dict(), disc_head="plain")
    with pytest.raises(continuation.ContinuationMismatchError, match="disc_head: 'stylegan_t' there, 'plain' here"):
        continuation.restore(other, tmp_path, student, heads, opt, sched)
    assert continuation.restore(dict(other, continue_discriminator=False), tmp_path, student, heads, opt, sched) is None
    assert continuation.restore(cfg.to_dict(), tmp_path / "nothing", student, heads, opt, sched) is None
    carried = continuation.restore(cfg.to_dict(), tmp_path, student, heads, opt, sched)
    assert carried.steps == 5 and carried.ema_source is None
    # This run's optimiser settings win over the carried ones (only the moments and the schedule carry over).
    continuation.restore(dict(cfg.to_dict(), lr_discriminator=3e-4, adam_betas=(0.5, 0.9)), tmp_path, student,
                         heads, opt, sched)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert sched.base_lrs == [3e-4]
