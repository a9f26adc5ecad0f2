"""The ADD objective as small functions over tensors. Notation follows the paper: x_t = α_t·x0 + σ_t·ε with
α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t) (ᾱ_t is the scheduler's `alphas_cumprod[t]`).

Discriminator logits are [B, K]: every head's per-token logits concatenated (StyleGAN-T style), so "mean"
below averages over samples, heads and tokens alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The student's non-saturating adversarial loss: -E[D(fake)]."""
    return -fake_logits.mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """E over samples of ‖∇_x D(x)‖² at the real inputs (Mescheder et al. 2018).

    `real_inputs` must have requires_grad and `real_logits` must come from them. The graph is kept
    (create_graph) so the penalty itself can be minimised w.r.t. the discriminator's parameters.
    Each sample's D(x) is the sum of its logits, so the gradient is per sample.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def discriminator_accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[float, float]:
    """Fraction of real logits > 0 and of fake logits < 0 (monitoring only)."""
    return (real_logits > 0).float().mean().item(), (fake_logits < 0).float().mean().item()


def distillation_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str) -> torch.Tensor:
    """c(t) for a batch of teacher timesteps t [B] -> [B].

    exponential: c(t) = α_t (the paper's default).
    sds: the weighting that makes the gradient of c(t)·‖x̂θ - sg(x̂ψ)‖² equal DreamFusion's SDS gradient
        w(t)·(ε̂ψ - ε)·∂x/∂θ with w(t) = σ_t². Since x_t = α_t·x̂θ + σ_t·ε, x̂θ - x̂ψ = (σ_t/α_t)(ε̂ψ - ε), and
        the squared loss's gradient is 2c(t)(x̂θ - x̂ψ), so c(t) = w(t)·α_t / (2σ_t) = α_t·σ_t / 2.
    """
    alpha_bar = alphas_cumprod.to(t.device)[t].float()
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "exponential":
        return alpha
    if kind == "sds":
        return alpha * sigma / 2
    raise ValueError(f"Unknown distillation weighting {kind!r} (exponential | sds)")


def distillation_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor, weight: torch.Tensor,
                      reduction: str = "sum") -> torch.Tensor:
    """E_b[c(t_b) · d(x̂θ_b, sg(x̂ψ_b))]; student_x0 and teacher_x0 are [B, ...], weight [B].

    reduction "sum": d(x, y) = ‖x - y‖²₂, the squared L2 norm of the whole sample (summed over its channels and
    pixels or latent elements), as the paper writes d; then the mean over the batch. This is the unit its
    λ = 2.5 is given in. "mean": the same divided by the number of elements per sample (the demo student's
    recipe; a 512² RGB image has 786,432 elements, a 64² SDXL latent 16,384, so λ differs by that factor).

    The teacher's estimate is detached here (the stop-gradient sg), whatever the caller passed.
    """
    squared = (student_x0.float() - teacher_x0.detach().float()).pow(2).flatten(1)
    if reduction == "sum":
        per_sample = squared.sum(1)
    elif reduction == "mean":
        per_sample = squared.mean(1)
    else:
        raise ValueError(f"Unknown distillation reduction {reduction!r} (sum | mean)")
    return (weight.float() * per_sample).mean()


def student_loss(adv: torch.Tensor, distill: torch.Tensor, lambda_distill: float,
                 lambda_adv: float = 1.0) -> torch.Tensor:
    """L = λ_adv·L_adv + λ·L_distill (λ_adv = 1, λ = 2.5 in the paper)."""
    return lambda_adv * adv + lambda_distill * distill


def discriminator_loss(real_logits, fake_logits, r1: torch.Tensor, r1_gamma: float) -> torch.Tensor:
    """Hinge loss plus the R1 penalty with the usual γ/2 factor: L_D = hinge + γ/2 · E‖∇D(x_real)‖²."""
    return hinge_d_loss(real_logits, fake_logits) + r1_gamma / 2 * r1
