"""What the served endpoints answer to bad input, requests over a limit, the time budget and Stop: through
gradio_client (and raw HTTP for NaN and inf, which gradio_client refuses to send) on the tiny models."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import app
import sdxl_fast
from sdxl_fast.serving import requests
from sdxl_fast.serving.limits import Limits
from test_app_helpers import running_app

FAST = dict(prompt="a red fox", steps=1, seed=7, randomize_seed=False, size="512x512", num_images=1, orig_w=0,
            orig_h=0, crop_top=0, crop_left=0, target_w=0, target_h=0)
QUALITY = dict(FAST, negative_prompt="", steps=2, guidance_scale=5.0, refiner_switch=0.8, aesthetic_score=6.0,
               negative_aesthetic_score=2.5, cache_interval=1)
ENDPOINTS = {"/generate_fast": (FAST, requests.FAST_FIELDS), "/generate_quality": (QUALITY, requests.QUALITY_FIELDS)}
NUMERIC = ("steps", "seed", "num_images", *requests.MICRO, "guidance_scale", "refiner_switch", "aesthetic_score",
           "negative_aesthetic_score", "cache_interval")
# Not JSON: gradio_client will not send these, curl and other clients do; they go as raw HTTP.
NOT_JSON = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
BAD = {**NOT_JSON, "huge": 1e300, "huge int": 10**30, "text": "abc", "None": None}




def call_raw(url: str, endpoint: str, args: dict) -> str:
    """POST to /gradio_api/call/<endpoint> with Python's JSON (NaN and Infinity allowed); the error message."""
    fields = ENDPOINTS[endpoint][1]
    body = json.dumps({"data": [args[name] for name in fields]}).encode()
    post = urllib.request.Request(f"{url}gradio_api/call{endpoint}", data=body,
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call{endpoint}/{event}", timeout=120) as response:
        text = response.read().decode()
    assert "event: error" in text, text
    data = text.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0]
    message = json.loads(data)["error"]
    assert message, f"an error without a message: {text}"
    return message


def error_message(url: str, client: Client, endpoint: str, args: dict) -> str:
    if any(isinstance(v, float) and not math.isfinite(v) for v in args.values()):
        return call_raw(url, endpoint, args)
    with pytest.raises(AppError) as caught:
        client.predict(api_name=endpoint, **args)
    return str(caught.value)


def bad_cases():
    for endpoint, (_, fields) in ENDPOINTS.items():
        for field in (f for f in NUMERIC if f in fields):
            for kind, value in BAD.items():
                if field in requests.MICRO and value is None:
                    continue  # empty micro-conditioning is "same as the output size" (issue 29)
                yield pytest.param(endpoint, field, value, id=f"{endpoint[1:]}-{field}-{kind}")
        for value in ("<img src=x>", "1024x", "huge", "1004x1000", "8192x1024", None):
            yield pytest.param(endpoint, "size", value, id=f"{endpoint[1:]}-size-{value}")


@pytest.mark.parametrize("endpoint, field, value", list(bad_cases()))
def test_every_bad_input_gets_an_error_naming_its_field(served, client, endpoint, field, value):
    message = error_message(served[0], client, endpoint, dict(ENDPOINTS[endpoint][0], **{field: value}))
    assert message.startswith(f"{requests.LABELS[field]} ({field}) must be "), message
    assert " from " in message or "such as" in message, message  # says what is allowed
    assert "<" not in message


def test_the_next_request_after_bad_ones_succeeds(client):
    for endpoint, (args, _) in ENDPOINTS.items():
        with pytest.raises(AppError):
            client.predict(api_name=endpoint, **dict(args, steps="many"))
        gallery, seed = client.predict(api_name=endpoint, **args)
        assert seed == 7 and Image.open(gallery[0]["image"]).size == (512, 512)


@pytest.mark.parametrize("field", ["size", "steps", "seed", "guidance_scale", "prompt", "randomize_seed"])
def test_no_user_text_is_rendered_as_html_in_messages(served, client, field):
    value = {"prompt": 12}.get(field, '<img src=x onerror="alert(1)">')
    message = error_message(served[0], client, "/generate_quality", dict(QUALITY, **{field: value}))
    assert "<" not in message and ">" not in message
    assert field != "prompt" and "&lt;img src=x" in message or field == "prompt"


def test_api_defaults_equal_the_page_defaults(served, client):
    config = json.loads(urllib.request.urlopen(served[0] + "config", timeout=30).read())
    page = {c["id"]: c["props"].get("value") for c in config["components"]}
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    demo_fns = {d["api_name"]: d for d in config["dependencies"] if d.get("api_name")}
    for endpoint in ENDPOINTS:
        params = info[endpoint]["parameters"]
        inputs = demo_fns[endpoint[1:]]["inputs"]
        assert len(params) == len(inputs)
        for parameter, component in zip(params, inputs):
            if page[component] is None:  # nothing in the page: only the prompt, which the API requires
                assert parameter["parameter_name"] == "prompt" and not parameter["parameter_has_default"]
            else:
                assert parameter["parameter_has_default"], parameter
                assert parameter["parameter_default"] == page[component], parameter
    negative = next(p for p in info["/generate_quality"]["parameters"] if p["parameter_name"] == "negative_prompt")
    assert negative["parameter_default"] == ""


def test_generate_quality_is_callable_without_a_negative_prompt(client):
    gallery, seed = client.predict(prompt="a red fox", steps=2, seed=3, randomize_seed=False, size="512x512",
                                   api_name="/generate_quality")
    params, _ = sdxl_fast.parse_infotext(Image.open(gallery[0]["image"]).info["parameters"])
    assert (seed, params.negative_prompt, params.guidance_scale, params.refiner_switch) == (3, "", 5.0, 0.8)


# -- limits, time budget, Stop ------------------------------------------------------------------------------

def test_a_request_over_a_limit_names_the_limit_and_its_flag(tiny_models):
    limits = Limits(fast_pixels=512 * 512, quality_pixels=2 * 512 * 512)
    with running_app(tiny_models, limits=limits) as (url, _):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match=r"asks for 2 images of 512x512 .* at most 0.3 megapixels .*"
                                           r"--max-fast-pixels or SDXL_FAST_MAX_FAST_PIXELS"):
            client.predict(api_name="/generate_fast", **dict(FAST, num_images=2))
        with pytest.raises(AppError, match="--max-quality-pixels"):
            client.predict(api_name="/generate_quality", **dict(QUALITY, size="1024x1024"))
        gallery, _ = client.predict(api_name="/generate_quality", **dict(QUALITY, num_images=2))
        assert len(gallery) == 2


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_request_over_the_time_budget_stops_with_a_message_naming_the_budget(tiny_models, endpoint):
    limits = Limits(time_budget=1e-6, realtime_pixels=256 * 256)  # Fast at 512² runs with a step callback
    with running_app(tiny_models, limits=limits) as (url, _):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match=r"Stopped after .* at step 1 of 2: this server's time budget is 1e-06 s "
                                           r"per request.*--time-budget or SDXL_FAST_TIME_BUDGET"):
            client.predict(api_name=endpoint, **dict(ENDPOINTS[endpoint][0], steps=2))


def test_fast_beyond_the_real_time_size_can_be_stopped_and_the_real_time_path_has_no_callback(tiny_models,
                                                                                                monkeypatch):
    studio = app.Studio(tiny_models, limits=Limits(realtime_pixels=512 * 512))
    request = SimpleNamespace(session_hash="typist")
    callbacks, real_generate = [], sdxl_fast.generate

    def generate(models, params, callback=None):
        callbacks.append(callback)
        if params.num_images > 1:
            studio.request_stop(request)  # Stop pressed while this one runs
        return real_generate(models, params, callback)

    monkeypatch.setattr(sdxl_fast, "generate", generate)
    args = [FAST[name] for name in requests.FAST_FIELDS]
    gallery, seed = studio.generate_fast(*args, request=request)  # 512², within the real-time size
    assert len(gallery) == 1 and callbacks == [None]
    stopped = app.generations["stopped"]
    args[requests.FAST_FIELDS.index("num_images")] = 2
    assert studio.generate_fast(*args, request=request) == (gr.skip(), gr.skip())
    assert callbacks[-1] is not None and app.generations["stopped"] == stopped + 1
    assert not studio._stop_flags  # released
    gallery, _ = studio.generate_fast(*args[:5], 1, *args[6:], request=request)  # and the next one runs
    assert len(gallery) == 1


def test_served_files_are_deleted_once_old(tiny_models):
    with running_app(tiny_models, delete_cache=(1, 1)) as (url, _):
        client = Client(url, verbose=False, download_files=False)
        gallery, _ = client.predict(api_name="/generate_fast", **FAST)
        served = Path(gallery[0]["image"]["path"])
        assert served.exists()
        for _ in range(100):  # within ~10 s: checked every second, deleted once a second old
            if not served.exists():
                break
            time.sleep(0.1)
        assert not served.exists()


def test_the_delete_cache_flag_reaches_the_blocks(monkeypatch):
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.setdefault("delete_cache", self.delete_cache))
    monkeypatch.setattr(app, "load_studio", lambda *a, **k: app.Studio(None, {"fast": "-", "quality": "-"}))
    app.main(["--delete-cache-after", "120", "--max-fast-pixels", "4x512x512", "--base", "x", "--fast", "x",
              "--refiner", "none"])
    assert seen["delete_cache"] == (60, 120)
