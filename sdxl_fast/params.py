"""The generation parameters: one dataclass, its defaults, and the checks that turn bad input into clear errors."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, replace
from math import gcd

MODES = ("fast", "quality")
# The samplers each mode runs, in AUTOMATIC1111's names where one exists. Fast: "ADD", the ADD paper's sampler
# our distilled students are trained for (the clean estimate re-noised with fresh noise at the next student
# timestep), or "Euler a", diffusers' SDXL-Turbo recipe (Euler-ancestral, trailing timesteps), the default of
# full few-step pipelines such as stabilityai/sdxl-turbo. Unset, a Fast call runs the loaded model's own.
SAMPLERS = {"quality": ("Euler",), "fast": ("ADD", "Euler a")}
DEFAULT_STEPS = {"quality": 50, "fast": 1}
DEFAULT_SIDE = {"quality": 1024, "fast": 512}
MAX_QUALITY_STEPS = 1000
MAX_FAST_STEPS = 4
MAX_SEED = 2**32 - 1  # the range other SDXL tools use, so seeds carry over between them
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_IMAGES = 16
MAX_CACHE_INTERVAL = 10
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_REFINER_SWITCH = 0.8  # fraction of the noise levels the base handles before the refiner takes over
# The refiner's aesthetic-score conditioning, as SDXL's refiner was trained and diffusers defaults it.
DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


# (width, height) of SDXL's multi-aspect training buckets: about 1024² pixels, sides multiples of 64
# (SDXL paper, appendix I). The list is symmetric, so it reads the same as (height, width).
SDXL_BUCKETS: list[tuple[int, int]] = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]] = SDXL_BUCKETS) -> tuple[int, int]:
    """The bucket (of SDXL's training buckets, or of `buckets`) whose aspect ratio is closest to width/height."""
    return min(buckets, key=lambda b: abs(b[0] / b[1] - width / height))


def bucket_label(width: int, height: int) -> str:
    g = gcd(width, height)
    return f"{width}×{height} ({width // g}:{height // g})"


_SIZE = re.compile(r"\s*(\d+)\s*(?:[x×*X]\s*(\d+))?\s*")


def parse_size(text: str) -> tuple[int, int]:
    """"1024x768" (also "1024×768", "1024*768", or "1024" for a square) -> (width, height), the way
    AUTOMATIC1111 and ComfyUI write sizes. Only the form is checked here; `GenerationParams.validate` checks
    the range."""
    match = _SIZE.fullmatch(str(text if text is not None else ""))
    if not match:
        raise ValueError(f"a size looks like 1024x768 (width x height), got {text!r}")
    width = int(match[1])
    return width, int(match[2]) if match[2] else width


def image_seed(seed: int, index: int) -> int:
    """Image `index` of a batch uses seed + index, wrapped into the seed range."""
    return (seed + index) % (MAX_SEED + 1)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides the pixels. Sizes follow diffusers: (height, width); crops are (top, left).

    Fields left as None take their mode's default in `resolved()`: 50 steps and 1024² for quality,
    1 step and 512² for fast (`generate` uses the loaded models' own size instead), a random seed, and
    micro-conditioning equal to the output size.
    """

    prompt: str
    negative_prompt: str = ""
    mode: str = "fast"
    steps: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    # Opt-in, approximate: the whole UNet every Nth step, only its outer level in between (sdxl_fast.pipeline.step_cache).
    cache_interval: int = 1
    # Quality path only.
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    use_refiner: bool = True
    refiner_switch: float = DEFAULT_REFINER_SWITCH
    # SDXL micro-conditioning.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    # None: diffusers' default, which depends on the model (`negative_crop`). `resolved()` makes it (0, 0) when
    # a negative size is given, as diffusers' base pipeline does.
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE  # refiner only
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE  # refiner only
    # One of SAMPLERS[mode]; None: Euler for quality, the loaded fast model's own for fast (`resolved`).
    sampler: str | None = None

    def resolved(self, default_side: int | None = None, default_sampler: str | None = None) -> "GenerationParams":
        """Fill the mode-dependent defaults and validate; the result is fully explicit and reproducible.

        `default_side` replaces DEFAULT_SIDE for an unset width or height: the loaded models' own size
        (`sdxl_fast.native_side`), e.g. 128 for the demo family. `default_sampler` is the loaded fast model's
        own sampler (`FastModels.sampler`), for an unset Fast sampler; without it that stays None.
        """
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        side = default_side or DEFAULT_SIDE[self.mode]
        height = self.height if self.height is not None else side
        width = self.width if self.width is not None else side
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        negative_crop = self.negative_crops_coords_top_left
        if negative_crop is None and (self.negative_original_size or self.negative_target_size):
            negative_crop = (0, 0)
        out = replace(
            self,
            steps=self.steps if self.steps is not None else DEFAULT_STEPS[self.mode],
            seed=self.seed if self.seed is not None else random.randint(0, MAX_SEED),
            width=width, height=height, original_size=tuple(original), target_size=tuple(target),
            crops_coords_top_left=tuple(self.crops_coords_top_left),
            negative_original_size=tuple(self.negative_original_size or original),
            negative_crops_coords_top_left=None if negative_crop is None else tuple(negative_crop),
            sampler=self.sampler or ("Euler" if self.mode == "quality" else default_sampler),
            negative_target_size=tuple(self.negative_target_size or target),
        )
        out.validate()
        return out

    def negative_crop(self, refiner: bool) -> tuple[int, int]:
        """The negative crop the base (refiner False) or the refiner reads, as diffusers' pipelines default it:
        an unset negative crop is the positive crop for the base (whose negative time ids are the positive
        ones unless negative sizes are given, and then the crop defaults to (0, 0), see `resolved`) and
        (0, 0) for the refiner (StableDiffusionXLImg2ImgPipeline's default)."""
        if self.negative_crops_coords_top_left is not None:
            return tuple(self.negative_crops_coords_top_left)
        return (0, 0) if refiner else tuple(self.crops_coords_top_left)

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError("prompt must be a string")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        max_steps = MAX_FAST_STEPS if self.mode == "fast" else MAX_QUALITY_STEPS
        if self.steps is not None and not (isinstance(self.steps, int) and 1 <= self.steps <= max_steps):
            raise ValueError(f"steps must be an integer from 1 to {max_steps} in {self.mode} mode, got {self.steps!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or value % 8 or not MIN_SIDE <= value <= MAX_SIDE:
                raise ValueError(
                    f"{name} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE} pixels, got {value!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS[self.mode]:
            raise ValueError(f"sampler must be one of {SAMPLERS[self.mode]} in {self.mode} mode, got {self.sampler!r}")
        if not (isinstance(self.num_images, int) and 1 <= self.num_images <= MAX_IMAGES):
            raise ValueError(f"num_images must be from 1 to {MAX_IMAGES}, got {self.num_images!r}")
        if not (isinstance(self.cache_interval, int) and 1 <= self.cache_interval <= MAX_CACHE_INTERVAL):
            raise ValueError(f"cache_interval must be an integer from 1 (off) to {MAX_CACHE_INTERVAL}, "
                             f"got {self.cache_interval!r}")
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise ValueError(f"guidance_scale must be between 0 and 50, got {self.guidance_scale}")
        if not 0.0 < self.refiner_switch <= 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1], got {self.refiner_switch}")
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "crops_coords_top_left", "negative_crops_coords_top_left"):
            value = getattr(self, name)
            if value is None:
                continue
            smallest = 0 if "crops" in name else 1
            if len(value) != 2 or not all(isinstance(v, int) and smallest <= v <= 16384 for v in value):
                raise ValueError(f"{name} must be two integers from {smallest} to 16384, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)
