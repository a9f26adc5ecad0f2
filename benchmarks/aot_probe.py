"""The Fast path with its UNet and VAE decoder compiled ahead of time (`sdxl_fast.accel.aot`): what compiling
each into one package for every batch size and size costs, what loading it costs,
and `generate()` with them against `generate()` uncompiled, both with the device's other speed-ups (CUDA
graphs on a GPU).

    python -m benchmarks.aot_probe --configs benchmarks/sdxl-configs --out aot.jsonl   # full-size SDXL, on a GPU
    python -m benchmarks.aot_probe --tiny                                                # a CPU check of the script
    python -m benchmarks.aot_probe --loader-check /tmp/loader-check   # does AOTInductor's loader (not used) run here?

Random weights of the given shapes (the student shares the SDXL base UNet's), Fast 1 step; batch sizes 1, 3
and `--max-batch` at the Fast path's own size (512², 128² with --tiny) and one image at 1.5 times its side.
The packages go where `app.py --compile aot` looks for them ($SDXL_FAST_AOT_CACHE): an app started after this
on the same machine and torch loads them instead of compiling.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import record
from benchmarks.bench import build_models
from benchmarks.timing import synchronize, time_calls
from sdxl_fast import accel
from sdxl_fast.accel import aot
from sdxl_fast.accel.cuda_graphs import drop_graphs
from sdxl_fast.params import GenerationParams
from sdxl_fast.pipeline.generate import generate_tensors
from sdxl_fast.serving import packages
from sdxl_fast.testing import random_weights


# A two-layer conv net exported with dynamic batch and sides and compiled with torch's own settings (weights
# inside the package), then loaded and run in a new process: whether torch's package loader works on this
# machine at all, apart from how `sdxl_fast.accel.aot` builds its packages.
LOADER_CHECK = """
import sys, torch
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 3, 3, padding=1))
net = net.to(device).eval()
x = torch.randn(2, 4, 32, 32, device=device)
if sys.argv[1] == "compile":
    b, h, w = (torch.export.Dim(n, min=1, max=32) for n in "bhw")
    with torch.no_grad():
        exported = torch.export.export(net, (x,), dynamic_shapes=({0: b, 2: 8 * h, 3: 8 * w},))
    torch._inductor.aoti_compile_and_package(exported, package_path=sys.argv[2])
else:
    package = torch._inductor.aoti_load_package(sys.argv[2])
    with torch.no_grad():
        print((package(x) - net(x)).abs().max().item())
"""


def loader_check(folder: Path) -> dict:
    """LOADER_CHECK's compile and load, each in a process of its own (a crash in the loader ends only that)."""
    path, row = folder / "loader-check.pt2", {}
    for step in ("compile", "load"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LOADER_CHECK, step, str(path)], capture_output=True, text=True)
        row[f"{step}_s"], row[f"{step}_returncode"] = round(time.perf_counter() - started, 1), done.returncode
        if done.returncode:
            row["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return row
    row["max_abs_diff"] = float(done.stdout.split()[-1])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/)")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes")
    shapes.add_argument("--loader-check", type=Path, metavar="FOLDER",
                        help="only check that torch loads a package it compiled here (a small conv net, in FOLDER)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.aot_probe " + " ".join(sys.argv[1:] if argv is None else argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def write(**fields):  # each row as soon as it is measured: a compile may outlast the caller's patience
        row = json.dumps({"device": record.device_name(device), **fields, **record.provenance(command)})
        print(row, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(row + "\n")

    if args.loader_check:
        args.loader_check.mkdir(parents=True, exist_ok=True)
        return write(kind="aot loader check", **loader_check(args.loader_check))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    models = build_models(random_weights.build_random_components(configs, device=device), device, dtype)
    applied = accel.apply(models, replace(accel.Acceleration.for_device(device), compile=False))
    side = 128 if args.tiny else 512
    calls = [(side, b) for b in sorted({1, 3, args.max_batch})] + [(side * 3 // 2, 1)]

    def measure(s: int, b: int) -> tuple[float, float, torch.Tensor]:
        """First call ms, median of later calls ms, uint8 images."""
        params = GenerationParams("a lighthouse", mode="fast", steps=1, seed=0, width=s, height=s, num_images=b)
        synchronize(device)
        started = time.perf_counter()
        images = generate_tensors(models, params)[1]
        first = (time.perf_counter() - started) * 1e3
        later = time_calls(lambda: generate_tensors(models, params), args.repeats, sync=device).median * 1e3
        return first, later, images

    eager = {shape: measure(*shape) for shape in calls}
    # The decoder first (the quicker compile), each part measured as soon as it runs its package.
    done = []
    for part, module in (("vae-decoder", models.fast.vae), ("unet", models.fast.student)):
        compile_package, use_package = (getattr(aot, name) for name in packages.PARTS[part])
        path = packages.package_path(part, module)
        print(f"compiling the Fast {part} into {path}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        compile_package(module, path)
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        use_package(module, path)
        write(kind="aot package", part=part, compile_s=round(compile_s, 1),
              load_s=round(time.perf_counter() - started, 2), package_mb=round(path.stat().st_size / 1e6, 1),
              max_batch=args.max_batch, acceleration=applied)
        done.append(part)
        drop_graphs(models.runner)  # recorded around the uncompiled module: record them again around the package
        for (s, b), (eager_first, eager_ms, eager_images) in eager.items():
            first, later, images = measure(s, b)
            write(kind="aot generate", packages=list(done), size=f"{s}x{s}", batch=b,
                  eager_first_ms=round(eager_first, 1), eager_ms=round(eager_ms, 2), aot_first_ms=round(first, 1),
                  aot_ms=round(later, 2), max_pixel_diff=int((images.int() - eager_images.int()).abs().max()))


if __name__ == "__main__":
    main()
