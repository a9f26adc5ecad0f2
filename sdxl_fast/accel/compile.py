"""torch.compile of the models, one static graph per shape."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Graphs torch.compile may keep per frame. The UNets share one frame (diffusers' forward), and each
# (model, batch, size) served is a graph of its own; torch's default of 8 would send later shapes to eager.
RECOMPILE_LIMIT = 64

# Inductor's compiled kernels persist here, so a restarted app compiles in seconds, not minutes (its default,
# /tmp, is wiped with many containers).
INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "sdxl-fast" / "inductor"


def compile_models(unets, vaes, text_encoders, mode: str | None, backend="inductor", combo_kernels=False) -> None:
    """torch.compile with static shapes: one graph per shape. With torch's default (dynamic after the first
    recompile) the second shape served, e.g. the 1024² base after the 512² student, compiled as a
    dynamic-shape graph that had not finished after minutes on an H200, where the same shapes compiled
    alone took three minutes (BENCHMARKS.md)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    how = {"mode": mode}
    if backend == "inductor":  # torch.compile takes a mode or options, not both: the mode's options, and ours
        how = {"options": {**torch._inductor.list_mode_options(mode or "default"), "combo_kernels": combo_kernels}}
    for unet in unets:
        unet.compile(fullgraph=True, dynamic=False, backend=backend, **how)
    for vae in vaes:
        vae.decoder.compile(dynamic=False, backend=backend, **how)
    for encoder in text_encoders:  # fuses the many small kernels of a batch-1 prompt: 3.3 -> 2.7 ms (H200)
        encoder.compile(dynamic=False, backend=backend, **how)
