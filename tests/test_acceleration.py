"""GPU options fall back cleanly on CPU, and the ones that also run on CPU keep the output faithful."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench import main as bench_main
from sdxl_fast import GenerationParams, generate, load
from sdxl_fast.accel.options import Acceleration


def _tool(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks.SCRIPT` with the given arguments, as a user would, capturing its output."""
    module = "benchmarks." + script.removesuffix(".py")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          check=check, cwd=Path(__file__).parent.parent)


def test_cpu_default_is_eager_with_only_the_upsampler_rewrite():
    assert Acceleration.for_device(torch.device("cpu")) == replace(Acceleration.none(), subpixel_upsample=True)
    on_gpu = Acceleration.for_device(torch.device("cuda"))
    assert on_gpu.cuda_graphs and on_gpu.channels_last and on_gpu.fuse_qkv and on_gpu.subpixel_upsample
    assert on_gpu.group_norm_rewrite and not Acceleration.for_device(torch.device("cpu")).group_norm_rewrite
    assert on_gpu.compile and on_gpu.compile_mode in ("default", "max-autotune-no-cudagraphs")  # no graphs inside ours


def test_options_on_cpu_apply_or_skip_with_reason_and_stay_faithful(tiny_sources, tiny_models):
    from sdxl_fast import accel as acceleration

    fast_models = load(modes=("fast",), sources=tiny_sources, device="cpu")
    notes = acceleration.apply(fast_models, Acceleration())  # everything asked for, on a CPU
    assert notes[0] == "subpixel_upsample: 4 upsamplers"  # the tiny VAE decoder's 3 and the student's 1
    assert notes[1] == "channels_last: applied" and notes[2] == "fuse_qkv: applied"
    assert notes[3].startswith("group_norm_rewrite: ")
    assert notes[4] == "fuse_text_qkv: 4 layers"  # the tiny encoders' 2 + 2
    assert notes[5] == "vae_matmul_attention: applied"
    assert notes[6] == "hoist_cross_kv: 8 cross-attentions"  # the tiny student's
    assert notes[7].startswith("compile: skipped on cpu")
    assert notes[8].startswith("cuda_graphs: skipped on cpu") and getattr(fast_models.runner, "graphs", None) is None
    assert fast_models.fast.student.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    params = GenerationParams("a tower", mode="fast", steps=2, seed=4, width=64, height=64)
    fused = np.asarray(generate(fast_models, params)[0]).astype(int)
    eager = np.asarray(generate(tiny_models, params)[0]).astype(int)
    assert np.abs(fused - eager).max() <= 2  # same maths; the fused matmul only rounds differently


def test_compiled_models_get_one_static_graph_per_shape(tiny_family):
    """Base and student share diffusers' forward frame; each new shape must compile a static graph (no
    symbolic sizes), not turn the frame dynamic. Run on CPU with a recording backend instead of Inductor."""
    from diffusers import UNet2DConditionModel

    from sdxl_fast.accel.compile import compile_models

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor)
                          and any(isinstance(d, torch.SymInt) for d in x.shape) for x in example_inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        unets = [UNet2DConditionModel.from_pretrained(tiny_family[name], subfolder="unet")
                 for name in ("base", "student")]
        compile_models(unets, [], [], mode=None, backend=recording_backend)
        with torch.no_grad():
            for unet, batch, side in [(unets[1], 1, 8), (unets[0], 2, 16), (unets[1], 3, 8)]:
                cfg = unet.config
                added = {"text_embeds": torch.randn(batch, cfg.projection_class_embeddings_input_dim
                                                    - 6 * cfg.addition_time_embed_dim),
                         "time_ids": torch.zeros(batch, 6)}
                unet(torch.randn(batch, 4, side, side), 500, torch.randn(batch, 7, cfg.cross_attention_dim),
                     added_cond_kwargs=added)
        assert graphs == [False, False, False]  # three shapes, three static graphs
    finally:
        torch._dynamo.reset()


def test_inductor_gets_the_modes_options_plus_combo_kernels(monkeypatch):
    """torch.compile refuses a mode together with options, so the mode's options travel with ours."""
    from sdxl_fast.accel.compile import compile_models
    from sdxl_fast.accel.options import Acceleration

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    layer = torch.nn.Linear(2, 2)
    compile_models([layer], [], [], mode="max-autotune-no-cudagraphs", combo_kernels=True)
    assert calls == [{"fullgraph": True, "dynamic": False, "backend": "inductor", "options": {
        "max_autotune": True, "coordinate_descent_tuning": True, "combo_kernels": True}}]
    compile_models([], [], [layer], mode=None)  # torch's default mode: no options but ours
    assert calls[1] == {"dynamic": False, "backend": "inductor", "options": {"combo_kernels": False}}
    assert Acceleration().combo_kernels and Acceleration().compile_mode == "default"


def test_bench_harness_runs_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--step-cache", "2", "-o", str(out)]) == 0
    table = out.read_text()
    for workload in ("fast 1-step", "fast 4-step", "fast 1-step batch 16", "quality 50-step base+refiner CFG 5",
                     "quality 30-step base CFG 5"):
        assert f"| {workload} | ours |" in table
    assert "python -m benchmarks.bench --tiny --repeats 1" in table and "torch 2.14.1" in table
    rows = [line for line in table.splitlines() if line.startswith("| fast") or line.startswith("| quality")]
    exact = [row for row in rows if "step cache" not in row]
    assert all(float(row.split("|")[-2]) < 1e-5 for row in exact)  # on CPU only the upsampler rewrite: rounding
    assert all(float(row.split("|")[-3]) < 1e-3 for row in exact)  # fp32 on CPU: the same as the fp32 reference
    # The opt-in step cache gets rows of its own for the multi-step workloads, with the error it adds.
    cached = [row for row in rows if "| ours + step cache 2 |" in row]
    assert [row.split("|")[1].strip() for row in cached] == ["fast 4-step", "quality 50-step base+refiner CFG 5",
                                                              "quality 30-step base CFG 5"]
    assert all(float(row.split("|")[-2]) > 1e-4 for row in cached)


def test_bench_compiled_only_skips_the_rows_without_compile(tmp_path):
    out = tmp_path / "BENCH.md"
    assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--only", "fast 1-step", "--compile",
                       "--compiled-only", "-o", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fast")]
    assert [row.split("|")[2].strip() for row in rows] == ["ours + compile"]  # on CPU compile is skipped, noted


def test_bench_reference_stays_fp32_while_the_same_modules_are_measured_in_half_precision():
    """The fp32 error baseline runs first on the very modules that are then cast in place (one copy of the
    weights on the GPU); with no options, ours is our eager loop exactly, and only the cast differs from fp32."""
    from benchmarks import bench
    from sdxl_fast.testing import random_weights

    rows, _ = bench.run_bench(random_weights.tiny_configs(), torch.device("cpu"), torch.bfloat16, 1, True,
                              Acceleration.none(), only=["fast 1-step"])
    assert rows[0]["error_eager"] == 0.0
    assert 1e-4 < rows[0]["error_fp32"] < 5e-2  # bf16 against fp32: the reference was not cast first


def test_bench_refuses_an_unknown_workload_before_building_anything(capsys, monkeypatch):
    from benchmarks import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--tiny", "--only", "fast 1 step"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fast 1 step'" in err and "'fast 1-step'" in err  # the valid names, listed


def test_bench_no_combo_kernels_compiles_without_them(tmp_path, monkeypatch):
    from benchmarks import bench
    from sdxl_fast import accel as acceleration

    applied, apply = [], acceleration.apply
    monkeypatch.setattr(bench.acceleration, "apply",
                        lambda models, options: applied.append(options) or apply(models, options))
    for flag, expected in (([], True), (["--no-combo-kernels"], False)):
        applied.clear()
        assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--only", "fast 1-step", "--compile",
                           "--compiled-only", *flag, "-o", str(tmp_path / "BENCH.md")]) == 0
        assert [o.combo_kernels for o in applied if o.compile] == [expected]


def test_fast_breakdown_script_times_every_part():
    out = _tool("fast_breakdown.py", "--tiny", "--batch", "2", "--without", "subpixel_upsample").stdout
    lines = [line for line in out.splitlines() if " ms " in line]
    assert len(lines) == 11 and all("median" in line for line in lines)
    assert out.startswith("acceleration: \n")  # the CPU default less the one option turned off


def test_fast_breakdown_timeline_lists_the_stages_of_a_call_in_order():
    out = _tool("fast_breakdown.py", "--tiny", "--timeline").stdout
    stages = out.split("host, ms from the call's start")[1].splitlines()[1:]
    names = [line.rsplit(None, 1)[0].strip() for line in stages]
    times = [float(line.rsplit(None, 1)[1]) for line in stages]
    assert names == ["generate() starts", "tokenising starts", "tokenising returns",
                     "waiting for the GPU, copying to the CPU starts", "waiting for the GPU, copying to the CPU returns",
                     "uint8 -> PIL starts", "uint8 -> PIL returns", "generate() returns"]  # on CPU: no graphs
    assert times == sorted(times) and times[0] == 0.0 < times[-1]


def test_fast_breakdown_batch_0_skips_the_batched_lines_and_sets_inductor_config():
    run = ("fast_breakdown.py", "--tiny", "--batch", "0")
    out = _tool(*run, "--inductor", "triton.enable_pdl=True").stdout
    assert [line.split("  ")[0] for line in out.splitlines() if " ms " in line][-1] == (
        "uint8 images -> CPU (pageable memory) -> PIL")
    bad = _tool(*run, "--inductor", "no_such_setting=1", check=False)
    assert bad.returncode != 0 and "no_such_setting" in bad.stderr


def test_fast_breakdown_trace_reports_each_call_and_writes_a_chrome_trace(tmp_path):
    import json

    out = _tool("fast_breakdown.py", "--tiny", "--trace", str(tmp_path / "t.json")).stdout
    calls = [line for line in out.splitlines() if line.startswith("call ")]
    assert len(calls) == 3 and all("GPU busy 0.000 ms" in line for line in calls)  # a CPU has no kernels
    assert "aten::" in out  # the CPU operations under each gap
    assert any(e.get("name") == "call 2" for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"])


@pytest.mark.parametrize("model", ["base", "refiner", "vae"])
def test_unet_probe_script_times_each_model_and_shape(model):
    run = ("unet_probe.py", "--tiny", "--model", model, "--shapes", "64x1", "128x2")
    out = _tool(*run).stdout
    results = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert [line.split("]")[1].split()[0] for line in results] == ["64x1", "128x2"]
    assert all(float(line.split("median")[1].split()[0]) > 0 for line in results)
    if not torch.cuda.is_available():  # the GPU-only parts refuse clearly instead of failing inside CUDA
        for refused_run in (run + ("--profile",), run + ("--blas", "cublaslt"), ("unet_probe.py", "--gemm-micro")):
            refused = _tool(*refused_run, check=False)
            assert refused.returncode == 2 and "need a CUDA GPU" in refused.stderr


def test_warmup_runs_every_path_and_the_quality_step_cache(tiny_models, monkeypatch):
    from sdxl_fast.accel import startup as warmup_module
    from sdxl_fast.pipeline import step_cache

    generate_module = warmup_module  # where warm-up looks its `generate` up
    calls, cached_unets = [], []
    real_generate, real_cached = generate_module.generate, step_cache.cached_step
    monkeypatch.setattr(generate_module, "generate", lambda models, p, *a: calls.append(p) or real_generate(models, p, *a))
    monkeypatch.setattr(step_cache, "cached_step", lambda unet, *a: cached_unets.append(unet) or real_cached(unet, *a))
    warmup_module.warmup(tiny_models)
    assert [(p.mode, p.steps, p.cache_interval) for p in calls] == [("fast", 1, 1), ("quality", 2, 1), ("quality", 4, 2)]
    q = tiny_models.quality
    assert cached_unets == [q.base, q.refiner]  # each Quality UNet's cached step has run (and compiled, on a GPU)


def test_bench_prompts_are_new_on_every_call_unless_a_workload_repeats_one():
    from benchmarks.bench import PROMPT, time_calls, workloads

    seen = []
    fast, same = (next(w for w in workloads(tiny=True) if w.name == name)
                  for name in ("fast 1-step", "fast 1-step, same prompt"))
    for w in (fast, fast, same):  # the same workload twice, as two phases of one run measure it
        time_calls(lambda w, prompt: seen.append((w.same_prompt, prompt)), w, torch.device("cpu"), repeats=3)
    new = [prompt for same_prompt, prompt in seen if not same_prompt]
    assert len(new) == 8 and len(set(new)) == 8 and PROMPT not in new  # never served from the prompt cache
    assert [prompt for same_prompt, prompt in seen if same_prompt] == [PROMPT] * 4


def test_generation_keeps_no_autograd_state_even_for_modules_that_require_grad(tiny_models):
    """A full-size fp32 bench reference ran out of GPU memory keeping the VAE's activations for a backward pass
    that never comes: its random modules required grad. Nothing in a generation may record for autograd."""
    from sdxl_fast.pipeline.generate import generate_tensors

    models = tiny_models
    seen = []
    hook = models.fast.vae.decoder.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    models.fast.vae.requires_grad_(True)
    try:
        generate_tensors(models, GenerationParams("a red circle", mode="fast", steps=1, seed=0))
    finally:
        hook.remove()
        models.fast.vae.requires_grad_(False)
    assert seen == [False]
