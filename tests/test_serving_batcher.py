"""The live micro-batcher (sdxl_fast.serving.batcher) with a stand-in for the batched model call."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from sdxl_fast.params import GenerationParams
from sdxl_fast.serving.batcher import Batcher, Busy, padded


def fast(prompt: str, size: int = 128, images: int = 1) -> GenerationParams:
    return GenerationParams(prompt, mode="fast", steps=1, seed=0, width=size, height=size, num_images=images)


class Model:
    """Records each batched call; the first one waits for `release`, so the next requests gather meanwhile."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[tuple[str, int, int]]] = []
        self.release, self.started = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, batch: list[GenerationParams]) -> list[list[str]]:
        self.calls.append([(p.prompt, p.width, p.num_images) for p in batch])
        self.started.set()
        self.release.wait(10)
        if any(p.prompt == self.fail_on for p in batch):
            raise ValueError(f"cannot draw {self.fail_on}")
        return [[f"{p.prompt} #{i}" for i in range(p.num_images)] for p in batch]


def submit_all(batcher: Batcher, requests: list[GenerationParams]) -> dict:
    """Each request from a thread of its own, as Gradio's handlers call it: {prompt: images or the error}."""
    out = {}

    def one(p):
        try:
            out[p.prompt] = batcher(p)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[p.prompt] = e

    threads = [threading.Thread(target=one, args=(p,)) for p in requests]
    for t in threads:
        t.start()
        time.sleep(0.01)  # in this order into the batcher
    return out, threads


def wait_waiting(batcher: Batcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(batcher.waiting) < n:
        assert time.monotonic() < deadline, "the requests never arrived"
        time.sleep(0.005)


def test_requests_waiting_together_share_one_call_per_shape_and_each_gets_its_own_images():
    model = Model()
    batcher = Batcher(model, max_images=8)
    first, first_threads = submit_all(batcher, [fast("first")])
    assert model.started.wait(10)  # the GPU is busy with "first" while the rest arrive
    rest = [fast("a"), fast("b", size=64), fast("c", images=2), fast("d", size=64), fast("e", images=4),
            fast("f")]
    out, threads = submit_all(batcher, rest)
    wait_waiting(batcher, len(rest))
    model.release.set()
    for t in first_threads + threads:
        t.join(10)
    assert first["first"] == ["first #0"]
    # The oldest's shape first: a, c, e (1 + 2 + 4 images) and f would make 8 -> all four; padded to 8 images.
    assert model.calls[1] == [("a", 128, 1), ("c", 128, 2), ("e", 128, 4), ("f", 128, 1)]
    assert model.calls[2] == [("b", 64, 1), ("d", 64, 1)]
    assert len(model.calls) == 3
    assert out == {"a": ["a #0"], "b": ["b #0"], "c": ["c #0", "c #1"], "d": ["d #0"],
                   "e": [f"e #{i}" for i in range(4)], "f": ["f #0"]}


def test_a_batch_holds_at_most_max_images_and_the_rest_waits_for_the_next():
    model = Model()
    batcher = Batcher(model, max_images=4)
    _, first_threads = submit_all(batcher, [fast("first")])
    assert model.started.wait(10)
    out, threads = submit_all(batcher, [fast("a", images=3), fast("b", images=2), fast("c")])
    wait_waiting(batcher, 3)
    model.release.set()
    for t in first_threads + threads:
        t.join(10)
    # a (3) + c (1) fill 4; b does not fit beside a and goes next, padded from 2 images it already is.
    assert model.calls[1:] == [[("a", 128, 3), ("c", 128, 1)], [("b", 128, 2)]]
    assert out["b"] == ["b #0", "b #1"]


def test_a_failed_batch_raises_in_every_request_of_it_and_the_batcher_goes_on():
    model = Model(fail_on="bad")
    batcher = Batcher(model)
    _, first_threads = submit_all(batcher, [fast("first")])
    assert model.started.wait(10)
    out, threads = submit_all(batcher, [fast("bad"), fast("good")])
    wait_waiting(batcher, 2)
    model.release.set()
    for t in first_threads + threads:
        t.join(10)
    assert all(isinstance(out[k], ValueError) and "cannot draw bad" in str(out[k]) for k in ("bad", "good"))
    assert batcher(fast("later")) == ["later #0"]


def test_beyond_max_waiting_a_request_is_refused_at_once_and_names_the_limit():
    model = Model()
    batcher = Batcher(model, max_waiting=2)
    _, first_threads = submit_all(batcher, [fast("first")])
    assert model.started.wait(10)  # running, so no longer waiting
    out, threads = submit_all(batcher, [fast("a"), fast("b")])
    wait_waiting(batcher, 2)
    with pytest.raises(Busy, match="2 live requests are already waiting"):
        batcher(fast("c"))
    model.release.set()
    for t in first_threads + threads:
        t.join(10)
    assert out == {"a": ["a #0"], "b": ["b #0"]}
    assert batcher(fast("d")) == ["d #0"]  # room again


@pytest.mark.parametrize("images, total", [([1], 1), ([1, 1, 1], 4), ([2, 3], 8), ([4, 4, 4, 4], 16), ([3], 4)])
def test_padding_repeats_the_last_request_up_to_a_power_of_two_images(images, total):
    batch = [fast(f"p{i}", images=n) for i, n in enumerate(images)]
    out = padded(batch)
    assert out[:len(batch)] == batch and sum(p.num_images for p in out) == total
    assert all(p == replace(batch[-1], num_images=1) for p in out[len(batch):])


def test_a_batch_is_a_power_of_two_images_and_what_does_not_fit_goes_first_next_time():
    model = Model()
    batcher = Batcher(model)
    _, first_threads = submit_all(batcher, [fast("first")])
    assert model.started.wait(10)
    names = [f"t{i}" for i in range(11)]
    out, threads = submit_all(batcher, [fast(n) for n in names])
    wait_waiting(batcher, 11)
    model.release.set()
    for t in first_threads + threads:
        t.join(10)
    # 11 waiting: 8 now, then 2, then 1; none padded with images nobody asked for
    assert [[c[0] for c in call] for call in model.calls[1:]] == [names[:8], names[8:10], names[10:]]
    assert all(out[n] == [f"{n} #0"] for n in names)

