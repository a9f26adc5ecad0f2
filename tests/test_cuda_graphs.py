"""The CUDA-graph paths, checked on the CPU with a stand-in that behaves like a recorded graph.

A real graph needs a GPU; what can go wrong in *our* code can be seen without one: a graph only sees its
input buffers, so anything the recorded function reads from elsewhere (a prompt, a seed, noise, a timestep
closed over from the first call) would be frozen at recording time. The stand-in keeps the same contract:
`Graphed(fn, inputs)` copies the inputs into its own buffers, and a replay runs fn on those buffers only.
"""

import threading
import time

import numpy as np
import pytest
import torch

from sdxl_fast import GenerationParams, generate
from sdxl_fast.accel import cuda_graphs
from sdxl_fast.accel.cuda_graphs import AcceleratedRunner, CudaGraphs
from sdxl_fast.models import Runner


class RecordedOnCPU:
    recorded: list = []

    def __init__(self, fn, example_inputs, pool=None):
        # A real graph would keep reading a closed-over tensor's memory after the call that made it is gone
        # (on the H200 this gave garbage from the second Fast call on): tensors must come in as inputs.
        bound = [*getattr(fn, "args", ()), *getattr(fn, "keywords", {}).values()]
        assert not any(isinstance(x, torch.Tensor) for x in bound), "a tensor is closed over, not an input"
        self.fn, self.inputs = fn, tuple(x.clone() for x in example_inputs)
        self.outputs = fn(*self.inputs)
        RecordedOnCPU.recorded.append(self)

    def __call__(self, *inputs):
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.outputs = self.fn(*self.inputs)
        return self.outputs


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "Graphed", RecordedOnCPU)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    RecordedOnCPU.recorded = []
    return CudaGraphs()


def _use_graphs(models, graphs):
    models.runner = AcceleratedRunner(graphs) if graphs is not None else Runner()
    for path in (models.quality, models.fast):
        path.encoders.cache.clear()  # so the encoders run (through their graph) rather than hit the cache


def _pixels(models, **kw):
    return [np.asarray(im) for im in generate(models, GenerationParams(width=64, height=64, **kw))]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fast_graph_gives_the_eager_images_for_every_prompt_seed_and_batch(tiny_models, cpu_graphs, steps):
    calls = [dict(prompt="a red fox", seed=1, num_images=1), dict(prompt="a blue bird", seed=7, num_images=1),
             dict(prompt="a green tree", seed=3, num_images=2)]
    eager = [_pixels(tiny_models, mode="fast", steps=steps, **c) for c in calls]
    _use_graphs(tiny_models, cpu_graphs)
    try:
        graphed = [_pixels(tiny_models, mode="fast", steps=steps, **c) for c in calls]
    finally:
        _use_graphs(tiny_models, None)
    for want, got in zip(eager, graphed):
        assert all(np.array_equal(w, g) for w, g in zip(want, got))
    names = [key[0] for key in cpu_graphs.graphs]
    assert names.count("fast") == 2  # batch 1 and batch 2 are different graphs; the second prompt replays
    assert names.count("text encoders") == 1


def test_quality_unet_graphs_give_the_eager_images(tiny_models, cpu_graphs):
    params = dict(mode="quality", steps=4, guidance_scale=5.0, refiner_switch=0.5)
    eager = [_pixels(tiny_models, prompt=p, seed=s, **params) for p, s in (("a red fox", 1), ("a cat", 2))]
    _use_graphs(tiny_models, cpu_graphs)
    try:
        graphed = [_pixels(tiny_models, prompt=p, seed=s, **params) for p, s in (("a red fox", 1), ("a cat", 2))]
    finally:
        _use_graphs(tiny_models, None)
    for want, got in zip(eager, graphed):
        assert all(np.array_equal(w, g) for w, g in zip(want, got))
    assert {key[0] for key in cpu_graphs.graphs} == {"text encoders", "base", "refiner"}


def test_steps_with_a_callback_run_eagerly(tiny_models, cpu_graphs):
    seen = []
    _use_graphs(tiny_models, cpu_graphs)
    try:
        generate(tiny_models, GenerationParams("a fox", mode="fast", steps=2, width=64, height=64), seen.append)
    finally:
        _use_graphs(tiny_models, None)
    assert len(seen) == 2 and not any(key[0] == "fast" for key in cpu_graphs.graphs)


def test_a_function_that_cannot_be_recorded_runs_eagerly_and_is_not_retried(monkeypatch, cpu_graphs):
    attempts = []

    def refuse(fn, inputs, pool=None):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "Graphed", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    x = torch.ones(3)
    assert torch.equal(cpu_graphs.run(("double",), lambda t: t * 2, x), x * 2)
    assert torch.equal(cpu_graphs.run(("double",), lambda t: t * 2, x), x * 2)
    assert len(attempts) == 1


def test_step_cache_graphs_give_the_eager_cached_images(tiny_models, cpu_graphs):
    params = dict(prompt="a red fox", seed=1, steps=6, guidance_scale=5.0, refiner_switch=0.5, cache_interval=2)
    eager = _pixels(tiny_models, mode="quality", **params)
    _use_graphs(tiny_models, cpu_graphs)
    try:
        graphed = _pixels(tiny_models, mode="quality", **params)
    finally:
        _use_graphs(tiny_models, None)
    assert all(np.array_equal(w, g) for w, g in zip(eager, graphed))
    assert {key[:4:3] for key in cpu_graphs.graphs if key[0] != "text encoders"} == {
        ("base", "full"), ("base", "cached"), ("refiner", "full"), ("refiner", "cached")}


def test_within_eager_if_new_an_unrecorded_call_runs_eagerly_in_that_thread_only(cpu_graphs):
    x = torch.ones(3)
    with cpu_graphs.eager_if_new() as missed:
        assert torch.equal(cpu_graphs.run(("double",), lambda t: t * 2, x), x * 2)
        other = threading.Thread(target=cpu_graphs.run, args=(("triple",), lambda t: t * 3, x))
        other.start()
        other.join()
    assert missed == ["double"]
    assert [key[0] for key in cpu_graphs.graphs] == ["triple"]  # another thread records as before
    cpu_graphs.run(("double",), lambda t: t * 2, x)  # outside: recorded
    with cpu_graphs.eager_if_new() as missed:
        assert torch.equal(cpu_graphs.run(("double",), lambda t: t * 2, x * 5), x * 10)  # replayed
    assert missed == [] and len(RecordedOnCPU.recorded) == 2


def test_a_fast_request_of_a_new_shape_runs_eagerly_and_is_recorded_between_requests(tiny_models, cpu_graphs):
    """The app never records a Fast call's graph on a user's request: that costs the request two more calls
    and the capture. The call runs eagerly and the recording thread records it once the GPU is idle."""
    import app

    params = GenerationParams("a red fox", mode="fast", seed=1, width=64, height=64, num_images=2)
    eager = [np.asarray(im) for im in generate(tiny_models, params)]
    _use_graphs(tiny_models, cpu_graphs)
    try:
        studio = app.Studio(tiny_models)
        images, _ = studio.run(params)
        assert all(np.array_equal(w, np.asarray(g)) for w, g in zip(eager, images))
        assert not any(key[0] == "fast" for key in cpu_graphs.graphs)  # the request recorded nothing...
        deadline = time.monotonic() + 30
        while not any(key[0] == "fast" for key in cpu_graphs.graphs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(key[0] == "fast" for key in cpu_graphs.graphs)  # ...the thread did, once the GPU was idle
        recorded = len(RecordedOnCPU.recorded)
        again, _ = studio.run(params)  # replays the recorded graph
        assert len(RecordedOnCPU.recorded) == recorded
        assert all(np.array_equal(w, np.asarray(g)) for w, g in zip(eager, again))
        # A Quality request records its UNet steps' graphs itself, as before.
        studio.run(GenerationParams("a red fox", mode="quality", seed=1, width=64, height=64, steps=2))
        assert {"base", "refiner"} <= {key[0] for key in cpu_graphs.graphs}
    finally:
        _use_graphs(tiny_models, None)
