"""The Fast UNet compiled ahead of time for the server (`app.py --compile aot`, `sdxl_fast.accel.aot`).

One package serves every size and every live batch, so no request ever waits for a compile. It holds kernels,
not weights, and is stored in a cache folder under a name made from everything it depends on: the UNet's
structure (module types, parameter shapes, strides and dtypes, after the speed-ups), the GPU, torch's version
and the largest batch. So a restart, or a replica that is given the folder, loads it in about a second.
Where the folder has none, the server starts serving uncompiled at once (CUDA graphs), and a thread compiles
the package (minutes), stores it and swaps it in between two generations.
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

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(os.environ.get("SDXL_FAST_AOT_CACHE", Path.home() / ".cache" / "sdxl-fast" / "aot"))


def package_path(unet, max_batch: int, directory: Path = PACKAGE_DIR) -> Path:
    """Where the package for this UNet, as it is now, on this device and torch, belongs."""
    digest = hashlib.sha256(f"{torch.__version__} {max_batch} {_device_name(unet.device)}".encode())
    for name, module in unet.named_modules():
        digest.update(f"{name} {type(module).__qualname__} {type(getattr(module, 'processor', None)).__name__}".encode())
    for name, t in unet.state_dict(keep_vars=True).items():
        digest.update(f"{name} {tuple(t.shape)} {t.stride()} {t.dtype}".encode())
    return directory / f"unet-{digest.hexdigest()[:16]}.pt2"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class FastPackage:
    """The state of the Fast UNet's package: `state` is "loaded", "compiling", "compiled" or "failed: why".

    `start()` loads a stored package at once; without one it compiles in a thread from a copy of the UNet
    (so the served module is never traced while it runs) and then, holding `exclusive()` (no generation
    running), makes the UNet run the package and calls `swapped()` (e.g. to drop CUDA graphs recorded around
    the uncompiled UNet)."""

    def __init__(self, unet, exclusive: Callable[[], AbstractContextManager], swapped: Callable[[], None],
                 max_batch: int = 16, directory: Path | None = None):
        self.unet, self.exclusive, self.swapped, self.max_batch = unet, exclusive, swapped, max_batch
        self.path = package_path(unet, max_batch, directory or PACKAGE_DIR)
        self.state = "compiling"
        self.thread = threading.Thread(target=self._compile, name="sdxl-fast-aot", daemon=True)

    def start(self) -> "FastPackage":
        if self.path.is_file():
            started = time.perf_counter()
            aot.use_package(self.unet, self.path)
            self.state = "loaded"
            log.info("Fast UNet: loaded its ahead-of-time package %s in %.2f s", self.path, time.perf_counter() - started)
        else:
            log.info("Fast UNet: no ahead-of-time package at %s yet; compiling one in the background (minutes, "
                     "once per model, GPU and torch version) while serving uncompiled", self.path)
            self.thread.start()
        return self

    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            partial = self.path.with_suffix(".partial.pt2")
            aot.compile_unet(copy.deepcopy(self.unet), partial, self.max_batch)
            partial.replace(self.path)  # whole or absent, for the next start
            with self.exclusive():
                aot.use_package(self.unet, self.path)
                self.swapped()
            self.state = "compiled"
            log.info("Fast UNet: compiled ahead of time in %.0f s and now serving from %s",
                     time.perf_counter() - started, self.path)
        except Exception as exc:  # noqa: BLE001 - the UNet keeps running uncompiled; the server goes on
            self.state = f"failed: {type(exc).__name__}: {exc}"
            log.warning("Fast UNet: compiling ahead of time failed, it stays uncompiled: %s", exc)
        if self.unet.device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's memory
