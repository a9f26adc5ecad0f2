"""Export the trained demo family as fp16 diffusers folders: `python -m sdxl_fast.shapes export-demo --work runs/demo`.

  OUT/base     StableDiffusionXLPipeline: both frozen text encoders and tokenizers, the VAE (with its
               measured scaling factor), the base UNet (EMA weights) and SDXL's Euler scheduler
  OUT/refiner  the refiner UNet (EMA) + scheduler + model_index.json of a StableDiffusionXLImg2ImgPipeline
               (requires_aesthetics_score, force_zeros_for_empty_prompt False). Its text_encoder_2 and VAE
               are the base's (as in SDXL, where the refiner shares them): sdxl_fast loads only unet and
               scheduler from a refiner folder, and leaving the copies out keeps the family within budget.
  OUT/student  the ADD student written by `python -m sdxl_fast.distill` (UNet-only folder), cast to fp16

Everything is safetensors in fp16; the total size is printed and checked against `max_mb`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..loading import STUDENT_CONFIG
from . import demo_family
from .train_demo import load_encoders, load_vae, load_weights


def _minify_tokenizer(folder: Path) -> None:
    """tokenizer.json is written indented (3.6 MB); the same JSON without whitespace is 1.7 MB."""
    path = folder / "tokenizer.json"
    if path.is_file():
        path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":"), ensure_ascii=False))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_demo(work: str | Path = "runs/demo", out: str | Path = "demo_models",
                parts: tuple[str, ...] = ("base", "refiner", "student"), student: str | Path | None = None,
                max_mb: float = 25.0, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    from sdxl_fast.testing.random_weights import SDXL_SCHEDULER

    work, out = Path(work), Path(out)
    unknown = set(parts) - {"base", "refiner", "student"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}")
    written: dict[str, Path] = {}
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)

    if "base" in parts:
        vae = load_vae(work, "cpu")
        te1, te2, tok1, tok2 = load_encoders(work, "cpu")
        unet = demo_family.build_base_unet()
        load_weights(unet, work / "base", ema=True)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler)
        pipe.to(dtype=dtype)
        pipe.save_pretrained(out / "base", safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):
            _minify_tokenizer(out / "base" / sub)
        written["base"] = out / "base"

    if "refiner" in parts:
        unet = demo_family.build_refiner_unet()
        load_weights(unet, work / "refiner", ema=True)
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet.to(dtype),
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        pipe.save_pretrained(out / "refiner", safe_serialization=True)
        written["refiner"] = out / "refiner"

    if "student" in parts:
        if student is None or not (Path(student) / "config.json").is_file():
            raise FileNotFoundError(f"No student UNet folder at {student!r} (python -m sdxl_fast.distill writes OUTPUT_DIR/student)")
        unet = UNet2DConditionModel.from_pretrained(student, use_safetensors=True).to(dtype)
        unet.save_pretrained(out / "student", safe_serialization=True)
        record = Path(student) / STUDENT_CONFIG  # its Fast sampler and prediction type
        if record.is_file():
            shutil.copyfile(record, out / "student" / STUDENT_CONFIG)
        card, trained = Path(student) / "README.md", Path(student) / "training_config.json"
        if card.is_file():
            text = card.read_text()
            if trained.is_file():  # the card's usage names the teacher folder it was trained from: name ours
                usage, sep, config = text.partition("## Training config")
                teacher = json.loads(trained.read_text())["teacher"]
                text = usage.replace(teacher, str(out / "base")) + sep + config
            (out / "student" / "README.md").write_text(text)
        written["student"] = out / "student"

    sizes = {name: folder_bytes(folder) for name, folder in written.items()}
    total = sum(sizes.values())
    print("exported " + ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in sizes.items()) + f"; total {total / 1e6:.2f} MB "
          f"({total / 2**20:.2f} MiB) in {out}", flush=True)
    if total > max_mb * 1e6:
        raise RuntimeError(f"the exported folders take {total / 1e6:.2f} MB, over the {max_mb} MB budget")
    return written
