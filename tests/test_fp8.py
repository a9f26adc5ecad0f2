"""The opt-in fp8 option: its maths on the CPU (torch._scaled_mm runs there too), and its clean skip."""

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch import nn

from sdxl_fast import GenerationParams
from sdxl_fast.accel.options import Acceleration, apply
from sdxl_fast.accel.fp8 import Fp8Linear, calibrate, convert_unet
from sdxl_fast.pipeline.generate import generate_tensors


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

    models = load(modes=("fast",), sources=tiny_sources, device="cpu")
    notes = apply(models, replace(Acceleration.none(), fp8=True))
    assert notes == ["fp8: skipped on cpu (fp8 tensor cores are on CUDA GPUs of compute capability 8.9+)"]
    assert not any(isinstance(m, Fp8Linear) for m in models.fast.student.modules())


def test_a_calibrated_linear_uses_its_fixed_scale_and_saturates_beyond_it():
    torch.manual_seed(0)
    fp8 = Fp8Linear(nn.Linear(64, 32))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        per_call = fp8(x)
        assert calibrate([fp8], lambda: fp8(x), headroom=1.0) == 1
        assert torch.allclose(fp8.input_scale, x.abs().amax() / 448)
        assert torch.equal(fp8(x), per_call)  # the same scale as found per call for this input
        big = 4 * x
        saturated = fp8(big)  # beyond the calibrated range: clipped
        fp8.input_scale = None
        assert not torch.allclose(saturated, fp8(big), rtol=0.05)  # a per-call scale follows the input


def test_calibration_on_sample_calls_fixes_every_layer_and_stays_close(tiny_models, monkeypatch):
    from sdxl_fast.accel import fp8, startup
    from sdxl_fast.accel.startup import sample_calls as _sample_calls

    models = copy.copy(tiny_models)
    models.fast = copy.copy(tiny_models.fast)
    models.fast.student = copy.deepcopy(tiny_models.fast.student)
    converted = convert_unet(models.fast.student)
    # The start-up's sample calls at 64² instead of the models' own size: every layer runs at any size, and
    # float8 matmuls on a CPU are slow.
    monkeypatch.setattr(startup, "GenerationParams", partial(GenerationParams, width=64, height=64))
    assert calibrate([models.fast.student], lambda: _sample_calls(models)) == converted > 0
    monkeypatch.setattr(fp8, "_quantise", None)  # no layer may find its scale per call any more
    params = GenerationParams("a red fox", mode="fast", steps=1, seed=3, width=64, height=64)
    want = generate_tensors(tiny_models, params)[0]
    got = generate_tensors(models, params)[0]
    assert 0 < float((got - want).norm() / want.norm()) < 0.1


def test_fp8_leaves_the_text_projections_to_the_hoisted_keys_and_values(tiny_models):
    from sdxl_fast.accel import cross_kv

    models = copy.copy(tiny_models)
    models.fast = copy.copy(tiny_models.fast)
    student = models.fast.student = copy.deepcopy(tiny_models.fast.student)
    student.fuse_qkv_projections()
    assert convert_unet(student) > 0
    cross = [m for m in student.modules() if getattr(m, "is_cross_attention", False)]
    assert cross and all(isinstance(m.to_q, Fp8Linear) and type(m.to_kv) is nn.Linear for m in cross)
    selfs = [m for m in student.modules() if getattr(m, "fused_projections", False) and not m.is_cross_attention]
    assert selfs and all(isinstance(m.to_qkv, Fp8Linear) and type(m.to_q) is nn.Linear for m in selfs)
    assert cross_kv.hoist(student) == len(cross)  # fp8 and the hoisted keys and values together
    assert convert_unet(student) == 0  # converting again (the bench does, after hoisting) changes nothing
    # At 64²: every layer runs at any size, and float8 matmuls on a CPU are slow.
    run = lambda: generate_tensors(models, GenerationParams("a boat", mode="fast", steps=4, seed=1,  # noqa: E731
                                                            width=64, height=64))
    assert calibrate([student], run) == sum(isinstance(m, Fp8Linear) for m in student.modules())  # all in use
    params = GenerationParams("a red fox", mode="fast", steps=1, seed=3, width=64, height=64)
    want = generate_tensors(tiny_models, params)[0]
    got = generate_tensors(models, params)[0]
    assert 0 < float((got - want).norm() / want.norm()) < 0.1
