"""The app's named API endpoints, called with gradio_client against an in-process server on the tiny models."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

import app
import sdxl_fast
from test_app_helpers import running_app




def fast(client, prompt="a red fox", **kw):
    args = dict(steps=1, seed=7, randomize_seed=False, size="512x512", num_images=1)
    args.update(kw)
    return client.predict(prompt=prompt, api_name="/generate_fast", **args)


def quality(client, prompt="a red fox", **kw):
    args = dict(negative_prompt="", steps=3, seed=7, randomize_seed=False, size="512x512", num_images=1)
    args.update(kw)
    return client.predict(prompt=prompt, api_name="/generate_quality", **args)


def test_endpoints_are_listed_in_the_api_page(client):
    assert {"/generate_fast", "/generate_quality"} <= set(client.view_api(print_info=False,
                                                                          return_format="dict")["named_endpoints"])


def test_fast_returns_pngs_of_the_requested_size_with_parameters(client):
    gallery, seed = fast(client, size="768x1344", num_images=2, seed=11, steps=2)
    assert seed == 11 and len(gallery) == 2
    for i, item in enumerate(gallery):
        image = Image.open(item["image"])
        assert image.format == "PNG" and image.size == (768, 1344)
        params, _ = sdxl_fast.parse_infotext(image.info["parameters"])
        assert (params.prompt, params.mode, params.steps, params.seed) == ("a red fox", "fast", 2, 11 + i)


def test_live_frames_come_inline_as_jpegs_with_their_parameters(served, tmp_path):
    """The live event's images as the browser gets them: in the event's one answer, as data: URLs of JPEGs
    (PNG encoding took most of the serving time) with their parameters in EXIF; no file is written."""
    from benchmarks.serving import Client as BrowserClient, live

    url, _ = served
    browser = BrowserClient(url)
    for prompt in ("a red circle", "a blue star"):
        _, output = browser.call("live_fast", live(prompt, "128x128"))
        (item,) = output["data"][0]
        head, _, data = item["image"]["url"].partition(",")
        assert head == "data:image/jpeg;base64" and item["image"]["path"] is None
        path = tmp_path / f"{prompt}.jpeg"
        path.write_bytes(base64.b64decode(data))
        assert Image.open(path).format == "JPEG" and Image.open(path).size == (128, 128)
        text = sdxl_fast.read_parameters(path)
        params, _ = sdxl_fast.parse_infotext(text)
        assert text == item["caption"] and (params.prompt, params.seed) == (prompt, 7)


def test_a_live_request_beyond_the_batchers_limit_says_the_server_is_busy(served, monkeypatch):
    import gradio as gr

    _, studio = served
    monkeypatch.setattr(studio.batcher, "max_waiting", 0)
    with pytest.raises(gr.Error, match="busy: 0 live requests are already waiting"):
        studio.live_fast(app.FAST, "a red fox", 1, 7, "128x128", 1, 0, 0, 0, 0, 0, 0)


def test_typists_waiting_together_share_batched_calls_and_each_gets_its_own_frame(served, monkeypatch):
    """live_fast from several handler threads at once, as Gradio calls it for several typists: the requests
    that wait while the model is busy run as one generate_many call per shape, each typist gets its own
    image back; Quality mode and empty prompts are left alone."""
    _, studio = served
    calls, generate_many, busy = [], app.generate_many, threading.Event()

    def slow_first(models, requests):
        calls.append(sorted({(p.prompt, p.width) for p in requests}))
        if len(calls) == 1:
            busy.wait(10)  # the others arrive meanwhile
        return generate_many(models, requests)

    monkeypatch.setattr(app, "generate_many", slow_first)
    typists = [(app.FAST, "a first prompt", "128x128"), (app.FAST, "a red circle", "128x128"),
               (app.FAST, "a blue star", "128x128"), (app.FAST, "a green cross", "64x64"),
               (app.QUALITY, "a quality prompt", "128x128"), (app.FAST, " ", "128x128")]
    results = {}

    def type_(i, mode, prompt, size):
        results[i] = studio.live_fast(mode, prompt, 1, 7 + i, size, 1, 0, 0, 0, 0, 0, 0)

    threads = [threading.Thread(target=type_, args=(i, *t)) for i, t in enumerate(typists)]
    threads[0].start()
    while not calls:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    while len(studio.batcher.waiting) < 3:
        time.sleep(0.01)
    busy.set()
    for t in threads:
        t.join(60)
    assert calls == [[("a first prompt", 128)], [("a blue star", 128), ("a red circle", 128)],
                     [("a green cross", 64)]]
    for i in range(4):
        frames, seed, for_history = results[i]
        assert frames == app.inline_gallery(for_history)
        (jpeg, caption), = for_history
        params, _ = sdxl_fast.parse_infotext(caption)
        assert (params.prompt, params.seed) == (typists[i][1], seed) == (typists[i][1], 7 + i)
        assert Image.open(io.BytesIO(jpeg)).size == (params.width, params.height)
    assert results[4] == results[5] == (app.gr.skip(),) * 3


def test_quality_returns_pngs_of_the_requested_size_with_parameters(client):
    gallery, seed = quality(client, size="640x384", steps=4, guidance_scale=3.0, refiner_switch=0.5)
    assert seed == 7 and len(gallery) == 1
    image = Image.open(gallery[0]["image"])
    assert image.size == (640, 384)
    params, names = sdxl_fast.parse_infotext(image.info["parameters"])
    assert (params.mode, params.steps, params.guidance_scale, params.refiner_switch) == ("quality", 4, 3.0, 0.5)
    assert "refiner" in names


def test_quality_step_cache_is_used_and_recorded(client):
    plain = Image.open(quality(client, steps=4, refiner_switch=0.5)[0][0]["image"])
    gallery, _ = quality(client, steps=4, refiner_switch=0.5, cache_interval=2)
    cached = Image.open(gallery[0]["image"])
    assert sdxl_fast.parse_infotext(cached.info["parameters"])[0].cache_interval == 2
    assert plain.tobytes() != cached.tobytes()


def test_randomized_seed_is_returned_and_used(client):
    gallery, seed = fast(client, randomize_seed=True)
    assert sdxl_fast.parse_infotext(Image.open(gallery[0]["image"]).info["parameters"])[0].seed == seed


@pytest.mark.parametrize("call, kwargs, message", [
    (fast, dict(steps=5), r"Steps \(steps\) must be a whole number from 1 to 4;"),
    (quality, dict(steps=101), "from 1 to 100"),
    (quality, dict(steps=0), "from 1 to 100"),
    (fast, dict(size="1004x1000"), "multiple of 8"),
    (quality, dict(size="8192x1024"), "from 64 to 4096"),
    (fast, dict(size="huge"), "Size .size. must be a size such as 1024x768"),
    (fast, dict(seed=-1), "Seed .seed. must be a whole number from 0 to 4294967295"),
    (quality, dict(seed=2**32), "Seed .seed. must be a whole number from 0 to 4294967295"),
    (fast, dict(crop_top=-8), r"Crop top \(crop_top\) must be a whole number from 0"),
])
def test_bad_input_gets_a_clear_error_and_the_next_request_succeeds(client, call, kwargs, message):
    with pytest.raises(AppError, match=message):
        call(client, **kwargs)
    gallery, _ = call(client)
    assert Image.open(gallery[0]["image"]).size == (512, 512)


def test_over_long_prompt_warns_and_still_generates(client):
    job = client.submit(prompt="a red fox " * 60, steps=1, seed=1, randomize_seed=False, size="512x512",
                        num_images=1, api_name="/generate_fast")
    gallery, _ = job.result()
    assert Image.open(gallery[0]["image"]).size == (512, 512)
    logs = []
    while not job.communicator.updates.empty():
        update = job.communicator.updates.get_nowait()
        if getattr(update, "log", None):
            logs.append(update.log)
    assert any(level == "warning" and "tokens" in text for text, level in logs), logs


@pytest.mark.parametrize("failure, message", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "ran out of memory"),
    (FloatingPointError("The VAE produced NaN/inf in fp32"), "NaN"),
    (RuntimeError("something broke"), "something broke"),
])
def test_a_failing_generation_is_reported_and_the_server_keeps_serving(client, monkeypatch, failure, message):
    real_generate = sdxl_fast.generate

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(sdxl_fast, "generate", real_generate)
        raise failure

    monkeypatch.setattr(sdxl_fast, "generate", fail_once)
    with pytest.raises(AppError, match=message):
        quality(client)
    gallery, _ = quality(client)
    assert Image.open(gallery[0]["image"]).size == (512, 512)


def test_a_full_queue_answers_busy_instead_of_hanging(tiny_models, monkeypatch):
    release, running = threading.Event(), threading.Event()
    real_run = app.Studio.run

    def held_run(self, params, callback=None):  # hold the one worker so requests pile up in the queue
        running.set()
        assert release.wait(60)
        return real_run(self, params, callback)

    monkeypatch.setattr(app.Studio, "run", held_run)
    with running_app(tiny_models, max_size=1) as (url, _):
        client = Client(url, verbose=False)
        first = client.submit(prompt="one", steps=1, seed=1, randomize_seed=False, size="512x512",
                              num_images=1, api_name="/generate_fast")
        assert running.wait(60)
        second = client.submit(prompt="two", steps=1, seed=1, randomize_seed=False, size="512x512",
                               num_images=1, api_name="/generate_fast")
        for _ in range(1200):  # until the second request holds the queue's one place (bounded, ~60 s)
            if not second.status().code < Status.IN_QUEUE:
                break
            threading.Event().wait(0.05)
        assert second.status().code == Status.IN_QUEUE
        with pytest.raises(Exception, match="Queue is full! Please try again"):
            client.predict(prompt="three", steps=1, seed=1, randomize_seed=False, size="512x512", num_images=1,
                           api_name="/generate_fast")
        release.set()
        assert len(first.result(timeout=120)[0]) == 1 and len(second.result(timeout=120)[0]) == 1


def test_missing_models_give_a_readable_error(tiny_models):
    why = "Could not load the fast model from 'nowhere': no such local folder."
    models = sdxl_fast.Models(device=tiny_models.device, dtype=tiny_models.dtype, quality=tiny_models.quality)
    with running_app(models, load_errors={"fast": why}) as (url, _):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="no such local folder"):
            fast(client)
        gallery, _ = quality(client)  # the other mode still works
        assert Image.open(gallery[0]["image"]).size == (512, 512)


def test_the_size_menu_offers_and_defaults_to_the_models_own_size(tiny_models):
    studio = app.Studio(tiny_models)
    assert app.size_choices(studio, app.FAST)[1] == "512x512" and app.size_choices(studio, app.QUALITY)[1] == "1024x1024"
    tiny_models.fast.student.register_to_config(sample_size=16)  # the demo family's 128²
    try:
        sizes, default = app.size_choices(studio, app.FAST)
    finally:
        tiny_models.fast.student.register_to_config(sample_size=64)
    assert default == "128x128" and sizes[0] == ("128×128 (1:1) the models' own", "128x128")
    assert sizes[1] == ("512×512 (1:1)", "512x512")  # SDXL-Turbo's size is not these models' own
    assert app.size_choices(studio, app.QUALITY)[1] == "1024x1024"  # the base is SDXL-sized
