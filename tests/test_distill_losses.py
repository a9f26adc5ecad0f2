"""Each ADD loss against values computed by hand on small tensors."""

import math

import pytest
import torch

from sdxl_fast.distill import losses
from sdxl_fast.distill.config import TrainConfig, load_config


def test_hinge_d_loss_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - x): 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])  # relu(1 + x): 0, 1, 1.5, 0.5 -> mean 0.75
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.625 + 0.75)


def test_generator_adv_loss_is_minus_mean_logit():
    fake = torch.tensor([[1.0, -3.0], [2.0, 4.0]])
    assert losses.generator_adv_loss(fake).item() == pytest.approx(-1.0)


def test_r1_is_squared_gradient_norm_of_real_inputs():
    # D(x) = sum_j w_j x_j^2 per sample -> ∇ = 2 w x, ‖∇‖² = sum 4 w² x²
    w = torch.tensor([1.0, 2.0, 3.0])
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], requires_grad=True)
    logits = (w * x.pow(2)).sum(1, keepdim=True)  # [B, 1]
    r1 = losses.r1_penalty(logits, x)
    by_hand = ((4 * (1 + 4 + 9)) + (4 * (0 + 4 * 1 + 9 * 4))) / 2  # (56 + 160) / 2
    assert r1.item() == pytest.approx(by_hand)
    # The graph is kept: the penalty can be minimised w.r.t. parameters of D.
    assert r1.requires_grad


def test_r1_gradient_reaches_discriminator_parameters():
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    r1 = losses.r1_penalty((w * x).sum(1, keepdim=True), x)  # ∇_x = w -> ‖w‖² -> d/dw = 2w
    r1.backward()
    assert torch.allclose(w.grad, torch.tensor([1.0, -2.0]))


def test_discriminator_loss_adds_half_gamma_r1():
    real, fake = torch.zeros(1, 1), torch.zeros(1, 1)
    assert losses.discriminator_loss(real, fake, torch.tensor(4.0), 0.5).item() == pytest.approx(2.0 + 1.0)


def test_discriminator_accuracy():
    real = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    fake = torch.tensor([[-1.0, 1.0]])
    assert losses.discriminator_accuracy(real, fake) == (0.75, 0.5)


def test_distillation_weights_by_hand():
    alphas_cumprod = torch.tensor([0.64, 0.36, 0.25])
    t = torch.tensor([0, 2])
    exp = losses.distillation_weight(t, alphas_cumprod, "exponential")
    assert torch.allclose(exp, torch.tensor([0.8, 0.5]))
    sds = losses.distillation_weight(t, alphas_cumprod, "sds")  # α σ / 2
    assert torch.allclose(sds, torch.tensor([0.8 * 0.6 / 2, 0.5 * math.sqrt(0.75) / 2]))
    with pytest.raises(ValueError):
        losses.distillation_weight(t, alphas_cumprod, "nope")


def test_sds_weighting_reproduces_the_sds_gradient():
    """∂/∂x̂θ of c(t)·‖x̂θ - x̂ψ‖² equals σ_t²·(ε̂ - ε) when c is the SDS weighting (single element)."""
    ab = torch.tensor([0.3])
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x_student = torch.tensor([0.7], requires_grad=True)
    eps, eps_hat = torch.tensor([0.2]), torch.tensor([-0.4])
    x_t = alpha * x_student.detach() + sigma * eps
    x_teacher = (x_t - sigma * eps_hat) / alpha
    c = losses.distillation_weight(torch.tensor([0]), ab, "sds")
    loss = c * (x_student - x_teacher).pow(2).sum()
    loss.backward()
    assert x_student.grad.item() == pytest.approx((sigma**2 * (eps_hat - eps)).item(), rel=1e-5)


def test_distillation_loss_by_hand_and_stop_gradient():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    weight = torch.tensor([0.5, 2.0])
    # The paper's d = ‖x - y‖²₂ per sample, then the batch mean:
    # sample 0: (1 + 4) * 0.5 = 2.5; sample 1: (1 + 9) * 2 = 20 -> mean 11.25
    loss = losses.distillation_loss(student, teacher, weight)
    assert loss.item() == pytest.approx(11.25)
    loss.backward()
    assert teacher.grad is None  # sg(x̂ψ)
    # ∂/∂x of c_b·‖x_b - y_b‖² / B = c_b·(x_b - y_b)
    assert torch.allclose(student.grad, torch.tensor([[0.5, 1.0], [-2.0, -6.0]]))
    # The old per-element mean: sample 0: mean(1, 4) = 2.5 * 0.5 = 1.25; sample 1: mean(1, 9) = 5 * 2 = 10
    assert losses.distillation_loss(student, teacher, weight, "mean").item() == pytest.approx(5.625)
    with pytest.raises(ValueError, match="reduction"):
        losses.distillation_loss(student, teacher, weight, "max")


def test_distillation_loss_sum_is_the_squared_l2_norm_of_an_image_sized_sample():
    """On [B, 3, 4, 4] 'images' the sum reduction is the per-sample squared L2 norm: 48 times the mean."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ones = torch.ones(2)
    by_hand = sum(torch.linalg.vector_norm(x[i] - y[i]) ** 2 for i in range(2)) / 2
    assert losses.distillation_loss(x, y, ones).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert losses.distillation_loss(x, y, ones).item() == pytest.approx(
        48 * losses.distillation_loss(x, y, ones, "mean").item(), rel=1e-6)


def test_student_loss_uses_lambda():
    assert losses.student_loss(torch.tensor(1.0), torch.tensor(2.0), 2.5).item() == pytest.approx(6.0)
    assert losses.student_loss(torch.tensor(1.0), torch.tensor(2.0), 2.5, lambda_adv=0.0).item() == pytest.approx(5.0)


def _two_terms():
    """A toy 'student' θ -> x̂θ = 2θ, an 'adversarial' term through a nonlinearity and a distillation term."""
    theta = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    x0 = 2 * theta
    l_adv = -torch.tanh(x0).sum() / 4  # ∂/∂x0 = -(1 - tanh²(x0)) / 4
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    l_distill = losses.distillation_loss(x0, target, torch.ones(2))  # ∂/∂x0 = (x0 - target)
    return theta, x0, l_adv, l_distill, target


def test_gradient_norms_at_the_student_output_by_hand_and_the_same_update():
    from sdxl_fast.distill import balance

    theta, x0, l_adv, l_distill, target = _two_terms()
    metrics = balance.student_backward(lambda t, **kw: t.backward(**kw), x0, l_adv, l_distill, 1.0, 2.5,
                                       measure=True)
    x = x0.detach()
    g_adv = -(1 - torch.tanh(x) ** 2) / 4
    g_distill = 2.5 * (x - target)
    assert metrics["grad_norm/adv"] == pytest.approx(g_adv.norm().item(), rel=1e-5)
    assert metrics["grad_norm/distill"] == pytest.approx(g_distill.norm().item(), rel=1e-5)
    assert metrics["lambda/distill"] == 2.5
    measured = theta.grad.clone()
    # The same parameter gradient as back-propagating the summed loss directly (unmeasured steps).
    theta2, x02, l_adv2, l_distill2, _ = _two_terms()
    plain = balance.student_backward(lambda t, **kw: t.backward(**kw), x02, l_adv2, l_distill2, 1.0, 2.5)
    assert set(plain) == {"lambda/distill"}
    assert torch.allclose(theta2.grad, measured, atol=1e-6)
    assert torch.allclose(measured, 2 * (g_adv + g_distill), atol=1e-6)


def test_adaptive_lambda_sets_the_gradient_ratio():
    from sdxl_fast.distill import balance

    theta, x0, l_adv, l_distill, target = _two_terms()
    metrics = balance.student_backward(lambda t, **kw: t.backward(**kw), x0, l_adv, l_distill, 1.0, 3.0,
                                       mode="adaptive")
    assert metrics["grad_norm/distill"] == pytest.approx(3.0 * metrics["grad_norm/adv"], rel=1e-5)
    x = x0.detach()
    expected = 3.0 * ((1 - torch.tanh(x) ** 2) / 4).norm() / (x - target).norm()
    assert metrics["lambda/distill"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="adaptive needs lambda_adv"):
        load_config(None, {"lambda_mode": "adaptive", "lambda_adv": "0"})


def test_new_config_keys_defaults_and_checks():
    cfg = TrainConfig()
    assert (cfg.disc_head, cfg.disc_head_channels, cfg.disc_augment, cfg.distill_reduction, cfg.lambda_mode,
            cfg.student_prediction, cfg.continue_discriminator) == (
        "stylegan_t", 0, "color,translation,cutout", "sum", "fixed", "teacher", True)
    for key, bad in (("disc_head", "mlp"), ("disc_augment", "color,zoom"), ("distill_reduction", "max"),
                     ("student_prediction", "x0"), ("lambda_mode", "auto")):
        with pytest.raises(ValueError, match=key):
            load_config(None, {key: bad})
    assert load_config(None, {"disc_augment": ""}).disc_augment == ""


def test_config_defaults_and_overrides(tmp_path):
    cfg = TrainConfig()
    assert cfg.lambda_distill == 2.5 and cfg.r1_gamma == 1e-5 and cfg.student_timesteps == (999, 749, 499, 249)
    path = tmp_path / "c.json"
    path.write_text('{"batch_size": 3, "student_timesteps": [999, 499]}')
    cfg = load_config(path, {"lr_student": "2e-6", "random_crop": "false", "student_timesteps": "999,249"})
    assert (cfg.batch_size, cfg.lr_student, cfg.random_crop, cfg.student_timesteps) == (3, 2e-6, False, (999, 249))
    toml = tmp_path / "c.toml"
    toml.write_text('batch_size = 2\ndisc_backbone_kwargs = { depth = 2 }\n')
    assert load_config(toml).disc_backbone_kwargs == {"depth": 2}
    with pytest.raises(ValueError, match="Unknown config keys"):
        load_config(None, {"lr": "1"})
    with pytest.raises(ValueError, match="distill_space"):
        load_config(None, {"distill_space": "both"})


def test_example_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.*"))
    assert configs
    for path in configs:
        load_config(path)


def test_student_timestep_weights_set_how_often_each_timestep_is_drawn():
    from sdxl_fast.distill.step import draw_student_timesteps

    timesteps = torch.tensor([999, 749, 499, 249])
    torch.manual_seed(0)
    drawn = draw_student_timesteps(timesteps, torch.tensor([3.0, 1.0, 1.0, 0.0]), 20000)
    share = {t: (drawn == t).float().mean().item() for t in (999, 749, 499, 249)}
    assert share[999] == pytest.approx(0.6, abs=0.02) and share[749] == pytest.approx(0.2, abs=0.02)
    assert share[249] == 0.0
    uniform = draw_student_timesteps(timesteps, torch.ones(4), 20000)
    assert all((uniform == t).float().mean().item() == pytest.approx(0.25, abs=0.02) for t in (999, 249))

    assert load_config(None, {"student_timestep_weights": "3,1,1,1"}).student_timestep_weights == (3.0, 1.0, 1.0, 1.0)
    for bad in ("3,1", "1,-1,1,1", "0,0,0,0"):
        with pytest.raises(ValueError, match="student_timestep_weights"):
            load_config(None, {"student_timestep_weights": bad})
