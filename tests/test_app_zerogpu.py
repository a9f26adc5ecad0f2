"""ZeroGPU with the real `spaces` package (installed from PyPI), as far as it runs off a Space.

Off ZeroGPU `spaces.GPU(fn)` is `fn` itself. With SPACES_ZERO_GPU=true the package patches torch at import
(`.to("cuda")` keeps the weights on the CPU, `torch.cuda.is_available()` says True) and decorates for real; only
scheduling a GPU needs the Space's device API, so that one call (`spaces.zero.client.schedule`) is replaced by
one that records the duration asked for. That part runs in a subprocess: the patch is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spaces

import app
from sdxl_fast.serving import zerogpu

ROOT = Path(__file__).resolve().parent.parent

# Run in a subprocess with SPACES_ZERO_GPU=true: app.main on the demo models with device "cuda" (which the patched
# torch accepts with no GPU), launch replaced by a stub, then the wrapped handlers called as Gradio would.
ZERO_GPU_SCRIPT = r'''
import json, sys
import gradio as gr
import app
import spaces.zero.client, spaces.zero.decorator
from sdxl_fast import accel
from sdxl_fast.accel.cuda_graphs import CudaGraphs
from sdxl_fast.serving import zerogpu

warmups, scheduled, launched = [], [], {}
app.accel.warmup = lambda models: warmups.append(1)
gr.Blocks.launch = lambda self, **kw: launched.setdefault("demo", self)

class Scheduled(Exception):
    pass

def schedule(task_id, request=None, duration=None, gpu_size=None, **kw):
    scheduled.append(duration.total_seconds())
    raise Scheduled()  # the GPU itself exists only on a Space

spaces.zero.client.schedule = schedule
app.main(["--preset", "demo", "--device", "cuda", "--dtype", "fp32"])
demo, studio = launched["demo"], None
handlers = {fn.api_name: fn.fn for fn in demo.fns.values()}
studio = handlers["generate_fast"].__wrapped__.__self__
fast = ["a red circle", 1, 7, False, "512x512", 1, 0, 0, 0, 0, 0, 0]
quality = ["a red circle", "", 30, 7, False, "1024x1024", 5.0, 0.8, 2, 0, 0, 0, 0, 0, 0, 6.0, 2.5, 1]
out = {"active": zerogpu.active(), "warmups": len(warmups),
       "wrapped": sorted(name for name, fn in handlers.items() if hasattr(fn, "zerogpu")),
       "decorated": len(spaces.zero.decorator.decorated_cache),
       "compiled": any(getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
                       for m in (studio.models.fast.student, studio.models.quality.base)),
       "graphs": isinstance(getattr(studio.models.runner, "graphs", None), CudaGraphs),
       "device": str(studio.models.device), "errors": []}
for name, args in (("generate_fast", fast), ("generate_quality", quality), ("live_fast", ["Fast", *fast[:3], *fast[4:]])):
    try:
        result = handlers[name](*args)
        if name == "generate_quality":
            next(result)
    except Scheduled:
        pass
# a bad request fails while its duration is computed, before any GPU is scheduled
for name, args in (("generate_fast", fast[:1] + ["nan"] + fast[2:]), ("generate_quality", quality[:5] + ["<b>1x</b>"] + quality[6:])):
    try:
        result = handlers[name](*args)
        if name == "generate_quality":
            next(result)
    except gr.Error as e:
        out["errors"].append(str(e.message))
out["scheduled"] = scheduled
print("RESULT " + json.dumps(out))
'''


def test_off_zerogpu_the_real_package_leaves_the_handlers_as_they_are():
    assert not spaces.config.Config.zero_gpu and not zerogpu.active()
    studio = app.Studio(None, {"fast": "no weights"})
    for handler in (studio.live_fast, studio.generate_fast, studio.generate_quality):
        assert app.gpu(handler) == handler  # spaces.GPU off ZeroGPU returns the function itself
    assert app.gpu(len) is len


def test_without_the_package_the_handlers_are_plain(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    assert zerogpu.spaces_module() is None and not zerogpu.active()
    studio = app.Studio(None)
    assert app.gpu(studio.generate_fast) == studio.generate_fast


@pytest.fixture(scope="module")
def on_zerogpu():
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9",
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    for var in ("SDXL_FAST_PRESET", "SDXL_FAST_BASE", "SDXL_FAST_REFINER", "SDXL_FAST_FAST"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-c", ZERO_GPU_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):]), done.stderr


def test_on_zerogpu_the_handlers_are_decorated_by_spaces(on_zerogpu):
    result, _ = on_zerogpu
    assert result["active"] and result["device"] == "cuda"
    assert result["wrapped"] == ["generate_fast", "generate_quality", "live_fast"]
    assert result["decorated"] == 6  # spaces caches each handler and its decorated form


def test_on_zerogpu_nothing_runs_on_the_gpu_at_start_up(on_zerogpu):
    result, log = on_zerogpu
    assert result["warmups"] == 0 and not result["compiled"] and not result["graphs"]
    assert "ZeroGPU: compile, cuda_graphs off" in log


def test_on_zerogpu_each_request_asks_for_its_own_duration(on_zerogpu):
    result, _ = on_zerogpu
    fast, quality, live = result["scheduled"]
    assert fast == live == zerogpu.START_SECONDS + 1  # 1 step of 512²
    assert quality == 13  # 5 s + 2 images of 1024² x (30 steps x 0.12 s + 0.2 s decode), rounded up


def test_on_zerogpu_a_bad_request_fails_before_a_gpu_is_scheduled(on_zerogpu):
    result, _ = on_zerogpu
    assert len(result["scheduled"]) == 3  # only the good requests
    assert result["errors"][0].startswith("Steps (steps) must be a whole number")
    assert result["errors"][1].startswith("Size (size) must be") and "&lt;b&gt;" in result["errors"][1]
