"""Which timesteps each path runs.

Quality: one Euler schedule of N steps shared by base and refiner; the base runs the noise levels down to
the switch point and the refiner the rest, so no step is lost or repeated (SDXL's "ensemble of experts").
Fast: the ADD student's own timesteps.
"""

from __future__ import annotations

import torch

# The timesteps an ADD student is trained on (N = 4, uniformly spaced, SDXL-Turbo paper section 3.2).
STUDENT_TIMESTEPS = (999, 749, 499, 249)


def student_timesteps(steps: int) -> list[int]:
    """The trailing subset of STUDENT_TIMESTEPS for `steps` in 1..4.

    Picked the way diffusers' "trailing" spacing picks from a training grid, so every step is one the
    student was trained on: 1 -> [999], 2 -> [999, 499], 3 -> [999, 749, 249], 4 -> all four.
    """
    n = len(STUDENT_TIMESTEPS)
    if not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"The fast path runs 1 to {n} student steps, got {steps!r}")
    ascending = STUDENT_TIMESTEPS[::-1]
    indices = [round(n - k * n / steps) - 1 for k in range(steps)]
    return [ascending[i] for i in indices]


def refiner_cutoff(refiner_switch: float, num_train_timesteps: int = 1000) -> int:
    """Timesteps at or above this value belong to the base, those below to the refiner."""
    return int(round(num_train_timesteps - refiner_switch * num_train_timesteps))


def quality_timesteps(scheduler, steps: int, refiner_switch: float | None, device=None) -> tuple[torch.Tensor, int]:
    """Set the scheduler to `steps` steps; return (timesteps, switch_index).

    timesteps[:switch_index] run on the base, timesteps[switch_index:] on the refiner. Without a refiner
    (refiner_switch None) switch_index == steps.
    """
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if refiner_switch is None:
        return timesteps, len(timesteps)
    cutoff = refiner_cutoff(refiner_switch, scheduler.config.num_train_timesteps)
    return timesteps, int((timesteps >= cutoff).sum())
