"""GPU speed-ups over loaded models: `apply(load(...), Acceleration.for_device(device))`, then `warmup`."""

from .options import PASSES, Acceleration, apply
from .startup import warmup, warmup_calls

__all__ = ["PASSES", "Acceleration", "apply", "warmup", "warmup_calls"]
