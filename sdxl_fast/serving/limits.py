"""How much work one request may ask for: pixels × images per mode, and a time budget.

Each limit has a flag of app.py and an environment variable (a Space sets variables, not flags); a flag wins
over the variable, the variable over the device's default. Pixels are width × height × number of images and
may be written as a product ("4x1024x1024"); 0 or "none" turns a limit off.

Defaults by device (one request should take seconds, not minutes, on the machine it runs on):

    device   Fast pixels            Quality pixels          time budget   real-time Fast (no step callback)
    CUDA     4 × 1024² (4.2 MP)     4 × 1536² (9.4 MP)      60 s          up to 1 × 1024²
    CPU      1 × 1024² (1.0 MP)     1 × 1024² (1.0 MP)      120 s         up to 1 × 512²

A Fast request within the real-time size runs as one call with no step callback (one CUDA graph on a GPU);
a larger one runs with a step callback that checks the Stop flag and the time budget after every step.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, fields, replace
from typing import Mapping

from ..params import GenerationParams

MEGA = 1024 * 1024


class LimitError(ValueError):
    """A request over one of the server's limits; the message names the limit and how to raise it."""


class OverBudget(Exception):
    """Raised from a step callback when a request has run longer than the server's time budget."""


@dataclass(frozen=True)
class Setting:
    flag: str
    env: str
    what: str


SETTINGS = {
    "fast_pixels": Setting("--max-fast-pixels", "SDXL_FAST_MAX_FAST_PIXELS",
                           "most pixels (width × height × images) of one Fast request"),
    "quality_pixels": Setting("--max-quality-pixels", "SDXL_FAST_MAX_QUALITY_PIXELS",
                              "most pixels (width × height × images) of one Quality request"),
    "time_budget": Setting("--time-budget", "SDXL_FAST_TIME_BUDGET",
                           "seconds one request may generate for before it is stopped"),
    "realtime_pixels": Setting("--realtime-fast-pixels", "SDXL_FAST_REALTIME_FAST_PIXELS",
                               "largest Fast request (pixels × images) run without a step callback, "
                               "so it cannot be stopped midway"),
}


def parse_amount(text: str | int | float | None, integer: bool = True):
    """"4194304", "4x1024x1024", "4*1024*1024" -> 4194304; "0", "none", "off" -> None (no limit)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = text
    else:
        cleaned = str(text).strip().lower()
        if cleaned in ("", "none", "off", "unlimited", "0"):
            return None
        parts = re.split(r"\s*[x×*]\s*", cleaned)
        try:
            numbers = [int(p) if integer else float(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected a number or a product such as 4x1024x1024, got {text!r}") from None
        value = 1
        for n in numbers:
            value *= n
    if value < 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value or None


@dataclass(frozen=True)
class Limits:
    """Per-request limits; None turns one off. `Limits()` is unbounded (the library's own use and tests)."""

    fast_pixels: int | None = None
    quality_pixels: int | None = None
    time_budget: float | None = None
    realtime_pixels: int | None = MEGA

    @classmethod
    def for_device(cls, device_type: str) -> "Limits":
        if device_type == "cuda":
            return cls(fast_pixels=4 * MEGA, quality_pixels=4 * 1536 * 1536, time_budget=60.0, realtime_pixels=MEGA)
        return cls(fast_pixels=MEGA, quality_pixels=MEGA, time_budget=120.0, realtime_pixels=512 * 512)

    @classmethod
    def resolve(cls, device_type: str, flags: Mapping[str, object] | None = None,
                env: Mapping[str, str] | None = None) -> "Limits":
        """The device's defaults, overridden by environment variables, overridden by flags (values that are
        not None in `flags`, keyed by field name)."""
        env = os.environ if env is None else env
        flags = flags or {}
        limits = cls.for_device(device_type)
        changes = {}
        for f in fields(cls):
            setting = SETTINGS[f.name]
            for source, value in ((setting.env, env.get(setting.env)), (setting.flag, flags.get(f.name))):
                if value is None:
                    continue
                try:
                    changes[f.name] = parse_amount(value, integer=f.name != "time_budget")
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from None
        return replace(limits, **changes)

    def describe(self) -> str:
        def show(name):
            value = getattr(self, name)
            if value is None:
                return "none"
            return f"{value:g} s" if name == "time_budget" else f"{value / 1e6:.1f} MP"
        return ", ".join(f"{name.replace('_', ' ')} {show(name)} ({SETTINGS[name].flag})" for name in SETTINGS)

    def check(self, params: GenerationParams) -> None:
        """Raise LimitError when `params` (resolved: sizes set) asks for more pixels than its mode allows."""
        name = f"{params.mode}_pixels"
        limit = getattr(self, name)
        asked = params.width * params.height * params.num_images
        if limit is None or asked <= limit:
            return
        setting = SETTINGS[name]
        images = f"{params.num_images} image{'s' if params.num_images > 1 else ''}"
        raise LimitError(
            f"This {params.mode.title()} request asks for {images} of {params.width}x{params.height} "
            f"({asked / 1e6:.1f} megapixels); this server allows at most {limit / 1e6:.1f} megapixels "
            f"(width × height × images) per {params.mode.title()} request. Ask for fewer or smaller images; "
            f"the server's operator can raise the limit with {setting.flag} or {setting.env}.")

    def realtime(self, params: GenerationParams) -> bool:
        """Whether a Fast request is small enough to run as one call without a step callback."""
        return (params.mode == "fast" and self.realtime_pixels is not None
                and params.width * params.height * params.num_images <= self.realtime_pixels)

    def deadline(self) -> "Deadline":
        return Deadline(self.time_budget)


class Deadline:
    """The time budget of one request, started now; `check` raises OverBudget once it is spent."""

    def __init__(self, budget: float | None, clock=time.monotonic):
        self.budget, self.clock, self.started = budget, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def check(self, step=None) -> None:
        if self.budget is None or (elapsed := self.elapsed()) <= self.budget:
            return
        where = f" at step {step.index} of {step.total}" if step is not None else ""
        setting = SETTINGS["time_budget"]
        raise OverBudget(
            f"Stopped after {elapsed:.1f} s{where}: this server's time budget is {self.budget:g} s per request. "
            f"Ask for fewer steps, fewer images or a smaller size; the server's operator can raise the budget "
            f"with {setting.flag} or {setting.env}.")


DELETE_CACHE_ENV = "SDXL_FAST_DELETE_CACHE_AFTER"
DELETE_CACHE_DEFAULT = 3600


def delete_cache(age: int | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """gr.Blocks' delete_cache (frequency, age) for served files older than `age` seconds (the flag, else
    SDXL_FAST_DELETE_CACHE_AFTER, else an hour); None (keep them) for 0. Checked every age/2 s, at most every
    10 minutes."""
    env = os.environ if env is None else env
    if age is None:
        text = env.get(DELETE_CACHE_ENV)
        try:
            age = int(text) if text not in (None, "") else DELETE_CACHE_DEFAULT
        except ValueError:
            raise ValueError(f"{DELETE_CACHE_ENV}: expected whole seconds, got {text!r}") from None
    if age < 0:
        raise ValueError(f"--delete-cache-after: expected whole seconds, got {age}")
    if age == 0:
        return None
    return max(1, min(600, age // 2)), age
