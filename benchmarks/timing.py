"""How every benchmark here times a call: untimed warm-up calls, then each timed call alone between two
device synchronisations (a CUDA call returns before its kernels finish), wall clock by `time.perf_counter`.

    timing = time_calls(lambda: model(x), repeats=20, warmup=3, sync=device)
    timing.median, timing.min, timing.max  # seconds
    timing.percentile(95)                  # nearest rank, as serving latencies are reported

`Timing(samples)` also summarises latencies measured elsewhere (serving.py's HTTP calls).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call, in call order, and their summary."""

    samples: tuple[float, ...]

    def __post_init__(self):
        if not self.samples:
            raise ValueError("a Timing needs at least one sample")
        object.__setattr__(self, "samples", tuple(self.samples))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def percentile(self, q: float) -> float:
        """The nearest-rank q-th percentile (q in 0..100): the sample at index int(q/100 * n) of the sorted ones."""
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def ms(self, digits: int = 1) -> dict[str, float]:
        """median_ms, min_ms, max_ms rounded to `digits` decimals: the fields of a results row."""
        return {f"{name}_ms": round(getattr(self, name) * 1e3, digits) for name in ("median", "min", "max")}


def synchronize(device: Any = None) -> None:
    """Wait for the work queued on `device` (a torch.device or its name); nothing to wait for off CUDA or for None."""
    if device is None:
        return
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Any = None) -> Timing:
    """Call `fn()` `warmup` times untimed (compiles, CUDA graph recording, caches), then `repeats` times, each
    timed alone with `synchronize(sync)` before and after it."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(sync)
        start = time.perf_counter()
        fn()
        synchronize(sync)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))
