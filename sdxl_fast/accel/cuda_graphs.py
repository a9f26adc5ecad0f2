"""CUDA graphs: record a call's kernels once, then replay them with a single launch.

On an H200 an eager 512² SDXL UNet forward takes ~50 ms for 1.6 TFLOP of work: the time goes into launching
about a thousand kernels from Python, not into running them. A graph replay launches them all at once. The
Fast path records its whole call after tokenisation (text encoders, every student step, the VAE decode and
the uint8 conversion) as one graph per (batch, size, steps); the Quality path records one UNet step per
(UNet, batch, size), two with the step cache (its whole and its cached steps), and keeps the scheduler and
guidance arithmetic eager, so step callbacks still work.

Replaying a graph reruns the same kernels on the same addresses, so the results equal the eager ones; the
inputs are copied into the graph's own buffers and its outputs are overwritten by the next replay.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..models import Runner
from . import cross_kv

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls before recording, so cuDNN/cuBLAS choose algorithms and lazy init happens


class Graphed:
    """`fn(*inputs)` recorded for the shapes and dtypes of `example_inputs` (tensors only).

    The graph reads `inputs` and whatever else fn touched at recording, at the same addresses: so fn must take
    every per-call tensor as an input, and is kept alive here together with what it refers to.
    """

    def __init__(self, fn: Callable, example_inputs: tuple[torch.Tensor, ...], pool=None):
        self.fn = fn
        self.inputs = tuple(x.clone() for x in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_CALLS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a background thread compiling new shapes may use the GPU meanwhile, on its own stream
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"), torch.no_grad():
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs


class CudaGraphs:
    """The recorded graphs of one `Models`, made on first use. All share one memory pool: they run one after
    another on one stream, so their temporary buffers can overlap."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, Graphed] = {}
        self.failed: set[tuple] = set()
        self._local = threading.local()  # .missed: the list `eager_if_new` yields, in this thread

    @contextmanager
    def eager_if_new(self) -> Iterator[list[str]]:
        """Within this context, in this thread, a call whose graph is not recorded yet runs eagerly instead of
        being recorded (recording costs two eager calls and the capture), and its name is added to the list
        yielded, so that the caller can have it recorded later, e.g. between users' requests."""
        missed: list[str] = []
        self._local.missed = missed
        try:
            yield missed
        finally:
            self._local.missed = None

    def clear(self) -> None:
        """Forget every graph (each is recorded again on its next use), e.g. once new shapes are compiled."""
        self.graphs, self.failed = {}, set()

    def run(self, name: tuple, fn: Callable, *inputs: torch.Tensor):
        """fn(*inputs) through the graph for `name` and the inputs' shapes. `name` must identify everything
        else fn's kernels depend on (the modules, their dtypes, Python constants such as the timesteps).
        If recording fails, fn runs eagerly from then on for this key, with a logged reason."""
        if any(x is None for x in inputs):  # an absent input (a family without a first text encoder): eager
            return fn(*inputs)
        key = (*name, *((tuple(x.shape), x.dtype) for x in inputs))
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.failed:
                return fn(*inputs)
            missed = getattr(self._local, "missed", None)
            if missed is not None:
                missed.append(name[0])
                return fn(*inputs)
            try:
                graph = self.graphs[key] = Graphed(fn, inputs, self.pool)
            except Exception as exc:  # anything in fn that syncs with the host cannot be recorded
                log.warning("CUDA graph for %s could not be recorded, running eagerly: %s", name[0], exc)
                self.failed.add(key)
                torch.cuda.synchronize()
                return fn(*inputs)
        return graph(*inputs)


def drop_graphs(runner: Runner) -> None:
    """Forget the CUDA graphs `runner` recorded, if any: each is recorded again on its next use, e.g. around
    the kernels of a newly compiled module."""
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        graphs.clear()


def _copy(out):
    """A copy of a graph's outputs (a tensor, a tuple of them, or an object with `clone()`), which the next
    replay would overwrite."""
    return tuple(x.clone() for x in out) if isinstance(out, tuple) else out.clone()


class AcceleratedRunner(Runner):
    """The runner `sdxl_fast.accel.apply` installs on `Models`: each function replayed from its CUDA graph
    (with `graphs`), and text states projected to the keys and values of a UNet's hoisted cross-attentions."""

    def __init__(self, graphs: CudaGraphs | None = None):
        self.graphs = graphs

    def run(self, name: tuple, fn: Callable, *inputs, keep: bool = False):
        if self.graphs is None:
            return fn(*inputs)
        out = self.graphs.run(name, fn, *inputs)
        return _copy(out) if keep else out

    def context(self, unet, context: torch.Tensor) -> torch.Tensor:
        return cross_kv.project(unet, context)
