"""The `parameters` text: written in the format AUTOMATIC1111, ComfyUI, Civitai and other SDXL tools read (a
PNG text chunk; in a JPEG, EXIF UserComment), and parsed back so an image can be reproduced from its own file.

    a prompt
    Negative prompt: a negative prompt
    Steps: 50, Sampler: Euler, CFG scale: 5.0, Seed: 42, Size: 1024x1024, Model: ..., Mode: quality, ...

Sizes are written WxH as those tools do. SDXL micro-conditioning is written only where it differs from its
default, so ordinary images carry ordinary metadata.

Samplers, in the names AUTOMATIC1111 writes and reads: "Euler" (Quality), "Euler a" (Fast, diffusers' SDXL-Turbo
recipe), and for our students' ADD sampler "Sampler: LCM, Schedule type: ADD": it is LCM's algorithm (the clean
estimate re-noised with fresh noise at the next timestep) on the ADD student's timesteps (999, 749, 499, 249),
so A1111's and ComfyUI's "LCM" is the nearest sampler they have (near, not identical: it scales the
starting noise and picks its own timesteps). "Sampler: ADD" from older images reads as ADD.

Prompts that survive any text. The prompt is written on the first lines and the negative prompt after
"Negative prompt: ", as those tools expect; they read them back line by line, each line stripped, a line
starting with "Negative prompt:" starting the negative prompt. Where that reading would not give the text
back exactly (a line starting with "Negative prompt:", leading or trailing spaces, a carriage return...), the
exact text is also written as a JSON-quoted field of the last line, `Prompt: "..."` and/or
`Negative prompt: "..."`. Fields of the last line take precedence when read, here and in A1111's reader
(which sets the prompt from the lines, then from the fields), so both read the exact text.
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
from .files import atomic_write
from .params import (DEFAULT_AESTHETIC_SCORE, DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE_AESTHETIC_SCORE,
                     DEFAULT_REFINER_SWITCH, GenerationParams, parse_size)

# Our sampler name -> (the name written, the schedule type written or None); and the names read back.
WRITTEN_SAMPLERS = {"Euler": ("Euler", None), "Euler a": ("Euler a", None), "ADD": ("LCM", "ADD")}
READ_SAMPLERS = {"Euler": "Euler", "Euler a": "Euler a", "LCM": "ADD", "ADD": "ADD"}
NEGATIVE = "Negative prompt:"
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


def _prompt_lines(prompt: str, negative: str) -> list[str]:
    lines = prompt.split("\n") if prompt else []
    if negative:
        lines += f"{NEGATIVE} {negative}".split("\n")
    return lines


def _read_prompt_lines(lines: list[str]) -> tuple[str, str]:
    """(prompt, negative prompt) from the lines above the last, as AUTOMATIC1111 reads them (quirks included:
    the text and each line stripped, an empty first line of either prompt dropped)."""
    prompt, negative, in_negative = "", "", False
    text = "\n".join(lines).strip()
    for line in text.split("\n") if text else []:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


def infotext(params: GenerationParams, model_names: dict[str, str]) -> str:
    """The `parameters` text for one image of `params` (already resolved; `seed` is that image's seed)."""
    p = params
    fields = {"Steps": p.steps}
    sampler = p.sampler or ("Euler" if p.mode == "quality" else None)  # None: not known (unresolved params)
    if sampler is not None:
        fields["Sampler"], schedule = WRITTEN_SAMPLERS[sampler]
        if schedule is not None:
            fields["Schedule type"] = schedule
    fields.update({"CFG scale": p.guidance_scale if p.mode == "quality" else 1.0,
                   "Seed": p.seed, "Size": f"{p.width}x{p.height}"})
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
    lines = _prompt_lines(p.prompt, p.negative_prompt)
    last = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
    read_back = _read_prompt_lines(lines)
    if read_back[0] != p.prompt:  # the exact text too, as fields (module docstring)
        last += f", Prompt: {json.dumps(p.prompt)}"
    if read_back[1] != p.negative_prompt:
        last += f", {NEGATIVE} {json.dumps(p.negative_prompt)}"
    return "\n".join([*lines, last])


def _convert(fields: dict, key: str, convert, default=None):
    """fields[key] through `convert`, or `default` when absent; a bad value is a ValueError naming the field."""
    if key not in fields:
        return default
    try:
        return convert(fields[key])
    except (ValueError, TypeError) as err:
        raise ValueError(f"the image's parameters have a malformed {key!r} field ({fields[key]!r}): {err}") from None


def parse_infotext(text: str) -> tuple[GenerationParams, dict[str, str]]:
    """Parse a `parameters` text back into (params for one image, model names). A malformed field is a
    ValueError that names it."""
    lines = text.strip("\n").split("\n")
    fields = {}
    for key, value in _FIELD.findall(lines[-1]):
        key = key.strip()
        try:
            fields[key] = json.loads(value) if value.startswith('"') else value.strip()
        except ValueError:
            raise ValueError(f"the image's parameters have a malformed {key!r} field ({value!r})") from None
    if "Steps" not in fields or "Seed" not in fields:
        raise ValueError("Not an image parameters text: the last line has no 'Steps' and 'Seed'")
    prompt, negative = _read_prompt_lines(lines[:-1])
    prompt, negative = fields.get("Prompt", prompt), fields.get("Negative prompt", negative)

    mode = fields.get("Mode", "quality")
    height, width = _convert(fields, "Size", _parse_size, (None, None))
    params = GenerationParams(
        prompt=prompt, negative_prompt=negative, mode=mode,
        steps=_convert(fields, "Steps", int), seed=_convert(fields, "Seed", int), width=width, height=height,
        cache_interval=_convert(fields, "Step cache interval", int, 1),
        # A sampler we do not run (another tool's image): the mode's default.
        sampler=READ_SAMPLERS.get(fields.get("Sampler", "")) if mode == "fast" else None,
    )
    if mode == "quality":
        params = replace(params, guidance_scale=_convert(fields, "CFG scale", float, DEFAULT_GUIDANCE_SCALE),
                         use_refiner="Refiner" in fields,
                         refiner_switch=_convert(fields, "Refiner switch at", float, DEFAULT_REFINER_SWITCH),
                         aesthetic_score=_convert(fields, "Aesthetic score", float, DEFAULT_AESTHETIC_SCORE),
                         negative_aesthetic_score=_convert(fields, "Negative aesthetic score", float,
                                                           DEFAULT_NEGATIVE_AESTHETIC_SCORE))
    parsers = {"Original size": ("original_size", _parse_size), "Target size": ("target_size", _parse_size),
               "Negative original size": ("negative_original_size", _parse_size),
               "Negative target size": ("negative_target_size", _parse_size),
               "Crop top left": ("crops_coords_top_left", _parse_pair),
               "Negative crop top left": ("negative_crops_coords_top_left", _parse_pair)}
    for key, (name, parse) in parsers.items():
        if key in fields:
            params = replace(params, **{name: _convert(fields, key, parse)})
    names = {"base": fields.get("Model", ""), "refiner": fields.get("Refiner", ""), "fast": fields.get("Model", "")}
    return params.resolved(), names


def _parse_pair(text: str) -> tuple[int, int]:
    """"[top, left]" -> (top, left)."""
    pair = json.loads(text)
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
        raise ValueError("expected [top, left], two integers")
    return tuple(pair)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the image's `parameters` text; written atomically, so a crash never leaves a truncated PNG."""
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


# EXIF UserComment (in the Exif IFD), where AUTOMATIC1111 writes the parameters of a JPEG: an 8-byte character
# code, then the text.
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _file_with_descriptor():
    """A file in memory where the OS offers one, else a temporary file. Pillow encodes into a file with a
    descriptor without holding Python's lock (into a BytesIO it holds it), and a server encodes frames on many
    threads at once."""
    try:
        return os.fdopen(os.memfd_create("jpeg"), "w+b")
    except (AttributeError, OSError):  # no memfd_create on this OS, or a sandbox that refuses it
        return tempfile.TemporaryFile()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """The image as a JPEG with its `parameters` text in EXIF UserComment. At 512² it encodes in 1-2 ms where a
    PNG takes 30-70 ms, which is why the live preview uses it."""
    exif = Image.Exif()
    if "parameters" in image.info:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + image.info["parameters"].encode("utf-16-be")
    with _file_with_descriptor() as out:
        image.convert("RGB").save(out, format="JPEG", quality=quality, exif=exif)
        out.seek(0)
        return out.read()


def _exif_comment(image: Image.Image) -> str | None:
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    return raw[8:].decode("utf-16-be") if isinstance(raw, bytes) and raw[:8] == b"UNICODE\0" else None


def read_parameters(path: str | Path) -> str:
    """The parameters text of a PNG (its `parameters` chunk) or a JPEG (EXIF UserComment)."""
    with Image.open(path) as image:
        text = image.info.get("parameters") or _exif_comment(image)
    if text is None:
        raise ValueError(f"{path} has no 'parameters' text (PNG chunk or JPEG EXIF UserComment)")
    return text
