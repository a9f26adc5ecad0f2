"""Which timesteps each path runs.

Quality: one Euler schedule of N steps shared by base and refiner; the base runs the noise levels down to
the switch point and the refiner the rest, so no step is lost or repeated (SDXL's "ensemble of experts").
Fast: the ADD student's own timesteps ("ADD"), or diffusers' SDXL-Turbo recipe ("Euler a": Euler-ancestral on
trailing timesteps, 999, 666, 332 at 3 steps where ADD runs 999, 749, 249).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

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


@dataclass(frozen=True)
class EulerAncestralStep:
    """One Euler-ancestral step's constants, float32 values as diffusers' EulerAncestralDiscreteScheduler
    computes them (held as Python floats: kernel arguments, so a CUDA graph records them with the call)."""

    timestep: int
    sigma: float
    input_scale: float  # the model reads x / input_scale = (sigma² + 1) ** 0.5
    v_out: float  # v-prediction: x0 = output * v_out + x / v_skip
    v_skip: float
    dt: float  # sigma_down - sigma
    sigma_up: float  # the fresh noise's scale (0 at the last step)


@dataclass(frozen=True)
class EulerAncestralSchedule:
    init_sigma: float  # the starting noise's scale
    steps: tuple[EulerAncestralStep, ...]

    @property
    def timesteps(self) -> list[int]:
        return [s.timestep for s in self.steps]


def euler_ancestral(scheduler_config, steps: int) -> EulerAncestralSchedule:
    """diffusers' SDXL-Turbo recipe: `EulerAncestralDiscreteScheduler.from_config(config,
    timestep_spacing="trailing")` set to `steps` steps; each constant computed by the same float32 operations
    as its `set_timesteps`, `scale_model_input` and `step`, so the sampler reproduces it bit for bit."""
    if not isinstance(steps, int) or not 1 <= steps <= len(STUDENT_TIMESTEPS):
        raise ValueError(f"The fast path runs 1 to {len(STUDENT_TIMESTEPS)} steps, got {steps!r}")
    return _euler_ancestral(json.dumps(dict(scheduler_config), sort_keys=True, default=str), steps)


@lru_cache(maxsize=64)
def _euler_ancestral(config_json: str, steps: int) -> EulerAncestralSchedule:
    from diffusers import EulerAncestralDiscreteScheduler

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    scheduler = EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas  # float32, on the CPU, with a final 0
    out = []
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        out.append(EulerAncestralStep(
            timestep=int(t), sigma=sigma.item(), input_scale=((sigma**2 + 1) ** 0.5).item(),
            v_out=(-sigma / (sigma**2 + 1) ** 0.5).item(), v_skip=(sigma**2 + 1).item(),
            dt=(sigma_down - sigma).item(), sigma_up=sigma_up.item()))
    return EulerAncestralSchedule(init_sigma=scheduler.init_noise_sigma.item(), steps=tuple(out))


def fast_timesteps(sampler: str, steps: int, scheduler_config) -> list[int]:
    """The timesteps a Fast call of `sampler` runs."""
    if sampler == "Euler a":
        return euler_ancestral(scheduler_config, steps).timesteps
    return student_timesteps(steps)
