"""`python app.py` as users start it: flags and GRADIO_* env vars, model env vars, and no weights at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client
from PIL import Image

from test_app_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


@pytest.fixture
def launch(tmp_path):
    """Start app.py with extra env and args; return (url, log path) once it serves its config."""
    started = []

    def start(args=(), env=None, port=None):
        log = tmp_path / f"app-{len(started)}.log"
        full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT)
        started.append(proc)
        url = f"http://127.0.0.1:{port}/"
        for _ in range(1200):  # up to ~5 minutes on a busy machine; leaves early when the app dies
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()}")
            if _get(url + "config"):
                return url, log
            time.sleep(0.25)
        pytest.fail(f"app.py did not come up:\n{log.read_text()}")

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_starts_on_models_from_env_vars_and_serves_the_api(launch, tiny_family):
    port = free_port()
    env = {"SDXL_FAST_BASE": str(tiny_family["base"]), "SDXL_FAST_REFINER": str(tiny_family["refiner"]),
           "SDXL_FAST_FAST": str(tiny_family["student"]), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port)}
    url, _ = launch(["--device", "cpu", "--dtype", "fp32"], env, port)
    gallery, seed = Client(url, verbose=False).predict(
        prompt="a red fox", steps=1, seed=5, randomize_seed=False, size="512x512", num_images=1,
        api_name="/generate_fast")
    assert seed == 5 and Image.open(gallery[0]["image"]).size == (512, 512)


def test_without_weights_it_starts_and_says_so_in_the_page_and_the_log(launch, tmp_path):
    port = free_port()
    missing = str(tmp_path / "no-such-model")
    url, log = launch(["--host", "127.0.0.1", "--port", str(port), "--base", missing, "--refiner", "none",
                       "--fast", missing], port=port)
    page = json.dumps(json.loads(_get(url + "config")))
    assert "Fast mode unavailable" in page and "Quality mode unavailable" in page
    assert "no such local folder" in page
    text = log.read_text()
    assert "Fast mode unavailable" in text and "no such local folder" in text


def test_fp8_flag_loads_with_fp8_asked_for_and_skipped_on_cpu(tiny_sources, caplog):
    import logging

    import app

    assert app.parse_args(["--fp8"]).fp8 and not app.parse_args([]).fp8
    with caplog.at_level(logging.INFO, logger="sdxl_fast.accel.options"):
        studio = app.load_studio(tiny_sources, device="cpu", dtype="fp32", fp8=True)
    assert studio.models.fast is not None and studio.models.quality is not None
    assert "fp8: skipped on cpu" in caplog.text


def test_modes_flag_loads_only_the_paths_asked_for_and_the_page_says_why_the_other_is_missing(tiny_sources, capsys):
    import app

    assert app.parse_args([]).modes == ("fast", "quality")
    assert app.parse_args(["--modes", " Fast,fast "]).modes == ("fast",)
    with pytest.raises(SystemExit):
        app.parse_args(["--modes", "fast,slow"])
    assert "argument --modes: expected fast, quality or fast,quality, got 'fast,slow'" in capsys.readouterr().err

    studio = app.load_studio(tiny_sources, device="cpu", dtype="fp32", modes=("fast",))
    assert studio.models.fast is not None and studio.models.quality is None
    assert studio.unavailable("fast") is None
    assert studio.unavailable("quality") == "This server was started with --modes fast."
    page = app.build_demo(studio).config
    assert any("Quality mode unavailable" in str(c.get("props", {}).get("value", "")) for c in page["components"])
    studio.run(app.sdxl_fast.GenerationParams("a red circle", mode="fast", seed=1, width=64, height=64))


def test_start_up_records_the_first_shape_before_serving_and_the_rest_between_requests(tiny_models, monkeypatch):
    """--compile off: the first Fast shape runs before start_serving returns; the other Fast step counts in a
    thread, each holding the studio's GPU slot, so a request never shares the GPU with a recording; a
    request waiting for the slot goes before the next shape, which waits for the GPU to be idle."""
    import threading

    import app
    import sdxl_fast

    studio = app.Studio(tiny_models)
    calls, recording, done = [], threading.Event(), threading.Event()
    started, ended = [], []

    def generate(models, params):
        calls.append((params.mode, params.steps, params.num_images, threading.current_thread().name,
                      studio.slots._value))  # 0: the only slot is held
        started.append(time.monotonic())
        if len(calls) == 2:  # the first shape recorded in the background: a request comes meanwhile
            recording.set()
            while not studio.waiting_for_gpu:
                time.sleep(0.01)
        if params.steps == 4:
            done.set()

    def request():  # a user's request comes while the second shape records, and waits for the slot
        recording.wait(10)
        with studio.gpu():
            calls.append("request")
        ended.append(time.monotonic())

    monkeypatch.setattr(sdxl_fast, "generate", generate)
    user = threading.Thread(target=request)
    user.start()
    app.start_serving(studio, "off")
    assert calls[0] == ("fast", 1, 1, threading.current_thread().name, 1)
    assert done.wait(30)
    user.join(10)
    warm = "sdxl-fast-warm-up"
    assert calls[1:] == [("fast", 2, 1, warm, 0), "request", ("fast", 3, 1, warm, 0), ("fast", 4, 1, warm, 0)]
    assert started[2] - ended[0] >= app.WARM_UP_IDLE_S  # the next shape waited for an idle GPU


def test_gradio_events_import_no_pyplot_where_matplotlib_is_installed(tmp_path, monkeypatch):
    """Gradio reads and sets matplotlib's backend in every event: where matplotlib is installed the app sets
    it to agg before serving, so no event imports pyplot (nor builds its font cache); where it is not,
    `import matplotlib` fails at once instead of searching the path."""
    from gradio.utils import MatplotlibBackendMananger

    import app

    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "matplotlib").exists()])
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        app.lighten_gradio_events()
        assert sys.modules["matplotlib"] is None
        with pytest.raises(ImportError):
            import matplotlib  # noqa: F401
    finally:
        sys.modules.pop("matplotlib", None)

    # A stand-in package (the real one may not be installed here) that resolves an unset backend as
    # matplotlib does: through pyplot.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text(
        "BACKEND = None\n\n"
        "def use(name):\n    global BACKEND\n    BACKEND = name\n\n"
        "def get_backend():\n    if BACKEND is None:\n        import matplotlib.pyplot\n        use('auto')\n"
        "    return BACKEND\n")
    (tmp_path / "matplotlib" / "pyplot.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        app.lighten_gradio_events()
        with MatplotlibBackendMananger():  # what Gradio does around an event
            pass
        assert "matplotlib.pyplot" not in sys.modules and sys.modules["matplotlib"].get_backend() == "agg"
    finally:  # gradio's later events in this process must not find the stand-in
        sys.modules.pop("matplotlib", None)
        sys.modules.pop("matplotlib.pyplot", None)


@pytest.mark.parametrize("env, rebuilt", [(None, False), ("1", True)])
def test_gradio_rebuilds_its_event_table_every_1000_events_not_after_each(tiny_models, monkeypatch, env, rebuilt):
    """By default Gradio rebuilds a pandas table of up to 10,000 past events after every event (2 ms per event
    after 300 events, 10 ms after 10,000 on a 2-core CPU); the app has it rebuilt every 1,000 events, and
    GRADIO_ANALYTICS_CACHE_FREQUENCY set by the deployer still decides."""
    import app
    from gradio import queueing

    from test_app_helpers import running_app

    monkeypatch.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", env or "")  # restored afterwards, set or not
    if env is None:
        monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY")
    tables = []
    build = queueing.Queue._get_df
    monkeypatch.setattr(queueing.Queue, "_get_df", staticmethod(lambda records: tables.append(len(records))
                                                                 or build(records)))
    app.lighten_gradio_events()
    with running_app(tiny_models) as (url, _):
        client = Client(url, verbose=False)
        for seed in range(3):
            client.predict(prompt="a red fox", steps=1, seed=seed, randomize_seed=False, size="128x128",
                           num_images=1, api_name="/generate_fast")
    assert bool(tables) == rebuilt


def test_quality_loaded_later_is_reported_as_loading_then_served_with_the_fast_encoders_and_vae(
        tiny_sources, caplog, tmp_path):
    """On a GPU the app serves Fast while Quality's UNets are read (app.main's fast_first): until then a Quality
    request is told it is loading, and afterwards Quality runs on the text encoders and VAE Fast already uses.
    The serving benchmark reads when from the log."""
    import logging

    import gradio as gr

    import app
    import sdxl_fast
    from benchmarks.serving import App

    studio = app.load_studio(tiny_sources, device="cpu", dtype="fp32", later=("quality",))
    assert studio.models.quality is None and studio.status()["loading"] == ["quality"]
    assert studio.unavailable("quality") == "The Quality models are still loading; try again in a few seconds."
    quality = sdxl_fast.GenerationParams("a red circle", mode="quality", steps=2, seed=1, width=64, height=64)
    with pytest.raises(gr.Error, match="still loading"):
        studio.run(quality)
    studio.run(sdxl_fast.GenerationParams("a red circle", mode="fast", seed=1, width=64, height=64))

    thread = studio.loading["quality"]
    with caplog.at_level(logging.INFO, logger="sdxl_fast.app"):
        studio.start_loading()
        thread.join(120)
    assert studio.unavailable("quality") is None and studio.status()["loading"] == []
    bench_view = App.__new__(App)
    bench_view.log = tmp_path / "app.log"
    bench_view.log.write_text(caplog.text)
    ready = bench_view.quality_ready(serves_quality=True, timeout=0)["quality_ready_s"]
    assert 0 < ready <= time.monotonic() - app.STARTED + 0.05  # logged to 0.1 s
    fast, q = studio.models.fast, studio.models.quality
    assert q.vae is fast.vae and q.encoders.text_encoder_2 is fast.encoders.text_encoder_2
    images, _ = studio.run(quality)
    assert images[0].size == (64, 64)


def test_a_quality_model_that_fails_to_load_later_says_why(tiny_sources, tmp_path):
    import dataclasses

    import app

    sources = dataclasses.replace(tiny_sources, refiner=str(tmp_path / "no-such-refiner"))
    studio = app.load_studio(sources, device="cpu", dtype="fp32", later=("quality",))
    thread = studio.loading["quality"]
    studio.start_loading()
    thread.join(120)
    assert "no such local folder" in studio.unavailable("quality")
    assert studio.unavailable("fast") is None
