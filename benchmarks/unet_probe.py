"""One SDXL UNet step (or VAE decode) alone, as the app runs it, under torch.compile and attention variants.

    python -m benchmarks.unet_probe --configs benchmarks/sdxl-configs --shapes 512x1 1024x2 --profile
    python -m benchmarks.unet_probe --configs ... --model vae --shapes 512x1 --profile     # the VAE decoder
    python -m benchmarks.unet_probe --configs ... --compile gemm       # Inductor's autotuned matmuls
    python -m benchmarks.unet_probe --configs ... --sdpa cudnn         # only cuDNN's attention kernels allowed
    python -m benchmarks.unet_probe --configs ... --sdpa-micro         # each attention kernel alone, SDXL's shapes
    python -m benchmarks.unet_probe --gemm-micro                       # each batch-1 matmul shape alone: cuBLAS,
                                                                  # cuBLASLt and Inductor's autotuned choice
    python -m benchmarks.unet_probe --configs ... --blas cublaslt      # the step with cuBLASLt's matmuls
    python -m benchmarks.unet_probe --configs ... --model vae --inductor coordinate_descent_tuning=True
    python -m benchmarks.unet_probe --configs ... --model vae --without channels_last

Random weights with the device's default options (sdxl_fast.accel.options, as the app applies them), fp16.
Prints the median of 20 graphed calls and, with --profile, the kernel time of 5 ungraphed calls summed per
kernel kind and the 25 costliest kernels (BENCHMARKS.md, "Where a UNet step's time goes"). `--tiny` instead
of `--configs` runs the tiny test shapes, on the CPU too (fp32, eager, without graphs): a check of the script.
"""

import argparse
import ast
import sys
import time
from collections import defaultdict
from dataclasses import replace

import torch

from benchmarks.bench import build_models
from benchmarks.timing import synchronize, time_calls
from sdxl_fast import accel as acceleration
from sdxl_fast.accel import cross_kv
from sdxl_fast.accel.compile import compile_models
from sdxl_fast.accel.cuda_graphs import CudaGraphs
from sdxl_fast.pipeline import sampling
from sdxl_fast.testing import random_weights


def build(cfg: dict, which: str, device: torch.device, dtype: torch.dtype, switched: dict[str, bool] | None = None):
    """The module, with the device's default options applied as the app applies them (compiled here, alone,
    below) and those in `switched` set as given, and its call: fn(latents, timestep, context, pooled, time_ids)."""
    models = build_models(random_weights.build_random_components(cfg, device=device), device, dtype)
    acceleration.apply(models, replace(acceleration.Acceleration.for_device(device), compile=False,
                                       cuda_graphs=False, **(switched or {})))
    q = models.quality
    if which == "vae":
        return q.vae.decoder, lambda x, t, ctx, pooled, ids: q.vae.decoder(x)
    unet = q.base if which == "base" else q.refiner
    return unet, lambda x, t, ctx, pooled, ids: sampling.unet_forward(unet, x, t, ctx, pooled, ids)


def add_switches(parser: argparse.ArgumentParser) -> None:
    """--without / --with OPTION (sdxl_fast.accel.options options) and --inductor KEY=VALUE, shared with
    fast_breakdown.py; `switches(args)` applies the Inductor settings and returns the options to set."""
    parser.add_argument("--without", action="append", default=[], metavar="OPTION",
                        help="turn off this sdxl_fast.accel.options option (repeatable), e.g. channels_last")
    parser.add_argument("--with", dest="with_", action="append", default=[], metavar="OPTION",
                        help="turn on this sdxl_fast.accel.options option (repeatable), e.g. fp8")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY to the Python literal VALUE (repeatable), on top of "
                             "the app's compile options, e.g. coordinate_descent_tuning=True")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms on each new shape (torch.backends.cudnn.benchmark)")


def switches(args: argparse.Namespace) -> dict[str, bool]:
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    for setting in args.inductor:  # dotted keys reach sub-configs, e.g. triton.enable_pdl=True
        key, _, value = setting.partition("=")
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    return {**{name: False for name in args.without}, **{name: True for name in args.with_}}


def only_sdpa(backend: str) -> None:
    """Allow only this one of PyTorch's attention kernels (flash, efficient or cudnn), process-wide."""
    torch.backends.cuda.enable_flash_sdp(backend == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(backend == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    torch.backends.cuda.enable_math_sdp(False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = p.add_mutually_exclusive_group(required="--gemm-micro" not in argv)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/)")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes (a quick check, CPU too)")
    p.add_argument("--model", default="base", choices=["base", "refiner", "vae"])
    p.add_argument("--compile", default="default",
                   help="none, gemm (autotuned matmuls), gemm-cd (and coordinate descent) or a torch.compile mode")
    p.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"])
    p.add_argument("--shapes", nargs="+", default=["512x1"], help="SIDExBATCH in pixels, e.g. 512x1 1024x2")
    p.add_argument("--profile", action="store_true", help="kernel time per kind (CUDA only)")
    p.add_argument("--sdpa-micro", action="store_true", help="each attention kernel alone (CUDA only)")
    p.add_argument("--gemm-micro", action="store_true", help="each batch-1 matmul shape alone (CUDA only)")
    p.add_argument("--blas", default="default", choices=["default", "cublas", "cublaslt"],
                   help="torch.backends.cuda.preferred_blas_library for the step's matmuls")
    add_switches(p)
    args = p.parse_args(argv)
    switched = switches(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if args.sdpa_micro or args.gemm_micro or args.profile or args.sdpa != "default" or args.blas != "default":
            p.error("--sdpa, --sdpa-micro, --gemm-micro, --blas and --profile need a CUDA GPU")
        args.compile = "none"  # Inductor on the CPU would take minutes for nothing the GPU figures need
    tag = (f"[{args.model} compile={args.compile} sdpa={args.sdpa} blas={args.blas}"
           + "".join(f" without={name}" for name in args.without) + "".join(f" with={name}" for name in args.with_)
           + "".join(f" {s}" for s in args.inductor) + "]")
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.gemm_micro:
        gemm_micro()
        return

    if args.sdpa != "default":
        only_sdpa(args.sdpa)
    if args.sdpa_micro:
        sdpa_micro()
        return

    dtype = torch.half if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    model, fwd = build(cfg, args.model, device, dtype, switched)
    if args.compile != "none":
        torch._dynamo.config.recompile_limit = 64
        options = {"gemm": {"max_autotune_gemm": True},
                   "gemm-cd": {"max_autotune_gemm": True, "coordinate_descent_tuning": True}}.get(args.compile)
        if options:
            model.compile(fullgraph=True, dynamic=False, options=options)
        else:  # as the app compiles it (acceleration.compile_models), combo kernels included
            compile_models([model], [], [], args.compile,
                                        combo_kernels=acceleration.Acceleration.combo_kernels)
    graphs = CudaGraphs() if device.type == "cuda" else None
    refiner = args.model == "refiner"
    context_dim = cfg["refiner_unet" if refiner else "unet"]["cross_attention_dim"]
    pooled_dim = 40 if args.tiny else 1280
    # TFLOP per image: the figures for the UNets; the VAE decoder's after the upsampler rewrite.
    tflop = {"base": {512: 1.59, 1024: 6.76}, "refiner": {512: 1.62, 1024: 7.29}, "vae": {512: 2.13, 1024: 8.5}}

    for shape in args.shapes:
        side, batch = map(int, shape.split("x"))
        on = dict(device=device, dtype=dtype)
        inputs = (torch.randn(batch, 4, side // 8, side // 8, **on), torch.tensor(999, device=device),
                  # as the loops pass it: projected to every cross-attention's keys and values, once per call
                  cross_kv.project(model, torch.randn(batch, 77, context_dim, **on)),
                  torch.randn(batch, pooled_dim, **on),
                  torch.tensor([[side, side, 0, 0, 6.0] if refiner else [side, side, 0, 0, side, side]] * batch,
                               **on))
        start = time.perf_counter()
        with torch.no_grad():
            fwd(*inputs)
        synchronize(device)
        print(f"{tag} {shape} first call (compile) {time.perf_counter() - start:.1f} s", flush=True)

        def step():
            with torch.no_grad():
                return graphs.run(("step",), fwd, *inputs) if graphs else fwd(*inputs)

        timing = time_calls(step, repeats=20, warmup=5, sync=device)
        rate = tflop[args.model].get(side, float("nan")) * batch / timing.median
        print(f"RESULT {tag} {shape} {'graphed' if graphs else 'eager'} median {timing.median * 1e3:.3f} ms "
              f"min {timing.min * 1e3:.3f} ms ~{rate:.0f} TFLOP/s", flush=True)
        if args.profile:
            profile(fwd, inputs, tag, shape)


def category(name: str) -> str:
    """Kernel kind from its name (cuDNN, cuBLAS and Inductor name their kernels consistently)."""
    n = name.lower()
    if "triton" in n:  # first: Inductor names its kernels after the fused ops, e.g. "..._convolution_group_norm"
        return "triton (fused elementwise/norm)"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if "conv" in n or "fprop" in n:  # cuDNN's implicit-GEMM convolutions are "..._fprop_implicit_gemm_..."
        return "conv"
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "cublas" in n:
        return "gemm"
    return "other"


def profile(fwd, inputs, tag, shape):
    from torch.profiler import ProfilerActivity, profile as prof
    with torch.no_grad():
        for _ in range(3):
            fwd(*inputs)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fwd(*inputs)
            torch.cuda.synchronize()
    sums, counts = defaultdict(float), defaultdict(int)
    per_kernel = defaultdict(float)
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            c = category(e.name)
            sums[c] += e.device_time / 5
            counts[c] += 1 / 5
            per_kernel[e.name[:90]] += e.device_time / 5
    total = sum(sums.values())
    print(f"PROFILE {tag} {shape} kernel time sum {total / 1e3:.3f} ms in {sum(counts.values()):.0f} kernels")
    for c in sorted(sums, key=lambda c: -sums[c]):
        print(f"PROFILE   {c:34s} {sums[c] / 1e3:7.3f} ms  {counts[c]:5.0f} kernels")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        print(f"PROFILE     {us / 1e3:7.3f} ms  {name}")


def sdpa_micro():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = "cuda"
    cases = [("512² L1 self", 1, 10, 1024, 1024), ("512² L2 self", 1, 20, 256, 256),
             ("512² L1 cross", 1, 10, 1024, 77), ("512² L2 cross", 1, 20, 256, 77),
             ("1024² L1 self b2", 2, 10, 4096, 4096), ("1024² L2 self b2", 2, 20, 1024, 1024),
             ("1024² L1 cross b2", 2, 10, 4096, 77), ("1024² L2 cross b2", 2, 20, 1024, 77)]
    for label, b, h, lq, lk in cases:
        q = torch.randn(b, lq, h, 64, device=dev, dtype=torch.half).transpose(1, 2)
        k = torch.randn(b, lk, h, 64, device=dev, dtype=torch.half).transpose(1, 2)
        v = torch.randn(b, lk, h, 64, device=dev, dtype=torch.half).transpose(1, 2)
        row = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):  # 50 calls back to back, as a UNet issues them: one sync around all
                    timing = time_calls(lambda: [F.scaled_dot_product_attention(q, k, v) for _ in range(50)],
                                        repeats=1, warmup=1, sync=dev)
                row.append(f"{backend.name} {timing.median / 50 * 1e6:8.1f} us")
            except Exception as e:
                row.append(f"{backend.name} failed {type(e).__name__}")
        print(f"SDPA {label:20s} " + " | ".join(row), flush=True)


def gemm_micro():
    """The matmul shapes of a batch-1 Fast call, each alone, 20 back to back in one CUDA graph: cuBLAS, cuBLASLt
    and the kernel Inductor's autotuning picks (its Triton templates against ATen). Linear layers: [M, K] @ [K, N]."""
    dev = "cuda"
    cases = [("unet 32² qkv", 1024, 640, 1920), ("unet 32² proj", 1024, 640, 640),
             ("unet 32² ff in", 1024, 640, 5120), ("unet 32² ff out", 1024, 2560, 640),
             ("unet 16² qkv", 256, 1280, 3840), ("unet 16² proj", 256, 1280, 1280),
             ("unet 16² ff in", 256, 1280, 10240), ("unet 16² ff out", 256, 5120, 1280),
             ("bigG qkv", 77, 1280, 3840), ("bigG out", 77, 1280, 1280),
             ("bigG fc1", 77, 1280, 5120), ("bigG fc2", 77, 5120, 1280)]

    def graphed_us(fn, a, w):
        for _ in range(3):
            fn(a, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn(a, w)
        timing = time_calls(lambda: [graph.replay() for _ in range(10)], repeats=1, warmup=1, sync=dev)
        return timing.median / 200 * 1e6  # 10 replays of 20 matmuls

    def matmul(a, w):
        return a @ w

    for label, m, k, n in cases:
        a = torch.randn(m, k, device=dev, dtype=torch.half)
        w = torch.randn(n, k, device=dev, dtype=torch.half).t()  # nn.Linear's weight layout
        row = []
        for blas in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(blas)
            row.append(f"{blas} {graphed_us(matmul, a, w):6.1f} us")
        torch.backends.cuda.preferred_blas_library("cublas")
        torch._dynamo.reset()
        start = time.perf_counter()
        tuned = torch.compile(matmul, mode="max-autotune-no-cudagraphs", dynamic=False)
        tuned(a, w)
        row.append(f"autotuned {graphed_us(tuned, a, w):6.1f} us (tuning {time.perf_counter() - start:.0f} s)")
        flop = 2 * m * k * n
        print(f"GEMM {label:16s} {m}x{k}x{n} ({flop / 1e9:.2f} GFLOP) " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
