"""A request's raw values (what a UI event or an API call sends) -> GenerationParams, or an error naming the field.

The values arrive as the client sent them (the app's events skip Gradio's own preprocessing, whose errors name
no field and whose NaN handling raises unreadable exceptions): numbers may be ints, floats, NaN or inf, text,
None or anything JSON holds. Each field is checked here against the range the page offers, and a bad one
raises `FieldError`, whose message names the field as the page labels it and as the API calls it, says what is
allowed, and quotes the value HTML-escaped (Gradio renders error messages as HTML).

A value left out of an API call is filled in by the client with the page's default (the API info lists them).
An explicit None (or empty text) is an error for every field but these: the prompts (empty text), the
micro-conditioning sizes and crops (0: for a size, "same as the output size" on that side, issue 29's rule), and
the seed when the request asks for a random one.
"""

from __future__ import annotations

import html
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping

from ..params import (DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, MAX_FAST_STEPS, MAX_SEED,
                      MAX_SIDE, MIN_SIDE, GenerationParams, parse_size)

# The ranges the page offers (its sliders), which the API keeps too.
QUALITY_MAX_STEPS = 100
MAX_STEPS = {"fast": MAX_FAST_STEPS, "quality": QUALITY_MAX_STEPS}
MAX_IMAGES = 4
GUIDANCE_RANGE = (0.0, 20.0)
REFINER_SWITCH_RANGE = (0.5, 1.0)
AESTHETIC_RANGE = (0.0, 10.0)
MAX_CACHE_INTERVAL = 4
MAX_MICRO = 16384  # micro-conditioning sizes and crops, as GenerationParams allows
MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens (a few hundred characters); this only stops absurd uploads

# API parameter name -> the page's label for it
LABELS = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "seed": "Seed",
    "randomize_seed": "Randomize seed", "size": "Size", "guidance_scale": "Guidance scale",
    "refiner_switch": "Refiner switch point", "num_images": "Number of images",
    "orig_w": "Original width", "orig_h": "Original height", "crop_top": "Crop top", "crop_left": "Crop left",
    "target_w": "Target width", "target_h": "Target height", "aesthetic_score": "Aesthetic score",
    "negative_aesthetic_score": "Negative aesthetic score", "cache_interval": "Step cache",
}


def escape(text: str) -> str:
    """Text safe to show in an HTML-rendered message: <, > and & escaped (quotes are harmless in text)."""
    return html.escape(str(text), quote=False)


def shown(value: Any, limit: int = 40) -> str:
    """A user's value as a message quotes it: its repr, cut to `limit` characters, HTML-escaped."""
    text = repr(value)
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


class FieldError(ValueError):
    """A request field that is missing, of the wrong kind or out of range. The message names the field (the
    page's label and the API parameter), says what is allowed and is safe to render as HTML."""

    def __init__(self, name: str, rule: str, value: Any):
        self.field, self.rule, self.value = name, rule, value
        super().__init__(f"{LABELS.get(name, name)} ({name}) must be {rule}; got {shown(value)}.")


def _blank(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 else f"{int(x)}"


REQUIRED = object()


def number(raw: Any, name: str, low: float, high: float, default: Any = REQUIRED, whole: bool = False,
           note: str = ""):
    """A finite number from `low` to `high` (a whole one with `whole`); None or "" -> `default`, an error
    where there is none. Numeric text ("3", " 2.5 ") is accepted, as a form would send it."""
    rule = f"{'a whole number' if whole else 'a number'} from {_fmt(low)} to {_fmt(high)}{note}"
    if _blank(raw):
        if default is REQUIRED:
            raise FieldError(name, rule, raw)
        return default
    value = raw
    if isinstance(raw, str):
        try:
            value = int(raw.strip()) if whole and raw.strip().lstrip("+-").isdigit() else float(raw)
        except (ValueError, OverflowError):
            raise FieldError(name, rule, raw) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, rule, raw)
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, rule, raw)
    if whole:
        if value != int(value):
            raise FieldError(name, rule, raw)
        value = int(value)
    if not low <= value <= high:
        raise FieldError(name, rule, raw)
    return value


def text(raw: Any, name: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Text up to `max_chars` characters; None -> ""."""
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise FieldError(name, "text", raw)
    if len(raw) > max_chars:
        raise FieldError(name, f"text of at most {max_chars} characters", f"{len(raw)} characters")
    return raw


def flag(raw: Any, name: str) -> bool:
    """true/false (also 1/0 and their text forms)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "1", "0"):
        return raw.strip().lower() in ("true", "1")
    raise FieldError(name, "true or false", raw)


def size(raw: Any, name: str) -> tuple[int, int]:
    """"1024x768" -> (width, height), each side a multiple of 8 from MIN_SIDE to MAX_SIDE."""
    rule = (f"a size such as 1024x768 (width x height), each side a multiple of 8 from {MIN_SIDE} to "
            f"{MAX_SIDE}")
    if not isinstance(raw, str):
        raise FieldError(name, rule, raw)
    try:
        width, height = parse_size(raw)
    except ValueError:
        raise FieldError(name, rule, raw) from None
    if any(side % 8 or not MIN_SIDE <= side <= MAX_SIDE for side in (width, height)):
        raise FieldError(name, rule, raw)
    return width, height


def pair(first: int, second: int, size_first: int, size_second: int) -> tuple[int, int] | None:
    """A micro-conditioning pair (height, width) from two fields where 0 means "same as the output size" for
    that side (issue 29's rule): (0, 0) -> None (the default, the output size); (0, w) -> (output height, w)."""
    if not first and not second:
        return None
    return first or size_first, second or size_second


@dataclass(frozen=True)
class Parsed:
    """A parsed request: its parameters (sizes filled, seed drawn when asked to randomize; not yet resolved
    against the loaded models) and whether the seed was drawn here."""

    params: GenerationParams
    randomized: bool


FAST_FIELDS = ("prompt", "steps", "seed", "randomize_seed", "size", "num_images", "orig_w", "orig_h", "crop_top",
               "crop_left", "target_w", "target_h")
QUALITY_FIELDS = ("prompt", "negative_prompt", "steps", "seed", "randomize_seed", "size", "guidance_scale",
                  "refiner_switch", "num_images", "orig_w", "orig_h", "crop_top", "crop_left", "target_w", "target_h",
                  "aesthetic_score", "negative_aesthetic_score", "cache_interval")
MICRO = ("orig_w", "orig_h", "crop_top", "crop_left", "target_w", "target_h")


def parse(mode: str, raw: Mapping[str, Any]) -> Parsed:
    """A request of `mode` ("fast" or "quality") from its raw values, keyed by API parameter name (a missing
    key is None). Fast reads only FAST_FIELDS (it has no negative prompt, guidance, refiner, aesthetic scores
    or step cache). Raises FieldError for the first bad field, in the page's order."""
    get = raw.get
    quality = mode == "quality"
    prompt = text(get("prompt"), "prompt")
    negative = text(get("negative_prompt"), "negative_prompt") if quality else ""
    steps = number(get("steps"), "steps", 1, MAX_STEPS[mode], whole=True)
    randomize = flag(get("randomize_seed"), "randomize_seed")
    seed = number(get("seed"), "seed", 0, MAX_SEED, None if randomize else REQUIRED, whole=True)
    width, height = size(get("size"), "size")
    num_images = number(get("num_images"), "num_images", 1, MAX_IMAGES, whole=True)
    micro = {name: number(get(name), name, 0, MAX_MICRO, 0, whole=True,
                          note="" if "crop" in name else " (0 or empty: the output size)") for name in MICRO}
    guidance, switch, aesthetic, negative_aesthetic, cache_interval = (
        0.0, 1.0, DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, 1)
    if quality:
        guidance = number(get("guidance_scale"), "guidance_scale", *GUIDANCE_RANGE)
        switch = number(get("refiner_switch"), "refiner_switch", *REFINER_SWITCH_RANGE)
        aesthetic = number(get("aesthetic_score"), "aesthetic_score", *AESTHETIC_RANGE)
        negative_aesthetic = number(get("negative_aesthetic_score"), "negative_aesthetic_score", *AESTHETIC_RANGE)
        cache_interval = number(get("cache_interval"), "cache_interval", 1, MAX_CACHE_INTERVAL, whole=True)
    drawn = randomize
    if drawn:
        seed = random.randint(0, MAX_SEED)
    params = GenerationParams(
        prompt=prompt, negative_prompt=negative, mode=mode, steps=steps, seed=seed, width=width, height=height,
        num_images=num_images, guidance_scale=float(guidance), use_refiner=switch < 1.0,
        refiner_switch=float(switch), original_size=pair(micro["orig_h"], micro["orig_w"], height, width),
        target_size=pair(micro["target_h"], micro["target_w"], height, width),
        crops_coords_top_left=(micro["crop_top"], micro["crop_left"]), aesthetic_score=float(aesthetic),
        negative_aesthetic_score=float(negative_aesthetic), cache_interval=cache_interval)
    return Parsed(params, drawn)
