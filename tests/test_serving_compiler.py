"""No request waits for a compile: new shapes run eagerly until a background thread has compiled them.

torch.compile runs for real here, with a recording backend in place of Inductor (which takes minutes for a
UNet), so what is checked is our dispatch: which calls compile, which run eagerly, and in which thread.
"""

import threading

import numpy as np
import pytest
import torch

from sdxl_fast import GenerationParams, generate, load
from sdxl_fast.accel.compile import ShapeCompiled, compile_models, compiled_shapes, compiling
from sdxl_fast.serving.compiler import BackgroundCompiler, Shape


class RecordingBackend:
    """A torch.compile backend that runs the traced graph as is, noting each compile and each compiled run."""

    def __init__(self):
        self.compiled_in, self.runs = [], 0

    def __call__(self, gm, example_inputs):
        self.compiled_in.append(threading.current_thread().name)

        def run(*args):
            self.runs += 1
            return gm.forward(*args)
        return run


def test_a_new_shape_runs_eagerly_unless_compiling_new_shapes():
    compiled_calls = []
    fn = ShapeCompiled(lambda x: x + 1, lambda x: compiled_calls.append(x.shape) or x + 1, compile_new=False)
    assert torch.equal(fn(torch.zeros(2)), torch.ones(2)) and compiled_calls == []  # eager: not compiled yet
    with compiling():
        fn(torch.zeros(2))
    assert compiled_calls == [(2,)] and len(fn.ready) == 1
    fn(torch.zeros(2))  # compiled now, in any thread
    fn(torch.zeros(3))  # a new shape: eager again
    assert compiled_calls == [(2,), (2,)]


def test_while_another_thread_compiles_every_call_runs_eagerly():
    compiled_calls = []
    fn = ShapeCompiled(lambda x: x, lambda x: compiled_calls.append(1) or x, compile_new=True)
    started, release = threading.Event(), threading.Event()

    def compiler():
        with compiling():
            started.set()
            release.wait(10)

    thread = threading.Thread(target=compiler)
    thread.start()
    started.wait(10)
    try:
        fn(torch.zeros(2))  # would compile (compile_new), but torch.compile is not thread-safe: eager
        assert compiled_calls == [] and not fn.ready
    finally:
        release.set()
        thread.join()
    fn(torch.zeros(2))
    assert compiled_calls == [1]


@pytest.fixture
def compiled_models(tiny_sources):
    """Tiny models compiled as the app compiles them (new shapes left to the background), recording backend."""
    torch._dynamo.reset()
    models = load(sources=tiny_sources, device="cpu")
    backend = RecordingBackend()
    q, f = models.quality, models.fast
    compile_models([q.base, q.refiner, f.student], [q.vae], [q.encoders.text_encoder, q.encoders.text_encoder_2],
                   mode=None, backend=backend, compile_new=False)
    yield models, backend
    torch._dynamo.reset()


def test_requests_never_compile_and_the_background_compiler_makes_their_shape_compiled(tiny_models, compiled_models):
    models, backend = compiled_models
    params = GenerationParams("a red fox", mode="fast", steps=2, seed=3, width=64, height=64)
    eager = generate(models, params)
    assert backend.compiled_in == [] and backend.runs == 0  # the request ran eagerly: no compile on its path

    compiler = BackgroundCompiler(models, cache=None).start()
    try:
        assert compiler.request(params.resolved()) == "queued"
        compiler.wait()
        assert compiler.status()["compiled"] == [str(Shape.of(params.resolved()))]
        assert backend.compiled_in and set(backend.compiled_in) == {"sdxl-fast-compile"}
        assert compiled_shapes(models.fast.student) == 1 and compiled_shapes(models.quality.vae.decoder) == 1
        runs = backend.runs
        again = generate(models, params)  # now on the compiled graphs
        assert backend.runs > runs
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(eager, again))
        assert compiler.request(params.resolved()) == "compiled"
        bigger = GenerationParams("a red fox", mode="fast", steps=1, seed=3, width=64, height=64, num_images=2)
        compiled_before = len(backend.compiled_in)
        generate(models, bigger)  # another shape: eager again, nothing compiled for it on the request path
        assert len(backend.compiled_in) == compiled_before
    finally:
        compiler.stop()


def test_a_shape_that_fails_to_compile_stays_eager_and_is_reported(compiled_models, monkeypatch):
    models, _ = compiled_models
    compiler = BackgroundCompiler(models, cache=None).start()
    monkeypatch.setattr(Shape, "example", lambda self: GenerationParams("x", mode="fast", steps=9))  # invalid
    try:
        compiler.request(GenerationParams("x", mode="fast", steps=1, seed=0, width=64, height=64).resolved())
        compiler.wait()
        failed = compiler.status()["failed"]
        assert list(failed) == ["fast 64x64 x1"] and "steps must be" in failed["fast 64x64 x1"]
    finally:
        compiler.stop()
