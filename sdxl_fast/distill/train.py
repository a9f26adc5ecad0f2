"""The ADD training loop, top to bottom, on accelerate (one process per GPU; DDP or FSDP2 across GPUs and nodes).

One optimiser step = `gradient_accumulation_steps` micro-steps of:
  1. frozen models: captions -> text embeddings, images -> real latents x0 -> decoded real images
  2. student: x_s = noised x0 at a student timestep s (pure noise at s = 999), x̂θ = x0-prediction
  3. adversarial (student side): D(decode(x̂θ)) through the frozen feature network, L_adv = -D
  4. score distillation: x_t = renoised sg(x̂θ) at a teacher timestep t, x̂ψ = guided teacher x0-prediction,
     L_distill = c(t)·‖x̂θ - sg(x̂ψ)‖² in pixel space (decoded) or latent space
  5. student backward on L_adv + λ·L_distill
  6. discriminator: hinge loss on (decoded real, detached fake) + γ/2·R1 on the real images, backward
then both optimisers step, the EMA follows, and logging / validation / checkpointing happen on schedule.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

import sdxl_fast
from sdxl_fast.loading import find_local_folder
from sdxl_fast.models import DTYPES, FastModels
from sdxl_fast.pipeline import sampling

from . import augment, balance, checkpoints, continuation, data, losses
from .cache import EncodingCache
from .config import TrainConfig
from .discriminator import build_discriminator, discriminate, discriminate_real_fake, image_condition
from .export import export_student, student_prediction_type, student_scheduler

log = logging.getLogger("distill")


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN/inf loss."""


def draw_student_timesteps(timesteps: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """n student timesteps [n], each drawn from `timesteps` [N] with probability proportional to `weights` [N]."""
    return timesteps[torch.multinomial(weights.float(), n, replacement=True)]


def _frozen_models(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype):
    """The teacher family through sdxl_fast's loader: encoders, VAE, base UNet, scheduler (all frozen)."""
    sources = sdxl_fast.ModelSources(base=cfg.teacher, refiner=None, fast="")
    quality = sdxl_fast.load(modes=("quality",), sources=sources, device=device, dtype=weight_dtype).quality
    if weight_dtype == torch.float16:
        quality.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    return quality


def _tensorboard_available() -> bool:
    """Logging to tensorboard is optional: without the package the run trains and logs to the console only."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        log.warning("tensorboard is not installed: no tensorboard logs, console logging only")
        return False
    return True


def _warmup(steps: int):
    return lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0


def _teacher_x0(teacher, x_t, t, alpha_bar, context, pooled, time_ids, guidance: float, prediction_type: str):
    """The frozen teacher's classifier-free-guided x0-prediction at (x_t, t). The unconditional branch uses
    zeroed text embeddings, as SDXL base was trained (force_zeros_for_empty_prompt)."""
    dtype = teacher.dtype
    cast = lambda x: x.to(dtype)  # noqa: E731
    if guidance > 1.0:
        inputs = sampling.UNetInputs(cast(torch.cat([torch.zeros_like(context), context])),
                                     cast(torch.cat([torch.zeros_like(pooled), pooled])),
                                     cast(torch.cat([time_ids, time_ids])))
        out_uncond, out_cond = inputs(teacher, cast(torch.cat([x_t, x_t])), torch.cat([t, t])).float().chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
    else:
        out = sampling.UNetInputs(cast(context), cast(pooled), cast(time_ids))(teacher, cast(x_t), t).float()
    return sampling.predicted_x0(out, x_t, alpha_bar, prediction_type)


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """SDXL latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1], differentiable."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


def _all_finite(accelerator, *values: torch.Tensor) -> bool:
    """True when every value is finite on every process, so all processes skip or step together."""
    bad = torch.tensor([float(not all(torch.isfinite(v).all() for v in values))], device=accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary with the exported student folder."""
    cfg.validate()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard" if _tensorboard_available() else None, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    set_seed(cfg.seed, device_specific=True)  # each process draws its own noise and timesteps
    device = accelerator.device
    weight_dtype = DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision]

    # --- models ---------------------------------------------------------------------------------------
    frozen = _frozen_models(cfg, device, weight_dtype)
    encoders, vae, teacher = frozen.encoders, frozen.vae, frozen.base
    alphas_cumprod = frozen.scheduler.alphas_cumprod.to(device)  # ᾱ_t, [1000]
    prediction_type = frozen.scheduler.config.prediction_type
    # [issue 27] How the student's output is read (the teacher's prediction type unless set).
    student_prediction = prediction_type if cfg.student_prediction == "teacher" else cfg.student_prediction
    last_t = len(alphas_cumprod) - 1

    student = copy.deepcopy(teacher).to(torch.float32).train().requires_grad_(True)  # fp32 master weights
    if cfg.student_init:
        init = find_local_folder(cfg.student_init, "student_init")
        student.load_state_dict(UNet2DConditionModel.from_pretrained(init, use_safetensors=True).state_dict())
        recorded = student_prediction_type(init)  # [issue 27] None: a student exported before it was recorded
        if recorded not in (None, student_prediction):
            raise ValueError(f"--student_init {cfg.student_init} predicts {recorded!r}, this run "
                             f"{student_prediction!r}: set --student_prediction {recorded}")
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    features, heads = build_discriminator(cfg, text_dim=encoders.text_encoder_2.config.projection_dim)
    features.to(device)

    opt_student = torch.optim.AdamW(student.parameters(), lr=cfg.lr_student, betas=cfg.adam_betas,
                                    weight_decay=cfg.weight_decay)
    opt_disc = torch.optim.AdamW(heads.parameters(), lr=cfg.lr_discriminator, betas=cfg.adam_betas,
                                 weight_decay=cfg.weight_decay)
    # Schedulers stay unprepared: accelerate would step them once per process, changing warm-up with world size.
    sched_student = torch.optim.lr_scheduler.LambdaLR(opt_student, _warmup(cfg.lr_warmup_steps))
    sched_disc = torch.optim.lr_scheduler.LambdaLR(opt_disc, _warmup(cfg.lr_warmup_steps))
    # FSDP: the student and the heads are each sharded in place (fully_shard); the frozen models stay whole.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("distill supports FSDP version 2 (fully_shard) only: set fsdp_version: 2 "
                         "(see configs/accelerate/fsdp.yaml)")
    if fsdp and cfg.gradient_accumulation_steps > 1:  # fails inside FSDP2 (the heads' gradients under no_sync)
        raise ValueError("gradient_accumulation_steps > 1 is not supported under FSDP yet: use more processes or "
                         "a larger batch_size")
    # [issue 27] A --student_init continuation carries the heads, their optimiser and LR schedule, and the raw
    # student weights (when the export holds the EMA); the EMA itself after it is built, below.
    carried = continuation.restore(cfg.to_dict(), init, student, heads, opt_disc, sched_disc,
                                   load_optimizer=not fsdp) if cfg.student_init else None
    if fsdp:
        # The heads were initialised under per-process seeds. DDP broadcasts rank 0's weights when it wraps them;
        # FSDP2 would shard each process's own copy, so rank 0's are broadcast first. (The student is a copy of
        # the teacher read from disk, the same on every process.)
        for tensor in heads.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    # One model per prepare call, as FSDP2 requires (the same order as before, so checkpoints keep their names).
    student, opt_student = accelerator.prepare(student, opt_student)
    if fsdp:  # accelerate keeps the student's wrap classes (the UNet's _no_split_modules), absent from the heads
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = None
    heads, opt_disc = accelerator.prepare(heads, opt_disc)
    raw_student, raw_heads = accelerator.unwrap_model(student), accelerator.unwrap_model(heads)
    if fsdp:
        # R1 differentiates D twice (create_graph): FSDP2 would free the gathered head weights after the first
        # backward, which the second still needs. So the (small) heads stay gathered after forward and backward
        # until an explicit `reshard()` (after the student's backward, and before the optimisers step).
        raw_heads.set_reshard_after_forward(False)
        raw_heads.set_reshard_after_backward(False)

    def unsharded_student(use_ema: bool):
        """The student (or its EMA) as a plain module on the main process, None elsewhere, for validation and
        export. Every process must call it: under FSDP it gathers the shards into a copy on the main process."""
        if not fsdp:
            if not accelerator.is_main_process:
                return None
            if not use_ema:
                return raw_student
            final = copy.deepcopy(raw_student)
            ema.copy_to(final)
            return final
        weights = accelerator.get_state_dict(student)  # whole tensors on the main process (collective)
        shadow = ema.full_shadow() if use_ema else None  # collective
        if not accelerator.is_main_process:
            return None
        final = copy.deepcopy(teacher).to(torch.float32)
        final.load_state_dict(weights)
        if use_ema:
            ema.copy_to(final, shadow)
        return final

    state = checkpoints.TrainingState()
    ema = checkpoints.EMA(raw_student, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if carried is not None:  # [issue 27]
        carried.restore_ema(ema)
    accelerator.register_for_checkpointing(state, sched_student, sched_disc, *([ema] if ema else []))
    if resume:
        path = checkpoints.resolve_resume(out, resume)
        accelerator.load_state(str(path))  # weights, optimisers, RNG states, registered objects
        state.select_rank(accelerator.process_index)
        log.info("Resumed from %s at step %d", path, state.step)

    # --- data -----------------------------------------------------------------------------------------
    loader = data.make_loader(cfg, accelerator.process_index, accelerator.num_processes, start_batch=state.batches)
    batches = iter(loader)

    def next_batch() -> dict:
        """The next batch with at least one readable image; unreadable ones are counted and logged."""
        while True:
            batch = next(batches)
            state.batches += 1
            if batch["skipped"]:
                state.skipped_images += batch["skipped"]
                log.warning("Skipped %d unreadable image(s) (%d so far)", batch["skipped"], state.skipped_images)
            if batch["pixels"] is not None:
                return batch

    if accelerator.is_main_process:
        accelerator.init_trackers("distill", config={k: str(v) for k, v in cfg.to_dict().items()})
        (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    student_ts = torch.tensor(cfg.student_timesteps, device=device)
    student_ts_weights = torch.tensor(cfg.student_timestep_weights or [1.0] * len(student_ts), device=device)
    cache = EncodingCache(cfg.cache_dir or None)

    def micro_step(batch: dict) -> tuple[bool, bool, dict]:
        """Forward and backward for one micro-batch. Returns (student loss finite, D loss finite, metrics)."""
        # 1. Conditioning and real data through the frozen models.
        with torch.no_grad():
            # context [B, 77, D], pooled [B, P]; the VAE posterior of the [-1, 1] pixels, [B, 4, H/8, W/8]
            context, pooled, mean, std = cache.encode(encoders, vae, batch["captions"], batch["pixels"],
                                                      batch["indices"], device)
            time_ids = batch["time_ids"].to(device, torch.float32)  # [B, 6]
            x0 = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor  # a posterior sample
            real_images = _decode(vae, x0)  # D sees decoded reals, as it sees decoded fakes
            image_emb = features.image_embedding(real_images)  # [B, C] conditions D on the real image
        b = x0.shape[0]
        # [issue 27] One DiffAugment draw per micro-step, for D's fake and real inputs alike (None: off).
        aug = augment.draw(cfg.disc_augment, b, device) if cfg.disc_augment else None

        # 2. Student: one x0-prediction from a noised real latent. At s = 999 the input is pure noise
        #    (zero terminal SNR), exactly what the Fast path feeds the student at inference.
        s = draw_student_timesteps(student_ts, student_ts_weights, b)  # [B]
        noise = torch.randn_like(x0)
        alpha_s = alphas_cumprod[s].view(b, 1, 1, 1)
        pure_noise = s == last_t  # [B]
        x_s = torch.where(pure_noise.view(b, 1, 1, 1), noise, sampling.add_noise(x0, noise, alpha_s))
        image_emb = image_condition(image_emb, ~pure_noise, cfg.disc_image_condition)
        out_s = sampling.UNetInputs(context, pooled, time_ids)(student, x_s, s).float()
        student_x0 = sampling.predicted_x0(out_s, x_s, alpha_s, student_prediction)  # [B, 4, h, w]
        fake_images = _decode(vae, student_x0)  # gradients flow through the frozen decoder

        # 3. Adversarial loss for the student; the heads take no gradient from it. Under DDP the unwrapped heads
        #    are frozen for this pass (no DDP hooks, no grads). FSDP2 fixes requires_grad when it shards, so there
        #    the sharded heads run as usual and their gradients are put back as they were after the student's
        #    backward (step 5).
        if fsdp:
            heads_grads = [None if p.grad is None else p.grad.clone() for p in heads.parameters()]
            l_adv = losses.generator_adv_loss(discriminate(features, heads, fake_images, pooled, image_emb, aug))
        else:
            raw_heads.requires_grad_(False)
            l_adv = losses.generator_adv_loss(discriminate(features, raw_heads, fake_images, pooled, image_emb,
                                                           aug))
            raw_heads.requires_grad_(True)

        # 4. Score distillation against the frozen teacher at a random teacher timestep t.
        t = torch.randint(cfg.teacher_t_min, cfg.teacher_t_max + 1, (b,), device=device)
        alpha_t = alphas_cumprod[t].view(b, 1, 1, 1)
        with torch.no_grad():
            x_t = sampling.add_noise(student_x0.detach(), torch.randn_like(x0), alpha_t)
            teacher_x0 = _teacher_x0(teacher, x_t, t, alpha_t, context, pooled, time_ids, cfg.teacher_guidance,
                                     prediction_type)
            target = _decode(vae, teacher_x0) if cfg.distill_space == "pixel" else teacher_x0
        prediction = fake_images if cfg.distill_space == "pixel" else student_x0
        weight = losses.distillation_weight(t, alphas_cumprod, cfg.distill_weighting)
        l_distill = losses.distillation_loss(prediction, target, weight, cfg.distill_reduction)
        l_student = losses.student_loss(l_adv, l_distill, cfg.lambda_distill, cfg.lambda_adv)

        # 5. Student backward, unless the loss is NaN/inf on any process.
        student_ok = _all_finite(accelerator, l_student)
        if not student_ok:
            return False, False, {"loss/student": l_student.item(), "loss/distill": l_distill.item()}
        # [issue 27] λ_adv·L_adv + λ·L_distill back-propagated; on logged steps (or with adaptive λ) each term's
        # gradient norm at the student's output x̂θ is measured.
        measure = cfg.log_grad_norms and cfg.log_every > 0 and (state.step + 1) % cfg.log_every == 0
        balance_metrics = balance.student_backward(
            lambda t, **kw: accelerator.backward(t / cfg.gradient_accumulation_steps, **kw), student_x0, l_adv,
            l_distill, cfg.lambda_adv, cfg.lambda_distill, cfg.lambda_mode, measure)
        if fsdp:  # drop what L_adv left on the heads: the gathered weights' gradients, then the shards'
            raw_heads.reshard()
            for p, grad in zip(heads.parameters(), heads_grads):
                p.grad = grad

        # 6. Discriminator on (real, detached fake) in one forward pass, with R1 on the real images.
        real = real_images.detach().requires_grad_(True)
        # [issue 27] One forward of [real; fake], the heads' batch statistics kept apart, the same augmentation.
        real_logits, fake_logits = discriminate_real_fake(features, heads, real, fake_images.detach(), pooled,
                                                          image_emb, aug)  # [B, K] each
        r1 = losses.r1_penalty(real_logits, real)
        l_disc = losses.discriminator_loss(real_logits, fake_logits, r1, cfg.r1_gamma)
        disc_ok = _all_finite(accelerator, l_disc)
        if disc_ok:
            accelerator.backward(l_disc / cfg.gradient_accumulation_steps)
        acc_real, acc_fake = losses.discriminator_accuracy(real_logits.detach(), fake_logits.detach())
        return True, disc_ok, {
            "loss/adv_g": l_adv.item(), "loss/distill": l_distill.item(), "loss/student": l_student.item(),
            "loss/disc": l_disc.item(), "loss/r1": r1.item(), "d_acc/real": acc_real, "d_acc/fake": acc_fake,
            **balance_metrics,
        }

    def optimizer_step(opt, sched, params, ok: bool) -> None:
        if ok:
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)

    # Only on a terminal: into a log file (a batch job, nohup, a pipe) the bar's carriage returns would glue
    # the log lines onto it, and the log lines every log_every steps already carry the step and the numbers.
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc="distill",
                    disable=not (accelerator.is_local_main_process and sys.stderr.isatty()))
    images_per_s, step_seconds = [], []
    # The wall-clock budget (max_minutes) counts from here; the run then checkpoints and exports as at max_steps.
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    while state.step < cfg.max_steps:
        # Every process must stop at the same step (DDP), so the decision is reduced across processes.
        if deadline < math.inf and accelerator.reduce(
                torch.tensor(float(time.time() >= deadline), device=device), "max").item() > 0:
            log.info("max_minutes (%.1f) reached at step %d: stopping", cfg.max_minutes, state.step)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every:  # not just saved: save now
                state.sync_ranks(accelerator)
                checkpoints.save_checkpoint(accelerator, out, state.step, cfg.to_dict(), cfg.keep_checkpoints)
            break
        started = time.perf_counter()
        student_ok = disc_ok = True
        metrics: dict = {}
        n_images = 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next_batch()
            n_images += len(batch["captions"])
            with accelerator.accumulate(student, heads), accelerator.autocast():
                g_ok, d_ok, metrics = micro_step(batch)
            student_ok, disc_ok = student_ok and g_ok, disc_ok and d_ok
        if fsdp:
            raw_heads.reshard()  # the next forward gathers the updated shards
        optimizer_step(opt_student, sched_student, student.parameters(), student_ok)
        optimizer_step(opt_disc, sched_disc, heads.parameters(), disc_ok)
        state.step += 1

        if student_ok and disc_ok:
            state.nan_in_a_row = 0
        else:
            state.nan_steps += 1
            state.nan_in_a_row += 1
            log.warning("Step %d: non-finite loss (%s), update skipped (%d in a row, %d in total)", state.step,
                        ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v)) or "see metrics",
                        state.nan_in_a_row, state.nan_steps)
            if state.nan_in_a_row >= cfg.max_nan_steps:
                raise NonFiniteLossError(f"{state.nan_in_a_row} steps in a row had a non-finite loss; stopping. "
                                         "Lower the learning rates or try bf16 instead of fp16.")
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
            validate(cfg, accelerator, unsharded_student(use_ema=False), frozen, state.step, weight_dtype,
                     prediction_type=student_prediction)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            state.sync_ranks(accelerator)
            checkpoints.save_checkpoint(accelerator, out, state.step, cfg.to_dict(), cfg.keep_checkpoints)
    progress.close()

    # --- the result -----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    # One per process, of the whole weights: DDP keeps them equal, FSDP gathers the same shards on every process.
    digests = gather_object([checkpoints.weights_digest(raw_student)])
    state.sync_ranks(accelerator)
    student_dir = out / "student"
    use_ema = ema is not None and cfg.export_ema
    final = unsharded_student(use_ema)  # the main process's copy; None elsewhere
    if accelerator.is_main_process:
        export_student(final, student_dir, cfg.to_dict(), state.step, ema_used=use_ema,
                       scheduler=student_scheduler(frozen.scheduler, student_prediction))
        if cfg.export_continuation and not fsdp:  # [issue 27] what a --student_init continuation needs
            continuation.save(student_dir, cfg.to_dict(), state.step, raw_heads, opt_disc, sched_disc,
                              raw_student=raw_student if use_ema else None,
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
        "images_per_s": sorted(images_per_s)[len(images_per_s) // 2] if images_per_s else 0.0,
        "seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else 0.0,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else None,
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def validate(cfg: TrainConfig, accelerator, student, frozen, step: int, weight_dtype, tag: str = "",
             prediction_type: str | None = None) -> list[Path]:
    """Fast-path images at each of `validation_steps` for the fixed prompts and seeds (main process only),
    made by sdxl_fast.pipeline.generate itself, so they are exactly what users of the student will see."""
    if not accelerator.is_main_process:
        return []
    scheduler = frozen.scheduler if prediction_type is None else student_scheduler(frozen.scheduler, prediction_type)
    fast = FastModels(encoders=frozen.encoders, vae=frozen.vae, student=student, scheduler=scheduler,
                      names={"fast": "student"})
    models = sdxl_fast.Models(device=accelerator.device, dtype=weight_dtype, fast=fast)
    folder = Path(cfg.output_dir) / "validation" / f"step-{step:08d}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = student.training
    student.eval()
    paths, grid = [], []
    with accelerator.autocast():
        for p, prompt in enumerate(cfg.validation_prompts):
            for seed in cfg.validation_seeds:
                for steps in cfg.validation_steps:
                    params = sdxl_fast.GenerationParams(prompt, mode="fast", steps=steps, seed=seed,
                                                        width=cfg.resolution, height=cfg.resolution)
                    image = sdxl_fast.generate(models, params)[0]
                    path = folder / f"p{p}-seed{seed}-{steps}step.png"
                    sdxl_fast.save_png(image, path)
                    paths.append(path)
                    grid.append(torch.from_numpy(np.array(image)))
    student.train(was_training)
    try:
        tracker = accelerator.get_tracker("tensorboard")
        tracker.log_images({f"validation{tag}": torch.stack(grid).numpy()}, step=step, dataformats="NHWC")
    except Exception as exc:  # logging images must never stop training
        log.warning("Could not log validation images to tensorboard: %s", exc)
    return paths
