"""The distillation loss really trains: on one fixed batch (fixed noises and timesteps) the student drives
c(t)·‖x̂θ - sg(x̂ψ)‖² down, through the same functions the training loop uses.

A random-weight teacher has no "right answer" the student could reach, so the teacher here is the exact
denoiser of a one-point data set {x*}: ε̂(x_t, t) = (x_t - α_t·x*)/σ_t, whose x0-prediction is x* for every
input. Distillation must then pull the student's one-step samples to x*.
"""

from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

from sdxl_fast.distill import losses
from sdxl_fast.distill.step import teacher_x0
from sdxl_fast.pipeline import sampling
from sdxl_fast.testing.random_weights import SDXL_SCHEDULER


class PointTeacher(torch.nn.Module):
    """Called like an SDXL UNet; predicts ε for data that is the single latent `target`."""

    def __init__(self, target, alphas_cumprod):
        super().__init__()
        self.target, self.alphas_cumprod = target, alphas_cumprod

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x_t, t, encoder_hidden_states=None, added_cond_kwargs=None):
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        target = self.target.repeat(x_t.shape[0] // self.target.shape[0], 1, 1, 1)
        return SimpleNamespace(sample=(x_t - ab.sqrt() * target) / (1 - ab).sqrt())


def _conditioning(b: int):
    """SDXL's noise schedule and random text conditioning for a batch of b 64x64 images of the tiny family."""
    from diffusers import EulerDiscreteScheduler

    alphas_cumprod = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).alphas_cumprod
    return alphas_cumprod, torch.randn(b, 77, 80), torch.randn(b, 40), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b)


def test_overfitting_a_fixed_batch_drives_the_distillation_loss_down(tiny_family):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    student = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet").train()
    b = 2
    alphas_cumprod, context, pooled, time_ids = _conditioning(b)
    s, t = torch.tensor([999, 499]), torch.tensor([300, 700])
    x0, noise, renoise = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    alpha_s, alpha_t = alphas_cumprod[s].view(b, 1, 1, 1), alphas_cumprod[t].view(b, 1, 1, 1)
    x_s = torch.where((s == 999).view(b, 1, 1, 1), noise, sampling.add_noise(x0, noise, alpha_s))
    teacher = PointTeacher(0.5 * torch.randn(1, 4, 8, 8).repeat(b, 1, 1, 1), alphas_cumprod)
    weight = losses.distillation_weight(t, alphas_cumprod, "exponential")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.0, 0.99))

    history = []
    for _ in range(30):
        student_x0 = sampling.predicted_x0(sampling.UNetInputs(context, pooled, time_ids)(student, x_s, s), x_s,
                                           alpha_s, "epsilon")
        with torch.no_grad():
            x_t = sampling.add_noise(student_x0.detach(), renoise, alpha_t)
            target = teacher_x0(teacher, x_t, t, alpha_t, context, pooled, time_ids, 3.0, "epsilon")
        loss = losses.distillation_loss(student_x0, target, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.2 * history[0], history


def test_teacher_guidance_is_the_pipelines_cfg_with_zeroed_text(tiny_family):
    """The teacher's target is the Quality path's guidance, uncond + g·(cond - uncond), with SDXL base's zeroed
    embeddings as the unconditional input: bit for bit the same numbers as the guided UNet call written out."""
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet").eval()
    b = 2
    alphas_cumprod, context, pooled, time_ids = _conditioning(b)
    x_t, t = torch.randn(b, 4, 8, 8), torch.tensor([300, 700])
    alpha_t = alphas_cumprod[t].view(b, 1, 1, 1)
    with torch.no_grad():
        got = teacher_x0(teacher, x_t, t, alpha_t, context, pooled, time_ids, 3.0, "epsilon")
        out = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                      encoder_hidden_states=torch.cat([torch.zeros_like(context), context]),
                      added_cond_kwargs={"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]),
                                         "time_ids": torch.cat([time_ids, time_ids])}).sample
    uncond, cond = out.chunk(2)
    expected = sampling.predicted_x0(uncond + 3.0 * (cond - uncond), x_t, alpha_t, "epsilon")
    assert torch.equal(got, expected)
