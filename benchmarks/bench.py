"""`python -m benchmarks.bench`: diffusers' default pipelines and ours on the same random weights, in one run.

Timing depends on shapes, not weight values, so the models are random-weight SDXL built from the public
configs (`--configs benchmarks/sdxl-configs`), or the tiny test shapes (`--tiny`, a CPU smoke run).
Every workload is measured prompt string in -> PIL image out. Output error is our optimised path against our
eager fp32 path, same seed, on the final latents: ||ours - eager|| / ||eager||.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdxl_fast import accel as acceleration
from sdxl_fast.accel.cuda_graphs import AcceleratedRunner, CudaGraphs
from sdxl_fast.models import FastModels, Models, QualityModels, TextEncoders, pick_device_dtype
from sdxl_fast.params import GenerationParams
from sdxl_fast.pipeline.generate import generate, generate_tensors
from sdxl_fast.testing import random_weights


PROMPT = "a photograph of an astronaut riding a horse"
_takes = itertools.count()


def new_prompt() -> str:
    """A prompt not used before in this process, so its embeddings are not in the prompt cache of any call."""
    return f"{PROMPT}, take {next(_takes)}"


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str
    steps: int
    side: int
    batch: int = 1
    cache_interval: int = 1  # sdxl_fast.pipeline.step_cache; 1 = off
    refiner: bool = True  # Quality: the refiner takes the last fifth of the noise levels, else the base does all
    # The same prompt on every call, so our text encoders are skipped (sdxl_fast.pipeline.prompts' cache), as when a user
    # re-runs a prompt with a new seed; otherwise every call has a new prompt and the encoders always run.
    same_prompt: bool = False


def workloads(tiny: bool) -> list[Workload]:
    fast_side, quality_side = (64, 64) if tiny else (512, 1024)
    return [
        Workload("fast 1-step", "fast", 1, fast_side),
        Workload("fast 1-step, same prompt", "fast", 1, fast_side, same_prompt=True),
        Workload("fast 4-step", "fast", 4, fast_side),
        Workload("fast 1-step batch 16", "fast", 1, fast_side, batch=16),
        Workload("quality 50-step base+refiner CFG 5", "quality", 50, quality_side),
        # The setting of NVIDIA/Stability's published TensorRT SDXL figure (1471 ms on an H100): issue 7.
        Workload("quality 30-step base CFG 5", "quality", 30, quality_side, refiner=False),
    ]


def build_models(components: dict, device: torch.device, dtype: torch.dtype) -> Models:
    """Our Models over in-memory components; the student shares the base UNet's shape (and here its weights)."""
    from diffusers import EulerDiscreteScheduler

    c = {k: (v.to(device=device, dtype=dtype).eval().requires_grad_(False) if isinstance(v, torch.nn.Module) else v)
         for k, v in components.items()}  # as sdxl_fast.loading loads them
    encoders = TextEncoders(c["tokenizer"], c["text_encoder"], c["tokenizer_2"], c["text_encoder_2"])
    scheduler = EulerDiscreteScheduler.from_config(random_weights.SDXL_SCHEDULER)
    names = {"base": "random-sdxl-base", "refiner": "random-sdxl-refiner", "fast": "random-sdxl-student"}
    return Models(
        device=device, dtype=dtype,
        quality=QualityModels(encoders, c["vae"], c["unet"], c["refiner_unet"], scheduler, True, names),
        fast=FastModels(encoders, c["vae"], c["unet"], scheduler, names),
    )


def diffusers_default(models: Models):
    """diffusers' own pipelines on the same modules: the baseline users get without sdxl-fast."""
    from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    q, enc = models.quality, models.quality.encoders
    common = dict(vae=q.vae, text_encoder_2=enc.text_encoder_2, tokenizer_2=enc.tokenizer_2)
    base = StableDiffusionXLPipeline(text_encoder=enc.text_encoder, tokenizer=enc.tokenizer, unet=q.base,
                                     scheduler=EulerDiscreteScheduler.from_config(random_weights.SDXL_SCHEDULER),
                                     **common)
    refiner = StableDiffusionXLImg2ImgPipeline(
        text_encoder=None, tokenizer=None, unet=q.refiner, requires_aesthetics_score=True,
        scheduler=EulerDiscreteScheduler.from_config(random_weights.SDXL_SCHEDULER), **common)
    turbo = StableDiffusionXLPipeline(
        text_encoder=enc.text_encoder, tokenizer=enc.tokenizer, unet=models.fast.student,
        scheduler=EulerAncestralDiscreteScheduler.from_config(random_weights.TURBO_SCHEDULER), **common)
    for pipe in (base, refiner, turbo):
        pipe.set_progress_bar_config(disable=True)

    def run(w: Workload, prompt: str):
        if w.mode == "fast":
            return turbo(prompt, num_inference_steps=w.steps, guidance_scale=0.0, height=w.side, width=w.side,
                         num_images_per_prompt=w.batch).images
        if not w.refiner:
            return base(prompt, num_inference_steps=w.steps, guidance_scale=5.0, height=w.side, width=w.side).images
        latents = base(prompt, num_inference_steps=w.steps, denoising_end=0.8, guidance_scale=5.0, height=w.side,
                       width=w.side, output_type="latent").images
        return refiner(prompt, image=latents, num_inference_steps=w.steps, denoising_start=0.8,
                       guidance_scale=5.0).images

    return run


def ours(models: Models):
    def run(w: Workload, prompt: str):
        return generate(models, _params(w, prompt))
    return run


def _params(w: Workload, prompt: str) -> GenerationParams:
    return GenerationParams(prompt, mode=w.mode, steps=w.steps, seed=0, width=w.side, height=w.side,
                            num_images=w.batch, guidance_scale=5.0, cache_interval=w.cache_interval,
                            use_refiner=w.refiner)


def final_latents(models: Models, w: Workload) -> torch.Tensor:
    return generate_tensors(models, _params(w, PROMPT))[0].float().cpu()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(run, w: Workload, device: torch.device, repeats: int) -> dict:
    """Median/min/max seconds of `repeats` calls after one untimed call (which records CUDA graphs), and the
    peak memory of those calls, weights included."""

    def prompt() -> str:
        return PROMPT if w.same_prompt else new_prompt()

    run(w, prompt())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run(w, prompt())
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(median=statistics.median(times), min=min(times), max=max(times), peak_gib=peak)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def measure(models: Models, label: str, jobs: list[Workload], default_times: dict, fp32: dict, eager: dict,
            device: torch.device, repeats: int, on_row=None) -> list[dict]:
    rows = []
    for w in jobs:
        if getattr(models.runner, "graphs", None) is not None:  # each workload's peak memory counts its own graphs
            models.runner = AcceleratedRunner(CudaGraphs())
            torch.cuda.empty_cache()
        timing = time_calls(ours(models), w, device, repeats)
        got = final_latents(models, w)
        rows.append(dict(
            workload=w.name, path=label, size=f"{w.side}²", batch=w.batch, ours=timing, default=default_times[w.name],
            images_per_s=w.batch / timing["median"], speedup=default_times[w.name]["median"] / timing["median"],
            error_fp32=_rel_error(got, fp32[w.name]), error_eager=_rel_error(got, eager[w.name]),
        ))
        if on_row:
            on_row(rows[-1])
    return rows


def run_bench(configs: dict, device: torch.device, dtype: torch.dtype, repeats: int, tiny: bool,
              options: acceleration.Acceleration, compile_too: bool = False, on_row=None,
              only: list[str] | None = None, fp8: bool = False, step_cache: int = 1,
              uncompiled_rows: bool = True) -> tuple[list[dict], list[str]]:
    started = time.perf_counter()

    def done(phase: str) -> None:  # GPU time is rationed: say where it goes, and how much memory it took
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"bench: {phase} done at {time.perf_counter() - started:.0f} s{peak}", file=sys.stderr, flush=True)

    def label(*extra: str) -> str:  # the options on for a phase, in the order they were applied
        return " + ".join(["ours", *(["compile"] if compile_too else []), *extra])

    jobs = [w for w in workloads(tiny) if not only or w.name in only]
    # The error baseline first, eager fp32, on the very modules that are then cast to `dtype` in place: one
    # copy of the weights on the GPU, not two.
    components = random_weights.build_random_components(configs, device=device)
    reference = build_models(components, device, torch.float32)
    fp32 = {w.name: final_latents(reference, w) for w in jobs}
    del reference
    done("eager fp32 reference latents")
    models = build_models(components, device, dtype)
    baseline = diffusers_default(models)
    default_times = {w.name: time_calls(baseline, w, device, repeats) for w in jobs}
    done("diffusers default timings")
    eager = {w.name: final_latents(models, w) for w in jobs}  # our loop, same dtype, no options
    done("eager reference latents")
    notes = acceleration.apply(models, options)
    rows = []
    if uncompiled_rows or not compile_too:
        rows = measure(models, "ours", jobs, default_times, fp32, eager, device, repeats, on_row)
        done("ours")
    if compile_too:
        notes += acceleration.apply(models, replace(acceleration.Acceleration.none(), cuda_graphs=options.cuda_graphs,
                                                    compile=True, compile_mode=options.compile_mode,
                                                    combo_kernels=options.combo_kernels))
        rows += measure(models, label(), jobs, default_times, fp32, eager, device, repeats, on_row)
        done(label())
    if fp8:
        notes += acceleration.apply(models, replace(acceleration.Acceleration.none(), fp8=True,
                                                    cuda_graphs=options.cuda_graphs))
        rows += measure(models, label("fp8"), jobs, default_times, fp32, eager, device, repeats, on_row)
        done(label("fp8"))
    if step_cache > 1:  # last, on top of whatever options are on by then; only workloads with a step to cache
        cached = [replace(w, cache_interval=step_cache) for w in jobs if w.steps > 1]
        cache_label = label(*(["fp8"] if fp8 else []), f"step cache {step_cache}")
        rows += measure(models, cache_label, cached, default_times, fp32, eager, device, repeats, on_row)
        done(cache_label)
    return rows, notes


def markdown(rows: list[dict], notes: list[str], device: torch.device, command: str) -> str:
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        "# Benchmarks", "",
        f"- device: {gpu}", f"- torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `{command}`", f"- acceleration: {'; '.join(dict.fromkeys(notes)) or 'none'}", "",
        "| workload | path | size | batch | median (min–max) ms | diffusers default median ms | speed-up | "
        "images/s | peak GiB | latent rel. error vs eager fp32 | vs our eager loop, same dtype |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, d = r["ours"], r["default"]
        lines.append(
            f"| {r['workload']} | {r['path']} | {r['size']} | {r['batch']} | {o['median'] * 1e3:.1f} "
            f"({o['min'] * 1e3:.1f}–{o['max'] * 1e3:.1f}) | {d['median'] * 1e3:.1f} | {r['speedup']:.2f}× | "
            f"{r['images_per_s']:.1f} | {o['peak_gib']:.2f} | {r['error_fp32']:.2e} | {r['error_eager']:.2e} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = bench.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", type=Path, help="folder of the SDXL configs (base/, refiner/) for full size")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes: a quick CPU run of the harness")
    bench.add_argument("--device", help="default: cuda when available")
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--no-graphs", action="store_true", help="measure without CUDA graphs")
    bench.add_argument("--compile", action="store_true",
                       help="then torch.compile the models too and measure again (minutes of compiling)")
    bench.add_argument("--compile-mode", default=acceleration.Acceleration.compile_mode,
                       help="torch.compile mode for --compile (without CUDA graphs: ours are recorded around it)")
    bench.add_argument("--no-combo-kernels", dest="combo_kernels", action="store_false",
                       help="with --compile: without Inductor's combo kernels (for an A/B of that default)")
    bench.add_argument("--compiled-only", action="store_true",
                       help="with --compile: skip the rows without it (saves GPU time on long runs)")
    bench.add_argument("--fp8", action="store_true",
                       help="then convert the UNets' transformer linears to fp8 (opt-in option) and measure again")
    bench.add_argument("--step-cache", type=int, default=1, metavar="N",
                       help="then measure the multi-step workloads again with cache_interval N (opt-in, approximate: "
                            "sdxl_fast.pipeline.step_cache)")
    bench.add_argument("--only", action="append", metavar="WORKLOAD", choices=[w.name for w in workloads(tiny=False)],
                       help='measure only this workload (repeatable), e.g. --only "fast 1-step"')
    bench.add_argument("--json", type=Path, help="also write the rows here, one JSON line per row as measured")
    bench.add_argument("-o", "--output", type=Path, help="also write the markdown table here")
    return bench


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m benchmarks.bench", *argv])
    device, dtype = pick_device_dtype(args.device, args.dtype)
    configs = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    # First without torch.compile, then (--compile) with it, so each lever's share is visible.
    options = replace(acceleration.Acceleration.for_device(device), compile=False,
                      compile_mode=args.compile_mode, combo_kernels=args.combo_kernels)
    if args.no_graphs:
        options = replace(options, cuda_graphs=False)

    def on_row(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    rows, notes = run_bench(configs, device, dtype, args.repeats, args.tiny, options, args.compile, on_row, args.only,
                            args.fp8, args.step_cache, uncompiled_rows=not args.compiled_only)
    table = markdown(rows, notes, device, command)
    if args.output:
        args.output.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
