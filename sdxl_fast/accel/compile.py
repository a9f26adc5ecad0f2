"""torch.compile of the models: one static graph per input shape, and never a request that waits for one.

Compiling a new shape of an SDXL UNet takes one to three minutes. `ShapeCompiled` runs a module's call
compiled for the shapes compiled so far and, with `compile_new=False` (the app), eagerly for any other until a
background thread has compiled it inside `compiling()` (sdxl_fast.serving.compiler). torch.compile is not
thread-safe (pytorch/pytorch#118260), so while one thread compiles, every other thread runs eagerly; a CUDA
graph replay does not enter Python, so graphs recorded before are unaffected.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..pipeline import step_cache

# Graphs torch.compile may keep per frame. The UNets share one frame (diffusers' forward), and each
# (model, batch, size) served is a graph of its own; torch's default of 8 would send later shapes to eager.
RECOMPILE_LIMIT = 64

# Inductor's compiled kernels persist here, so a restarted app compiles in seconds, not minutes (its default,
# /tmp, is wiped with many containers).
INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "sdxl-fast" / "inductor"

# Held by the thread that is compiling; other threads that cannot take it run eagerly.
_COMPILE_LOCK = threading.RLock()
_local = threading.local()


@contextmanager
def compiling():
    """In this thread, until the block ends: new shapes are compiled on the spot, and every other thread's
    calls of compiled models run eagerly."""
    with _COMPILE_LOCK:
        _local.compile_new = True
        try:
            yield
        finally:
            _local.compile_new = False


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """What a static-shape graph is specialised on: each tensor's shape, strides, dtype and device (torch.compile
    guards on all four), other values as they are."""
    def key(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.stride(), x.dtype, x.device)
        if isinstance(x, dict):
            return tuple((k, key(v)) for k, v in sorted(x.items()))
        if isinstance(x, (tuple, list)):
            return tuple(key(v) for v in x)
        return x if isinstance(x, (int, float, str, bool, type(None))) else type(x)
    return key(args), key(kwargs)


class ShapeCompiled:
    """`compiled` (torch.compile of `eager`) for the shapes it has compiled; `eager` for the others unless
    `compile_new`, and whenever another thread is compiling."""

    def __init__(self, eager: Callable, compiled: Callable, compile_new: bool = True):
        self.eager, self.compiled, self.compile_new = eager, compiled, compile_new
        self.ready: set[tuple] = set()

    def __call__(self, *args, **kwargs):
        key = shape_key(args, kwargs)
        new = key not in self.ready
        if new and not (self.compile_new or getattr(_local, "compile_new", False)):
            return self.eager(*args, **kwargs)
        if not _COMPILE_LOCK.acquire(blocking=False):  # another thread is compiling
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        finally:
            _COMPILE_LOCK.release()
        if new:
            self.ready.add(key)
        return out


def compile_module(module: torch.nn.Module, compile_new: bool = True, **how) -> ShapeCompiled:
    """Compile `module` in place, as `module.compile(**how)` does, through a ShapeCompiled."""
    module._compiled_call_impl = ShapeCompiled(module._call_impl, torch.compile(module._call_impl, **how), compile_new)
    return module._compiled_call_impl


def compile_models(unets, vaes, text_encoders, mode: str | None, backend="inductor", combo_kernels=False,
                   compile_new: bool = True) -> None:
    """torch.compile with static shapes: one graph per shape. With torch's default (dynamic after the first
    recompile) the second shape served, e.g. the 1024² base after the 512² student, compiled as a
    dynamic-shape graph that had not finished after minutes on an H200, where the same shapes compiled
    alone took three minutes (BENCHMARKS.md). `compile_new=False`: see ShapeCompiled."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # What dynamic=False patches in for each compiled call, set for good: that patching is not thread-safe.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.assume_static_by_default = True
    how = {"mode": mode}
    if backend == "inductor":  # torch.compile takes a mode or options, not both: the mode's options, and ours
        how = {"options": {**torch._inductor.list_mode_options(mode or "default"), "combo_kernels": combo_kernels}}
    for unet in unets:
        compile_module(unet, compile_new, fullgraph=True, dynamic=False, backend=backend, **how)
        if hasattr(unet, "up_blocks"):  # the step cache's outer-level step calls the blocks directly: compiled too
            unet._sdxl_fast_cached_step = ShapeCompiled(step_cache.cached_step, torch.compile(
                step_cache.cached_step, dynamic=False, backend=backend, **how), compile_new)
    for vae in vaes:
        compile_module(vae.decoder, compile_new, dynamic=False, backend=backend, **how)
    for encoder in text_encoders:  # fuses the many small kernels of a batch-1 prompt: 3.3 -> 2.7 ms (H200)
        compile_module(encoder, compile_new, dynamic=False, backend=backend, **how)


def compiled_shapes(module) -> int:
    """How many input shapes `module` runs compiled (0 when it is not compiled)."""
    impl = getattr(module, "_compiled_call_impl", None)
    return len(impl.ready) if isinstance(impl, ShapeCompiled) else 0
