"""One logical run over many `--student_init` continuations: what the exported student folder does not hold.

A `--resume` needs the whole checkpoint (student and heads with both optimisers, ~30 GB for SDXL) in the same
output folder. A continuation needs only the exported student folder, e.g. on a fresh GPU machine. So that it
goes on with the same discriminator instead of fresh heads, the export writes `student/continuation/`:

  heads.safetensors       the discriminator heads' state (weights, spectral-norm vectors, BatchNormLocal affine)
  heads_optimizer.pt      their AdamW state and LR schedule (torch.save, read back with weights_only)
  student.safetensors     the raw student weights, when the exported weights are the EMA
  ema.safetensors         the EMA, when the exported weights are the raw ones (export_ema false)
  state.json              the settings the heads depend on, and the steps the logical run has taken

A continuation (`--student_init FOLDER`, `continue_discriminator` true) then starts the student from its raw
weights, the EMA from the EMA, and the heads, their optimiser and LR schedule from where they were. The student's
own optimiser starts fresh (with Adam betas (0, 0.99) only its second moments are lost, rebuilt in ~100 steps).
Not under FSDP (the heads' optimiser state is sharded there): FSDP runs start fresh heads, with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FOLDER = "continuation"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Settings the heads' shapes and meaning depend on: a continuation with other values cannot use them.
HEAD_KEYS = ("disc_backbone", "disc_backbone_kwargs", "disc_image_size", "disc_blocks", "disc_head",
             "disc_head_channels", "disc_cond_dim", "disc_virtual_batch")


class ContinuationMismatchError(ValueError):
    """The continuation state was written by a run whose discriminator differs from this one's."""


def _tensors(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save(student_dir: str | Path, config: dict, steps: int, heads: torch.nn.Module, optimizer, scheduler,
         raw_student: torch.nn.Module | None = None, ema_shadow: dict | None = None, steps_before: int = 0) -> Path:
    """Write `student_dir/continuation/` (main process; unsharded modules). `raw_student` when the export holds
    the EMA, `ema_shadow` when it holds the raw weights and an EMA exists; `steps`: this run's steps,
    `steps_before`: the logical run's steps before it (`Carried.steps`)."""
    folder = Path(student_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(heads.state_dict()), str(folder / "heads.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               folder / "heads_optimizer.pt")
    for name, state in (("student", raw_student and raw_student.state_dict()), ("ema", ema_shadow)):
        path = folder / f"{name}.safetensors"
        if state:
            save_file(_tensors(state), str(path))
        elif path.exists():
            path.unlink()  # left from an earlier export into the same folder
    (folder / "state.json").write_text(json.dumps({
        "heads": {k: config[k] for k in HEAD_KEYS}, "steps": steps_before + steps, "steps_this_run": steps,
    }, indent=2))
    return folder


@dataclass
class Carried:
    """What `restore` found, for the parts that are restored later (the EMA is built after accelerate.prepare)."""

    folder: Path
    steps: int  # steps of the logical run before this continuation
    ema_source: Path | None  # the file holding the EMA weights, if any

    def restore_ema(self, ema) -> None:
        """Set `ema` (checkpoints.EMA, sharded or not; every process calls this) to the carried EMA."""
        if ema is None or self.ema_source is None:
            return
        weights = load_file(str(self.ema_source))
        ema.load_state_dict({"decay": ema.decay, "shadow": {name: weights[name] for name in ema.shadow}})


def restore(config: dict, init_folder: str | Path, student: torch.nn.Module, heads: torch.nn.Module, optimizer,
            scheduler, load_optimizer: bool = True) -> Carried | None:
    """Load `init_folder/continuation/` into the (unprepared) student, heads and the heads' optimiser and LR
    scheduler. None when there is nothing to carry or `continue_discriminator` is off."""
    folder = Path(init_folder) / FOLDER
    if not config.get("continue_discriminator", True) or not (folder / "state.json").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    differs = {k: (state["heads"].get(k), config[k]) for k in HEAD_KEYS
               if _normal(state["heads"].get(k)) != _normal(config[k])}
    if differs:
        raise ContinuationMismatchError(
            f"{folder} holds discriminator heads for other settings ("
            + ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differs.items())
            + "). Use the same settings, or --continue_discriminator false for fresh heads.")
    heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    if load_optimizer:
        saved = torch.load(folder / "heads_optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _use_configured_hyperparameters(config, optimizer, scheduler)
    else:
        log.warning("Continuation under FSDP: heads carried, their optimiser state starts fresh")
    ema_source = None
    if (folder / "student.safetensors").is_file():  # the export holds the EMA: the raw weights are here
        student.load_state_dict(load_file(str(folder / "student.safetensors")))
        ema_source = Path(init_folder) / WEIGHTS
    elif (folder / "ema.safetensors").is_file():
        ema_source = folder / "ema.safetensors"
    log.info("Continuing the run of %s (%d steps so far): discriminator heads, their optimiser%s carried",
             init_folder, state["steps"], " and the EMA" if ema_source else "")
    return Carried(folder, state["steps"], ema_source)


def _use_configured_hyperparameters(config: dict, optimizer, scheduler) -> None:
    """Loading an optimiser's state also loads its learning rate, betas and weight decay, and a LambdaLR's its
    base learning rates: put this run's values back (the moments and the schedule's position stay carried)."""
    lr = config["lr_discriminator"]
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch) if callable(factor) else lr,
                     betas=tuple(config["adam_betas"]), weight_decay=config["weight_decay"])
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _normal(value):
    """Config values as JSON reads them back (tuples are lists there)."""
    return json.loads(json.dumps(value))
