"""GPU options fall back cleanly on CPU, and the ones that also run on CPU keep the output faithful."""

from dataclasses import replace

import numpy as np
import torch

from sdxl_fast import GenerationParams, generate, load
from sdxl_fast.accel.options import Acceleration


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


def test_warmup_runs_every_path_and_the_quality_step_cache(tiny_models, monkeypatch, caplog):
    from sdxl_fast.accel import startup as warmup_module
    from sdxl_fast.pipeline import step_cache

    generate_module = warmup_module  # where warm-up looks its `generate` up
    calls, cached_unets = [], []
    real_generate, real_cached = generate_module.generate, step_cache.cached_step
    monkeypatch.setattr(generate_module, "generate", lambda models, p, *a: calls.append(p) or real_generate(models, p, *a))
    monkeypatch.setattr(step_cache, "cached_step", lambda unet, *a: cached_unets.append(unet) or real_cached(unet, *a))
    with caplog.at_level("INFO", logger="sdxl_fast.accel.startup"):
        warmup_module.warmup(tiny_models, fast_batches=(1, 2))
    assert [(p.mode, p.steps, p.num_images, p.cache_interval) for p in calls] == [
        ("fast", 1, 1, 1), ("fast", 1, 2, 1), ("quality", 2, 1, 1), ("quality", 4, 1, 2)]
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up ")]
    assert [m.split(":")[0] for m in progress] == ["warm-up 1/4", "warm-up 2/4", "warm-up 3/4", "warm-up 4/4"]
    assert progress[1].startswith("warm-up 2/4: fast, 2 image(s), 1 steps: ") and progress[1].endswith(" s")
    from benchmarks.serving import compiled_lines  # the serving bench records these lines from the app's log
    assert compiled_lines("".join(f"12:00:00 INFO sdxl_fast.accel.startup: {m}\n" for m in progress)) == progress
    q = tiny_models.quality
    assert cached_unets == [q.base, q.refiner]  # each Quality UNet's cached step has run (and compiled, on a GPU)


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


def test_apply_to_models_loaded_later_changes_only_their_own_modules(tiny_sources):
    """Quality loaded after Fast (sdxl_fast.load(share=)) shares Fast's VAE and text encoders, which Fast's CUDA
    graphs read at their addresses while Quality is prepared: applying the options to Quality rewrites its
    UNets and leaves every tensor of the shared modules where it was."""
    from sdxl_fast import accel as acceleration

    options = replace(Acceleration.none(), subpixel_upsample=True, fuse_qkv=True, fuse_text_qkv=True)
    fast = load(modes=("fast",), sources=tiny_sources, device="cpu")
    assert acceleration.apply(fast, options)[0] == "subpixel_upsample: 4 upsamplers"
    shared = [fast.fast.vae, fast.fast.encoders.text_encoder, fast.fast.encoders.text_encoder_2]
    addresses = [[p.data_ptr() for p in module.parameters()] for module in shared]
    later = load(modes=("quality",), sources=tiny_sources, device="cpu", share=fast)
    notes = acceleration.apply(later, options, leave=fast)
    assert notes[0] == "subpixel_upsample: 2 upsamplers"  # the base's and the refiner's one each
    assert [[p.data_ptr() for p in module.parameters()] for module in shared] == addresses
    assert hasattr(later.quality.base.down_blocks[1].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    params = GenerationParams("a tower", mode="quality", steps=2, seed=4, width=64, height=64)
    assert generate(later, params)[0].size == (64, 64)
