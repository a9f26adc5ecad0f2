"""One micro-step of ADD, as functions of explicit inputs (train.py calls them in this order):

  1. `encode_real`: captions -> text embeddings, images -> real latents x0 -> decoded real images (frozen models)
  2. `student_step`:
     a. x_s = noised x0 at a student timestep s (pure noise at s = 999), x̂θ = the student's x0-prediction
        (its output read as `student_prediction`: epsilon, v_prediction or sample)
     b. adversarial: D(augment(decode(x̂θ))) through the frozen feature network, L_adv = -D
     c. score distillation: x_t = renoised sg(x̂θ) at a teacher timestep t, x̂ψ = guided teacher x0-prediction,
        L_distill = c(t)·‖x̂θ - sg(x̂ψ)‖² in pixel space (decoded) or latent space
     d. backward on λ_adv·L_adv + λ·L_distill, measuring each term's gradient at x̂θ on logged steps (balance.py)
  3. `discriminator_step`: hinge loss on augmented (decoded real, detached fake), the same DiffAugment draw as
     in 2b, + γ/2·R1 on the real images, backward

Backward goes through `accelerator.backward`, which divides by gradient_accumulation_steps itself, so the
accumulated gradient is the mean over the micro-steps (the loss is not divided here as well).

A loss that is NaN/inf on any process is not backpropagated, and the step reports it, so every process skips
the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxl_fast.pipeline import decoding, sampling

from . import balance, losses
from .augment import Draw
from .discriminator import discriminate, discriminate_real_fake, image_condition


@dataclass
class NoiseSchedule:
    """The teacher's noise schedule and the timesteps each side trains at."""

    alphas_cumprod: torch.Tensor  # ᾱ_t, [1000], on the training device
    prediction_type: str  # what the teacher's UNet predicts: epsilon | v_prediction | sample
    student_prediction: str  # how the student's output is read (the same three; the config's student_prediction)
    student_timesteps: torch.Tensor  # [N]
    student_weights: torch.Tensor  # [N]: how often each is drawn, relative to the others
    teacher_t_min: int  # teacher timesteps are drawn uniformly from [min, max]
    teacher_t_max: int

    @property
    def last_t(self) -> int:
        return len(self.alphas_cumprod) - 1


@dataclass
class RealBatch:
    """A micro-batch of real data as the frozen models see it; no gradient."""

    context: torch.Tensor  # [B, 77, D] text embeddings
    pooled: torch.Tensor  # [B, P]
    time_ids: torch.Tensor  # [B, 6] SDXL micro-conditioning
    x0: torch.Tensor  # [B, 4, h, w] a sample of the VAE posterior, scaled
    images: torch.Tensor  # [B, 3, H, W] x0 decoded: D sees decoded reals, as it sees decoded fakes
    image_emb: torch.Tensor  # [B, C] conditions D on the real image


@dataclass
class StudentResult:
    ok: bool  # the loss was finite on every process, and was backpropagated
    fake_images: torch.Tensor  # [B, 3, H, W] decoded x̂θ, for the discriminator
    image_emb: torch.Tensor  # [B, C] the image condition D judges each sample against
    metrics: dict


def draw_student_timesteps(timesteps: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """n student timesteps [n], each drawn from `timesteps` [N] with probability proportional to `weights` [N]."""
    return timesteps[torch.multinomial(weights.float(), n, replacement=True)]


def teacher_x0(teacher, x_t, t, alpha_bar, context, pooled, time_ids, guidance: float, prediction_type: str):
    """The frozen teacher's classifier-free-guided x0-prediction at (x_t, t). The unconditional branch uses
    zeroed text embeddings, as SDXL base was trained (force_zeros_for_empty_prompt)."""
    dtype = teacher.dtype
    cast = lambda x: x.to(dtype)  # noqa: E731
    if guidance > 1.0:
        inputs = sampling.UNetInputs(cast(torch.cat([torch.zeros_like(context), context])),
                                     cast(torch.cat([torch.zeros_like(pooled), pooled])),
                                     cast(torch.cat([time_ids, time_ids])))
        uncond, cond = inputs(teacher, cast(torch.cat([x_t, x_t])), torch.cat([t, t])).float().chunk(2)
        out = sampling.cfg(uncond, cond, guidance)
    else:
        out = sampling.UNetInputs(cast(context), cast(pooled), cast(time_ids))(teacher, cast(x_t), t).float()
    return sampling.predicted_x0(out, x_t, alpha_bar, prediction_type)


def all_finite(accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process, so all processes skip or step together."""
    bad = torch.tensor([float(not all(torch.isfinite(v).all() for v in values))], device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


@torch.no_grad()
def encode_real(batch: dict, encoders, vae, features, cache, device) -> RealBatch:
    """Step 1: the batch's captions and images through the frozen models (or `cache`, see cache.py)."""
    # context [B, 77, D], pooled [B, P]; the VAE posterior of the [-1, 1] pixels, [B, 4, H/8, W/8]
    context, pooled, mean, std = cache.encode(encoders, vae, batch["captions"], batch["pixels"], batch["indices"],
                                              device)
    time_ids = batch["time_ids"].to(device, torch.float32)
    x0 = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor
    images = decoding.pixels(vae, x0).float()
    return RealBatch(context, pooled, time_ids, x0, images, features.image_embedding(images))


def student_step(accelerator, cfg, student, teacher, vae, features, heads, real: RealBatch,
                 schedule: NoiseSchedule, aug: Draw | None = None, measure_grad_norms: bool = False) -> StudentResult:
    """Step 2: the student's losses and backward. `heads` is the discriminator as the adversarial loss must read
    it, taking no gradient itself (fsdp.heads_for_student_loss); `aug` the micro-step's DiffAugment draw (None:
    off); `measure_grad_norms`: log both terms' gradient norms at x̂θ (grad_norm/*)."""
    b = real.x0.shape[0]
    alphas_cumprod = schedule.alphas_cumprod

    # a. One x0-prediction from a noised real latent. At s = 999 the input is pure noise (zero terminal SNR),
    #    exactly what the Fast path feeds the student at inference.
    s = draw_student_timesteps(schedule.student_timesteps, schedule.student_weights, b)  # [B]
    noise = torch.randn_like(real.x0)
    alpha_s = alphas_cumprod[s].view(b, 1, 1, 1)
    pure_noise = s == schedule.last_t  # [B]
    x_s = torch.where(pure_noise.view(b, 1, 1, 1), noise, sampling.add_noise(real.x0, noise, alpha_s))
    image_emb = image_condition(real.image_emb, ~pure_noise, cfg.disc_image_condition)
    out_s = sampling.UNetInputs(real.context, real.pooled, real.time_ids)(student, x_s, s).float()
    student_x0 = sampling.predicted_x0(out_s, x_s, alpha_s, schedule.student_prediction)  # [B, 4, h, w]
    fake_images = decoding.pixels(vae, student_x0).float()

    # b. Adversarial loss.
    l_adv = losses.generator_adv_loss(discriminate(features, heads, fake_images, real.pooled, image_emb, aug))

    # c. Score distillation against the frozen teacher at a random teacher timestep t.
    t = torch.randint(schedule.teacher_t_min, schedule.teacher_t_max + 1, (b,), device=real.x0.device)
    alpha_t = alphas_cumprod[t].view(b, 1, 1, 1)
    with torch.no_grad():
        x_t = sampling.add_noise(student_x0.detach(), torch.randn_like(real.x0), alpha_t)
        target_x0 = teacher_x0(teacher, x_t, t, alpha_t, real.context, real.pooled, real.time_ids,
                               cfg.teacher_guidance, schedule.prediction_type)
        target = decoding.pixels(vae, target_x0).float() if cfg.distill_space == "pixel" else target_x0
    prediction = fake_images if cfg.distill_space == "pixel" else student_x0
    weight = losses.distillation_weight(t, alphas_cumprod, cfg.distill_weighting)
    l_distill = losses.distillation_loss(prediction, target, weight, cfg.distill_reduction)
    l_student = losses.student_loss(l_adv, l_distill, cfg.lambda_distill, cfg.lambda_adv)

    # d. Backward, unless the loss is NaN/inf on any process: λ_adv·L_adv + λ·L_distill (λ adaptive with
    #    lambda_mode "adaptive"), from x̂θ when the terms' gradients there are measured.
    if not all_finite(accelerator, l_student):
        return StudentResult(False, fake_images, image_emb,
                             {"loss/student": l_student.item(), "loss/distill": l_distill.item()})
    balance_metrics = balance.student_backward(accelerator.backward, student_x0, l_adv, l_distill, cfg.lambda_adv,
                                               cfg.lambda_distill, cfg.lambda_mode, measure_grad_norms)
    return StudentResult(True, fake_images, image_emb, {
        "loss/adv_g": l_adv.item(), "loss/distill": l_distill.item(), "loss/student": l_student.item(),
        **balance_metrics})


def discriminator_step(accelerator, cfg, features, heads, real: RealBatch, fake_images: torch.Tensor,
                       image_emb: torch.Tensor, aug: Draw | None = None) -> tuple[bool, dict]:
    """Step 3: D on (real, detached fake) in one forward pass (their batch statistics kept apart, both with the
    DiffAugment draw `aug`), with R1 on the real images; backward unless the loss is NaN/inf on any process.
    -> (loss finite, metrics)."""
    real_images = real.images.detach().requires_grad_(True)
    real_logits, fake_logits = discriminate_real_fake(features, heads, real_images, fake_images.detach(),
                                                      real.pooled, image_emb, aug)  # [B, K] each
    r1 = losses.r1_penalty(real_logits, real_images)
    l_disc = losses.discriminator_loss(real_logits, fake_logits, r1, cfg.r1_gamma)
    ok = all_finite(accelerator, l_disc)
    if ok:
        accelerator.backward(l_disc)
    acc_real, acc_fake = losses.discriminator_accuracy(real_logits.detach(), fake_logits.detach())
    return ok, {"loss/disc": l_disc.item(), "loss/r1": r1.item(), "d_acc/real": acc_real, "d_acc/fake": acc_fake}
