"""The opt-in fp8 option: its maths on the CPU (torch._scaled_mm runs there too), and its clean skip."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from sdxl_fast import GenerationParams
from sdxl_fast.acceleration import Acceleration, apply
from sdxl_fast.fp8 import Fp8Linear, convert_unet
from sdxl_fast.generate import generate_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_a_quantised_linear(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    fp8 = Fp8Linear(linear)
    with torch.no_grad():
        want, got = linear(x).float(), fp8(x)
    assert got.shape == (3, 5, 32) and got.dtype == dtype and fp8.weight.dtype == torch.float8_e4m3fn
    rel = float((got.float() - want).norm() / want.norm())
    assert 1e-3 < rel < 0.06  # really quantised (3 mantissa bits), and still the same layer


def test_converted_student_stays_close_to_the_eager_one(tiny_models):
    models = copy.copy(tiny_models)
    models.fast = copy.copy(tiny_models.fast)
    models.fast.student = copy.deepcopy(tiny_models.fast.student)
    assert convert_unet(models.fast.student) > 0
    transformer_linears = [m for m in models.fast.student.modules() if isinstance(m, Fp8Linear)]
    assert transformer_linears and not isinstance(models.fast.student.time_embedding.linear_1, Fp8Linear)
    params = GenerationParams("a red fox", mode="fast", steps=1, seed=3, width=64, height=64)
    want = generate_tensors(tiny_models, params)[0]
    got = generate_tensors(models, params)[0]
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.1


def test_fp8_is_skipped_on_cpu_with_the_reason(tiny_sources):
    from sdxl_fast import load

    models = load(modes=("fast",), sources=tiny_sources, device="cpu", acceleration=Acceleration.none())
    notes = apply(models, replace(Acceleration.none(), fp8=True))
    assert notes == ["fp8: skipped on cpu (fp8 tensor cores are on CUDA GPUs of compute capability 8.9+)"]
    assert not any(isinstance(m, Fp8Linear) for m in models.fast.student.modules())
