"""Where the time of one Fast 1-step call goes: each part timed alone, as the Fast path runs it.

    python -m benchmarks.fast_breakdown --configs benchmarks/sdxl-configs   # full SDXL shapes, on a GPU
    python -m benchmarks.fast_breakdown --tiny                                   # a quick CPU run of the script

Random weights of the given shapes, the default acceleration of the device (sdxl_fast.accel.options), 512²
(64² with --tiny). Each line is the median of 20 calls after 3 untimed ones; parts run through CUDA graphs
as `generate` runs them, so on a GPU the figures add up to roughly one `generate` call. `--without OPTION`
(`--with OPTION`) turns one acceleration option off (on), for a comparison, `--sdpa flash` allows one
attention kernel only, `--inductor KEY=VALUE` sets a torch._inductor.config entry (e.g.
triton.enable_pdl=True); `--trace FILE` profiles whole calls instead of parts, and `--timeline` times the
stages of whole calls with host clocks and CUDA events, without the profiler's overhead.
"""

import argparse
import itertools
import statistics
import time
from dataclasses import replace
from functools import partial

import torch
from PIL import Image

from benchmarks.bench import PROMPT, build_models, new_prompt
from benchmarks.timing import synchronize, time_calls
from benchmarks.unet_probe import add_switches, only_sdpa, switches
from sdxl_fast import accel as acceleration
from sdxl_fast.accel import cross_kv, cuda_graphs
from sdxl_fast.params import GenerationParams
from sdxl_fast.pipeline import conditioning, decoding, prompts, sampling, schedules
from sdxl_fast.pipeline.generate import fast_call, generate
from sdxl_fast.testing import random_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/)")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes")
    parser.add_argument("--batch", type=int, nargs="+", default=[16],
                        help="batch sizes of the batched lines (0: none)")
    add_switches(parser)
    parser.add_argument("--trace", metavar="FILE", help="instead of the parts: profile 3 generate() calls, write "
                        "their Chrome trace here and print where the GPU waits within each call")
    parser.add_argument("--timeline", action="store_true", help="instead of the parts: when each stage of 20 "
                        "generate() calls starts on the host, and the GPU time of each CUDA graph, without the profiler")
    parser.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                        help="allow only this attention kernel in the UNet (CUDA only; the text encoders "
                        "choose theirs, sdxl_fast.accel.text_qkv)")
    args = parser.parse_args(argv)
    switched = switches(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    side = 64 if args.tiny else 512
    configs = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    models = build_models(random_weights.build_random_components(configs, device=device), device, dtype)
    if args.sdpa != "default":
        if device.type != "cuda":
            parser.error("--sdpa needs a CUDA GPU")
        only_sdpa(args.sdpa)
    options = replace(acceleration.Acceleration.for_device(device), **switched)
    print("acceleration:", "; ".join(acceleration.apply(models, options)))
    f = models.fast

    def timeit(label, fn):  # fn(i): i differs on every call, so no two calls share a prompt
        calls = itertools.count()
        timing = time_calls(lambda: fn(next(calls)), repeats=20, warmup=3, sync=device)
        print(f"{label:52s} median {timing.median * 1e3:8.3f} ms   min {timing.min * 1e3:8.3f} ms", flush=True)

    def graphed(key, fn, *inputs):
        return models.runner.run(key, fn, *inputs)

    params = GenerationParams(PROMPT, mode="fast", steps=1, seed=0, width=side, height=side).resolved(side)
    timesteps = schedules.student_timesteps(1)
    pos = prompts.encode_prompts(f.encoders, [PROMPT], device)
    _, time_ids = conditioning.time_ids(params, refiner=False, device=device, dtype=dtype)
    context = cross_kv.project(f.student, pos.base_context)  # as the loop passes it, once per call
    latents = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
    timestep = torch.tensor(timesteps[0], device=device)  # made outside the graphs: no host copy inside them

    def unet(x, context, pooled, ids, t):
        return sampling.unet_forward(f.student, x, t, context, pooled, ids)

    def vae(z):
        return decoding.to_uint8(f.vae.decode(z).sample)

    def text(i):
        ids_1, ids_2, _ = prompts.tokenize(f.encoders, [f"{PROMPT} {i}"])
        return graphed(("text",), lambda a, b: prompts.encode_tokens(f.encoders, a, b).pooled.clone(),
                       ids_1.to(device), ids_2.to(device))

    fast_args = (f.scheduler.alphas_cumprod.to(device), pos.base_context, pos.pooled, time_ids, latents[None])
    images = fast_call(f, timesteps, *fast_args, runner=models.runner)[1]

    def one_call(i, batch=1):  # a new prompt each time (never one of an earlier line): the text encoders run
        return generate(models, GenerationParams(new_prompt(), mode="fast", steps=1, seed=0, width=side,
                                                 height=side, num_images=batch))

    timeit("generate(): prompt in -> PIL image out", one_call)
    if args.trace:
        return trace(args.trace, one_call)
    if args.timeline:
        return timeline(one_call, device)
    timeit("tokenise both prompts (CPU)", lambda i: prompts.tokenize(f.encoders, [f"{PROMPT} {i}"]))
    timeit("tokenise + both text encoders", text)
    timeit("the Fast graph: UNet step, VAE decode, uint8", lambda i: graphed(
        ("fast",), partial(fast_call, f, timesteps, runner=models.runner), *fast_args))
    timeit("UNet step", lambda i: graphed(("unet",), unet, latents, context, pos.pooled, time_ids, timestep))
    timeit("VAE decode + uint8", lambda i: graphed(("vae",), vae, latents))
    timeit("uint8 images -> CPU -> PIL", lambda i: decoding.to_pil(decoding.to_host(images)[0]))
    timeit("uint8 images -> CPU (pageable memory) -> PIL",
           lambda i: [Image.fromarray(x.numpy()) for x in images.cpu()])
    for batch in (b for b in args.batch if b):
        def batched(x):
            return x.expand(batch, *x.shape[1:]).contiguous()

        timeit(f"UNet step, batch {batch}", lambda i: graphed(
            ("unet", batch), unet, batched(latents), batched(context), batched(pos.pooled), batched(time_ids),
            timestep))
        timeit(f"VAE decode + uint8, batch {batch}", lambda i: graphed(("vae", batch), vae, batched(latents)))
        timeit(f"generate(), batch {batch}", lambda i: one_call(i, batch))

def timeline(call, device: torch.device, calls: int = 20) -> None:
    """Medians over `calls` calls: when each stage starts and ends on the host (ms from the call's start), and
    on a GPU each graph's time there (CUDA events around its replay). The stages are found by wrapping the
    functions `generate` calls, as the profiler's trace would, but at the cost of a clock read each."""
    cuda = device.type == "cuda"
    marks = []  # (stage, host seconds, CUDA event or None)

    def mark(stage):
        event = torch.cuda.Event(enable_timing=True) if cuda else None
        if event is not None:
            event.record()
        marks.append((stage, time.perf_counter(), event))

    def wrap(owner, name, stage):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            mark(f"{stage} starts")
            out = original(*args, **kwargs)
            mark(f"{stage} returns")
            return out
        setattr(owner, name, timed)

    wrap(prompts, "tokenize", "tokenising")
    wrap(cuda_graphs.Graphed, "__call__", "a graph's input copies and launch")
    wrap(decoding, "to_host", "waiting for the GPU, copying to the CPU")
    wrap(decoding, "to_pil", "uint8 -> PIL")
    host, gpu = {}, {}
    for i in range(3 + calls):
        marks.clear()
        mark("generate() starts")
        call(3000 + i)
        mark("generate() returns")
        synchronize(device)
        if i < 3:
            continue
        for n, (stage, seconds, _) in enumerate(marks):
            host.setdefault((n, stage), []).append((seconds - marks[0][1]) * 1e3)
        launches = [event for stage, _, event in marks if stage.startswith("a graph's")]
        for n, (start, end) in enumerate(zip(launches[::2], launches[1::2])):
            gpu.setdefault(n, []).append(start.elapsed_time(end))
    print(f"host, ms from the call's start (medians of {calls} calls, each with a new prompt):")
    for (_, stage), ms in host.items():
        print(f"  {stage:52s} {statistics.median(ms):8.3f}")
    for n, ms in gpu.items():  # a new prompt's call replays the text encoders' graph, then the Fast graph
        print(f"GPU, the call's graph {n + 1}, its input copies included {statistics.median(ms):21.3f} ms")


def trace(path: str, call) -> None:
    """Profile 3 calls; per call print its span, the GPU's busy time, and each gap of over 20 µs in which no
    kernel ran, with the CPU operations that ran then (what the GPU waited for)."""
    import json

    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            with record_function(f"call {i}"):
                call(2000 + i)
            synchronize(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy"))
    for i in range(3):
        span = next(e for e in events if e["name"] == f"call {i}" and e.get("cat") == "user_annotation")
        start, end = span["ts"], span["ts"] + span["dur"]
        busy, gaps, last = 0.0, [], start
        for k0, k1 in kernels:
            if k1 <= start or k0 >= end:
                continue
            k0, k1 = max(k0, start), min(k1, end)
            if k0 - last > 20:
                gaps.append((last, k0))
            busy += max(0.0, k1 - max(k0, last))
            last = max(last, k1)
        if end - last > 20:
            gaps.append((last, end))
        print(f"call {i}: {span['dur'] / 1e3:.3f} ms, GPU busy {busy / 1e3:.3f} ms, "
              f"{len(gaps)} gaps over 20 µs totalling {sum(b - a for a, b in gaps) / 1e3:.3f} ms")
        for a, b in gaps:
            overlap = {}  # CPU operation and CUDA runtime call -> µs of this gap it covers
            for e in events:
                if e.get("cat") in ("cpu_op", "cuda_runtime") and e["ts"] < b and e["ts"] + e["dur"] > a:
                    overlap[e["name"]] = overlap.get(e["name"], 0) + min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
            top = sorted(overlap.items(), key=lambda kv: -kv[1])[:6]
            print(f"    +{(a - start) / 1e3:7.3f} ms  gap {(b - a) / 1e3:.3f} ms  CPU: "
                  + ", ".join(f"{name} {us:.0f} µs" for name, us in top))


if __name__ == "__main__":
    main()
