"""Train the demo family's stages on shapes images: `python -m sdxl_fast.shapes train-demo --stage STAGE --work DIR`.

Stages, in order (the student comes after, from `python -m sdxl_fast.distill`, see docs/DEMO_MODELS.md):

  encoders  the two CLIP text encoders, trained on caption labels (shapes/text_pretrain.py), then saved once
            and frozen, so every stage and machine uses the very same weights (minutes, CPU)
  vae       AutoencoderKL on pixels: L1 + MSE reconstruction + a mild KL pull towards N(0, 1); at the end the
            latent scaling factor (1 / std of the latents) and the probe's accuracy on reconstructions are stored
  base      SDXL-style base UNet: epsilon objective on VAE latents, t ~ U{0..999}, SDXL's noise schedule,
            caption dropout to zeroed embeddings (force_zeros_for_empty_prompt) for classifier-free guidance
  refiner   refiner UNet on the low-noise end only (t ~ U{0..refiner_t_max}), context = text_encoder_2's
            hidden states, time ids (orig size, crop, aesthetic score); dropped captions become the *encoded*
            empty prompt, as SDXL's refiner (force_zeros_for_empty_prompt=False)

Every run has a wall-clock budget (`minutes`, counted from the start of the process, data drawing included):
it stops itself in time and leaves a checkpoint in WORK/STAGE/. Running the same command again resumes from
that checkpoint (the step counter continues). A checkpoint is

  model.safetensors   fp32 weights (≤ 12 MB for every model here)
  ema.safetensors     fp32 EMA of the weights (UNets; what is exported)
  state.json          step, seconds trained, config, losses; for the VAE the latent scaling factor
  optimizer.pt        AdamW moments (2x the weights; kept for a resume on the same machine, but too big to
                      bring back from the GPU machine, so a resume elsewhere re-creates the optimiser and warms
                      its learning rate up again over `warmup_steps`)

Data: a fixed pool of training seeds 0 .. pool_size-1 (never held-out seeds), drawn once per run by
`workers` processes into uint8 memory (optionally cached on disk for the next stage on the same machine);
the base and refiner stages encode the pool once with the trained VAE (posterior mean and std: each step
draws a fresh latent sample) and each distinct caption once with the frozen encoders.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdxl_fast.distill.checkpoints import EMA
from sdxl_fast.files import atomic_write
from sdxl_fast.pipeline import sampling

from . import demo_family
from .demo_config import ORIGINAL_SIZE, STAGES, DemoTrainConfig  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------------------
# Checkpoints: one folder per stage, each file replaced atomically.

def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_checkpoint(folder: Path, model, ema: EMA | None, optimizer, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(model.state_dict(), folder / "model.safetensors")
    if ema is not None:
        _save_tensors(ema.shadow, folder / "ema.safetensors")
    if optimizer is not None:
        with atomic_write(folder / "optimizer.pt") as tmp:
            torch.save(optimizer.state_dict(), tmp)
    with atomic_write(folder / "state.json") as tmp:  # last: a complete checkpoint has state.json
        tmp.write_text(json.dumps(state, indent=1))


def load_state(folder: Path) -> dict | None:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_weights(model, folder: Path, ema: bool = False) -> None:
    """Load model.safetensors (or ema.safetensors) into `model`; every key must match."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / ("ema.safetensors" if ema else "model.safetensors"))), strict=True)


# ---------------------------------------------------------------------------------------------------------
# Frozen text encoders and caption embeddings.

def train_text_encoders(cfg: DemoTrainConfig, started: float) -> dict:
    """Random init (seed 0), trained on caption labels (shapes/text_pretrain.py), saved once to WORK/encoders:
    every later stage and machine must see the very same weights, so an existing folder is kept."""
    from .text_pretrain import train_encoders

    folder = Path(cfg.work) / "encoders"
    if (folder / "text_encoder_2" / "config.json").is_file():
        print(f"text encoders already in {folder}; kept (every stage must see the same weights)", flush=True)
        return load_state(folder) or {}
    device = pick_device(cfg)
    te1, te2 = demo_family.build_text_encoders()
    tok1, tok2 = demo_family.tokenizers()
    state = train_encoders(
        {"text_encoder": te1.to(device), "text_encoder_2": te2.to(device)},
        {"text_encoder": tok1, "text_encoder_2": tok2}, steps=cfg.max_steps or 10**9, batch_size=cfg.batch_size,
        lr=cfg.lr, seed=cfg.seed, pool_size=cfg.pool_size, eval_captions=cfg.eval_images,
        deadline=started + 60 * cfg.minutes - cfg.reserve_seconds, log_every=cfg.log_every)
    te1.cpu().save_pretrained(folder / "text_encoder", safe_serialization=True)
    te2.cpu().save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    state["config"] = cfg.to_dict()
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    acc = state["heldout_accuracy"]
    worst = min(acc, key=acc.get)
    print(f"encoders: {state['steps']} steps in {state['seconds']:.0f} s; held-out accuracy of the linear read-outs "
          f"{acc[worst]:.3f} (worst: {worst}) to {max(acc.values()):.3f}; saved to {folder}", flush=True)
    return state


def load_encoders(work: Path, device, dtype=torch.float32):
    """(text_encoder, text_encoder_2, tokenizer, tokenizer_2) from WORK/encoders, written by the encoders stage."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = work / "encoders"
    if not (folder / "text_encoder_2" / "config.json").is_file():
        raise FileNotFoundError(f"No text encoders in {folder}: run `python -m sdxl_fast.shapes train-demo --stage encoders "
                                f"--work {work}` first (once; every later stage and machine reuses them)")
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).to(device).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype).to(device).eval()
    tok1, tok2 = demo_family.tokenizers()
    return te1.requires_grad_(False), te2.requires_grad_(False), tok1, tok2


@torch.no_grad()
def encode_captions(encoders, captions: list[str], device, batch: int = 1024):
    """Each distinct caption once, exactly as `sdxl_fast.pipeline.prompts.encode_prompts` encodes a prompt (77 tokens,
    penultimate hidden states, pooled = text_encoder_2's projected end token).

    Returns (context [U, 77, 64] = cat(hidden_1, hidden_2), pooled [U, 32], index [N] into the U rows)."""
    from sdxl_fast.models import TextEncoders
    from sdxl_fast.pipeline.prompts import encode_tokens

    te1, te2, tok1, tok2 = encoders
    text_encoders = TextEncoders(tok1, te1, tok2, te2)
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    contexts, pooled = [], []
    for i in range(0, len(unique), batch):
        part = unique[i:i + batch]
        # Captions are short: tokenised without sdxl_fast's per-prompt truncation check, which would double
        # the tokenising of ~45k captions on the GPU machine's clock.
        ids = [tok(part, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
               for tok in (tok1, tok2)]
        embeddings = encode_tokens(text_encoders, *ids)
        contexts.append(embeddings.base_context.float())
        pooled.append(embeddings.pooled.float())
    index = torch.tensor([row[c] for c in captions], device=device)
    return torch.cat(contexts), torch.cat(pooled), index


# ---------------------------------------------------------------------------------------------------------
# Small helpers shared by the stages.

class Budget:
    """The run's wall-clock budget, counted from `started` (the process start), and its step limit."""

    def __init__(self, cfg: DemoTrainConfig, started: float):
        self.deadline = started + cfg.minutes * 60 - cfg.reserve_seconds
        self.max_steps = cfg.max_steps
        self.every = cfg.checkpoint_minutes * 60
        self.last_checkpoint = self.last_lap = time.time()

    def over(self) -> bool:
        return time.time() >= self.deadline

    def running(self, step: int) -> bool:
        """Whether to train another step: time is left and max_steps (0: none) is not reached."""
        return not self.over() and not (self.max_steps and step >= self.max_steps)

    def lap(self) -> float:
        """Seconds trained since the last lap (the first: since the budget was made)."""
        now = time.time()
        seconds, self.last_lap = now - self.last_lap, now
        return seconds

    def checkpoint_due(self) -> bool:
        if time.time() - self.last_checkpoint >= self.every:
            self.last_checkpoint = time.time()
            return True
        return False


def pick_device(cfg: DemoTrainConfig) -> torch.device:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device):
    """bf16 autocast on GPUs (fp32 master weights and optimiser); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def make_optimizer(cfg: DemoTrainConfig, model, folder: Path, state: dict):
    """AdamW; its moments come back from optimizer.pt when present, else it starts fresh and warms up again."""
    fused = next(model.parameters()).device.type == "cuda"  # one kernel per step instead of one per tensor
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused)
    path = folder / "optimizer.pt"
    state["opt_steps"] = state.get("opt_steps", 0)
    if state.get("step", 0) > 0 and path.is_file():
        opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"resumed optimizer state from {path}", flush=True)
    else:
        if state.get("step", 0) > 0:
            print("no optimizer.pt: fresh AdamW moments, learning rate warms up again", flush=True)
        state["opt_steps"] = 0
    return opt


def optimizer_step(opt, model, loss: torch.Tensor, max_grad_norm: float, state: dict) -> None:
    """Backward, clip, step; the step counters live in `state`, which the checkpoint saves."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    state["step"] += 1
    state["opt_steps"] += 1


def set_lr(cfg: DemoTrainConfig, opt, state: dict) -> float:
    lr = cfg.lr * min(1.0, (state["opt_steps"] + 1) / max(1, cfg.warmup_steps))  # then constant (EMA anneals)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def images_to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, H, W] on `device` (a uint8 pool is 4x smaller than floats)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


class Logger:
    def __init__(self, cfg: DemoTrainConfig, start_step: int):
        self.every, self.t0, self.step0, self.losses = cfg.log_every, time.time(), start_step, []

    def __call__(self, step: int, loss: torch.Tensor, lr: float, extra: dict | None = None) -> None:
        """Losses stay on the device until a log line is due: a .item() every step would stall the GPU."""
        self.losses.append(loss.detach())
        if self.every and step % self.every == 0:
            rate = (step - self.step0) / max(1e-9, time.time() - self.t0)
            mean = torch.stack(self.losses).float().mean().item()
            more = " ".join(f"{k} {v.item():.4f}" for k, v in (extra or {}).items())
            print(f"step {step} loss {mean:.5f} lr {lr:.2e} {rate:.2f} steps/s {more}", flush=True)
            self.losses = []


def draw_pool(cfg: DemoTrainConfig):
    from .pool import load_or_draw_pool

    t = time.time()
    images, captions, labels = load_or_draw_pool(cfg.pool_size, cfg.workers, cfg.pool_cache or None)
    print(f"pool: {len(images)} images (seeds 0..{len(images) - 1}) in {time.time() - t:.1f} s", flush=True)
    return images, captions, labels


def _resume(model, folder: Path, name: str):
    """(model, state): the stage's checkpoint loaded into `model` when there is one, else a fresh state."""
    state = load_state(folder) or {"step": 0, "seconds": 0.0}
    if state["step"]:
        load_weights(model, folder)
        print(f"resuming {name} from step {state['step']}", flush=True)
    return model, state


def _checkpoint(folder: Path, model, ema: EMA | None, optimizer, state: dict, budget: Budget, cfg: DemoTrainConfig,
                **extra) -> None:
    """Save the stage, with the seconds trained since the last save added to its state."""
    state["seconds"] += budget.lap()
    state.update(config=cfg.to_dict(), **extra)
    save_checkpoint(folder, model, ema, optimizer, state)


# ---------------------------------------------------------------------------------------------------------
# Stage: VAE.

def load_vae(work: Path, device) -> torch.nn.Module:
    """The trained VAE with its measured latent scaling factor in its config."""
    folder = work / "vae"
    state = load_state(folder)
    if state is None or "scaling_factor" not in state:
        raise FileNotFoundError(f"No finished VAE checkpoint in {folder}: run the vae stage first")
    vae = demo_family.build_vae()
    load_weights(vae, folder)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def measure_vae(vae, pixels_uint8: torch.Tensor, device, n: int = 2048, heldout: int = 256) -> dict:
    """Latent std (-> scaling factor = 1/std, as SD's 0.18215/0.13025 were chosen) and mean on n pool images;
    on held-out seeds, the reconstruction error and the probe's accuracy on the reconstructions: the ceiling of
    every model that draws through this VAE (a VAE that loses object colours caps every stage after it)."""
    from .data import heldout_seeds, sample
    from .probe import label_targets, load_probe, predict_indices, score

    vae.eval()
    latents = []
    for i in range(0, min(n, len(pixels_uint8)), 256):
        with autocast(device):
            latents.append(vae.encode(to_float(pixels_uint8[i:i + 256])).latent_dist.sample().float())
    z = torch.cat(latents)
    images, _, labels = zip(*(sample(s) for s in heldout_seeds(heldout)))
    held = to_float(images_to_tensor(np.stack([np.asarray(im) for im in images]), device))
    with autocast(device):
        rec = vae.decode(vae.encode(held).latent_dist.mode()).sample.float().clamp(-1, 1)
    mse = F.mse_loss(rec, held).item()
    probe = load_probe()
    small = F.interpolate(rec, size=probe.config.input_size, mode="area")  # the probe's box resize
    accuracy = score(predict_indices(probe, ((small + 1) * 127.5).round().to(torch.uint8).cpu()),
                     label_targets(list(labels)))
    return {"scaling_factor": 1.0 / z.std().item(), "latent_mean": z.mean().item(), "latent_std": z.std().item(),
            "heldout_l1": (rec - held).abs().mean().item(), "heldout_psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
            **{f"heldout_probe_{k}": v for k, v in accuracy.items()}}


def train_vae(cfg: DemoTrainConfig, started: float) -> dict:
    folder = Path(cfg.work) / "vae"
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    vae, state = _resume(demo_family.build_vae(), folder, "vae")
    vae.to(device).train()
    opt = make_optimizer(cfg, vae, folder, state)
    images, _, _ = draw_pool(cfg)
    pixels = images_to_tensor(images, device)
    del images
    budget, log = Budget(cfg, started), Logger(cfg, state["step"])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + state["step"])
    while budget.running(state["step"]):
        x = to_float(pixels[torch.randint(len(pixels), (cfg.batch_size,), generator=gen).to(device)])
        lr = set_lr(cfg, opt, state)
        loss, parts = vae_loss(vae, x, cfg.kl_weight, device)
        optimizer_step(opt, vae, loss, cfg.max_grad_norm, state)
        log(state["step"], loss, lr, parts)
        if budget.checkpoint_due():
            _checkpoint(folder, vae, None, opt, state, budget, cfg)
    state["seconds"] += budget.lap()
    # The latent scaling factor every later stage needs; measuring it is not training time.
    state.update(config=cfg.to_dict(), **measure_vae(vae, pixels, device, heldout=cfg.eval_images))
    print("vae: " + " ".join(f"{k} {v:.4f}" for k, v in state.items() if isinstance(v, float)), flush=True)
    vae.train()
    save_checkpoint(folder, vae, None, opt, state)
    print(f"vae: stopped at step {state['step']}, checkpoint in {folder}", flush=True)
    return state


def vae_loss(vae, x: torch.Tensor, kl_weight: float, device) -> tuple[torch.Tensor, dict]:
    """Reconstruction of pixels x [B, 3, H, W] through a posterior sample -> (loss, its parts for the log)."""
    with autocast(device):
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample.float()
    # L1 + MSE: a wrongly coloured object is few pixels with large errors, which MSE weighs up against the
    # small per-pixel errors of textured backgrounds (L1 alone left half the object colours wrong).
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    kl = posterior.kl().float().mean() / (4 * demo_family.LATENT_SIZE ** 2)  # per latent element
    return l1 + mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


# ---------------------------------------------------------------------------------------------------------
# Stages: base and refiner UNets (one loop; the stage decides conditioning and timesteps).

@torch.no_grad()
def encode_pool(vae, images: np.ndarray, device, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, [N, 4, 16, 16] each, in bf16 on `device`."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = to_float(images_to_tensor(images[i:i + batch], device))
        with autocast(device):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.to(torch.bfloat16))
        stds.append(dist.std.to(torch.bfloat16))
    return torch.cat(means), torch.cat(stds)


@dataclass
class UNetData:
    """The pool as the UNet stages read it, computed once: VAE posteriors and the caption embeddings."""

    lat_mean: torch.Tensor  # [N, 4, 16, 16] bf16, each image's posterior mean (unscaled)
    lat_std: torch.Tensor  # [N, 4, 16, 16] bf16
    scaling: float  # the VAE's latent scaling factor
    context: torch.Tensor  # [U, 77, D] each distinct caption once (refiner: text_encoder_2's part only)
    pooled: torch.Tensor  # [U, P]
    cap_index: torch.Tensor  # [N] each image's caption row
    empty: torch.Tensor  # the encoded empty prompt's row (the refiner's caption dropout)
    size_crop: torch.Tensor  # [4] time ids: original size, crop (0, 0)
    target: torch.Tensor  # [2] time ids: target size


def load_unet_data(cfg: DemoTrainConfig, refiner: bool, device) -> UNetData:
    """The pool through the trained VAE and the frozen encoders."""
    work = Path(cfg.work)
    vae = load_vae(work, device)
    scaling = vae.config.scaling_factor
    images, captions, _ = draw_pool(cfg)
    t = time.time()
    lat_mean, lat_std = encode_pool(vae, images, device)
    del images
    encoders = load_encoders(work, device)
    context, pooled, cap_index = encode_captions(encoders, captions + [""], device)
    if refiner:
        context = context[..., demo_family.TEXT_HIDDEN:]  # hidden_2 only
    del encoders, vae
    print(f"encoded {len(cap_index) - 1} latents and {len(context)} distinct captions in {time.time() - t:.1f} s "
          f"(latent scale {scaling:.4f})", flush=True)
    return UNetData(lat_mean, lat_std, scaling, context, pooled, cap_index[:-1], cap_index[-1],
                    size_crop=torch.tensor([*ORIGINAL_SIZE, 0, 0], device=device, dtype=torch.float32),
                    target=torch.tensor(ORIGINAL_SIZE, device=device, dtype=torch.float32))


def unet_loss(unet, cfg: DemoTrainConfig, d: UNetData, alphas: torch.Tensor, t_max: int, refiner: bool,
              gen: torch.Generator, device) -> torch.Tensor:
    """The epsilon objective on a random batch: a fresh posterior sample of each latent, t ~ U{0..t_max}, and
    caption dropout for classifier-free guidance."""
    b = cfg.batch_size
    idx = torch.randint(len(d.cap_index), (b,), generator=gen).to(device)
    mean, std = d.lat_mean[idx].float(), d.lat_std[idx].float()
    x0 = (mean + std * torch.randn(mean.shape, device=device)) * d.scaling  # a posterior sample
    noise = torch.randn_like(x0)
    t = torch.randint(0, t_max + 1, (b,), device=device)
    x_t = sampling.add_noise(x0, noise, alphas[t].view(b, 1, 1, 1))
    drop = torch.rand(b, device=device) < cfg.caption_dropout
    rows = d.cap_index[idx]
    if refiner:  # dropped captions -> the encoded "" (the refiner's negative prompt is encoded, not zeroed)
        rows = torch.where(drop, d.empty, rows)
        context, pooled = d.context[rows], d.pooled[rows]
        score = torch.empty(b, device=device).uniform_(*cfg.aesthetic_range)
        time_ids = torch.cat([d.size_crop.expand(b, 4), score[:, None]], dim=1)  # [B, 5]
    else:  # dropped captions -> zeroed embeddings (force_zeros_for_empty_prompt)
        keep = (~drop).float()
        context, pooled = d.context[rows] * keep.view(b, 1, 1), d.pooled[rows] * keep.view(b, 1)
        time_ids = torch.cat([d.size_crop, d.target]).expand(b, 6)  # [B, 6]
    with autocast(device):
        eps = sampling.unet_forward(unet, x_t, t, context, pooled, time_ids)
    return F.mse_loss(eps.float(), noise)


def train_unet(cfg: DemoTrainConfig, started: float) -> dict:
    from diffusers import EulerDiscreteScheduler

    from sdxl_fast.testing.random_weights import SDXL_SCHEDULER

    refiner = cfg.stage == "refiner"
    folder = Path(cfg.work) / cfg.stage
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    unet, state = _resume(demo_family.build_refiner_unet() if refiner else demo_family.build_base_unet(), folder,
                          cfg.stage)
    unet.to(device).train()
    ema = EMA(unet, cfg.ema_decay)
    if state["step"] and (folder / "ema.safetensors").is_file():
        from safetensors.torch import load_file

        ema.load_state_dict({"decay": cfg.ema_decay, "shadow": load_file(str(folder / "ema.safetensors"))})
    opt = make_optimizer(cfg, unet, folder, state)
    print(f"{cfg.stage} unet: {demo_family.count_parameters(unet) / 1e6:.2f} M parameters", flush=True)
    data = load_unet_data(cfg, refiner, device)

    alphas = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).alphas_cumprod.to(device)  # ᾱ_t, [1000]
    t_max = cfg.refiner_t_max if refiner else len(alphas) - 1
    budget, log = Budget(cfg, started), Logger(cfg, state["step"])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + state["step"])
    while budget.running(state["step"]):
        lr = set_lr(cfg, opt, state)
        loss = unet_loss(unet, cfg, data, alphas, t_max, refiner, gen, device)
        optimizer_step(opt, unet, loss, cfg.max_grad_norm, state)
        ema.update(unet, step=state["step"])
        log(state["step"], loss, lr)
        if budget.checkpoint_due():
            _checkpoint(folder, unet, ema, opt, state, budget, cfg, scaling_factor=data.scaling)
    _checkpoint(folder, unet, ema, opt, state, budget, cfg, scaling_factor=data.scaling)
    print(f"{cfg.stage}: stopped at step {state['step']} ({state['seconds']:.0f} s trained in all), "
          f"checkpoint in {folder}", flush=True)
    return state


def run_stage(cfg: DemoTrainConfig, started: float | None = None) -> dict:
    started = started if started is not None else time.time()
    if cfg.stage == "encoders":
        return train_text_encoders(cfg, started)
    if cfg.stage == "vae":
        return train_vae(cfg, started)
    return train_unet(cfg, started)
