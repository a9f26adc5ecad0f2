"""`python -m benchmarks.bench`: diffusers' default pipelines and ours on the same random weights, in one run.

Timing depends on shapes, not weight values, so the models are random-weight SDXL built from the public
configs (`--configs benchmarks/sdxl-configs`), or the tiny test shapes (`--tiny`, a CPU smoke run).
Every workload is measured prompt string in -> PIL image out. Output error is our optimised path against our
eager fp32 path, same seed, on the final latents: ||ours - eager|| / ||eager||.

Each measured (workload, path) is one JSON line in the schema of benchmarks/render.py, written as soon as it is
measured to `--json FILE` (default: a new file under benchmarks/results/new/, which git ignores); `-o FILE`
also writes a markdown table of the run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks import record
from benchmarks.timing import Timing, time_calls
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


def time_workload(run, w: Workload, device: torch.device, repeats: int) -> tuple[Timing, float | None]:
    """`repeats` timed calls after one untimed call (which records CUDA graphs), and the peak GPU memory of the
    timed calls in GiB, weights included (None off CUDA)."""

    def call() -> None:
        run(w, PROMPT if w.same_prompt else new_prompt())

    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = time_calls(call, repeats, warmup=0, sync=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return timing, peak


def _rate(per_second: float) -> float:
    """One decimal, and at least three significant digits for slow (CPU) runs: 62.4, 0.0202."""
    return round(per_second, max(1, 2 - math.floor(math.log10(per_second))))


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(f"{float((got - want).norm() / want.norm()):.2e}")  # three significant digits, as recorded


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def result_row(device: str, w: Workload, path: str, timing: Timing, peak: float | None, dtype: torch.dtype,
               **errors: float) -> dict:
    """One results row (benchmarks/render.py's schema) without its provenance: main adds command, commit, date
    and versions."""
    return dict(device=device, workload=w.name, path=path, size=f"{w.side}x{w.side}", batch=w.batch, **timing.ms(),
                images_per_s=_rate(w.batch / timing.median), peak_gib=None if peak is None else round(peak, 2),
                **errors, dtype=DTYPE_NAMES[dtype])


def measure(models: Models, label: str, jobs: list[Workload], fp32: dict, eager: dict, device: torch.device,
            repeats: int, on_row=None) -> list[dict]:
    rows = []
    for w in jobs:
        if getattr(models.runner, "graphs", None) is not None:  # each workload's peak memory counts its own graphs
            models.runner = AcceleratedRunner(CudaGraphs())
            torch.cuda.empty_cache()
        timing, peak = time_workload(ours(models), w, device, repeats)
        got = final_latents(models, w)
        rows.append(result_row(record.device_name(device), w, label, timing, peak, models.dtype,
                               error_vs_fp32=_rel_error(got, fp32[w.name]),
                               error_vs_eager_same_dtype=_rel_error(got, eager[w.name])))
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
    rows = []
    for w in jobs:
        rows.append(result_row(record.device_name(device), w, "diffusers default",
                               *time_workload(baseline, w, device, repeats), dtype))
        if on_row:
            on_row(rows[-1])
    done("diffusers default timings")
    eager = {w.name: final_latents(models, w) for w in jobs}  # our loop, same dtype, no options
    done("eager reference latents")
    notes = acceleration.apply(models, options)
    if uncompiled_rows or not compile_too:
        rows += measure(models, "ours", jobs, fp32, eager, device, repeats, on_row)
        done("ours")
    if compile_too:
        notes += acceleration.apply(models, replace(acceleration.Acceleration.none(), cuda_graphs=options.cuda_graphs,
                                                    compile=True, compile_mode=options.compile_mode,
                                                    combo_kernels=options.combo_kernels))
        rows += measure(models, label(), jobs, fp32, eager, device, repeats, on_row)
        done(label())
    if fp8:
        notes += acceleration.apply(models, replace(acceleration.Acceleration.none(), fp8=True,
                                                    cuda_graphs=options.cuda_graphs))
        rows += measure(models, label("fp8"), jobs, fp32, eager, device, repeats, on_row)
        done(label("fp8"))
    if step_cache > 1:  # last, on top of whatever options are on by then; only workloads with a step to cache
        cached = [replace(w, cache_interval=step_cache) for w in jobs if w.steps > 1]
        cache_label = label(*(["fp8"] if fp8 else []), f"step cache {step_cache}")
        rows += measure(models, cache_label, cached, fp32, eager, device, repeats, on_row)
        done(cache_label)
    return rows, notes


def markdown(rows: list[dict], notes: list[str], provenance: dict) -> str:
    """The run's rows as one table, ours against diffusers' default of the same workload (`-o`)."""
    default = {r["workload"]: r for r in rows if r["path"] == "diffusers default"}
    versions = provenance["versions"]
    lines = [
        "# Benchmarks", "",
        f"- device: {rows[0]['device'] if rows else ''}",
        "- " + ", ".join(f"{name} {versions[key]}" for key, name in (
            ("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"), ("python", "Python"))
            if key in versions),
        f"- command: `{provenance['command']}`", f"- commit: {provenance['commit'] or 'unknown'}",
        f"- acceleration: {'; '.join(dict.fromkeys(notes)) or 'none'}", "",
        "| workload | path | size | batch | median (min–max) ms | diffusers default median ms | speed-up | "
        "images/s | peak GiB | latent rel. error vs eager fp32 | vs our eager loop, same dtype |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["path"] == "diffusers default":
            continue
        d = default[r["workload"]]
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['workload']} | {r['path']} | {r['size']} | {r['batch']} | {r['median_ms']:.1f} "
            f"({r['min_ms']:.1f}–{r['max_ms']:.1f}) | {d['median_ms']:.1f} | "
            f"{d['median_ms'] / r['median_ms']:.2f}× | "
            f"{r['images_per_s']:.1f} | {peak} | {r['error_vs_fp32']:.2e} | {r['error_vs_eager_same_dtype']:.2e} |")
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
    bench.add_argument("--json", type=Path, metavar="FILE",
                       help="append the rows here, one JSON line per row as measured (default: a new file under "
                            "benchmarks/results/new/ named by date and device)")
    bench.add_argument("-o", "--output", type=Path, metavar="FILE", help="also write the markdown table here")
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

    provenance = record.provenance(command)
    json_path = args.json or record.new_results_file(record.device_name(device))
    write = record.Writer(json_path)

    rows, notes = run_bench(configs, device, dtype, args.repeats, args.tiny, options, args.compile,
                            lambda row: write({**row, **provenance}), args.only, args.fp8, args.step_cache,
                            uncompiled_rows=not args.compiled_only)
    print(f"bench: {len(rows)} rows in {json_path}", file=sys.stderr)
    if args.output:
        args.output.write_text(markdown(rows, notes, provenance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
