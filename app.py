"""sdxl-fast web app: Quality (base + refiner) and Fast (few-step student) text-to-image in one Gradio page.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--preset demo | --base ... --refiner ... --fast ...]

This file is UI and event wiring only; every model call goes through `sdxl_fast`. In Fast mode the image
follows the prompt as it is typed: the live event uses trigger_mode="always_last", so the browser keeps at
most one request pending and replaces it with the newest text instead of queueing one per keystroke.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports, which are much of a restart's time (torch, diffusers, gradio)

try:  # first: on a ZeroGPU Space, importing `spaces` patches torch before anything touches CUDA
    import spaces  # noqa: F401
except ImportError:  # anywhere else the models sit on their device and the handlers run as they are
    pass

import argparse
import base64
import importlib.util
import inspect
import logging
import os
import queue
import random
import sys
import threading
import uuid
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import gradio as gr
import torch

import sdxl_fast
from sdxl_fast import accel, metadata
from sdxl_fast.cli import add_model_arguments
from sdxl_fast.models import pick_device_dtype
from sdxl_fast.params import (DEFAULT_AESTHETIC_SCORE, DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_AESTHETIC_SCORE,
                              DEFAULT_REFINER_SWITCH, MAX_SEED, MODES, SDXL_BUCKETS, bucket_label)
from sdxl_fast.pipeline.decoding import latent_preview
from sdxl_fast.pipeline.generate import batch_key, generate_many
from sdxl_fast.accel.compile import compiling
from sdxl_fast.accel.cuda_graphs import drop_graphs
from sdxl_fast.serving.compiler import BackgroundCompiler, load_cache, save_cache
from sdxl_fast.serving.packages import FastPackages
from sdxl_fast.serving import limits as serving_limits
from sdxl_fast.serving import requests, zerogpu
from sdxl_fast.serving.batcher import Batcher, Busy
from sdxl_fast.serving.limits import Limits, LimitError, OverBudget


def gpu(handler):
    """On a ZeroGPU Space, `handler` through `spaces.GPU` with a duration estimated per request (from mode,
    steps, size and images; a bad request fails there, before a GPU is scheduled); elsewhere `handler` itself."""
    studio = getattr(handler, "__self__", None)
    duration = partial(studio.gpu_seconds, handler.__name__) if isinstance(studio, Studio) else None
    return zerogpu.wrap(handler, duration)

log = logging.getLogger("sdxl_fast.app")

FAST, QUALITY = "Fast", "Quality"
QUALITY_MAX_STEPS = requests.QUALITY_MAX_STEPS
FAST_MAX_STEPS = requests.MAX_STEPS["fast"]
MAX_IMAGES_UI = requests.MAX_IMAGES
LIVE_BATCH = 16  # images that the keystrokes of several typists may share in one batched Fast call
LIVE_BATCHES = (1, 2, 4, 8, LIVE_BATCH)  # the batch sizes of live calls (sdxl_fast.serving.batcher)
# The start-up warm-up records each remaining shape only after the GPU has had no request for this long: a
# recording holds the GPU for up to a second or so (an H100 at 16 images), and a typist's next keystroke
# comes within a fraction of one.
WARM_UP_IDLE_S = 1.0
# The session's gallery is sent whole with each Generate click, and Gradio checks each of its files each
# time (about 1.3 ms per entry on a 2-core CPU): a cap keeps a long session's clicks as cheap as a new one's.
HISTORY_SIZE = 32
QUALITY_SIZES = [(bucket_label(w, h), f"{w}x{h}") for w, h in SDXL_BUCKETS]
FAST_SIZES = [(bucket_label(512, 512), "512x512")] + QUALITY_SIZES
DEFAULT_SIZE = {FAST: "512x512", QUALITY: "1024x1024"}
EXAMPLES = [
    "a red fox in fresh snow, golden hour, 85mm photo",
    "an isometric cutaway of a tiny bakery, soft pastel colours",
    "a lighthouse on a cliff during a storm, oil painting",
    "portrait of an astronaut cat, studio lighting",
]
# The demo family only knows its procedural shapes (docs/DEMO_MODELS.md), so it gets captions of its own.
DEMO_EXAMPLES = [
    "a red circle",
    "a large green star",
    "two blue squares on a yellow background",
    "a small purple ring at the top left on a white background",
]
DEMO_NOTE = ("Running the small **demo models** shipped with sdxl-fast: SDXL's architecture, trained on simple "
             "shapes at 128² (the default where SDXL's weights are not in the Hugging Face cache). "
             "`python app.py --preset sdxl` downloads SDXL.")

# How many generations started, per mode, and how many Quality runs Stop aborted. Tests read it to check
# that typing fast produces far fewer generations than keystrokes and that Stop really ends the work.
generations = Counter()
_generations_lock = threading.Lock()


class Stopped(Exception):
    """Raised from the step callback to abort a generation when the user presses Stop."""


class Studio:
    """The loaded models (or why they could not be loaded), the limits a request must keep to, and the
    generation calls the UI makes. `limits` defaults to none (app.py's main() sets the device's, see
    sdxl_fast.serving.limits); `concurrency` generations may run at once (`--concurrency`)."""

    def __init__(self, models: sdxl_fast.Models | None, load_errors: dict[str, str] | None = None,
                 limits: Limits | None = None, concurrency: int = 1):
        self.models = models
        self.load_errors = load_errors or {}
        self.limits = limits or Limits()
        self.concurrency = concurrency
        # Held by every generation (`self.gpu()`): the live batches run in a thread of their own, beside
        # Gradio's "gpu" group, and the start-up warm-up in another.
        self.slots = threading.BoundedSemaphore(concurrency)
        self.waiting_for_gpu, self._waiting_lock = 0, threading.Lock()
        self.gpu_used_at = 0.0  # time.monotonic() when a request last let go of the GPU
        # The live keystrokes of all typists, batched (on ZeroGPU each is a GPU call of its own instead).
        self.batcher = Batcher(self._live_batch, LIVE_BATCH) if models is not None and not zerogpu.active() else None
        self._stop_flags: dict[str | None, threading.Event] = {}
        # Compiles each new (mode, size, images) in the background while it is served eagerly (GPU only).
        self.compiler: BackgroundCompiler | None = None
        # The Fast UNet and VAE decoder compiled ahead of time for every shape (--compile aot).
        self.packages: FastPackages | None = None
        # Modes whose models are read while the others serve (load_studio's `later`): mode -> their loading, a
        # thread not started yet or running. Their requests are told to come back in a moment.
        self.loading: dict[str, threading.Thread] = {}
        # (shape, call) whose CUDA graphs a thread records between requests (`record_later`); the shapes queued.
        self._to_record: queue.Queue = queue.Queue()
        self._recording: set[tuple] = set()
        self._record_lock = threading.Lock()
        self._recorder: threading.Thread | None = None

    def prepare(self, params: sdxl_fast.GenerationParams, notify: bool = True) -> None:
        """Queue this request's shape for compiling if it is new, and tell the user why it may be slower."""
        if self.compiler is None:
            return
        if self.compiler.request(params) == "queued" and notify:
            gr.Info(f"First request at {params.width}×{params.height} × {params.num_images}: it runs uncompiled "
                    "(a little slower) while a faster version is prepared in the background.")

    def status(self) -> dict:
        """Which shapes run compiled, are being compiled, or wait for it."""
        compiled = self.compiler.status() if self.compiler is not None else {"compiled": [], "compiling": [],
                                                                               "queued": [], "failed": {}}
        packages = {"fast_ahead_of_time": self.packages.states} if self.packages is not None else {}
        return {"models": {mode: self.unavailable(mode) is None for mode in MODES}, "loading": list(self.loading),
                **compiled, **packages}

    def unavailable(self, mode: str) -> str | None:
        if mode in self.loading:
            return f"The {mode.title()} models are still loading; try again in a few seconds."
        loaded = self.models is not None and getattr(self.models, mode) is not None
        return None if loaded else self.load_errors.get(mode, f"The {mode} models are not loaded.")

    def start_loading(self) -> None:
        """Start reading the models of the modes load_studio left for later, each in a thread of its own."""
        for mode, thread in list(self.loading.items()):  # a thread removes its entry when done
            if thread.ident is None:
                log.info("%s models are read in the background", mode.title())
                thread.start()

    def _load_later(self, mode: str, load: Callable[[], sdxl_fast.Models],
                    options: accel.Acceleration | None) -> None:
        """`mode`'s models, read and sped up beside the served ones, then attached to them. The weights move to
        the GPU tensor by tensor, between the requests' kernels; only the speed-ups hold the GPU slot."""
        started = time.monotonic()
        try:
            later = load()
            with self.gpu():
                if options is not None:
                    accel.apply(later, options, leave=self.models)  # the served models' modules stay as they are
                if self.models is None:  # nothing else loaded
                    self.models = later
                else:
                    setattr(self.models, mode, getattr(later, mode))
            log.info("%s models ready %.1f s after the start (%.1f s in the background)", mode.title(),
                     time.monotonic() - STARTED, time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 - reported in the page and the log; the other mode goes on
            self.load_errors[mode] = str(e)
            log.error("%s mode unavailable: %s", mode.title(), e)
        finally:
            del self.loading[mode]

    def params(self, mode: str, raw: dict) -> sdxl_fast.GenerationParams:
        """A request's raw values, keyed by API parameter name -> resolved
        parameters within this server's limits. A bad field or a request over a limit becomes a gr.Error that
        names it (sdxl_fast.serving.requests, .limits); no user text reaches the message unescaped."""
        try:
            params = requests.parse(mode, raw).params.resolved()
            self.limits.check(params)
        except (requests.FieldError, LimitError) as e:  # their messages are escaped already
            raise gr.Error(str(e)) from e
        except ValueError as e:
            raise gr.Error(requests.escape(str(e))) from e
        return params

    def run(self, params: sdxl_fast.GenerationParams, callback=None) -> tuple[list, list[str]]:
        """Generate; return (images, warning texts). Every failure becomes a gr.Error with a readable message,
        so the UI shows it and the worker goes on to the next request."""
        reason = self.unavailable(params.mode)
        if reason:
            raise gr.Error(requests.escape(reason))
        self.prepare(params)
        with _generations_lock:
            generations[params.mode] += 1
        log.info("generation %d (%s): %d steps, %dx%d x %d, seed %d, prompt %r", generations[params.mode],
                 params.mode, params.steps, params.width, params.height, params.num_images, params.seed,
                 params.prompt[:60])
        # catch_warnings swaps process-wide state; it is safe because generations run one at a time (one slot
        # unless --concurrency says otherwise).
        with self.gpu(), self.eager_if_new(params if callback is None else None), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sdxl_fast.PromptTruncatedWarning)
            started = time.perf_counter()
            images = self._run_errors(sdxl_fast.generate, self.models, params, callback)
            log.info("generate() took %.1f ms (%s, %dx%d x%d)", (time.perf_counter() - started) * 1e3, params.mode,
                     params.width, params.height, params.num_images)
        notes = [requests.escape(w.message) for w in caught
                 if issubclass(w.category, sdxl_fast.PromptTruncatedWarning)]
        return images, notes

    @staticmethod
    def _run_errors(fn, *args):
        """fn(*args), every failure turned into a gr.Error with a readable message (user text escaped), so the UI
        shows it and the worker goes on to the next request."""
        try:
            return fn(*args)
        except Stopped:
            raise
        except OverBudget as e:
            log.info("generation stopped: %s", e)
            raise gr.Error(str(e)) from e
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise gr.Error("The GPU ran out of memory. Try a smaller size or fewer images.") from e
        except FloatingPointError as e:
            raise gr.Error(requests.escape(f"The image came out as NaN/inf and was discarded: {e}")) from e
        except ValueError as e:
            raise gr.Error(requests.escape(str(e))) from e
        except Exception as e:  # noqa: BLE001 - any failure must reach the user, not kill the worker
            log.exception("generation failed")
            raise gr.Error(requests.escape(f"Generation failed: {type(e).__name__}: {e}")) from e

    def gpu_seconds(self, handler: str, *args, **kwargs) -> int:
        """ZeroGPU's `duration` for a call of handler `handler` with these arguments (the ones Gradio passes
        it): parses the request as the handler will, so a bad one fails here, before a GPU is scheduled."""
        raw = inspect.signature(getattr(self, handler)).bind_partial(*args, **kwargs).arguments
        if handler == "live_fast":
            if raw.get("mode") != FAST or not str(raw.get("prompt") or "").strip():
                return zerogpu.MIN_SECONDS  # the handler skips without generating
            raw = {**raw, "randomize_seed": False}  # as live_fast calls generate_fast
        params = self.params("quality" if handler == "generate_quality" else "fast", raw)
        return zerogpu.duration_seconds(params, self.limits)

    def _guard(self, stop: threading.Event, then=None):
        """A step callback that ends the generation when Stop was pressed (or a newer request of the session
        came) or the time budget is spent, then calls `then`."""
        deadline = self.limits.deadline()

        def on_step(step: sdxl_fast.Step):
            if stop.is_set():
                raise Stopped()
            deadline.check(step)
            if then is not None:
                then(step)
        return on_step

    # -- event handlers ---------------------------------------------------------------------------------
    # They get the values as sent (the events skip Gradio's preprocessing) and check them in self.params.

    def generate_fast(self, prompt, steps, seed, randomize_seed, size, num_images,
                      orig_w, orig_h, crop_top, crop_left, target_w, target_h, request: gr.Request = None):
        """Fast mode (1-4 steps, no guidance). Returns the images (PNGs with their parameters) and the seed."""
        params = self.fast_params(prompt, steps, seed, randomize_seed, size, num_images,
                                  orig_w, orig_h, crop_top, crop_left, target_w, target_h)
        images = self._fast(params, request)
        if images is None:
            return gr.skip(), gr.skip()
        return [(im, im.info["parameters"]) for im in images], params.seed

    def fast_params(self, prompt, steps, seed, randomize_seed, size, num_images,
                    orig_w, orig_h, crop_top, crop_left, target_w, target_h) -> sdxl_fast.GenerationParams:
        return self.params("fast", dict(
            prompt=prompt, steps=steps, seed=seed, randomize_seed=randomize_seed, size=size, num_images=num_images,
            orig_w=orig_w, orig_h=orig_h, crop_top=crop_top, crop_left=crop_left, target_w=target_w,
            target_h=target_h))

    def _fast(self, params: sdxl_fast.GenerationParams, request: gr.Request | None,
              batched: bool = False) -> list | None:
        """The Fast images, or None if Stop ended the run. Up to the real-time size it runs as one call (one
        CUDA graph on a GPU), `batched` with the other typists' waiting requests; above it with a step
        callback, so Stop, a newer request of the session and the time budget can end it."""
        realtime = self.limits.realtime(params)
        if realtime and batched and self.batcher is not None:
            with _generations_lock:
                generations["fast"] += 1
            try:
                return self.batcher(params)
            except Busy as e:
                raise gr.Error(str(e)) from e
        if realtime:
            images, notes = self.run(params)
        else:
            stop = self._stop_flag(request)
            try:
                images, notes = self.run(params, self._guard(stop))
            except Stopped:
                with _generations_lock:
                    generations["stopped"] += 1
                gr.Info("Stopped.")
                return None
            finally:
                self._release_stop_flag(request, stop)
        for note in notes:
            gr.Warning(note)
        return images

    def _live_batch(self, batch: list[sdxl_fast.GenerationParams]) -> list[list]:
        """One batched call for the live requests the batcher gathered (a power of two images)."""
        images = sum(p.num_images for p in batch)
        together = replace(batch[0], num_images=images)
        self.prepare(together, notify=False)
        with self.gpu(), self.eager_if_new(together):
            started = time.perf_counter()
            made = self._run_errors(generate_many, self.models, batch)
        log.info("generate() took %.1f ms (fast live, %d requests, %d images)", (time.perf_counter() - started) * 1e3,
                 len(batch), images)
        return made

    def live_fast(self, mode, prompt, steps, seed, size, num_images,
                  orig_w, orig_h, crop_top, crop_left, target_w, target_h, request: gr.Request = None):
        """As-you-type generation: Fast mode only, and with the seed as shown, so the words change the image and
        the noise does not. The waiting keystrokes of all typists share batched calls. Returns the frames for
        the result gallery (inline JPEGs), the seed, and the frames for the session's history to take at its
        next Generate click."""
        if mode != FAST or not (prompt or "").strip() or self.unavailable("fast"):
            return gr.skip(), gr.skip(), gr.skip()
        params = self.fast_params(prompt, steps, seed, False, size, num_images,
                                  orig_w, orig_h, crop_top, crop_left, target_w, target_h)
        images = self._fast(params, request, batched=True)
        if images is None:
            return gr.skip(), gr.skip(), gr.skip()
        frames = [(metadata.jpeg_bytes(image), image.info["parameters"]) for image in images]
        return inline_gallery(frames), params.seed, frames

    def generate_quality(self, prompt, negative_prompt, steps, seed, randomize_seed, size, guidance_scale,
                         refiner_switch, num_images, orig_w, orig_h, crop_top, crop_left, target_w, target_h,
                         aesthetic_score, negative_aesthetic_score, cache_interval, request: gr.Request = None,
                         progress=gr.Progress()):
        """Quality mode (base + refiner, guided). Streams previews while denoising, then the final PNGs."""
        params = self.params("quality", dict(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed, randomize_seed=randomize_seed,
            size=size, guidance_scale=guidance_scale, refiner_switch=refiner_switch, num_images=num_images,
            orig_w=orig_w, orig_h=orig_h, crop_top=crop_top, crop_left=crop_left, target_w=target_w,
            target_h=target_h, aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            cache_interval=cache_interval))
        stop = self._stop_flag(request)
        steps_done: queue.Queue = queue.Queue()
        outcome: dict = {}
        on_step = self._guard(stop, steps_done.put)

        def work():
            try:
                outcome["result"] = self.run(params, on_step)
            except Stopped as e:
                outcome["error"] = e
                with _generations_lock:
                    generations["stopped"] += 1
            except BaseException as e:  # noqa: BLE001 - handed to the request thread below
                outcome["error"] = e
            finally:
                steps_done.put(None)

        # The model runs in a worker so this generator can stream previews while it denoises.
        worker = threading.Thread(target=work, name="quality-generation", daemon=True)
        started = time.monotonic()
        progress((0, params.steps), desc="Starting", unit="steps")
        worker.start()
        try:
            while (step := steps_done.get()) is not None:
                while not steps_done.empty():  # skip previews we are already behind on
                    newer = steps_done.get()
                    if newer is None:
                        steps_done.put(None)
                        break
                    step = newer
                left = (time.monotonic() - started) / step.index * (step.total - step.index)
                progress((step.index, step.total), desc=f"Step {step.index}/{step.total}, about {left:.0f} s left",
                         unit="steps")
                previews = latent_preview(step.denoised, size=(params.width // 2, params.height // 2))
                yield [(im, f"step {step.index}/{step.total}") for im in previews], params.seed
        finally:
            stop.set()  # if the client went away or the event was cancelled, abort the worker too
            worker.join()
            self._release_stop_flag(request, stop)
        if isinstance(outcome.get("error"), Stopped):
            gr.Info("Stopped.")
            return
        if "error" in outcome:
            raise outcome["error"]
        images, notes = outcome["result"]
        for note in notes:
            gr.Warning(note)
        yield [(im, im.info["parameters"]) for im in images], params.seed

    @contextmanager
    def gpu(self):
        """Hold a GPU slot for a request's generation; counted while waiting, so the warm-up lets it go first."""
        with self._waiting_lock:
            self.waiting_for_gpu += 1
        try:
            self.slots.acquire()
        finally:
            with self._waiting_lock:
                self.waiting_for_gpu -= 1
        try:
            yield
        finally:
            self.gpu_used_at = time.monotonic()
            self.slots.release()

    @contextmanager
    def exclusive(self):
        """Hold every GPU slot: no generation runs meanwhile (e.g. while a module's kernels are swapped)."""
        for _ in range(self.concurrency):
            self.slots.acquire()
        try:
            yield
        finally:
            for _ in range(self.concurrency):
                self.slots.release()

    @contextmanager
    def eager_if_new(self, params: sdxl_fast.GenerationParams | None):
        """Around a Fast call made as one CUDA graph (`params`; None: any other call): if that graph is not
        recorded yet, the call runs eagerly and the shape is recorded between requests (`record_later`), as
        recording costs two more calls and the capture, which a user's request should not wait for. Quality
        records its UNet steps' graphs on its first request: the cost of a few steps in a run of many."""
        graphs = getattr(self.models.runner, "graphs", None) if params is not None and params.mode == "fast" else None
        if graphs is None:
            yield
            return
        with graphs.eager_if_new() as missed:
            yield
        if missed:
            self.record_later([params])

    def _shape(self, params: sdxl_fast.GenerationParams) -> tuple:
        """What a call's CUDA graphs depend on: mode, sampler, steps, size, step cache and images."""
        family = getattr(self.models, params.mode)
        p = params.resolved(sdxl_fast.native_side(self.models, params.mode),
                            default_sampler=getattr(family, "sampler", None))
        return *batch_key(p), p.num_images

    def record_later(self, calls: list[sdxl_fast.GenerationParams]) -> None:
        """Have a thread run these calls, so that their CUDA graphs are recorded: one at a time, each holding
        the GPU slot once the GPU has been idle for WARM_UP_IDLE_S; a request waiting for the slot goes first.
        A shape already waiting is not queued again."""
        with self._record_lock:
            for params in calls:
                shape = self._shape(params)
                if shape not in self._recording:
                    self._recording.add(shape)
                    self._to_record.put((shape, params))
            if self._recorder is None:
                self._recorder = threading.Thread(target=self._record, name="sdxl-fast-warm-up", daemon=True)
                self._recorder.start()

    def _idle_slot(self) -> None:
        """Take a GPU slot once no request has used the GPU for WARM_UP_IDLE_S and none is waiting for it."""
        def idle():
            return not self.waiting_for_gpu and time.monotonic() - self.gpu_used_at >= WARM_UP_IDLE_S
        while True:
            while not idle():
                time.sleep(0.01)
            self.slots.acquire()
            if idle():  # still: no request took the slot between the check and here
                return
            self.slots.release()

    def _record(self) -> None:
        while True:
            shape, params = self._to_record.get()
            self._idle_slot()
            started = time.perf_counter()
            try:
                sdxl_fast.generate(self.models, params)
            except Exception:  # noqa: BLE001 - that shape goes on running eagerly
                log.exception("recording %s at %d image(s) failed", params.mode, params.num_images)
            finally:
                self.slots.release()
            mode, _, steps, width, height, _, images = shape
            with self._record_lock:
                self._recording.discard(shape)
            log.info("Recorded the CUDA graphs of %s %dx%d x%d, %d step(s), between requests in %.2f s", mode, width,
                     height, images, steps, time.perf_counter() - started)

    def _stop_flag(self, request: gr.Request | None) -> threading.Event:
        """A new stop flag for the request's session; a generation of the session still running (with more
        than one worker) is told to stop: the newer request replaces it."""
        session = getattr(request, "session_hash", None)
        flag = threading.Event()
        previous, self._stop_flags[session] = self._stop_flags.get(session), flag
        if previous is not None and session is not None:
            previous.set()
        return flag

    def _release_stop_flag(self, request: gr.Request | None, flag: threading.Event) -> None:
        session = getattr(request, "session_hash", None)
        if self._stop_flags.get(session) is flag:
            del self._stop_flags[session]

    def request_stop(self, request: gr.Request):
        flag = self._stop_flags.get(request.session_hash)
        if flag is not None:
            flag.set()


def inline_gallery(frames: list[tuple[bytes, str]]) -> list[dict]:
    """JPEG frames (parameters in EXIF) as the result gallery's JSON with the bytes inline (data: URLs), for an
    event registered with postprocess=False. The browser gets each frame in the event's own answer: no file is
    written, moved into Gradio's cache or fetched in a second request. The entries carry no FileData marker,
    so Gradio passes them on untouched. JPEG because a PNG takes 30-70 ms to encode at 512², 1-2 ms for this."""
    return [{"image": {"path": None, "url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
                       "orig_name": "live.jpeg", "mime_type": "image/jpeg"}, "caption": caption}
            for jpeg, caption in frames]


def saved_frames(frames: list[tuple[bytes, str]]) -> list[tuple[str, str]]:
    """Live frames as JPEG files in Gradio's upload folder (delete_cache removes them with its own files)."""
    folder = Path(gr.utils.get_upload_folder()) / "live"
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for jpeg, caption in frames:
        path = folder / f"{uuid.uuid4().hex}.jpeg"
        path.write_bytes(jpeg)
        saved.append((str(path), caption))
    return saved


def add_to_history(result, history: list, live: list | None = None):
    """Put a Generate click's results on top of this session's gallery, captions (the parameters) included,
    after the last as-you-type frames made since the previous click (`live`: JPEG bytes and captions, saved as
    files now), so typing a sentence adds one entry, not one per letter. The newest HISTORY_SIZE entries are
    kept. Returns the gallery, the history and the emptied `live`.

    The gallery is not updated on keystrokes: Gradio checks every entry's file on every update (on a 2-core
    CPU 6.5 ms per keystroke with 1 entry, 47 ms with 32), and the frame is on show in the result anyway."""
    if not result:
        return gr.skip(), gr.skip(), gr.skip()
    entries = [(item[0], item[1]) for item in result] + saved_frames(live or [])
    history = (entries + list(history or []))[:HISTORY_SIZE]
    return history, history, []


def size_choices(studio: Studio, mode: str) -> tuple[list[tuple[str, str]], str]:
    """The size dropdown's choices and default for `mode`: the loaded models' own size (SDXL 1024², Turbo
    512², the demo family 128²), listed first when SDXL's sizes do not include it."""
    sizes, default = (FAST_SIZES if mode == FAST else QUALITY_SIZES), DEFAULT_SIZE[mode]
    key = mode.lower()
    if studio.models is None or getattr(studio.models, key) is None:
        return sizes, default
    side = sdxl_fast.native_side(studio.models, key)
    own = f"{side}x{side}"
    if own not in {value for _, value in sizes}:
        sizes = [(bucket_label(side, side), own)] + sizes
    return [(label + " the models' own" if value == own else label, value) for label, value in sizes], own


def on_mode_change(studio: Studio, mode, size):
    fast = mode == FAST
    sizes, default = size_choices(studio, mode)
    if size not in {value for _, value in sizes}:
        size = default
    quality_only = gr.update(visible=not fast)
    return (gr.update(visible=fast), quality_only, gr.update(choices=sizes, value=size), quality_only,
            quality_only, quality_only, gr.update(visible=fast), quality_only, quality_only)


def build_demo(studio: Studio, examples: list[str] = EXAMPLES, note: str = "",
               delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    problems = [f"**{mode.title()} mode unavailable.** {why}" for mode, why in studio.load_errors.items()]
    fast_sizes, fast_size = size_choices(studio, FAST)
    # preprocess=False: the handlers get the values as sent and check them (sdxl_fast.serving.requests), so
    # every bad one is answered with its field's name, not Gradio's unnamed or unreadable preprocessing errors.
    gpu_events = dict(concurrency_id="gpu", concurrency_limit=studio.concurrency, preprocess=False)

    # delete_cache (frequency, age) in seconds: served images older than `age` are deleted (--delete-cache-after)
    with gr.Blocks(title="sdxl-fast", delete_cache=delete_cache) as demo:
        gr.Markdown("# sdxl-fast\nSDXL text-to-image. **Fast** redraws as you type; **Quality** uses base + "
                    "refiner with live previews.")
        gr.Markdown("\n\n".join(problems).replace("\n", "  \n"), visible=bool(problems), elem_id="load-error")
        gr.Markdown(note, visible=bool(note), elem_id="models-note")
        with gr.Row():
            with gr.Column(scale=2):
                mode = gr.Radio([FAST, QUALITY], value=FAST, label="Mode", elem_id="mode")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Describe an image", elem_id="prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1, visible=False, elem_id="negative")
                steps_fast = gr.Slider(1, FAST_MAX_STEPS, value=1, step=1, label="Steps")
                steps_quality = gr.Slider(1, QUALITY_MAX_STEPS, value=50, step=1, label="Steps", visible=False,
                                          elem_id="steps-quality")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed on Generate", value=True)
                size = gr.Dropdown(fast_sizes, value=fast_size, label="Size (width × height)",
                                   allow_custom_value=True)
                guidance = gr.Slider(0, 20, value=DEFAULT_GUIDANCE_SCALE, step=0.5, label="Guidance scale", visible=False)
                switch = gr.Slider(0.5, 1.0, value=DEFAULT_REFINER_SWITCH, step=0.05, visible=False,
                                   label="Refiner switch point (share of the noise levels the base handles; 1 = no refiner)")
                # Opt-in and labelled as approximate (sdxl_fast.pipeline.step_cache): 0.90 s instead of 1.61 s per SDXL
                # image at 2 on an H200 (BENCHMARKS.md), with a small change to the picture.
                cache = gr.Slider(1, 4, value=1, step=1, visible=False, elem_id="step-cache",
                                  label="Step cache: whole UNet every N steps (faster, approximate; 1 = off)")
                num_images = gr.Slider(1, MAX_IMAGES_UI, value=1, step=1, label="Number of images")
                with gr.Accordion("Advanced: SDXL micro-conditioning (0 = same as the output size)", open=False):
                    with gr.Row():
                        orig_w = gr.Number(0, label="Original width", precision=0)
                        orig_h = gr.Number(0, label="Original height", precision=0)
                    with gr.Row():
                        crop_top = gr.Number(0, label="Crop top", precision=0)
                        crop_left = gr.Number(0, label="Crop left", precision=0)
                    with gr.Row():
                        target_w = gr.Number(0, label="Target width", precision=0)
                        target_h = gr.Number(0, label="Target height", precision=0)
                    with gr.Row(visible=False) as aesthetic_row:
                        aesthetic = gr.Slider(0, 10, value=DEFAULT_AESTHETIC_SCORE, step=0.5, label="Aesthetic score (refiner)")
                        negative_aesthetic = gr.Slider(0, 10, value=DEFAULT_NEGATIVE_AESTHETIC_SCORE, step=0.5,
                                                       label="Negative aesthetic score (refiner)")
                with gr.Row():
                    fast_button = gr.Button("Generate", variant="primary", elem_id="generate-fast")
                    quality_button = gr.Button("Generate", variant="primary", visible=False,
                                               elem_id="generate-quality")
                    stop_button = gr.Button("Stop", variant="stop", visible=False, elem_id="stop")
            with gr.Column(scale=3):
                result = gr.Gallery(label="Result", format="png", interactive=False, columns=2, height=560, elem_id="result")
                history = gr.Gallery(label="This session", format="png", interactive=False, columns=6, height=220,
                                     elem_id="history")
        gr.Examples(examples, inputs=[prompt], label="Examples (click one)")
        history_state = gr.State([])
        live_state = gr.State([])  # the session's newest as-you-type frames, for the history's next entry

        micro = [orig_w, orig_h, crop_top, crop_left, target_w, target_h]
        fast_inputs = [prompt, steps_fast, seed, randomize, size, num_images, *micro]
        # The typists' keystrokes wait together in the studio's batcher, which bounds them, not in Gradio's
        # queue: a queued event costs the server a join request and an event stream besides the call, 20-30 %
        # of a live image's host time. On ZeroGPU each is a queued GPU call of its own, with its own duration.
        # The frames come back as the gallery's own JSON (inline_gallery), hence postprocess=False.
        live_events = dict(gpu_events if studio.batcher is None else dict(queue=False, preprocess=False),
                           postprocess=False)
        gr.on([prompt.change, steps_fast.release, seed.input, size.input, num_images.release, mode.input],
              gpu(studio.live_fast), inputs=[mode, *fast_inputs[:3], *fast_inputs[4:]],
              outputs=[result, seed, live_state], trigger_mode="always_last", show_progress="hidden",
              api_name="live_fast", api_visibility="undocumented", **live_events)
        to_history = dict(fn=add_to_history, inputs=[result, history_state, live_state],
                          outputs=[history, history_state, live_state], queue=False, api_visibility="private")
        fast_button.click(gpu(studio.generate_fast), fast_inputs, [result, seed], api_name="generate_fast",
                          **gpu_events).success(**to_history)
        quality_event = quality_button.click(
            gpu(studio.generate_quality),
            [prompt, negative, steps_quality, seed, randomize, size, guidance, switch, num_images, *micro,
             aesthetic, negative_aesthetic, cache],
            [result, seed], api_name="generate_quality", **gpu_events)
        quality_event.success(**to_history)
        stop_button.click(studio.request_stop, None, None, cancels=[quality_event], queue=False,
                          api_visibility="private")
        gr.api(studio.status, api_name="status", queue=False)  # which shapes run compiled
        # A fresh seed per visitor; live typing then keeps it fixed.
        demo.load(lambda: random.randint(0, MAX_SEED), None, seed, queue=False, api_visibility="private")
        mode.change(partial(on_mode_change, studio), [mode, size],
                    [steps_fast, steps_quality, size, guidance, switch, negative, fast_button, quality_button,
                     stop_button], queue=False, api_visibility="private")
        # The aesthetic scores only feed the refiner, so they show with Quality too, as does the step cache:
        # Fast's 1 step has nothing to cache.
        mode.change(lambda m: [gr.update(visible=m == QUALITY)] * 2, mode, [aesthetic_row, cache], queue=False,
                    api_visibility="private")
        if studio.unavailable("fast") and not studio.unavailable("quality"):  # e.g. --modes quality
            demo.load(lambda: QUALITY, None, mode, queue=False, api_visibility="private")
    return demo


def load_studio(sources: sdxl_fast.ModelSources | None, device=None, dtype=None, cpu_offload=False,
                fp8=False, compile_mode: str = "off", concurrency: int = 1,
                modes: tuple[str, ...] = MODES, later: tuple[str, ...] = ()) -> Studio:
    """Load the paths in `modes` together; when that fails, each alone, so one missing model does not take down
    the other. A path that cannot load, or is not in `modes`, is reported in the page and the log, never by
    crashing. `fp8`: the opt-in fp8 matmuls on top of the device's default acceleration (skipped, with a log
    line, where unsupported). The paths in `later` are read afterwards, beside the others' requests, by a
    thread that `studio.start_loading()` starts; they share the text encoders and VAE already loaded."""
    device, dtype = pick_device_dtype(device, dtype)
    options = None
    if not cpu_offload:
        # compile_new_shapes=False: a new shape runs uncompiled until the background compiler is done with it
        options = replace(accel.Acceleration.for_device(device), fp8=fp8, compile_new_shapes=False)
        if zerogpu.active():
            options = zerogpu.acceleration(options)
        options = replace(options, compile=options.compile and compile_mode in ("start", "background"))

    def loaded(studio: Studio) -> Studio:
        if studio.models is not None and options is not None:
            accel.apply(studio.models, options)
        for mode in later:
            load = partial(sdxl_fast.load, modes=(mode,), sources=sources, device=device, dtype=dtype,
                           share=studio.models, beside_requests=True)
            studio.loading[mode] = threading.Thread(target=studio._load_later, args=(mode, load, options),
                                                    name=f"sdxl-fast-load-{mode}", daemon=True)
        return studio

    left_out = {mode: f"This server was started with --modes {','.join(modes)}."
                for mode in MODES if mode not in modes}
    now = tuple(mode for mode in modes if mode not in later)
    try:
        return loaded(Studio(sdxl_fast.load(modes=now, sources=sources, device=device, dtype=dtype,
                                            cpu_offload=cpu_offload), left_out, concurrency=concurrency))
    except Exception as e:  # noqa: BLE001
        log.warning("Could not load all models (%s); trying each mode on its own", e)
    models, errors = None, dict(left_out)
    for mode in now:
        try:
            one = sdxl_fast.load(modes=(mode,), sources=sources, device=device, dtype=dtype, cpu_offload=cpu_offload)
        except Exception as e:  # noqa: BLE001
            errors[mode] = str(e)
            log.error("%s mode unavailable: %s", mode.title(), e)
            continue
        if models is None:
            models = one
        else:
            models.quality = one.quality
    return loaded(Studio(models, errors, concurrency=concurrency))


def start_serving(studio: Studio, compile_mode: str) -> None:
    """Record the default shapes' CUDA graphs. With `compile_mode` "off" or "aot" only the first (Fast, 1 image)
    before the first visitor, the other Fast shapes in a thread between requests; "aot" first loads the Fast
    UNet's and VAE decoder's packages compiled ahead of time, or starts compiling them in the background.
    With "start" all of them are compiled first (minutes on a cold machine; a restart loads PyTorch's compile
    cache); with "background" they, and each new shape a request brings, are compiled in another thread while
    being served. Any shape not compiled runs uncompiled through CUDA graphs: no request waits for a compile."""
    models = studio.models
    if compile_mode in ("start", "background"):
        load_cache()
    if compile_mode == "aot" and models.offload_hooks:
        log.warning("--compile aot is ignored with --cpu-offload: a package reads the weights where they lie, and "
                    "offloading moves them on every call")
    elif compile_mode == "aot" and models.fast is not None:
        studio.packages = FastPackages(models, studio.exclusive, partial(drop_graphs, models.runner)).start()
    # On a GPU each live batch size is its own CUDA graph: record them all at start-up, not on a typist's keystroke.
    batches = LIVE_BATCHES if models.device.type == "cuda" else (1,)
    if compile_mode in ("off", "aot"):
        # Quality records its graphs on its first request (about 1 s on a 2.6 s request on an H100); recording
        # them here would hold the GPU for seconds while a typist's request waits.
        first, *rest = accel.warmup_calls(models, batches, fast_steps=tuple(range(1, FAST_MAX_STEPS + 1)),
                                          quality=models.fast is None)
        log.info("Recording the CUDA graphs of %s at %d image(s); the other default shapes follow while serving",
                 first.mode, first.num_images)
        sdxl_fast.generate(models, first)
        if studio.packages is not None:
            studio.packages.ran()
        studio.record_later(rest)
        return
    log.info("Compiling and recording the default shapes%s", " in the background" if compile_mode == "background" else "")
    with compiling() if compile_mode == "start" else nullcontext():
        accel.warmup(models, batches)
    if compile_mode == "start":
        save_cache()
    if compile_mode != "background":
        return
    studio.compiler = BackgroundCompiler(models).start()
    # The models' own size: Fast at 1 image, Quality at 1 image, then Fast at the live batches' sizes.
    for mode, images in (("fast", 1), ("quality", 1), *(("fast", n) for n in LIVE_BATCHES[1:])):
        if getattr(models, mode) is not None:
            side = sdxl_fast.native_side(models, mode)
            studio.compiler.request(sdxl_fast.GenerationParams("", mode=mode, seed=0, width=side, height=side,
                                                               num_images=images).resolved())


def modes_list(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"expected fast, quality or fast,quality, got {text!r}")
    return modes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=None, help="interface to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1; "
                        "0.0.0.0 for the local network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="create a public gradio.live link")
    add_model_arguments(parser)
    parser.add_argument("--queue-size", type=int, default=20,
                        help="requests that may wait; beyond this users are told the app is busy")
    parser.add_argument("--modes", type=modes_list, default=MODES, metavar="fast,quality",
                        help="the paths to serve (default both); a Fast-only server loads no base or refiner UNet and "
                             "compiles and records only Fast's shapes")
    parser.add_argument("--compile", choices=["off", "aot", "start", "background"], default="off",
                        help="compiling on a GPU: off (default: uncompiled kernels in CUDA graphs, serving within "
                             "seconds); aot (experimental, not measured on a GPU yet, see README: the Fast UNet "
                             "and VAE decoder compiled ahead of time for every size and batch: loaded from "
                             "$SDXL_FAST_AOT_CACHE in a second, or compiled there once in the background while "
                             "serving uncompiled); start (torch.compile the default shapes before serving, minutes "
                             "when cold); background (experimental: torch.compile each shape in a thread while "
                             "serving it uncompiled)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="generations run at once (one per GPU the models occupy)")
    limits = parser.add_argument_group("limits per request (default: by device; README, 'Limits per request')")
    for name, setting in serving_limits.SETTINGS.items():
        off = "every Fast request step by step" if name == "realtime_pixels" else "no limit"
        limits.add_argument(setting.flag, dest=name, default=None, metavar="N",
                            help=f"{setting.what} (env {setting.env}; 0 or none: {off})")
    parser.add_argument("--delete-cache-after", type=int, default=None, metavar="SECONDS",
                        help=f"delete served images older than this (env {serving_limits.DELETE_CACHE_ENV}; "
                             f"default {serving_limits.DELETE_CACHE_DEFAULT}; 0 keeps them)")
    return parser.parse_args(argv)


def lighten_gradio_events() -> None:
    """Take Gradio's own per-event work off the request path; the live event pays it on every keystroke.
    - Gradio rebuilds its monitoring summary, a pandas table of up to 10,000 past events, after every event
      (2 ms after 300 events, 10 ms after 10,000 on a 2-core CPU, under Python's one lock). The app does not
      enable monitoring: the summary is rebuilt every 1,000 events (GRADIO_ANALYTICS_CACHE_FREQUENCY overrides).
    - Gradio sets matplotlib's backend around every event, and reading the backend first imports pyplot and
      builds matplotlib's font cache (0.5 s, and seconds on a fresh machine). Where matplotlib is installed
      its backend is set to "agg" now, which a server draws with anyway: events then find it set and import
      nothing (`import matplotlib` itself takes 0.2-0.3 s on a 2-core CPU). Where it is not, it is marked
      absent, so that events do not search the import path for it twice each."""
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")  # read when demo.queue() builds the queue
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("agg")
    else:
        sys.modules.setdefault("matplotlib", None)  # `import matplotlib` now fails at once


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        sources = sdxl_fast.resolve_sources(args.preset, args.base, args.refiner, args.fast)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    log.info("Imports took %.1f s; model sources: %s", time.monotonic() - STARTED, sources)
    started = time.monotonic()
    device, dtype = pick_device_dtype(args.device, args.dtype)
    # On a GPU, Fast serves while Quality's two UNets (about 10 GB for SDXL) are read: its first image comes
    # seconds sooner. Compiling at start-up, or ZeroGPU, wants every model there first.
    fast_first = (device.type == "cuda" and set(args.modes) == set(MODES) and not args.cpu_offload
                  and args.compile in ("off", "aot") and not zerogpu.active())
    studio = load_studio(sources, device, dtype, args.cpu_offload, args.fp8, args.compile, args.concurrency,
                         args.modes, later=("quality",) if fast_first else ())
    device_type = studio.models.device.type if studio.models is not None else "cpu"
    try:
        studio.limits = Limits.resolve(device_type, {name: getattr(args, name) for name in serving_limits.SETTINGS})
        delete_cache = serving_limits.delete_cache(args.delete_cache_after)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    log.info("Limits per request: %s", studio.limits.describe())
    # On ZeroGPU the GPU exists only inside decorated calls: nothing is warmed up or compiled there.
    if studio.models is not None and studio.models.device.type == "cuda" and not zerogpu.active():
        start_serving(studio, args.compile)
    lighten_gradio_events()
    log.info("Models ready after %.1f s", time.monotonic() - started)
    demo_family = sources == sdxl_fast.PRESETS["demo"]
    demo = build_demo(studio, examples=DEMO_EXAMPLES if demo_family else EXAMPLES,
                      note=DEMO_NOTE if demo_family else "", delete_cache=delete_cache)
    studio.start_loading()
    demo.queue(max_size=args.queue_size).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
