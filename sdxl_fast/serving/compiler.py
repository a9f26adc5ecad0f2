"""Compiling the shapes users ask for in a background thread, while every request is served.

With `Acceleration(compile_new_shapes=False)` a shape not compiled yet runs eagerly through CUDA graphs, which
takes about 1.5-2x the compiled time instead of a one-to-three-minute compile on the request path. Each new
shape a request brings is queued here and compiled in this thread (`sdxl_fast.accel.compile.compiling`) with a
call of that shape on a stream of its own; once it is ready, the recorded CUDA graphs are dropped so that they
are recorded again around the compiled kernels. PyTorch's portable compile cache is saved after each shape
and loaded at start, so a restarted server or a new replica compiles from it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..accel.compile import compiling
from ..accel.cuda_graphs import AcceleratedRunner, drop_graphs
from ..files import atomic_write
from ..models import Models
from ..params import GenerationParams
from ..pipeline.generate import generate

log = logging.getLogger(__name__)

CACHE_FILE = Path(os.environ.get("SDXL_FAST_COMPILE_CACHE", Path.home() / ".cache" / "sdxl-fast" / "compiled.bin"))


@dataclass(frozen=True)
class Shape:
    """What the compiled graphs of one request depend on (the step count does not: timesteps are inputs)."""

    mode: str
    width: int
    height: int
    num_images: int
    guided: bool = False  # Quality: both guidance branches in one UNet call, twice the batch
    refiner: bool = False
    step_cache: bool = False

    @classmethod
    def of(cls, p: GenerationParams) -> "Shape":
        """The shape of resolved parameters."""
        quality = p.mode == "quality"
        return cls(p.mode, p.width, p.height, p.num_images, quality and p.guidance_scale > 1.0,
                   quality and p.use_refiner and p.refiner_switch < 1.0, p.cache_interval > 1)

    def example(self) -> GenerationParams:
        """A short call that runs every compiled part of this shape: text encoders, each UNet, the VAE decoder."""
        steps = 4 if self.step_cache else (2 if self.mode == "quality" else 1)
        return GenerationParams(
            "a photograph", mode=self.mode, steps=steps, seed=0, width=self.width, height=self.height,
            num_images=self.num_images, guidance_scale=5.0 if self.guided else 1.0, use_refiner=self.refiner,
            refiner_switch=0.5 if self.refiner else 1.0, cache_interval=2 if self.step_cache else 1)

    def __str__(self) -> str:
        extras = [name for name in ("guided", "refiner", "step_cache") if getattr(self, name)]
        return f"{self.mode} {self.width}x{self.height} x{self.num_images}" + "".join(f" +{e}" for e in extras)


def _shadow(models: Models) -> Models:
    """The same modules without CUDA graphs and with prompt caches of their own, for the compiling thread."""
    runner = AcceleratedRunner() if isinstance(models.runner, AcceleratedRunner) else models.runner
    own = {}
    for mode in ("quality", "fast"):
        family = getattr(models, mode)
        if family is not None:
            own[mode] = replace(family, encoders=replace(family.encoders, cache=OrderedDict()))
    return replace(models, runner=runner, **own)


def load_cache(path: Path = CACHE_FILE) -> bool:
    """Load PyTorch's portable compile cache (Inductor, Triton and autotuning results) saved by an earlier run."""
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    log.info("compile cache loaded from %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return True


def save_cache(path: Path = CACHE_FILE) -> None:
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return
    with atomic_write(path) as tmp:
        tmp.write_bytes(saved[0])


class BackgroundCompiler:
    """A thread that compiles each queued `Shape` in turn. `request(params)` queues a new shape and says its
    state: "compiled", "compiling", "queued" or "failed: why"."""

    def __init__(self, models: Models, cache: Path | None = CACHE_FILE):
        self.models, self.cache = models, cache
        self.shadow = _shadow(models)
        self.states: dict[Shape, str] = {}
        self.seconds: dict[Shape, float] = {}
        self.queue: queue.Queue[Shape | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="sdxl-fast-compile", daemon=True)

    def start(self) -> "BackgroundCompiler":
        self.thread.start()
        return self

    def request(self, params: GenerationParams) -> str:
        shape = Shape.of(params)
        if shape not in self.states:
            self.states[shape] = "queued"
            self.queue.put(shape)
        return self.states[shape]

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def wait(self) -> None:
        """Until every queued shape is compiled (or failed)."""
        self.queue.join()

    def status(self) -> dict:
        return {state: [str(s) for s, st in self.states.items() if st == state]
                for state in ("compiled", "compiling", "queued")} | {
            "failed": {str(s): st for s, st in self.states.items() if st.startswith("failed")}}

    def _work(self) -> None:
        device = self.models.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        while (shape := self.queue.get()) is not None:
            self.states[shape] = "compiling"
            started = time.perf_counter()
            try:
                with compiling(), torch.cuda.stream(stream):  # torch.cuda.stream(None) is a no-op
                    generate(self.shadow, shape.example())
                if stream is not None:
                    stream.synchronize()
                self.states[shape] = "compiled"
            except Exception as exc:  # noqa: BLE001 - the shape keeps running eagerly; the server goes on
                self.states[shape] = f"failed: {type(exc).__name__}: {exc}"
                log.warning("compiling %s failed, it stays eager: %s", shape, exc)
            self.seconds[shape] = time.perf_counter() - started
            drop_graphs(self.models.runner)  # to be recorded again around the compiled kernels
            if self.cache is not None and self.states[shape] == "compiled":
                save_cache(self.cache)
            status = self.status()
            log.info("compiled shapes: %s %s in %.1f s; %d compiled, %d queued", shape, self.states[shape],
                     self.seconds[shape], len(status["compiled"]), len(status["queued"]))
            self.queue.task_done()
        self.queue.task_done()
