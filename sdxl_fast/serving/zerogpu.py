"""Hugging Face ZeroGPU: a GPU attached only for the duration of each call decorated with `spaces.GPU`.

What the `spaces` package does (read from its source, 0.51): with SPACES_ZERO_GPU=true (`spaces.config.Config
.zero_gpu`, set by the Space) importing it patches torch, so that `.to("cuda")` at start-up records the weights
on the CPU and `torch.cuda.is_available()` says True; a decorated call is scheduled for the duration it
declares (refused when that exceeds the visitor's remaining quota), runs in a forked worker that gets the GPU
and the weights moved onto it, and the GPU goes back when the call returns. Without SPACES_ZERO_GPU (anywhere
else, the package installed or not) `spaces.GPU(fn)` returns `fn` itself.

What the app does differently there (ZeroGPU's documentation: torch.compile is not supported; ahead-of-time
compilation is):
- `acceleration`: no torch.compile, no CUDA graphs, no fp8 (its calibration runs generations at start-up);
  the module swaps that only re-lay weights (fused QKV, channels_last, ...) stay, they run on the CPU at start.
- no warm-up at start-up: it would be CUDA work outside a decorated call (and compiles nothing here anyway);
- each handler is decorated with a `duration` computed per request (`duration_seconds`) from mode, steps,
  size and images, capped by the time budget: short requests are scheduled sooner and use less quota.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Callable

from ..params import GenerationParams
from .limits import MEGA, Limits

log = logging.getLogger(__name__)

# Scheduling estimates for eager SDXL (no compile, no CUDA graphs) on ZeroGPU's H200 slice, with a margin of
# about 2x over the eager H100/H200 figures in BENCHMARKS.md: seconds per denoising step of one 1024² image
# (Quality's includes both guidance branches), per VAE decode of one 1024² image, and per call for attaching
# the GPU and moving the weights in a fresh worker.
STEP_SECONDS = {"fast": 0.1, "quality": 0.12}
DECODE_SECONDS = 0.2
START_SECONDS = 5.0
MIN_SECONDS = 5


def spaces_module():
    """The `spaces` package, or None where it is not installed."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces


def active() -> bool:
    """True on a ZeroGPU Space: `spaces` installed and its config saying ZeroGPU (SPACES_ZERO_GPU=true)."""
    spaces = spaces_module()
    if spaces is None:
        return False
    from spaces.config import Config

    return bool(Config.zero_gpu)


def wrap(handler: Callable, duration: Callable | int | None = None) -> Callable:
    """`handler` through `spaces.GPU(duration=...)` where `spaces` is installed (which returns `handler` itself
    off ZeroGPU); `handler` as is where it is not. `duration` may be a callable taking the handler's own
    arguments (spaces calls it before scheduling: an exception from it reaches the user with no GPU used)."""
    spaces = spaces_module()
    if spaces is None:
        return handler
    return spaces.GPU(handler, duration=duration)


def duration_seconds(params: GenerationParams, limits: Limits) -> int:
    """Seconds to ask ZeroGPU for one request (resolved params): start + pixels × (steps × step cost + decode),
    at most the time budget (after which the request stops itself) plus the start."""
    megapixels = params.width * params.height * params.num_images / MEGA
    seconds = START_SECONDS + megapixels * (params.steps * STEP_SECONDS[params.mode] + DECODE_SECONDS)
    if limits.time_budget is not None:
        seconds = min(seconds, limits.time_budget + START_SECONDS)
    return max(MIN_SECONDS, math.ceil(seconds))


def acceleration(options):
    """`options` (an `sdxl_fast.accel.Acceleration`) as ZeroGPU allows: torch.compile, CUDA graphs and fp8 off."""
    changed = [name for name in ("compile", "cuda_graphs", "fp8") if getattr(options, name)]
    if changed:
        log.info("ZeroGPU: %s off (torch.compile is not supported there; graphs and fp8 calibration would be "
                 "GPU work at start-up)", ", ".join(changed))
    return replace(options, compile=False, cuda_graphs=False, fp8=False)
