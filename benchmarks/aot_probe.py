"""The Fast UNet compiled ahead of time (`sdxl_fast.accel.aot`): what compiling one package for every batch
size up to `--max-batch` and every size costs, what loading it costs, and its calls and outputs against the
eager UNet's.

    python -m benchmarks.aot_probe --configs benchmarks/sdxl-configs --out aot.jsonl   # full-size SDXL, on a GPU
    python -m benchmarks.aot_probe --tiny                                                # a CPU check of the script

Random weights of the given shapes (the SDXL base UNet's, which the student shares), fp16 on a GPU and fp32
on the CPU; batch sizes 1, 3 and `--max-batch` at the model's own size and at 1.5 times its side.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import record
from benchmarks.timing import synchronize, time_calls
from sdxl_fast.accel import aot
from sdxl_fast.pipeline.sampling import unet_forward
from sdxl_fast.testing import random_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/)")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--package", type=Path, help="where the .pt2 package goes (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.aot_probe " + " ".join(sys.argv[1:] if argv is None else argv)

    from diffusers import UNet2DConditionModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    torch.manual_seed(0)
    eager = UNet2DConditionModel.from_config(configs["unet"]).to(device, dtype).eval().requires_grad_(False)
    compiled = copy.deepcopy(eager)
    rows = []

    def write(**fields):
        rows.append({"device": record.device_name(device), **fields, **record.provenance(command)})
        print(json.dumps(rows[-1]), flush=True)

    package = args.package or Path(tempfile.mkdtemp()) / "unet.pt2"
    started = time.perf_counter()
    aot.compile_unet(compiled, package, args.max_batch)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    aot.use_package(compiled, package)
    write(kind="aot package", compile_s=round(compile_s, 1), load_s=round(time.perf_counter() - started, 2),
          package_mb=round(package.stat().st_size / 1e6, 1), max_batch=args.max_batch)
    side = 128 if args.tiny else 512  # the Fast path's own size (SDXL-Turbo's)
    with torch.no_grad():
        for s in (side, side * 3 // 2):
            for b in sorted({1, 3, args.max_batch}):
                x = aot.example_inputs(eager, b, s)
                started = time.perf_counter()
                out = unet_forward(compiled, *x)
                synchronize(device)
                first_ms = (time.perf_counter() - started) * 1e3
                ref = unet_forward(eager, *x)
                write(kind="aot call", size=f"{s}x{s}", batch=b, first_call_ms=round(first_ms, 1),
                      eager_ms=round(time_calls(lambda: unet_forward(eager, *x), args.repeats, sync=device).median * 1e3, 2),
                      aot_ms=round(time_calls(lambda: unet_forward(compiled, *x), args.repeats, sync=device).median * 1e3, 2),
                      max_abs_diff=float((out.float() - ref.float()).abs().max()), ref_abs_mean=float(ref.float().abs().mean()))
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
