"""The PNG `parameters` text: written in the format AUTOMATIC1111, ComfyUI, Civitai and other SDXL tools read,
and parsed back so an image can be reproduced from its own file.

    a prompt
    Negative prompt: a negative prompt
    Steps: 50, Sampler: Euler, CFG scale: 5.0, Seed: 42, Size: 1024x1024, Model: ..., Mode: quality, ...

Sizes are written WxH as those tools do. SDXL micro-conditioning is written only where it differs from its
default, so ordinary images carry ordinary metadata.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__ as VERSION
from .params import (DEFAULT_AESTHETIC_SCORE, DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_AESTHETIC_SCORE,
                     DEFAULT_REFINER_SWITCH, GenerationParams, parse_size)

SAMPLERS = {"quality": "Euler", "fast": "ADD"}
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _size(hw) -> str:
    return f"{hw[1]}x{hw[0]}"


def _parse_size(text: str) -> tuple[int, int]:
    """WxH -> (height, width)."""
    width, height = parse_size(text)
    return height, width


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def infotext(params: GenerationParams, model_names: dict[str, str]) -> str:
    """The `parameters` text for one image of `params` (already resolved; `seed` is that image's seed)."""
    p = params
    fields = {"Steps": p.steps, "Sampler": SAMPLERS[p.mode],
              "CFG scale": p.guidance_scale if p.mode == "quality" else 1.0,
              "Seed": p.seed, "Size": f"{p.width}x{p.height}"}
    if p.mode == "quality":
        fields["Model"] = model_names.get("base", "")
        if p.use_refiner and model_names.get("refiner"):
            fields["Refiner"] = model_names["refiner"]
            fields["Refiner switch at"] = p.refiner_switch
    else:
        fields["Model"] = model_names.get("fast", "")
    fields["Mode"] = p.mode
    if p.cache_interval > 1:
        fields["Step cache interval"] = p.cache_interval
    output_size = (p.height, p.width)
    defaults = {
        "Original size": (p.original_size, output_size, _size),
        "Crop top left": (p.crops_coords_top_left, (0, 0), list),
        "Target size": (p.target_size, output_size, _size),
        "Negative original size": (p.negative_original_size, p.original_size, _size),
        "Negative target size": (p.negative_target_size, p.target_size, _size),
    }
    for key, (value, default, fmt) in defaults.items():
        if tuple(value) != tuple(default):
            fields[key] = fmt(value)
    # Unset (None), the negative crop follows diffusers' defaults (GenerationParams.negative_crop); set, it is
    # written unless both crops are (0, 0), where set and unset are the same.
    negative_crop = p.negative_crops_coords_top_left
    if negative_crop is not None and (tuple(negative_crop), tuple(p.crops_coords_top_left)) != ((0, 0), (0, 0)):
        fields["Negative crop top left"] = list(negative_crop)
    if p.mode == "quality" and p.use_refiner and "Refiner" in fields:
        if (p.aesthetic_score, p.negative_aesthetic_score) != (DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE):
            fields["Aesthetic score"] = p.aesthetic_score
            fields["Negative aesthetic score"] = p.negative_aesthetic_score
    fields["Version"] = f"sdxl-fast {VERSION}"
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[GenerationParams, dict[str, str]]:
    """Parse a `parameters` text back into (params for one image, model names)."""
    lines = text.strip("\n").split("\n")
    fields = {}
    for key, value in _FIELD.findall(lines[-1]):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    if "Steps" not in fields or "Seed" not in fields:
        raise ValueError("Not an image parameters text: the last line has no 'Steps' and 'Seed'")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    mode = fields.get("Mode", "quality")
    height, width = _parse_size(fields["Size"])
    params = GenerationParams(
        prompt="\n".join(prompt_lines), negative_prompt="\n".join(negative_lines), mode=mode,
        steps=int(fields["Steps"]), seed=int(fields["Seed"]), width=width, height=height,
        cache_interval=int(fields.get("Step cache interval", 1)),
    )
    if mode == "quality":
        params = replace(params, guidance_scale=float(fields.get("CFG scale", DEFAULT_GUIDANCE_SCALE)),
                         use_refiner="Refiner" in fields,
                         refiner_switch=float(fields.get("Refiner switch at", DEFAULT_REFINER_SWITCH)),
                         aesthetic_score=float(fields.get("Aesthetic score", DEFAULT_AESTHETIC_SCORE)),
                         negative_aesthetic_score=float(fields.get("Negative aesthetic score",
                                                                   DEFAULT_NEGATIVE_AESTHETIC_SCORE)))
    parsers = {"Original size": ("original_size", _parse_size), "Target size": ("target_size", _parse_size),
               "Negative original size": ("negative_original_size", _parse_size),
               "Negative target size": ("negative_target_size", _parse_size),
               "Crop top left": ("crops_coords_top_left", lambda v: tuple(json.loads(v))),
               "Negative crop top left": ("negative_crops_coords_top_left", lambda v: tuple(json.loads(v)))}
    for key, (name, parse) in parsers.items():
        if key in fields:
            params = replace(params, **{name: parse(fields[key])})
    names = {"base": fields.get("Model", ""), "refiner": fields.get("Refiner", ""), "fast": fields.get("Model", "")}
    return params.resolved(), names


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the image's `parameters` text; written to a temporary file first so a crash never leaves a
    truncated PNG behind."""
    path = Path(path)
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_parameters(path: str | Path) -> str:
    with Image.open(path) as image:
        text = image.info.get("parameters")
    if text is None:
        raise ValueError(f"{path} has no 'parameters' text chunk")
    return text
