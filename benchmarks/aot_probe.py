"""AOTInductor on the Fast path's UNet: one package compiled ahead of time for every batch size from 1 to
`--max-batch` (and, with `--dynamic-size`, every size), what the compile and the load cost, and its calls and
outputs against the eager UNet's. A server that loads such a package starts compiled without tracing anything.

    python -m benchmarks.aot_probe --configs benchmarks/sdxl-configs --out aot.jsonl   # full-size SDXL, on a GPU
    python -m benchmarks.aot_probe --tiny                                                # a CPU check of the script

Random weights of the given shapes (the SDXL base UNet's, which the student shares), fp16 on a GPU and fp32
on the CPU, batch sizes 1, 3 and `--max-batch` at the native size (and a second size with `--dynamic-size`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import record
from benchmarks.timing import synchronize, time_calls
from sdxl_fast.testing import random_weights


class UNetCall(torch.nn.Module):
    """The UNet with plain tensor inputs and output, as torch.export takes it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timesteps, context, pooled, time_ids):
        return self.unet(latents, timesteps, encoder_hidden_states=context, return_dict=False,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]


def example(unet, batch: int, side: int, device, dtype) -> tuple[torch.Tensor, ...]:
    """Inputs of a Fast call: [B, 4, side/8, side/8] latents, [B] timesteps, [B, 77, D] context, [B, P] pooled
    embeddings, [B, 6] micro-conditioning."""
    c, g = unet.config, torch.Generator().manual_seed(batch)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    shapes = [(batch, 4, side // 8, side // 8), (batch, 77, c.cross_attention_dim), (batch, pooled), (batch, 6)]
    x, context, pooled, time_ids = (torch.randn(s, generator=g) for s in shapes)
    time_ids = time_ids.abs() * side
    return tuple(t.to(device, dtype) for t in (x, torch.full((batch,), 999.0), context, pooled, time_ids))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/)")
    shapes.add_argument("--tiny", action="store_true", help="tiny test shapes")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dynamic-size", action="store_true", help="the latent height and width dynamic too")
    parser.add_argument("--package", type=Path, help="where the .pt2 package goes (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = random_weights.tiny_configs() if args.tiny else random_weights.full_configs(args.configs)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(configs["unet"]).to(device, dtype).eval().requires_grad_(False)
    model = UNetCall(unet)
    side = 128 if args.tiny else 512
    batch = torch.export.Dim("batch", min=1, max=args.max_batch)
    dims = {0: batch}
    if args.dynamic_size:  # latent sides in multiples of 8 (the UNet halves them three times), 64 to 2048 px
        dims = {0: batch, 2: 8 * torch.export.Dim("h8", min=1, max=32), 3: 8 * torch.export.Dim("w8", min=1, max=32)}
    dynamic = (dims, {0: batch}, {0: batch}, {0: batch}, {0: batch})
    rows = []
    command = "python -m benchmarks.aot_probe " + " ".join(argv if argv is not None else __import__("sys").argv[1:])

    def write(**fields):
        row = {"device": record.device_name(device), **fields, **record.provenance(command)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with torch.no_grad():
        started = time.perf_counter()
        exported = torch.export.export(model, example(unet, 2, side, device, dtype), dynamic_shapes=dynamic)
        export_s = time.perf_counter() - started
        package = args.package or Path(tempfile.mkdtemp()) / "unet.pt2"
        started = time.perf_counter()
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = torch._inductor.aoti_load_package(str(package))
        load_s = time.perf_counter() - started
        write(kind="aot package", export_s=round(export_s, 1), compile_s=round(compile_s, 1),
              load_s=round(load_s, 2), package_mb=round(package.stat().st_size / 1e6, 1),
              max_batch=args.max_batch, dynamic_size=args.dynamic_size)
        sides = [side, side * 3 // 2] if args.dynamic_size else [side]
        for s in sides:
            for b in sorted({1, 3, args.max_batch}):
                inputs = example(unet, b, s, device, dtype)
                started = time.perf_counter()
                out = compiled(*inputs)
                synchronize(device)
                first_ms = (time.perf_counter() - started) * 1e3
                ref = model(*inputs)
                eager = time_calls(lambda: model(*inputs), args.repeats, sync=device)
                aot = time_calls(lambda: compiled(*inputs), args.repeats, sync=device)
                write(kind="aot call", size=f"{s}x{s}", batch=b, first_call_ms=round(first_ms, 1),
                      eager_ms=round(eager.median * 1e3, 2), aot_ms=round(aot.median * 1e3, 2),
                      max_abs_diff=float((out.float() - ref.float()).abs().max()),
                      ref_abs_mean=float(ref.float().abs().mean()))
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
