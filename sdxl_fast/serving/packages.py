"""The Fast path's UNet and VAE decoder compiled ahead of time for the server (`app.py --compile aot`,
`sdxl_fast.accel.aot`).

One package per module serves every size and every live batch, so no request ever waits for a compile.
A package holds kernels, not weights, and is stored in a cache folder under a name made from everything it
depends on: the module's structure (module types, parameter shapes, strides and dtypes, after the speed-ups),
the GPU and torch's version. So a restart, or a replica that is given the folder, loads it in about a
second. Where the folder has none, the server starts serving uncompiled at once (CUDA graphs),
and a thread has another process compile the missing packages (minutes), then stores them and swaps each in
between two generations. The compile runs in a process of its own because tracing and code generation are
minutes of Python, which in the serving process would hold the interpreter lock between requests; a crash
in the compiler then ends that process, not the server.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

from ..accel import aot
from ..files import atomic_write
from ..models import Models

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(os.environ.get("SDXL_FAST_AOT_CACHE", Path.home() / ".cache" / "sdxl-fast" / "aot"))
# part -> the `sdxl_fast.accel.aot` functions that compile its package and make it run one
PARTS = {"unet": ("compile_unet", "use_unet_package"), "vae-decoder": ("compile_decoder", "use_decoder_package")}


def package_path(part: str, module, directory: Path | None = None) -> Path:
    """Where the package of `module` (a `PARTS` name), as it is now, on this device and torch, belongs."""
    device = torch.cuda.get_device_name(module.device) if module.device.type == "cuda" else module.device.type
    digest = hashlib.sha256(f"{torch.__version__} {device}".encode())
    for name, m in module.named_modules():
        digest.update(f"{name} {type(m).__qualname__} {type(getattr(m, 'processor', None)).__name__}".encode())
    for name, t in module.state_dict(keep_vars=True).items():
        digest.update(f"{name} {tuple(t.shape)} {t.stride()} {t.dtype}".encode())
    return (directory or PACKAGE_DIR) / f"{part}-{digest.hexdigest()[:16]}.aot"


def _skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device (no data), with their shapes,
    strides and dtypes: all a compile depends on, and cheap to send to another process."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def _compile_skeleton(part: str, skeleton: torch.nn.Module, device: str, path: str) -> None:
    """In the compiling process: the skeleton given uninitialised memory on `device`, compiled into `path`. The
    kernels do not depend on the weights' values, which the package reads from the served module at each call."""
    getattr(aot, PARTS[part][0])(skeleton.to_empty(device=device), Path(path))


def compiler_process() -> ProcessPoolExecutor:
    """A process of its own for compiling packages, started on its first compile; each compile it runs after
    the first skips the imports and CUDA start-up."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def compile_elsewhere(part: str, module: torch.nn.Module, path: Path,
                      process: ProcessPoolExecutor | None = None) -> None:
    """Compile the package of `module` (a `PARTS` name) into `path`, in `process` (`compiler_process()`) or a
    new one; raises what it raised, or BrokenProcessPool if that process stopped."""
    if process is None:
        with compiler_process() as process:
            return compile_elsewhere(part, module, path, process)
    process.submit(_compile_skeleton, part, _skeleton(module), str(module.device), str(path)).result()


def _marker(package: Path) -> Path:
    return package.with_name(package.name + ".loading")


class FastPackages:
    """The packages of the Fast path's UNet and VAE decoder. `states[part]` is "loaded", "queued",
    "compiling", "compiled" or "failed: why".

    `start()` loads the stored packages at once (call `ran()` once a generation has gone through them); for
    the missing ones a thread has another process compile each in turn (`compile_elsewhere`), and then, holding
    `exclusive()` (no generation running), makes the module run it and calls `swapped()` (e.g. to drop CUDA
    graphs recorded around the uncompiled module)."""

    def __init__(self, models: Models, exclusive: Callable[[], AbstractContextManager], swapped: Callable[[], None],
                 directory: Path | None = None):
        self.exclusive, self.swapped = exclusive, swapped
        # The decoder first: uncompiled, it takes most of a live batch's time (BENCHMARKS.md, H100 serving notes).
        self.modules = {"vae-decoder": models.fast.vae, "unet": models.fast.student}
        self.paths = {part: package_path(part, m, directory) for part, m in self.modules.items()}
        self.states = {part: "queued" for part in self.modules}
        self.thread = threading.Thread(target=self._compile_missing, name="sdxl-fast-aot", daemon=True)

    def start(self) -> "FastPackages":
        for part, path in self.paths.items():
            if not path.is_file():
                continue
            # Loading and first running a package is native code: should it stop the process, the marker left
            # behind keeps the next start from loading it again (a Space restarting into the same crash).
            marker = _marker(path)
            if marker.exists():
                self.states[part] = "failed: a start stopped while loading or first running this package"
                log.error("Fast %s: the last start stopped while loading or first running %s; serving it "
                          "uncompiled (delete it to compile it again)", part, path)
                continue
            try:
                marker.touch()
            except OSError:  # a read-only folder of shipped packages: loaded without the guard
                pass
            started = time.perf_counter()
            try:
                getattr(aot, PARTS[part][1])(self.modules[part], path)
            except Exception as exc:  # noqa: BLE001 - e.g. a truncated file: compiled again, the server starts
                marker.unlink(missing_ok=True)
                log.warning("Fast %s: the package %s could not be loaded (%s); compiling it again", part, path, exc)
                continue
            self.states[part] = "loaded"
            log.info("Fast %s: loaded its ahead-of-time package %s in %.2f s", part, path,
                     time.perf_counter() - started)
        missing = [part for part, state in self.states.items() if state == "queued"]
        if missing:
            log.info("Fast %s: no ahead-of-time package in %s yet; compiling in the background (minutes, once per "
                     "model, GPU and torch version) while serving uncompiled", " and ".join(missing),
                     self.paths[missing[0]].parent)
            self.thread.start()
        return self

    def ran(self) -> None:
        """Call after the first generation through the loaded packages: they load and run here."""
        for path in self.paths.values():
            _marker(path).unlink(missing_ok=True)

    def _compile_missing(self) -> None:
        process = compiler_process()  # one for every part, unless a compile stops it
        try:
            for part in [part for part, state in self.states.items() if state == "queued"]:
                try:
                    self._compile(part, process)
                except BrokenProcessPool:
                    process.shutdown()
                    process = compiler_process()
        finally:
            process.shutdown()

    def _compile(self, part: str, process: ProcessPoolExecutor) -> None:
        """Compile `part` in `process` and swap its package in; a failure leaves it uncompiled, and one that
        stopped the process is raised again (BrokenProcessPool) after being recorded."""
        use_package = getattr(aot, PARTS[part][1])
        module, path = self.modules[part], self.paths[part]
        self.states[part] = "compiling"
        started = time.perf_counter()
        try:
            with atomic_write(path) as tmp:  # whole or absent, for the next start
                compile_elsewhere(part, module, tmp, process)
            _marker(path).unlink(missing_ok=True)  # a new package: the next start tries it
            with self.exclusive():
                use_package(module, path)
                self.swapped()
            self.states[part] = "compiled"
            log.info("Fast %s: compiled ahead of time in %.0f s and now serving from %s", part,
                     time.perf_counter() - started, path)
        except Exception as exc:  # noqa: BLE001 - the module keeps running uncompiled; the server goes on
            self.states[part] = f"failed: {type(exc).__name__}: {exc}"
            log.warning("Fast %s: compiling ahead of time failed, it stays uncompiled: %s", part, exc)
            if isinstance(exc, BrokenProcessPool):
                raise
