"""How the student's two loss terms are weighed, measured and back-propagated.

L = λ_adv·L_adv + λ·L_distill depends on the student's weights only through its clean-sample estimate x̂θ
(`student_x0`, [B, 4, h, w]). So the gradient of each term at x̂θ says how hard that term pulls the student,
in the same units for both, and back-propagating their weighted sum from x̂θ gives exactly the gradient of L
(up to float rounding: the terms are summed at x̂θ instead of inside the VAE decoder).

* Measuring (`measure`, on logged steps): ‖∂(λ_adv·L_adv)/∂x̂θ‖ and ‖∂(λ·L_distill)/∂x̂θ‖, the L2 norms over
  the whole micro-batch, logged as grad_norm/adv and grad_norm/distill.
* Adaptive λ (`lambda_mode = "adaptive"`, after VQGAN's adaptive weight, Esser et al. 2021): every step,
  λ = lambda_distill · ‖∂(λ_adv·L_adv)/∂x̂θ‖ / ‖∂L_distill/∂x̂θ‖ (treated as a constant), so the distillation
  gradient has lambda_distill times the adversarial gradient's norm. Each process uses its own norms.

Each measured step costs one extra backward through the part of the graph between x̂θ and the losses that
both terms share (the VAE decoder in pixel-space distillation; nothing extra in latent space).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

EPS = 1e-12


def output_gradients(terms: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: ∂term/∂output} for scalar terms that depend on `output`; the graph up to `output` is kept (it is
    back-propagated afterwards), and nothing accumulates into any parameter's .grad."""
    grads = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, output, retain_graph=True, allow_unused=True)
        grads[name] = torch.zeros_like(output) if grad is None else grad
    return grads


def adaptive_lambda(adv_grad: torch.Tensor, distill_grad: torch.Tensor, ratio: float) -> float:
    """λ such that ‖λ·distill_grad‖ = ratio·‖adv_grad‖ (ratio when the distillation gradient vanishes)."""
    d = distill_grad.float().norm().item()
    lam = ratio * adv_grad.float().norm().item() / d if d > EPS else ratio
    return lam if math.isfinite(lam) else ratio


def student_backward(backward: Callable[..., None], student_x0: torch.Tensor, l_adv: torch.Tensor,
                     l_distill: torch.Tensor, lambda_adv: float, lambda_distill: float, mode: str = "fixed",
                     measure: bool = False) -> dict[str, float]:
    """Back-propagate L = λ_adv·L_adv + λ·L_distill into the student through `backward(tensor, **kwargs)`
    (e.g. accelerator.backward, which scales for gradient accumulation and fp16), and return metrics:
    lambda/distill (the λ used) and, when measured or adaptive, grad_norm/adv and grad_norm/distill (of the
    weighted terms) and loss/student with that λ."""
    if mode == "fixed" and not measure:
        backward(lambda_adv * l_adv + lambda_distill * l_distill)
        return {"lambda/distill": lambda_distill}
    grads = output_gradients({"adv": l_adv, "distill": l_distill}, student_x0)
    adv = lambda_adv * grads["adv"]
    lam = adaptive_lambda(adv, grads["distill"], lambda_distill) if mode == "adaptive" else lambda_distill
    distill = lam * grads["distill"]
    backward(student_x0, gradient=(adv + distill).to(student_x0.dtype))
    return {"lambda/distill": lam, "grad_norm/adv": adv.float().norm().item(),
            "grad_norm/distill": distill.float().norm().item(),
            "loss/student": (lambda_adv * l_adv + lam * l_distill).item()}
