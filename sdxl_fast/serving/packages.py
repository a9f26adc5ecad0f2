"""The Fast path's UNet and VAE decoder compiled ahead of time for the server (`app.py --compile aot`,
`sdxl_fast.accel.aot`).

One package per module serves every size and every live batch, so no request ever waits for a compile.
A package holds kernels, not weights, and is stored in a cache folder under a name made from everything it
depends on: the module's structure (module types, parameter shapes, strides and dtypes, after the speed-ups),
the GPU and torch's version. So a restart, or a replica that is given the folder, loads it in about a
second. Where the folder has none, the server starts serving uncompiled at once (CUDA graphs),
and a thread compiles the missing packages (minutes), stores them and swaps each in between two generations.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
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


def _marker(package: Path) -> Path:
    return package.with_name(package.name + ".loading")


class FastPackages:
    """The packages of the Fast path's UNet and VAE decoder. `states[part]` is "loaded", "queued",
    "compiling", "compiled" or "failed: why".

    `start()` loads the stored packages at once (call `ran()` once a generation has gone through them); the
    missing ones a thread compiles in turn, each from a copy of its module (so the served module is never
    traced while it runs), and then, holding `exclusive()` (no generation running), makes the module run it
    and calls `swapped()` (e.g. to drop CUDA graphs recorded around the uncompiled module)."""

    def __init__(self, models: Models, exclusive: Callable[[], AbstractContextManager], swapped: Callable[[], None],
                 directory: Path | None = None):
        self.exclusive, self.swapped = exclusive, swapped
        self.modules = {"unet": models.fast.student, "vae-decoder": models.fast.vae}
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
        for part, state in self.states.items():
            if state == "queued":
                self._compile(part)

    def _compile(self, part: str) -> None:
        compile_package, use_package = (getattr(aot, name) for name in PARTS[part])
        module, path = self.modules[part], self.paths[part]
        self.states[part] = "compiling"
        started = time.perf_counter()
        try:
            with atomic_write(path) as tmp:  # whole or absent, for the next start
                compile_package(copy.deepcopy(module), tmp)
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
        if module.device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's memory
