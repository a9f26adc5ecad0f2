"""Calls made at start-up: fp8's calibration calls, and the warm-up that compiles and records graphs."""

from __future__ import annotations

import logging
import time

import torch

from ..models import Models, Runner
from ..params import GenerationParams
from ..pipeline.generate import generate

log = logging.getLogger(__name__)


def sample_calls(models: Models) -> None:
    """Eager calls at the models' own size that reach every UNet: the student at each of its 4 timesteps,
    base and refiner over a 10-step schedule with both guidance branches. fp8's calibration watches them."""
    runner, models.runner = models.runner, Runner()  # recorded graphs would replay the layers as they were
    try:
        with torch.compiler.set_stance("force_eager"):  # a compiled UNet would trace the watching hooks
            for mode, steps in (("fast", 4), ("quality", 10)):
                if getattr(models, mode) is not None:
                    generate(models, GenerationParams("a photograph of a city street", mode=mode, steps=steps,
                                                      seed=0))
    finally:
        models.runner = runner


def warmup_calls(models: Models, fast_batches: tuple[int, ...] = (1,), fast_steps: tuple[int, ...] = (1,),
                 quality: bool = True) -> list[GenerationParams]:
    """A call of each loaded path at the models' own size (generate's default), so compilation, autotuning and
    graph recording happen before a user's request: Fast at 1 step with each of `fast_batches` images (the
    app's batched live calls, each batch size its own CUDA graph), then at each other of `fast_steps` with
    one image (each step count its own graph); with `quality`, Quality at 2 steps (one on the base, one on
    the refiner), then at 4 with the step cache, which the app offers for Quality (a whole and a cached step
    on each UNet)."""
    calls = {"fast": [dict(steps=1, num_images=n) for n in fast_batches] +
                     [dict(steps=s, num_images=1) for s in fast_steps if s != 1],
             "quality": [dict(steps=2), dict(steps=4, refiner_switch=0.5, cache_interval=2)] if quality else []}
    return [GenerationParams("warm-up", mode=mode, seed=0, **kw)
            for mode, kwargs in calls.items() if getattr(models, mode) is not None for kw in kwargs]


def warmup(models: Models, fast_batches: tuple[int, ...] = (1,)) -> None:
    """Run `warmup_calls`, logging each one's time: compiling them takes minutes on a cold machine."""
    calls = warmup_calls(models, fast_batches)
    for i, params in enumerate(calls, 1):
        started = time.perf_counter()
        generate(models, params)
        log.info("warm-up %d/%d: %s, %d image(s), %d steps: %.1f s", i, len(calls), params.mode, params.num_images,
                 params.steps, time.perf_counter() - started)
