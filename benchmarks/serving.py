"""Serving as users meet it: `python app.py` on random-weight SDXL, measured over HTTP the way a browser gets
its images (the event's request until the image bytes have arrived).

    python -m benchmarks.serving --configs benchmarks/sdxl-configs --work /tmp/serving --json serving.jsonl
    python -m benchmarks.serving --tiny --work /tmp/serving-tiny        # the tiny test shapes, a CPU check

1. Saves random-weight SDXL base, refiner and a UNet-only student (trained size 512²) as diffusers folders.
2. Starts the app with empty compile caches ("cold") and times it to its first Fast image over HTTP.
3. Fast 1 step at the models' size over HTTP against `generate()` alone (the app logs each call's time): the
   live event (JPEG frames) and the Generate button (PNGs).
4. N typists at once (each sends its next keystroke's request when the last image has arrived).
5. First and later calls of every size in the page's menus (1 image, Fast 1 step), 1-4 images at two sizes,
   and Quality at a sample of sizes; with --app-compile start/background, once the compiler is done with
   them, the compiled calls.
6. Restarts the app ("cached": with the portable compile cache from step 2; "restart": without compilation)
   and times its first Fast image; phase "cached-typists" then repeats step 4 against it.
Each result is one JSON line, printed and appended to `--json FILE` (default: a new file under
benchmarks/results/new/, which git ignores): "kind" (one of SERVING_KINDS in benchmarks/render.py), "device",
the kind's own fields, and the command, commit, date and versions that made it. `python -m benchmarks.render`
shows them as one table per kind per device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from benchmarks import record
from benchmarks.timing import Timing
ROOT = Path(__file__).resolve().parent.parent
# What app.start_compiling queues at start: Fast 1 image and the live batches of 2, 4, 8, 16; Quality 1 image.
DEFAULT_SHAPES = 6
QUALITY_SIZES = ["1024x1024", "1152x896", "768x1344", "1536x640"]


def save_family(configs: str | None, out: Path) -> dict[str, Path]:
    """Base, refiner and student folders (full size from `configs`, else the tiny test shapes), saved once."""
    import torch

    from sdxl_fast.testing import random_weights

    paths = {name: out / name for name in ("base", "refiner", "student")}
    if all((p / ("config.json" if name == "student" else "model_index.json")).is_file() for name, p in paths.items()):
        return paths
    cuda = torch.cuda.is_available()
    full = random_weights.full_configs(configs) if configs else None
    random_weights.save_random_family(out, full, dtype=torch.float16 if cuda else torch.float32,
                                      device="cuda" if cuda else "cpu", names=tuple(paths))
    gc.collect()
    if cuda:  # built on the GPU: give its memory back before the app needs it
        torch.cuda.empty_cache()
    return paths


def compiled_lines(log: str) -> list[str]:
    """What an app's log says it compiled: with --compile start, each start-up warm-up call with its time
    ("warm-up 3/9: fast, 4 image(s), 1 steps: 61.2 s", sdxl_fast.accel.startup); with background, each shape
    the background compiler finished ("compiled shapes: ..."); with aot, what became of the Fast UNet's and
    VAE decoder's packages ("Fast unet: loaded its ahead-of-time package ...")."""
    return [m[0] for m in re.finditer(r"(warm-up \d+/\d+|compiled shapes|Fast (?:unet|vae-decoder)): [^\n]*", log)]


class App:
    """`python app.py` in a subprocess, its log in a file."""

    def __init__(self, family: dict[str, Path], work: Path, cache: Path, port: int, label: str, compile_mode: str,
                 modes: str = "fast,quality"):
        self.log = work / f"app-{label}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", SDXL_FAST_COMPILE_CACHE=str(cache),
                   SDXL_FAST_AOT_CACHE=str(work / "aot"),
                   # a new machine: Inductor's and Triton's on-disk caches start empty every time
                   TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{label}"), TRITON_CACHE_DIR=str(work / f"triton-{label}"))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--base", str(family["base"]), "--refiner", str(family["refiner"]),
             "--fast", str(family["student"]), "--port", str(port), "--compile", compile_mode, "--modes", modes],
            cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.root = f"http://127.0.0.1:{port}"

    def wait_until_serving(self, timeout: float = 600) -> "Client":
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited:\n{self.log.read_text()[-3000:]}")
            try:
                return Client(self.root)
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("the app did not start")

    def log_lines(self, pattern: str) -> list[re.Match]:
        return [m for m in re.finditer(pattern, self.log.read_text())]

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> bool:
        """Until `count` lines of the log match `pattern` (True) or `timeout` seconds pass (False)."""
        deadline = time.perf_counter() + timeout
        while len(self.log_lines(pattern)) < count:
            if time.perf_counter() > deadline:
                return False
            time.sleep(1)
        return True

    def wait_compiled(self, count: int, timeout: float) -> int:
        """Until the log says `count` shapes are compiled (or `timeout` seconds): how many are."""
        deadline = time.perf_counter() + timeout
        while True:
            done = [int(m[1]) for m in self.log_lines(r"compiled shapes: .*?; (\d+) compiled")]
            if (done and done[-1] >= count) or time.perf_counter() > deadline:
                return done[-1] if done else 0
            time.sleep(1)

    def quality_ready(self, serves_quality: bool, timeout: float = 180) -> dict:
        """{"quality_ready_s": when the log says Quality's models, read while Fast serves, were ready} where the
        app loads them so (a GPU with both modes), else {}."""
        if not serves_quality or not self.log_lines("models are read in the background"):
            return {}
        pattern = r"Quality models ready ([\d.]+) s after the start"
        return {"quality_ready_s": float(self.log_lines(pattern)[-1][1])} if self.wait_for(pattern, timeout) else {}

    def cpu_seconds(self) -> float:
        """User + system CPU time of the app process so far: with Python's one GIL, about 1 s per second of
        wall time means its host work is what limits it."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Client:
    """What a browser tab does for one event: join the queue and read the event's messages (or, for an event
    outside the queue, one request that returns its output), then fetch the images. A tab keeps one session
    for all its events, and so does a Client."""

    def __init__(self, root: str):
        self.http = httpx.Client(base_url=root, timeout=900)
        self.session = uuid.uuid4().hex[:12]
        config = self.http.get("/config").raise_for_status().json()
        self.fn = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}
        self.queued = {d["api_name"]: d["queue"] for d in config["dependencies"] if d.get("api_name")}

    def call(self, api_name: str, data: list) -> tuple[float, dict]:
        started = time.perf_counter()
        if not self.queued[api_name]:  # one request, answered with the output
            output = self.http.post(f"/gradio_api/run/{api_name}", json={
                "data": data, "fn_index": self.fn[api_name], "session_hash": self.session})
            if output.status_code != 200:
                raise RuntimeError(f"{api_name} failed: {output.text}")
            return self._fetch_images(started, output.json())
        joined = self.http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": self.fn[api_name], "session_hash": self.session, "event_data": None,
            "trigger_id": None}).raise_for_status().json()
        message = {}
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("event_id") == joined["event_id"] and message["msg"] == "process_completed":
                        break
        if not message.get("success"):
            raise RuntimeError(f"{api_name} failed: {message.get('output')}")
        return self._fetch_images(started, message["output"])

    def _fetch_images(self, started: float, output: dict) -> tuple[float, dict]:
        """Until the images' bytes have arrived, as in the browser: inline ones (the live frames' data: URLs)
        came with the answer, the others are fetched."""
        for item in output["data"][0] or []:
            if not item["image"]["url"].startswith("data:"):
                self.http.get(item["image"]["url"]).raise_for_status()
        return time.perf_counter() - started, output


def fast(prompt: str, size: str, steps: int = 1, images: int = 1) -> list:
    return [prompt, steps, 7, False, size, images, 0, 0, 0, 0, 0, 0]


def live(prompt: str, size: str) -> list:
    return ["Fast", prompt, 1, 7, size, 1, 0, 0, 0, 0, 0, 0]


def quality(prompt: str, size: str, steps: int = 50, images: int = 1) -> list:
    return [prompt, "", steps, 7, False, size, 5.0, 0.8, images, 0, 0, 0, 0, 0, 0, 6.0, 2.5, 1]


def ms(seconds: list[float], prefix: str = "") -> dict:
    """The median and 95th percentile of these latencies, in ms: {PREFIXp50_ms, PREFIXp95_ms}."""
    timing = Timing(tuple(seconds))
    return {f"{prefix}p50_ms": round(timing.median * 1e3, 1), f"{prefix}p95_ms": round(timing.percentile(95) * 1e3, 1)}


class Recorder:
    """write(kind=..., **fields) writes one row: its kind, the device, its fields, then the provenance."""

    def __init__(self, out: Path, device: str, command: str):
        self.write, self.device, self.provenance = record.Writer(out), device, record.provenance(command)

    def __call__(self, kind: str, **fields) -> None:
        self.write({"kind": kind, "device": self.device, **fields, **self.provenance})


def first_and_later(client: Client, write, api: str, data, later: int, **what) -> None:
    first, _ = client.call(api, data)
    times = Timing(tuple(client.call(api, data)[0] for _ in range(later)))
    write(kind="first call", api=api, **what, first_ms=round(first * 1e3, 1), later_ms=round(times.median * 1e3, 1))


# What the app logs for each batched live call (app.Studio._live_batch).
LIVE_BATCH_LINE = r"generate\(\) took ([\d.]+) ms \(fast live, (\d+) requests, (\d+) images\)"


def live_batches(lines: list[re.Match]) -> str:
    """The live batches of these log lines by size: "8 images: 42 calls, p50 202.2 ms; 2 images: ..."."""
    by_size: dict[int, list[float]] = {}
    for m in lines:
        by_size.setdefault(int(m[3]), []).append(float(m[1]))
    return "; ".join(f"{images} images: {len(took)} calls, p50 {statistics.median(took):.1f} ms"
                     for images, took in sorted(by_size.items(), key=lambda kv: -len(kv[1])))


def typists(app: App, write, n: int, seconds: float, size: str) -> None:
    """N typists, each sending its next keystroke when the last frame has arrived; the row also says in which
    batches the app served them, from its log."""
    latencies, lock, stop = [], threading.Lock(), time.perf_counter() + seconds
    logged = len(app.log_lines(LIVE_BATCH_LINE))

    def type_(who: int):
        client, i = Client(app.root), 0
        while time.perf_counter() < stop:
            took, _ = client.call("live_fast", live(f"a red fox {who} " + "x" * i, size))
            with lock:
                latencies.append(took)
            i += 1

    threads = [threading.Thread(target=type_, args=(k,)) for k in range(n)]
    started, cpu = time.perf_counter(), app.cpu_seconds()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - started, app.cpu_seconds() - cpu
    write(kind="typists", typists=n, size=size, requests=len(latencies), images_per_s=round(len(latencies) / wall, 1),
          **ms(latencies), app_cpu_per_s=round(cpu / wall, 2), app_cpu_ms_per_request=round(cpu / len(latencies) * 1e3, 1),
          batches=live_batches(app.log_lines(LIVE_BATCH_LINE)[logged:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--configs", help="folder of the SDXL configs (base/, refiner/) for full size")
    shapes.add_argument("--tiny", action="store_true", help="the tiny test shapes (a check of the harness)")
    parser.add_argument("--work", type=Path, required=True, help="models, logs and caches go here")
    parser.add_argument("--json", "-o", type=Path, metavar="FILE",
                        help="append the JSON lines here (default: a new file under benchmarks/results/new/)")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--phases", default="cold,sizes,http,typists,cached",
                        help="which parts to run, comma-separated")
    parser.add_argument("--compile-wait", type=float, default=240,
                        help="seconds to wait for the background compiler before the compiled measurements")
    parser.add_argument("--typist-seconds", type=float, default=10)
    parser.add_argument("--app-compile", choices=["off", "aot", "start", "background"], default="off",
                        help="the app's --compile")
    parser.add_argument("--app-modes", default="fast,quality",
                        help="the app's --modes: with fast alone, --app-compile start compiles only Fast's shapes")
    parser.add_argument("--size-stride", type=int, default=1, help="every Nth size of the page's menu")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    args.work.mkdir(parents=True, exist_ok=True)

    import torch

    device = record.device_name("cuda" if torch.cuda.is_available() else "cpu")
    command = " ".join(["python -m benchmarks.serving", *(sys.argv[1:] if argv is None else argv)])
    write = Recorder(args.json or record.new_results_file(device), device, command)
    started = time.perf_counter()
    family = save_family(args.configs, args.work / "models")
    write(kind="models saved", seconds=round(time.perf_counter() - started, 1))
    native = "128x128" if args.tiny else "512x512"
    big = "256x256" if args.tiny else "1024x1024"
    cache = args.work / "compiled.bin"
    serves_quality = "quality" in args.app_modes

    if phases & {"cold", "sizes", "http", "typists"}:
        cache.unlink(missing_ok=True)
        app = App(family, args.work, cache, args.port, "cold", args.app_compile, args.app_modes)
        client = app.wait_until_serving()
        serving = time.perf_counter() - app.started
        took, _ = client.call("generate_fast", fast("a red fox", native))
        first = time.perf_counter() - app.started
        write(kind="start-up", cache="cold", serving_s=round(serving, 1), first_fast_image_s=round(first, 1),
              first_fast_call_ms=round(took * 1e3, 1), **app.quality_ready(serves_quality))
        try:
            if "http" in phases:
                # The live event (JPEG frames, what a typing user waits for) and the button (PNGs with parameters).
                for api, data, logged in (("live_fast", live, "fast live"), ("generate_fast", fast, "fast")):
                    pattern = rf"generate\(\) took ([\d.]+) ms \({logged}, "
                    mark = len(app.log_lines(pattern))
                    times = [client.call(api, data(f"a red fox {i}", native))[0] for i in range(30)]
                    alone = [float(m[1]) / 1e3 for m in app.log_lines(pattern)][mark:]
                    write(kind="http", api=api, size=native, calls=len(times), **ms(times, "end_to_end_"),
                          **ms(alone, "generate_alone_"))
            if "typists" in phases:
                for n in (1, 4, 16):
                    typists(app, write, n, args.typist_seconds, native)
            if "sizes" in phases:
                sizes = [native, "192x192", big] if args.tiny else [native] + [
                    value for _, value in __import__("app").FAST_SIZES if value != native][::args.size_stride]
                for size in sizes:
                    first_and_later(client, write, "generate_fast", fast("a lighthouse", size), 2, mode="fast",
                                    size=size, images=1, steps=1)
                for size in (native, big):
                    for images in (2, 3, 4):
                        first_and_later(client, write, "generate_fast", fast("a lighthouse", size, images=images), 2,
                                        mode="fast", size=size, images=images, steps=1)
                first_and_later(client, write, "generate_fast", fast("a lighthouse", native, steps=4), 3,
                                mode="fast", size=native, images=1, steps=4)
                if serves_quality:
                    for size in [native, "192x128"] if args.tiny else QUALITY_SIZES:
                        first_and_later(client, write, "generate_quality", quality("a lighthouse", size), 1,
                                        mode="quality", size=size, images=1, steps=50)
                    for images in (2, 4):
                        size = native if args.tiny else big
                        first_and_later(client, write, "generate_quality", quality("a lighthouse", size, 20, images),
                                        1, mode="quality", size=size, images=images, steps=20)
            compiles = args.app_compile != "off" and torch.cuda.is_available()
            if compiles and args.app_compile == "start":  # compiled before serving
                log = compiled_lines(app.log.read_text())
                write(kind="compiled", shapes=len(log), after_s=round(serving, 1), log=log)
            elif compiles and args.app_compile == "aot":  # a package per module for every shape, compiled while serving
                app.wait_for(r"Fast \S+: (compiled ahead of time|compiling ahead of time failed)", args.compile_wait,
                             count=2)
                done = len(app.log_lines(r"Fast \S+: compiled ahead of time")) == 2
                write(kind="compiled", shapes="every Fast shape" if done else 0,
                      after_s=round(time.perf_counter() - app.started, 1), log=compiled_lines(app.log.read_text()))
            elif compiles:
                compiled = app.wait_compiled(count=DEFAULT_SHAPES, timeout=args.compile_wait)
                write(kind="compiled", shapes=compiled, after_s=round(time.perf_counter() - app.started, 1),
                      log=compiled_lines(app.log.read_text()))
            if "sizes" in phases and compiles:
                first_and_later(client, write, "generate_fast", fast("a lighthouse", native), 5, mode="fast",
                                size=native, images=1, steps=1, compiled=True)
                if serves_quality:
                    first_and_later(client, write, "generate_quality", quality("a lighthouse", big), 2,
                                    mode="quality", size=big, images=1, steps=50, compiled=True)
        finally:
            app.stop()

    # A restart: with the compile cache of the first start (--app-compile start/background) or the Fast path's
    # packages (aot), or, without compilation, what a restarted server pays with its model files in the OS's
    # page cache.
    cached = list((args.work / "aot").glob("*.aot")) if args.app_compile == "aot" else [cache] * cache.is_file()
    if "cached" in phases and (cached or args.app_compile == "off"):
        app = App(family, args.work, cache, args.port, "cached", args.app_compile, args.app_modes)
        try:
            client = app.wait_until_serving()
            serving = time.perf_counter() - app.started
            took, _ = client.call("generate_fast", fast("a red fox", native))
            first = time.perf_counter() - app.started
            if args.app_compile == "start":  # compiled from the cache before serving
                compiled = len(compiled_lines(app.log.read_text()))
            elif args.app_compile == "aot":
                compiled = len(app.log_lines("loaded its ahead-of-time package"))
            else:
                compiled = app.wait_compiled(count=2, timeout=args.compile_wait) if cached else 0
            write(kind="start-up", cache="cached" if cached else "restart",
                  cache_mb=round(sum(f.stat().st_size for f in cached) / 1e6, 1),
                  serving_s=round(serving, 1), first_fast_image_s=round(first, 1),
                  first_fast_call_ms=round(took * 1e3, 1), defaults_compiled_after_s=round(time.perf_counter() - app.started, 1),
                  compiled=compiled, log=compiled_lines(app.log.read_text()), **app.quality_ready(serves_quality))
            if "cached-typists" in phases:  # with the kernels the cache brought
                for n in (1, 4, 16):
                    typists(app, write, n, args.typist_seconds, native)
        finally:
            app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
