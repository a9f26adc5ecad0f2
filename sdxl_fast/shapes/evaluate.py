"""The sampler table: how well each way of sampling the demo models follows held-out shapes captions.

For each row (teacher base+refiner at 50 steps, teacher base at 50, 1 and 4 steps, ADD student at 1, 2, 4),
one image per held-out caption is generated through `sdxl_fast.pipeline.generate` at the data resolution, seeded with
the caption's index, and
  * attribute accuracy: the fraction of captions whose every stated attribute (shape, colour, count, and the
    position cell for single objects) the frozen probe reads correctly off the generated image;
  * Fréchet distance: between the probe's penultimate features of the generated images and of the real
    held-out images of the same captions;
  * CPU ms / image: wall-clock time of the `generate` call (text encoding, sampling, decoding), one image per
    call, after one untimed warm-up call per path.
A reference row scores real held-out images the same way: its accuracy is the probe's ceiling, and its
Fréchet distance (the real images against the next n held-out seeds) is the floor that sampling noise of n
images alone produces; distances are comparable only at the same n.

The held-out captions state every attribute; users type less. With `short_prompts=k` each row also reports
the fraction of images for twelve short prompts ("a red circle", "a blue star", ...; seeds 0..k-1) that the
probe reads as the asked shape and colour, whatever their size, position and background.

The teacher's 1- and 4-step rows use the base alone (with the same guidance), as the ADD student is distilled
from the base; the refiner only handles the last 20% of noise levels and is not meant for few-step use.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdxl_fast.params import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, MAX_FAST_STEPS

from . import data
from .frechet import frechet_distance, frechet_standard_error
from .probe import (DEFAULT_DIR, HEADS, features, label_targets, load_probe, predict, predict_indices, render, score,
                    to_uint8)

SHORT_PROMPTS = tuple((shape, colour) for shape in ("circle", "square", "triangle", "star")
                      for colour in ("red", "blue", "green"))


@dataclass(frozen=True)
class Row:
    sampler: str
    mode: str  # sdxl_fast mode: "quality" (teacher) or "fast" (student)
    steps: int
    use_refiner: bool = False
    cache_interval: int = 1  # sdxl_fast.pipeline.step_cache (opt-in); 1 = off


ROWS = (
    Row("teacher base+refiner", "quality", DEFAULT_STEPS["quality"], use_refiner=True),
    Row("teacher base", "quality", DEFAULT_STEPS["quality"]),
    Row("teacher base", "quality", 1),  # the teacher at the student's step counts, for comparison
    Row("teacher base", "quality", MAX_FAST_STEPS),
    Row("student (ADD)", "fast", 1),
    Row("student (ADD)", "fast", 2),
    Row("student (ADD)", "fast", MAX_FAST_STEPS),
)
REFERENCE = "real held-out images (reference)"
HEADER = ("| sampler | steps | attribute accuracy | Fréchet distance | CPU ms / image | accuracy s.e. "
          "| Fréchet s.e. |")


def cached_rows(interval: int, rows: tuple[Row, ...] = ROWS) -> tuple[Row, ...]:
    """The rows with a step to cache (more than one step), again with the step cache on."""
    return tuple(replace(r, sampler=f"{r.sampler}, step cache {interval}", cache_interval=interval)
                 for r in rows if r.steps > 1)


def _log(message: str) -> None:
    print(message, flush=True)


def short_prompt_accuracy(generate_one, probe, seeds: int) -> float:
    """The fraction of `generate_one(prompt, seed)` images, over SHORT_PROMPTS and seeds 0..seeds-1, that the probe
    reads as the prompt's shape and colour."""
    hits = 0
    for shape, colour in SHORT_PROMPTS:
        images = [generate_one(f"a {colour} {shape}", seed) for seed in range(seeds)]
        hits += sum((p["shape"], p["colour"]) == (shape, colour) for p in predict(probe, images))
    return hits / (seeds * len(SHORT_PROMPTS))


def evaluate(base: str, refiner: str | None, student: str, n: int = 200, probe_dir: str | Path = DEFAULT_DIR,
             size: int = data.DEFAULT_SIZE, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, rows: tuple[Row, ...] = ROWS,
             short_prompts: int = 0, selection: bool = False, log=_log) -> dict:
    """Run every row on the first n held-out captions (of the selection set if `selection`); returns
    {"rows": [...], "reference": {...}, "setup": {...}}. Rows that need a refiner are skipped (reported as not run)
    when `refiner` is None."""
    import sdxl_fast

    if n < 2:
        raise ValueError("n must be at least 2 (the Fréchet distance needs a covariance)")
    probe = load_probe(probe_dir)
    seeds = data.heldout_seeds(n, selection)
    real_x, labels = render(seeds, probe.config.input_size)
    captions = [data.full_caption(lab) for lab in labels]  # every attribute stated: comparable across attempts
    targets = label_targets(labels)
    real_features = features(probe, real_x)
    floor_x, _ = render(data.heldout_seeds(2 * n, selection)[n:], probe.config.input_size)
    reference = {"sampler": REFERENCE, "steps": None, "accuracy": score(predict_indices(probe, real_x), targets),
                 "frechet": frechet_distance(features(probe, floor_x), real_features), "ms_per_image": None}

    models = sdxl_fast.load(modes=("quality", "fast"),
                            sources=sdxl_fast.ModelSources(base=str(base), refiner=refiner and str(refiner),
                                                           fast=str(student)),
                            device="cpu", dtype=torch.float32)

    def params(caption: str, row: Row, seed: int):
        return sdxl_fast.GenerationParams(caption, mode=row.mode, steps=row.steps, seed=seed, width=size,
                                          height=size, use_refiner=row.use_refiner, guidance_scale=guidance_scale,
                                          cache_interval=row.cache_interval)

    # One untimed call per path first: the first call pays for lazy initialisation, not for sampling.
    for mode in sorted({row.mode for row in rows}):
        sdxl_fast.generate(models, params("a red circle", Row("warm-up", mode, 1), seed=0))

    results = []
    for row in rows:
        if row.use_refiner and refiner is None:
            results.append({"sampler": row.sampler, "steps": row.steps, "skipped": "no refiner given"})
            continue
        images, seconds = [], 0.0
        # A 50-step row takes minutes at n = 1000; disable=None shows the bar in a terminal only.
        for i, caption in enumerate(tqdm(captions, desc=f"{row.sampler}, {row.steps} steps", unit="image",
                                         leave=False, disable=None)):
            started = time.perf_counter()
            images.extend(sdxl_fast.generate(models, params(caption, row, seed=i)))
            seconds += time.perf_counter() - started
        x = to_uint8(images, probe.config.input_size)
        accuracy, generated = score(predict_indices(probe, x), targets), features(probe, x)
        result = {"sampler": row.sampler, "steps": row.steps, "accuracy": accuracy,
                  "frechet": frechet_distance(generated, real_features), "ms_per_image": 1000 * seconds / n,
                  # binomial for the share of captions read right; a paired bootstrap over captions for Fréchet
                  "accuracy_se": math.sqrt(accuracy["all"] * (1 - accuracy["all"]) / n),
                  "frechet_se": frechet_standard_error(generated, real_features)}
        if short_prompts:
            result["short_prompts"] = short_prompt_accuracy(
                lambda prompt, seed: sdxl_fast.generate(models, params(prompt, row, seed))[0], probe, short_prompts)
        log(f"{row.sampler} {row.steps} steps: accuracy {result['accuracy']['all']:.3f}, "
            f"Fréchet {result['frechet']:.2f}, {result['ms_per_image']:.0f} ms/image")
        results.append(result)

    setup = {"n": n, "heldout_seeds": [seeds[0], seeds[-1]], "selection": selection, "size": size,
             "guidance_scale": guidance_scale, "short_prompt_seeds": short_prompts,
             "probe": str(probe_dir), "torch_threads": torch.get_num_threads(), "base": str(base),
             "refiner": refiner and str(refiner), "student": str(student)}
    return {"rows": results, "reference": reference, "setup": setup}


def _fmt(value, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The sampler table, then per-attribute accuracies, then the setup that produced them."""
    s = report["setup"]
    lines = [HEADER, "|---|---|---|---|---|---|---|"]
    for r in report["rows"] + [report["reference"]]:
        if "skipped" in r:
            lines.append(f"| {r['sampler']} | {r['steps']} | not run ({r['skipped']}) | – | – | – | – |")
            continue
        steps = "–" if r["steps"] is None else str(r["steps"])
        lines.append(f"| {r['sampler']} | {steps} | {_fmt(r['accuracy']['all'], 3)} | {_fmt(r['frechet'], 2)} | "
                     f"{_fmt(r['ms_per_image'], 0)} | {_fmt(r.get('accuracy_se'), 3)} | "
                     f"{_fmt(r.get('frechet_se'), 1)} |")
    lines += ["", "| sampler | steps | " + " | ".join(HEADS) + " |", "|---|---|" + "---|" * len(HEADS)]
    for r in report["rows"] + [report["reference"]]:
        if "skipped" not in r:
            steps = "–" if r["steps"] is None else str(r["steps"])
            lines.append(f"| {r['sampler']} | {steps} | "
                         + " | ".join(_fmt(r["accuracy"][h], 3) for h in HEADS) + " |")
    short = [r for r in report["rows"] if "short_prompts" in r]
    if short:
        lines += ["", f"| sampler | steps | short prompts read as asked ({len(SHORT_PROMPTS)} prompts x "
                      f"{s['short_prompt_seeds']} seeds) |", "|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['steps']} | {r['short_prompts']:.3f} |" for r in short]
    which = "selection" if s.get("selection") else "evaluation"
    lines += ["", f"n = {s['n']} held-out {which} captions (seeds {s['heldout_seeds'][0]}..{s['heldout_seeds'][1]}), "
                  f"{s['size']}x{s['size']} px, teacher guidance {s['guidance_scale']}, "
                  f"CPU with {s['torch_threads']} torch threads; probe: {s['probe']}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path | None, json_out: str | Path | None = None) -> str:
    table = markdown(report)
    if out:
        Path(out).write_text(table, encoding="utf-8")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return table
