"""Checkpoints: written atomically (a temp folder renamed into place), the last K kept, restored exactly.

A checkpoint is accelerate's `save_state` folder (so DDP, FSDP and DeepSpeed shard and gather as they need):
student and discriminator heads, both optimisers, every process's RNG states (Python, NumPy, torch, CUDA), and
the objects registered with `accelerator.register_for_checkpointing`: the EMA, both LR schedulers and the
`TrainingState` below (step, data position, counters). The frozen teacher, VAE, encoders and DINOv2 backbone
are not saved: they are reloaded from their sources.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdxl_fast import files

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"


@dataclass
class TrainingState:
    """Everything about the run's progress that is not a tensor."""

    step: int = 0  # optimiser steps done
    batches: int = 0  # micro-batches drawn from this process's data stream: the data position
    skipped_images: int = 0  # unreadable images met so far
    nan_steps: int = 0  # steps skipped for a non-finite loss, in total
    nan_in_a_row: int = 0
    # accelerate saves registered objects from the main process only, so each process's own data position
    # and skip count are gathered into these lists before a save (`sync_ranks`) and picked out after a load.
    rank_batches: list = field(default_factory=list)
    rank_skipped: list = field(default_factory=list)

    def sync_ranks(self, accelerator) -> None:
        from accelerate.utils import gather_object

        self.rank_batches = gather_object([self.batches])
        self.rank_skipped = gather_object([self.skipped_images])

    def select_rank(self, rank: int) -> None:
        if self.rank_batches:
            self.batches, self.skipped_images = self.rank_batches[rank], self.rank_skipped[rank]

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP2 shard (DTensor) is all-gathered (a collective: every process must call this),
    a plain tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class EMA:
    """Exponential moving average of a model's trainable parameters, kept in fp32 on the parameters' device
    (the distilled student; the demo family's UNets).

    Under FSDP the shadow is sharded like the parameters (each process averages its own shard);
    `state_dict` / `full_shadow` gather whole tensors and `load_state_dict` re-shards them, so a checkpoint
    holds the full EMA whatever the sharding.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        """shadow <- decay·shadow + (1 - decay)·weights. With `step` (optimiser steps done) the decay starts
        short, min(decay, (1 + step) / (10 + step)), so an average over few steps is not mostly the init."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        pairs = [(self.shadow[name], p.detach().float()) for name, p in model.named_parameters() if name in self.shadow]
        # One fused kernel over all tensors instead of one launch per parameter (small UNets are launch-bound).
        torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], 1.0 - decay)

    @torch.no_grad()
    def full_shadow(self) -> dict:
        """The shadow as whole tensors; under FSDP a collective (every process must call it)."""
        return {name: _full(value) for name, value in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module, shadow: dict | None = None) -> None:
        """Write the EMA into `model`, an unsharded module (pass `shadow=full_shadow()` when sharded)."""
        shadow = self.shadow if shadow is None else shadow
        for name, p in model.named_parameters():
            if name in shadow:
                p.copy_(shadow[name].to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.full_shadow()}  # accelerate calls this on every process

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        self.decay = state["decay"]
        for name, value in state["shadow"].items():
            own = self.shadow[name]
            if isinstance(own, DTensor):  # keep this process's shard of the whole tensor
                value = distribute_tensor(value.to(own.device, own.dtype), own.device_mesh, own.placements)
            self.shadow[name].copy_(value)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted saves are not listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """`latest` -> the newest checkpoint of this run; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / "training_config.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a distill checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, config: dict, keep: int) -> Path:
    """Every process calls this. Written to a temp folder, renamed into place by the main process once all
    processes have finished writing, then the oldest checkpoints beyond `keep` are deleted."""
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "training_config.json").write_text(json.dumps(config, indent=2))
        files.replace(tmp, final)  # a checkpoint folder is complete or absent
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes: equal digests mean bit-identical weights. Under FSDP the digest is
    of the whole (gathered) weights, and every process must call it."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(_full(p).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
