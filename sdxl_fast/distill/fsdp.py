"""Everything the training loop does differently under FSDP2 (torch `fully_shard`, through accelerate), next to
what it does otherwise (one process, or DDP). Each function takes the accelerator and decides from it.

Under FSDP the student and the discriminator heads are each sharded in place; the frozen models (teacher, VAE,
encoders, the discriminator's feature network) stay whole on every process.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from accelerate.utils import DistributedType


def enabled(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check(accelerator, cfg) -> None:
    """Refuse the FSDP set-ups the loop does not support, before any model is built."""
    if not enabled(accelerator):
        return
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("distill supports FSDP version 2 (fully_shard) only: set fsdp_version: 2 "
                         "(see configs/accelerate/fsdp.yaml)")
    if cfg.gradient_accumulation_steps > 1:  # fails inside FSDP2 (the heads' gradients under no_sync)
        raise ValueError("gradient_accumulation_steps > 1 is not supported under FSDP yet: use more processes or "
                         "a larger batch_size")


def prepare(accelerator, student, opt_student, heads, opt_disc):
    """accelerate's prepare for both trained models -> (student, opt_student, heads, opt_disc)."""
    sharded = enabled(accelerator)
    if sharded:
        # The heads were initialised under per-process seeds. DDP broadcasts rank 0's weights when it wraps them;
        # FSDP2 would shard each process's own copy, so rank 0's are broadcast first. (The student is a copy of
        # the teacher read from disk, the same on every process.)
        for tensor in heads.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    # One model per prepare call, as FSDP2 requires; the student first, so checkpoints name the models the same
    # way under every distributed type.
    student, opt_student = accelerator.prepare(student, opt_student)
    if sharded:  # accelerate keeps the student's wrap classes (the UNet's _no_split_modules), absent from the heads
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = None
    heads, opt_disc = accelerator.prepare(heads, opt_disc)
    if sharded:
        # R1 differentiates D twice (create_graph): FSDP2 would free the gathered head weights after the first
        # backward, which the second still needs. So the (small) heads stay gathered after forward and backward
        # until an explicit `reshard()` (after the student's backward, and before the optimisers step).
        raw_heads = accelerator.unwrap_model(heads)
        raw_heads.set_reshard_after_forward(False)
        raw_heads.set_reshard_after_backward(False)
    return student, opt_student, heads, opt_disc


@contextmanager
def heads_for_student_loss(accelerator, heads) -> Iterator[torch.nn.Module]:
    """The heads module the student's adversarial loss reads, for the student's forward and backward: the
    gradient flows through the heads to the student, but the heads themselves take none from it.

    DDP (and one process): the unwrapped heads, frozen meanwhile (no DDP hooks, no grads). FSDP2 fixes
    requires_grad when it shards, so there the sharded heads run as usual; afterwards what L_adv left on them
    is dropped: the gathered weights' gradients (reshard), then the shards' (put back as they were)."""
    if not enabled(accelerator):
        raw_heads = accelerator.unwrap_model(heads)
        raw_heads.requires_grad_(False)
        try:
            yield raw_heads
        finally:
            raw_heads.requires_grad_(True)
        return
    saved = [None if p.grad is None else p.grad.clone() for p in heads.parameters()]
    yield heads
    accelerator.unwrap_model(heads).reshard()
    for p, grad in zip(heads.parameters(), saved):
        p.grad = grad


def reshard_heads(accelerator, heads) -> None:
    """After the micro-steps, before the optimisers step: under FSDP the next forward then gathers the updated
    shards (the heads stay gathered otherwise, see `prepare`)."""
    if enabled(accelerator):
        accelerator.unwrap_model(heads).reshard()


def whole_student(accelerator, student, template: torch.nn.Module, ema=None) -> torch.nn.Module | None:
    """The student, or with `ema` its EMA weights, as a plain module on the main process (None elsewhere), for
    validation and export. Every process must call it: under FSDP it gathers the shards into a copy of
    `template` (a module of the student's architecture) on the main process."""
    raw_student = accelerator.unwrap_model(student)
    if not enabled(accelerator):
        if not accelerator.is_main_process:
            return None
        if ema is None:
            return raw_student
        final = copy.deepcopy(raw_student)
        ema.copy_to(final)
        return final
    weights = accelerator.get_state_dict(student)  # whole tensors on the main process (collective)
    shadow = ema.full_shadow() if ema is not None else None  # collective
    if not accelerator.is_main_process:
        return None
    final = copy.deepcopy(template).to(torch.float32)
    final.load_state_dict(weights)
    if ema is not None:
        ema.copy_to(final, shadow)
    return final
