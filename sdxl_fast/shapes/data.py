"""A procedural captioned-image data set: one to three flat shapes on a plain or textured background.

`sample(seed)` is a pure function of the seed (numpy's PCG64 stream, no global state), so any image can be
rebuilt from its seed alone, and the data set is as large as the seed range: the discrete choices (shape,
colour, size, position cell, count, background colour and texture, caption template) combine with continuous
jitter (exact position, size, rotation, shade, stripe period, noise) into far more than millions of distinct
images.

Labels are what an image shows, and a caption states them (all, or all but some of OPTIONAL), so the probe
classifier can score a generated image against its prompt:
  * shape and colour: of every object (all objects in one image share shape, colour and size class);
  * count: 1, 2 or 3;
  * position: the 3x3 grid cell of the object's centre, for single objects only. With two or three objects
    the caption names no position and the label is None.
Size class, background colour and texture are in the caption too (useful text for the generator) and in the
labels, but the probe does not predict them.

Captions vary in detail as users' prompts do: each of size, position and background is left out of a caption
with probability OMIT_PROBABILITY (labels["unstated"]), so "a red circle" is a caption the models have seen
(1 in 27 single-object captions), not an unknown prompt. That choice comes from its own random stream, so
a seed's image does not depend on how its caption is worded. The held-out evaluation uses `full_caption`: every
attribute stated, so attempts stay comparable.

Split: training seeds are 0 .. HELDOUT_START - 1; the held-out evaluation set is the fixed seeds
HELDOUT_START, HELDOUT_START + 1, ... (`heldout_seeds`). Never train on seeds >= HELDOUT_START.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

HELDOUT_START = 10**9
DATA_VERSION = 2  # bumped when a seed's caption or image changes (2: captions leave attributes out); keys caches
DEFAULT_SIZE = 128

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "ring": "rings",
           "cross": "crosses"}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "orange": (240, 130, 30), "purple": (140, 60, 190), "white": (240, 240, 240), "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = dict(COLOURS, gray=(128, 128, 128))
TEXTURES = ("plain", "gradient", "striped", "noisy")
# Position cells, row-major from the top left; the label is the cell of the object's centre.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
COUNTS = (1, 2, 3)
COUNT_WORDS = {2: "two", 3: "three"}
# Radius ranges as a fraction of the image side. Size classes do not overlap, so the word is never ambiguous.
SIZES = {"small": (0.07, 0.095), "medium": (0.105, 0.13), "large": (0.145, 0.18)}
MULTI_SIZES = ("small", "medium")  # three large objects do not fit without touching
# Centre of each grid row/column, and how far a single object's centre may stray from it. The cells' centre
# ranges stay 0.2 apart, and a large object at a corner still fits inside the image.
CELL_CENTRES = (0.22, 0.5, 0.78)
CELL_JITTER = 0.04
# Object and background colours must differ by at least this RGB distance (red/orange, orange/yellow are closer).
MIN_CONTRAST = 100.0
COLOUR_JITTER = 14  # per channel, so "red" is a family of reds, never another colour's value
# Every label an image has, with its classes; position is None for multi-object images.
LABELS = {"shape": SHAPES, "colour": COLOUR_NAMES, "position": POSITIONS, "count": COUNTS, "size": tuple(SIZES),
          "background": tuple(BACKGROUNDS), "texture": TEXTURES}


SELECTION_OFFSET = 10**6  # held-out seeds from HELDOUT_START + this pick among candidate models; the evaluation set
# (from HELDOUT_START) then scores the pick without having chosen it


def heldout_seeds(n: int, selection: bool = False) -> list[int]:
    """The fixed held-out evaluation set, the first n seeds from HELDOUT_START; or the selection set."""
    start = HELDOUT_START + (SELECTION_OFFSET if selection else 0)
    return [start + i for i in range(n)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _background_phrase(colour: str, texture: str) -> str:
    words = {"plain": f"{colour} background", "gradient": f"{colour} gradient background",
             "striped": f"striped {colour} background", "noisy": f"noisy {colour} background"}[texture]
    return f"{_article(words)} {words}"


def caption_for(labels: dict, template: int = 0, unstated: tuple[str, ...] = ()) -> str:
    """The caption of a label set, naming every label once except those in `unstated` (a subset of
    OPTIONAL). Templates only reorder words."""
    colour, shape, count = labels["colour"], labels["shape"], labels["count"]
    size = "" if "size" in unstated else f"{labels['size']} "
    if count == 1:
        where = "" if "position" in unstated else f" {POSITION_PHRASES[labels['position']]}"
        words = f"{size}{colour} {shape}"
        thing = f"{_article(words)} {words}{where}"
    else:
        thing = f"{COUNT_WORDS[count]} {size}{colour} {PLURALS[shape]}"
    if "background" in unstated:
        return f"a picture of {thing}" if template == 2 else thing
    background = _background_phrase(labels["background"], labels["texture"])
    if template == 0:
        return f"{thing} on {background}"
    if template == 1:
        return f"{background} with {thing}"
    return f"a picture of {thing} on {background}"


def caption_of(labels: dict) -> str:
    """The training caption of a sample: its template, without its unstated attributes."""
    return caption_for(labels, labels["template"], tuple(labels["unstated"]))


def full_caption(labels: dict) -> str:
    """Every attribute stated (the held-out evaluation's captions)."""
    return caption_for(labels, labels["template"])


def stated_labels(labels: dict) -> dict:
    """The labels with those the caption leaves out set to None (texture goes with the background)."""
    hidden = set(labels["unstated"]) | ({"texture"} if "background" in labels["unstated"] else set())
    return {k: (None if k in hidden else v) for k, v in labels.items()}


CAPTION_TEMPLATES = 3
OPTIONAL = ("size", "position", "background")  # what a caption may leave out; shape, colour, count never
OMIT_PROBABILITY = 1 / 3
_BACKGROUND_PHRASE = re.compile(
    rf"\ban? (?:striped |noisy )?(?:{'|'.join(BACKGROUNDS)}) (?:gradient )?background\b")


def parse_caption(caption: str) -> dict:
    """Read the probe's labels (shape, colour, position, count) back from any caption `caption_for` writes, or
    from a shorter prompt such as "a red circle" (missing attributes are None; a missing count means 1)."""
    text = caption.lower()
    # The object phrase is what remains without the background phrase (which names a colour too).
    text_wo_bg = _BACKGROUND_PHRASE.sub(" ", text)
    shape = count = colour = position = None
    for name in SHAPES:
        if re.search(rf"\b{PLURALS[name]}\b", text_wo_bg):
            shape = name
        elif re.search(rf"\b{name}\b", text_wo_bg):
            shape, count = name, 1
    for n, word in COUNT_WORDS.items():
        if re.search(rf"\b{word}\b", text_wo_bg):
            count = n
    if count is None:
        count = 1
    for name in COLOUR_NAMES:
        if re.search(rf"\b{name}\b", text_wo_bg):
            colour = name
    for name, phrase in sorted(POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
        if phrase in text_wo_bg:
            position = name
            break
    return {"shape": shape, "colour": colour, "position": position, "count": count}


# ---------------------------------------------------------------------------------------------------------
# Drawing. Coordinates are fractions of the side; everything is drawn at 2x and box-downsampled (anti-aliasing).

def _rotate(points, angle: float, cx: float, cy: float):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_polygons(shape: str, r: float) -> list[list[tuple[float, float]]]:
    """Outline(s) of a shape centred on the origin, with its extent about r (y points down)."""
    if shape == "square":
        h = 0.75 * r
        return [[(-h, -h), (h, -h), (h, h), (-h, h)]]
    if shape == "triangle":
        # Equilateral, centred on its bounding box rather than its centroid so that it looks centred.
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        return [[(x, y + 0.25 * r) for x, y in pts]]  # the box spans -r .. 0.5r; move its middle to 0
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return [pts]
    if shape == "cross":
        w = 0.3 * r
        return [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]]
    raise ValueError(shape)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, side: int):
    """Draw one object as 255 on the mask `draw`, whose image is `side` pixels square."""
    x, y, rr = cx * side, cy * side, r * side
    if shape in ("circle", "ring"):
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
        if shape == "ring":
            hole = 0.55 * rr
            draw.ellipse((x - hole, y - hole, x + hole, y + hole), fill=0)
        return
    for poly in _shape_polygons(shape, rr):
        draw.polygon(_rotate(poly, angle, x, y), fill=255)


def _jitter_colour(rgb, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, float) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)


def _background(colour: str, texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """[side, side, 3] float array. Textures vary the background colour's brightness only, so its name holds."""
    base = _jitter_colour(BACKGROUNDS[colour], rng)
    # Shade toward black for light colours and toward white for dark ones, so the texture stays visible.
    other = base * 0.6 if base.mean() > 100 else base + (255 - base) * 0.35
    yy, xx = _grid(side)
    if texture == "plain":
        t = np.zeros((side, side), np.float32)
    elif texture == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        proj = xx * math.cos(a) + yy * math.sin(a)
        t = (proj - proj.min()) / (proj.max() - proj.min())
    elif texture == "striped":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.06, 0.16)
        t = ((xx * math.cos(a) + yy * math.sin(a)) / period + rng.uniform()) % 1.0 < 0.5
        t = t.astype(float) * 0.7
    elif texture == "noisy":
        # Blocky noise (4x4 cells at 128 px) so it survives the downsample as texture, not as a colour shift.
        cells = max(side // 8, 1)
        coarse = rng.uniform(0, 1, (cells, cells))
        t = np.kron(coarse, np.ones((side // cells, side // cells)))[:side, :side] * 0.6
    else:
        raise ValueError(texture)
    return base.astype(np.float32) + t[..., None].astype(np.float32) * (other - base).astype(np.float32)


@lru_cache(maxsize=4)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates as fractions of the side (float32: these arrays dominate the cost of a sample)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    return yy, xx


def _place_multi(count: int, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Centres for `count` non-touching objects of radius r, anywhere in the image."""
    margin = 1.1 * r  # squares and crosses reach slightly past r
    for _ in range(1000):
        pts = [tuple(rng.uniform(margin, 1 - margin, 2)) for _ in range(count)]
        if all(_distance(p, q) > 2.3 * r for i, p in enumerate(pts) for q in pts[i + 1:]):
            return pts
    # Practically unreachable with these sizes; a fixed spread layout keeps sample() total and deterministic.
    return [(0.22, 0.22), (0.78, 0.78), (0.22, 0.78)][:count]


def sample_labels(seed: int, omit_probability: float = OMIT_PROBABILITY) -> tuple[dict, dict, np.random.Generator]:
    """The labels of `seed` and the geometry to draw them; the same rng continues into the drawing.
    `omit_probability`: how often the caption leaves out each of size, position and background (a larger one
    leaves out a superset of what a smaller one does; the image is the same)."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    count = int(COUNTS[rng.integers(len(COUNTS))])
    size = (tuple(SIZES) if count == 1 else MULTI_SIZES)[rng.integers(3 if count == 1 else 2)]
    backgrounds = [b for b in BACKGROUNDS if _distance(BACKGROUNDS[b], COLOURS[colour]) >= MIN_CONTRAST]
    background = backgrounds[rng.integers(len(backgrounds))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    position = None
    r = float(rng.uniform(*SIZES[size]))
    if count == 1:
        cell = int(rng.integers(9))
        position = POSITIONS[cell]
        row, col = divmod(cell, 3)
        centres = [(CELL_CENTRES[col] + rng.uniform(-CELL_JITTER, CELL_JITTER),
                    CELL_CENTRES[row] + rng.uniform(-CELL_JITTER, CELL_JITTER))]
    else:
        centres = _place_multi(count, r, rng)
    labels = {"shape": shape, "colour": colour, "position": position, "count": count, "size": size,
              "background": background, "texture": texture, "template": int(rng.integers(CAPTION_TEMPLATES))}
    # A separate stream for the caption's detail, so the drawing (rng) does not depend on omit_probability.
    detail = np.random.default_rng([seed, 1])
    labels["unstated"] = [a for a in OPTIONAL if detail.random() < omit_probability
                          and not (a == "position" and count > 1)]
    geometry = {"centres": centres, "radius": r}
    return labels, geometry, rng


def sample(seed: int, size: int = DEFAULT_SIZE, omit_probability: float = OMIT_PROBABILITY
           ) -> tuple[Image.Image, str, dict]:
    """(RGB image size x size, caption, labels) for one seed; identical on every call and machine."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    labels, geo, rng = sample_labels(seed, omit_probability)
    side = 2 * size
    mask_img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_img)
    # Small rotations only: a square turned 45 degrees would read as a diamond, a cross as an "x".
    for cx, cy in geo["centres"]:
        _draw_object(draw, labels["shape"], cx, cy, geo["radius"], rng.uniform(-0.2, 0.2), side)
    colour = _jitter_colour(COLOURS[labels["colour"]], rng)
    bg = _background(labels["background"], labels["texture"], side, rng)
    m = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
    pixels = bg + m * (colour.astype(np.float32) - bg)
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB").reduce(2)
    return image, caption_of(labels), labels
