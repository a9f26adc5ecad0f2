"""The ADD training loop, top to bottom, on accelerate (one process per GPU; DDP or FSDP2 across GPUs and nodes).

One optimiser step = `gradient_accumulation_steps` micro-steps of step.py's encode_real -> student_step ->
discriminator_step; then both optimisers step, the EMA follows, and logging / validation / checkpointing happen
on schedule. What FSDP needs besides is in fsdp.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

import sdxl_fast
from sdxl_fast.loading import find_local_folder, student_prediction_type
from sdxl_fast.models import DTYPES

from . import augment, checkpoints, continuation, data, fsdp, step
from .cache import EncodingCache
from .config import TrainConfig
from .discriminator import build_discriminator
from .export import export_student
from .validation import validate

log = logging.getLogger("distill")


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN/inf loss."""


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary with the exported student folder."""
    # 1. Accelerator, logging, seeds.
    cfg.validate()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard" if _tensorboard_available() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    set_seed(cfg.seed, device_specific=True)  # each process draws its own noise and timesteps
    device = accelerator.device
    weight_dtype = DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision]
    fsdp.check(accelerator, cfg)

    # 2. Models: the frozen teacher family, the student (a copy of the teacher, or student_init), the discriminator.
    #    The student's output is read as student_prediction: the teacher's prediction type unless set.
    frozen = _frozen_models(cfg, device, weight_dtype)
    encoders, vae, teacher = frozen.encoders, frozen.vae, frozen.base
    prediction_type = frozen.scheduler.config.prediction_type
    student_prediction = prediction_type if cfg.student_prediction == "teacher" else cfg.student_prediction
    init = find_local_folder(cfg.student_init, "student_init") if cfg.student_init else None
    student = _student(cfg, teacher, init, student_prediction)
    features, heads = build_discriminator(cfg, text_dim=encoders.text_encoder_2.config.projection_dim)
    features.to(device)
    schedule = step.NoiseSchedule(
        alphas_cumprod=frozen.scheduler.alphas_cumprod.to(device),  # ᾱ_t, [1000]
        prediction_type=prediction_type, student_prediction=student_prediction,
        student_timesteps=torch.tensor(cfg.student_timesteps, device=device),
        student_weights=torch.tensor(cfg.student_timestep_weights or [1.0] * len(cfg.student_timesteps), device=device),
        teacher_t_min=cfg.teacher_t_min, teacher_t_max=cfg.teacher_t_max)

    # 3. Optimisers and their warm-up; the trained models and optimisers through accelerate's prepare.
    opt_student = torch.optim.AdamW(student.parameters(), lr=cfg.lr_student, betas=cfg.adam_betas,
                                    weight_decay=cfg.weight_decay)
    opt_disc = torch.optim.AdamW(heads.parameters(), lr=cfg.lr_discriminator, betas=cfg.adam_betas,
                                 weight_decay=cfg.weight_decay)
    # Schedulers stay unprepared: accelerate would step them once per process, changing warm-up with world size.
    sched_student = torch.optim.lr_scheduler.LambdaLR(opt_student, _warmup(cfg.lr_warmup_steps))
    sched_disc = torch.optim.lr_scheduler.LambdaLR(opt_disc, _warmup(cfg.lr_warmup_steps))
    # A student_init continuation carries the heads, their optimiser and LR schedule, and the raw student weights
    # (when the export holds the EMA) from its folder, into the unprepared modules; the EMA once built (step 4).
    carried = continuation.restore(cfg.to_dict(), init, student, heads, opt_disc, sched_disc,
                                   load_optimizer=not fsdp.enabled(accelerator)) if init else None
    student, opt_student, heads, opt_disc = fsdp.prepare(accelerator, student, opt_student, heads, opt_disc)
    raw_student = accelerator.unwrap_model(student)

    # 4. The EMA and the run's progress, saved in every checkpoint with the models and optimisers; resume.
    state = checkpoints.TrainingState()
    ema = checkpoints.EMA(raw_student, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if carried is not None:
        carried.restore_ema(ema)
    accelerator.register_for_checkpointing(state, sched_student, sched_disc, *([ema] if ema else []))
    if resume:
        path = checkpoints.resolve_resume(out, resume)
        accelerator.load_state(str(path))  # weights, optimisers, RNG states, registered objects
        state.select_rank(accelerator.process_index)
        log.info("Resumed from %s at step %d", path, state.step)

    # 5. Data, from this process's data position on.
    batches = iter(data.make_loader(cfg, accelerator.process_index, accelerator.num_processes,
                                    start_batch=state.batches))
    cache = EncodingCache(cfg.cache_dir or None)
    if accelerator.is_main_process:
        accelerator.init_trackers("distill", config={k: str(v) for k, v in cfg.to_dict().items()})
        (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # 6. Train.
    # Only on a terminal: into a log file (a batch job, nohup, a pipe) the bar's carriage returns would glue
    # the log lines onto it, and the log lines every log_every steps already carry the step and the numbers.
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc="distill",
                    disable=not (accelerator.is_local_main_process and sys.stderr.isatty()))
    images_per_s, step_seconds = [], []
    # The wall-clock budget (max_minutes) counts from here; the run then checkpoints and exports as at max_steps.
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    while state.step < cfg.max_steps:
        if _out_of_time(accelerator, deadline):
            log.info("max_minutes (%.1f) reached at step %d: stopping", cfg.max_minutes, state.step)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every:  # not just saved: save now
                _save_checkpoint(accelerator, out, state, cfg)
            break
        started = time.perf_counter()
        student_ok = disc_ok = True
        metrics, n_images = {}, 0
        # On logged steps: the norms of both loss terms' gradients at the student's output (balance.py).
        measure = cfg.log_grad_norms and cfg.log_every > 0 and (state.step + 1) % cfg.log_every == 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = _next_batch(batches, state)
            n_images += len(batch["captions"])
            with accelerator.accumulate(student, heads), accelerator.autocast():
                real = step.encode_real(batch, encoders, vae, features, cache, device)
                # One DiffAugment draw per micro-step, for D's fake and real inputs alike (None: off).
                aug = augment.draw(cfg.disc_augment, real.x0.shape[0], device) if cfg.disc_augment else None
                with fsdp.heads_for_student_loss(accelerator, heads) as frozen_heads:
                    g = step.student_step(accelerator, cfg, student, teacher, vae, features, frozen_heads, real,
                                          schedule, aug, measure_grad_norms=measure)
                d_ok, d_metrics = step.discriminator_step(accelerator, cfg, features, heads, real, g.fake_images,
                                                          g.image_emb, aug) if g.ok else (False, {})
            student_ok, disc_ok, metrics = student_ok and g.ok, disc_ok and d_ok, {**g.metrics, **d_metrics}
        fsdp.reshard_heads(accelerator, heads)
        _optimizer_step(accelerator, cfg, opt_student, sched_student, student.parameters(), student_ok)
        _optimizer_step(accelerator, cfg, opt_disc, sched_disc, heads.parameters(), disc_ok)
        state.step += 1
        _count_non_finite(cfg, state, student_ok and disc_ok, metrics)
        if ema is not None and student_ok:
            ema.update(raw_student)

        # Logging: losses, learning rates, throughput, memory.
        elapsed = time.perf_counter() - started
        images_per_s.append(n_images * accelerator.num_processes / elapsed)
        step_seconds.append(elapsed)
        metrics.update({"lr/student": sched_student.get_last_lr()[0], "lr/disc": sched_disc.get_last_lr()[0],
                        "images_per_s": images_per_s[-1], "skipped_images": state.skipped_images,
                        "nan_steps": state.nan_steps})
        if torch.cuda.is_available():
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        progress.update(1)
        progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")},
                             refresh=False)
        if cfg.log_every and state.step % cfg.log_every == 0:
            accelerator.log(metrics, step=state.step)
            log.info("step %d %s", state.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

        if cfg.validate_every and state.step % cfg.validate_every == 0:
            validate(cfg, accelerator, fsdp.whole_student(accelerator, student, teacher), frozen, state.step,
                     weight_dtype, prediction_type=student_prediction)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            _save_checkpoint(accelerator, out, state, cfg)
    progress.close()

    # 7. The result: the student (its EMA, if kept) as a diffusers folder, validated once more; a summary.
    accelerator.wait_for_everyone()
    # One per process, of the whole weights: DDP keeps them equal, FSDP gathers the same shards on every process.
    digests = gather_object([checkpoints.weights_digest(raw_student)])
    state.sync_ranks(accelerator)
    student_dir = out / "student"
    use_ema = ema is not None and cfg.export_ema
    final = fsdp.whole_student(accelerator, student, teacher, ema if use_ema else None)  # None off the main process
    if accelerator.is_main_process:
        export_student(final, student_dir, cfg.to_dict(), state.step, ema_used=use_ema,
                       prediction_type=student_prediction)
        if cfg.export_continuation and not fsdp.enabled(accelerator):  # what a student_init continuation needs
            continuation.save(student_dir, cfg.to_dict(), state.step, accelerator.unwrap_model(heads), opt_disc,
                              sched_disc, raw_student=raw_student if use_ema else None,
                              ema_shadow=ema.shadow if ema is not None and not use_ema else None,
                              steps_before=carried.steps if carried is not None else 0)
        elif cfg.export_continuation:
            log.warning("export_continuation is not supported under FSDP: use --resume with the checkpoint")
        if cfg.validate_every and (use_ema or state.step % cfg.validate_every):
            validate(cfg, accelerator, final, frozen, state.step, weight_dtype, tag="-ema" if use_ema else "",
                     prediction_type=student_prediction)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {
        "student": str(student_dir), "step": state.step, "skipped_images": sum(state.rank_skipped),
        "nan_steps": state.nan_steps, "weight_digests": digests, "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index, "distributed_type": str(accelerator.distributed_type.value),
        "cache_hits": cache.hits, "cache_misses": cache.misses,
        # Medians, so the first steps (allocator warm-up, cuDNN autotuning) do not skew them.
        "images_per_s": _median(images_per_s), "seconds_per_step": _median(step_seconds),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else None,
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------------------
# The loop's parts, each a function of what it reads.

def _tensorboard_available() -> bool:
    """Logging to tensorboard is optional: without the package the run trains and logs to the console only."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        log.warning("tensorboard is not installed: no tensorboard logs, console logging only")
        return False
    return True


def _frozen_models(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype):
    """The teacher family through sdxl_fast's loader: encoders, VAE, base UNet, scheduler (all frozen)."""
    sources = sdxl_fast.ModelSources(base=cfg.teacher, refiner=None, fast="")
    quality = sdxl_fast.load(modes=("quality",), sources=sources, device=device, dtype=weight_dtype).quality
    if weight_dtype == torch.float16:
        quality.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    return quality


def _student(cfg: TrainConfig, teacher, init: Path | None, prediction_type: str) -> torch.nn.Module:
    """The trainable student in fp32 (the master weights): the teacher's UNet, or the weights of student_init
    (`init`), which must read its output as `prediction_type` if its folder records one."""
    student = copy.deepcopy(teacher).to(torch.float32).train().requires_grad_(True)
    if init is not None:
        recorded = student_prediction_type(init)  # None: a student folder without the record
        if recorded not in (None, prediction_type):
            raise ValueError(f"--student_init {cfg.student_init} predicts {recorded!r}, this run "
                             f"{prediction_type!r}: set --student_prediction {recorded}")
        student.load_state_dict(UNet2DConditionModel.from_pretrained(init, use_safetensors=True).state_dict())
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student


def _warmup(steps: int):
    """Linear learning-rate warm-up over `steps`, then constant."""
    return lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0


def _out_of_time(accelerator, deadline: float) -> bool:
    """Every process must stop at the same step (DDP), so the decision is reduced across processes."""
    if deadline == math.inf:
        return False
    late = torch.tensor(float(time.time() >= deadline), device=accelerator.device)
    return accelerator.reduce(late, "max").item() > 0


def _next_batch(batches, state: checkpoints.TrainingState) -> dict:
    """The next batch with at least one readable image; unreadable ones are counted and logged."""
    while True:
        batch = next(batches)
        state.batches += 1
        if batch["skipped"]:
            state.skipped_images += batch["skipped"]
            log.warning("Skipped %d unreadable image(s) (%d so far)", batch["skipped"], state.skipped_images)
        if batch["pixels"] is not None:
            return batch


def _optimizer_step(accelerator, cfg: TrainConfig, opt, sched, params, ok: bool) -> None:
    """Clip, step and advance the warm-up when the step's losses were finite; the gradients are dropped either way."""
    if ok:
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)


def _count_non_finite(cfg: TrainConfig, state: checkpoints.TrainingState, ok: bool, metrics: dict) -> None:
    """Count a step whose update was skipped for a NaN/inf loss; stop after max_nan_steps of them in a row."""
    if ok:
        state.nan_in_a_row = 0
        return
    state.nan_steps += 1
    state.nan_in_a_row += 1
    log.warning("Step %d: non-finite loss (%s), update skipped (%d in a row, %d in total)", state.step,
                ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v)) or "see metrics",
                state.nan_in_a_row, state.nan_steps)
    if state.nan_in_a_row >= cfg.max_nan_steps:
        raise NonFiniteLossError(f"{state.nan_in_a_row} steps in a row had a non-finite loss; stopping. "
                                 "Lower the learning rates or try bf16 instead of fp16.")


def _save_checkpoint(accelerator, out: Path, state: checkpoints.TrainingState, cfg: TrainConfig) -> None:
    """Every process calls this: each one's data position goes into the state first."""
    state.sync_ranks(accelerator)
    checkpoints.save_checkpoint(accelerator, out, state.step, cfg.to_dict(), cfg.keep_checkpoints)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0
