"""The serving path's own ceiling: `python app.py` with a Fast model that takes a fixed time and no CPU, and N
typists at once, measured over HTTP as `benchmarks.serving` measures the real one.

    python -m benchmarks.serving_overhead --model-ms 0 --size 512x512 --json overhead.jsonl
    python -m benchmarks.serving_overhead --model-ms 40 --typists 16   # about a GPU's batch time

The app serves the demo family, but each Fast denoise-and-decode is replaced by a sleep of `--model-ms` (the
wait for a GPU, which holds no Python lock) returning one fixed image per request: everything else (Gradio,
the micro-batcher, the PIL conversion, the parameters text, the JPEG frames, the HTTP requests) is the app's
own. So images/s here is the most the host can serve on this machine, whatever the GPU.
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import record, serving


def serve(port: int, model_ms: float) -> None:
    """In the app's process: replace the Fast call, then run app.py as `python app.py` would."""
    import torch

    from sdxl_fast.pipeline import generate

    pixels: dict[tuple[int, int], torch.Tensor] = {}

    def fast(models, ps, callback):
        time.sleep(model_ms / 1e3)
        n, shape = sum(p.num_images for p in ps), (ps[0].height, ps[0].width)
        if shape not in pixels:  # a fixed picture with some structure, so the JPEG is not trivially small
            y, x = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
            pixels[shape] = torch.stack([x % 256, y % 256, (x * y) % 256], -1).to(torch.uint8)
        return None, pixels[shape].expand(n, *pixels[shape].shape), {"fast": "stand-in"}

    generate._fast = fast
    sys.argv = ["app.py", "--preset", "demo", "--port", str(port), "--modes", "fast"]
    runpy.run_path(str(serving.ROOT / "app.py"), run_name="__main__")


class Overhead(serving.App):
    """This module's `serve` in a subprocess, its log in a file (what `serving.typists` measures)."""

    def __init__(self, work: Path, port: int, model_ms: float):
        self.log = work / "app-overhead.log"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serving_overhead", "--serve", str(port), "--model-ms", str(model_ms)],
            cwd=serving.ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=self.log.open("w"),
            stderr=subprocess.STDOUT)
        self.root = f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-ms", type=float, default=0.0, help="what each batched Fast call takes")
    parser.add_argument("--size", default="512x512", help="the live frames' size, as the page's menu writes it")
    parser.add_argument("--typists", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each group types")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--json", type=Path, help="append the JSON lines here")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the app's side
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.model_ms)

    command = "python -m benchmarks.serving_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.json or Path(tempfile.mkstemp(suffix=".jsonl", prefix="serving-overhead-")[1])
    write = serving.Recorder(out, record.device_name("cpu"), command)
    with tempfile.TemporaryDirectory() as work:
        app = Overhead(Path(work), args.port, args.model_ms)
        try:
            app.wait_until_serving(300)
            for n in (int(k) for k in args.typists.split(",")):
                serving.typists(app, lambda kind, **row: write("serving path alone", **row, model_ms=args.model_ms),
                                n, args.seconds, args.size)
        except (httpx.HTTPError, RuntimeError, TimeoutError):
            print(app.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            app.stop()
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
