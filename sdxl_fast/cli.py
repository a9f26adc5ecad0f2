"""`sdxl-fast`: the command line.

    sdxl-fast generate "a red fox in the snow" --mode fast --steps 1 --seed 7 -o fox.png
    sdxl-fast generate --from-png fox.png -o again.png          # reproduce an image from its metadata
    sdxl-fast buckets                                           # the SDXL aspect-ratio size presets

Exit status: 0 on success, 2 for invalid arguments (nothing is loaded or written), 1 when the models
cannot be loaded or generation fails. Every error is one line on stderr. `-o` must be writable (checked before
anything is loaded) and is never overwritten without `--overwrite`: scripts get the name they asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

from . import __version__, metadata
from .params import DEFAULT_SIDE, MAX_SEED, SAMPLERS, SDXL_BUCKETS, GenerationParams, bucket_label, parse_size

EXAMPLES = """examples:
  sdxl-fast generate "a lighthouse at dusk, oil painting" --mode quality --seed 1 -o lighthouse.png
  sdxl-fast generate "a corgi astronaut" --mode fast --steps 4 --size 768x768 --num-images 4 -o corgi.png
  sdxl-fast generate --from-png lighthouse.png -o same-again.png
model sources (first found wins): --base/--refiner/--fast, then SDXL_FAST_BASE/SDXL_FAST_REFINER/SDXL_FAST_FAST,
then --preset (or SDXL_FAST_PRESET), then SDXL if all three SDXL pipelines are in the Hugging Face cache,
then the shipped demo models, then the SDXL hub ids (downloaded)."""


def _size(text: str) -> tuple[int, int]:
    """'WxH' (or a single number for a square) -> (width, height)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x768, got {text!r}") from None


def _hw(text: str) -> tuple[int, int]:
    """A WxH size on the command line -> (height, width), the order SDXL's conditioning uses."""
    width, height = _size(text)
    return height, width


def _pair(text: str) -> tuple[int, int]:
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT such as 0,128, got {text!r}") from None
    return top, left


def add_model_arguments(parser) -> None:
    """Model sources and hardware flags, shared by `sdxl-fast generate` and `python app.py`."""
    parser.add_argument("--preset", help="named model set: sdxl, sdxl-no-refiner, demo")
    parser.add_argument("--base", help="SDXL base: hub id or local diffusers folder")
    parser.add_argument("--refiner", help="refiner: hub id, local folder, or 'none'")
    parser.add_argument("--fast", help="fast model: a distill student folder or a few-step pipeline")
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models in CPU memory (small GPUs)")
    parser.add_argument("--fp8", action="store_true",
                        help="fp8 matmuls in the UNets (Ada/Hopper GPUs), input scales calibrated on sample calls at "
                             "load; opt-in: changes numerics, see BENCHMARKS.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-fast", description="SDXL text-to-image: quality and fast paths.")
    parser.add_argument("--version", action="version", version=f"sdxl-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="make images from a prompt", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Make images from a prompt and save them as PNGs with their parameters.")
    gen.add_argument("prompt", nargs="?", help="the text prompt (omit with --from-png)")
    gen.add_argument("-o", "--output", type=Path,
                     help="output PNG (default: MODE-SEED.png); several images get -1, -2, ... suffixes")
    gen.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    gen.add_argument("--from-png", type=Path, metavar="PNG",
                     help="take every parameter from this PNG's metadata; other flags given override it")
    what = gen.add_argument_group("generation")
    what.add_argument("--mode", choices=["fast", "quality"], help="fast: ADD student, 1-4 steps (default); "
                      "quality: base + refiner with guidance")
    what.add_argument("--sampler", choices=list(SAMPLERS["fast"]),
                      help="fast mode: 'Euler a' (diffusers' SDXL-Turbo recipe, the default of full few-step "
                           "pipelines such as sdxl-turbo) or 'ADD' (the default of our distilled students)")
    what.add_argument("-n", "--negative-prompt", help="what to steer away from (quality mode)")
    what.add_argument("--steps", type=int, help="denoising steps (fast: 1-4, default 1; quality: default 50)")
    what.add_argument("--seed", type=int, help=f"0 to {MAX_SEED}; random when omitted (and printed)")
    what.add_argument("--size", type=_size, metavar="WxH",
                      help="image size, sides multiples of 8 (default: the models' own, e.g. "
                           f"{DEFAULT_SIDE['fast']}² SDXL-Turbo, {DEFAULT_SIDE['quality']}² SDXL, 128² the demo "
                           "models); see `sdxl-fast buckets`")
    what.add_argument("--num-images", type=int, help="images in one batch; image i uses seed + i")
    what.add_argument("--cache-interval", type=int, metavar="N",
                      help="opt-in, approximate (DeepCache): the whole UNet every Nth step, only its outer level "
                           "in between; for many-step quality sampling (few-step fast sampling loses much quality "
                           "with it); default 1: off")
    quality = gen.add_argument_group("quality mode")
    quality.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float,
                         help="classifier-free guidance scale (default 5.0; 1 turns guidance off)")
    quality.add_argument("--refiner-switch", type=float, metavar="FRACTION",
                         help="fraction of the noise levels run on the base before the refiner (default 0.8)")
    quality.add_argument("--no-refiner", dest="use_refiner", action="store_const", const=False,
                         help="run the base alone")
    micro = gen.add_argument_group("SDXL micro-conditioning (default: the output size, no crop)")
    micro.add_argument("--original-size", type=_hw, metavar="WxH")
    micro.add_argument("--crop", dest="crops_coords_top_left", type=_pair, metavar="TOP,LEFT")
    micro.add_argument("--target-size", type=_hw, metavar="WxH")
    micro.add_argument("--negative-original-size", type=_hw, metavar="WxH")
    micro.add_argument("--negative-crop", dest="negative_crops_coords_top_left", type=_pair, metavar="TOP,LEFT")
    micro.add_argument("--negative-target-size", type=_hw, metavar="WxH")
    micro.add_argument("--aesthetic-score", type=float, help="refiner's aesthetic score (default 6.0)")
    micro.add_argument("--negative-aesthetic-score", type=float, help="default 2.5")
    models = gen.add_argument_group("models and hardware")
    add_model_arguments(models)
    models.add_argument("--compile", action="store_true",
                        help="torch.compile the models (CUDA): minutes once, then faster; worth it for many images")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    commands.add_parser("buckets", help="list SDXL's aspect-ratio size presets")
    return parser


PARAM_FLAGS = ("negative_prompt", "mode", "sampler", "steps", "seed", "num_images", "cache_interval", "guidance_scale",
               "refiner_switch", "use_refiner", "original_size", "crops_coords_top_left", "target_size",
               "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
               "aesthetic_score", "negative_aesthetic_score")


def params_from_args(args: argparse.Namespace, default_side: int | None = None) -> GenerationParams:
    """Flags given on the command line override the PNG's metadata (with --from-png) or the defaults;
    `default_side` is the size without --size (GenerationParams.resolved)."""
    if args.from_png:
        params, _ = metadata.parse_infotext(metadata.read_parameters(args.from_png))
        if args.prompt is not None:
            params = replace(params, prompt=args.prompt)
    elif args.prompt is None:
        raise ValueError("give a prompt, or --from-png to reuse an image's parameters")
    else:
        params = GenerationParams(prompt=args.prompt)
    overrides = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    return replace(params, **overrides).resolved(default_side)


def output_paths(output: Path | None, params: GenerationParams) -> list[Path]:
    output = output or Path(f"{params.mode}-{params.seed}.png")
    if output.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file (the parameters are stored in a PNG text chunk): {output}")
    if params.num_images == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(params.num_images)]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Before any work: every output can be written, and none exists unless `overwrite`. A ValueError says
    which and why, in one line."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"output {path} is a folder")
        if path.exists() and not overwrite:
            raise ValueError(f"output {path} exists; pass --overwrite to replace it")
    for folder in dict.fromkeys(path.parent for path in paths):
        try:  # the real test (permissions, read-only file systems, a file where a folder should be)
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, suffix=".png.tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"cannot write the output in {folder}: {err.strerror or err}") from None


def _generate(args: argparse.Namespace) -> int:
    try:
        params = params_from_args(args)
        paths = output_paths(args.output, params)
    except (ValueError, OSError) as err:
        print(f"sdxl-fast generate: error: {err}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    import sdxl_fast  # heavy imports (diffusers, transformers) only once the arguments are known to be good
    from sdxl_fast import accel
    from sdxl_fast.models import pick_device_dtype

    try:
        sources = sdxl_fast.resolve_sources(args.preset, args.base, args.refiner, args.fast)
        check_writable(paths, args.overwrite)
    except ValueError as err:
        print(f"sdxl-fast generate: error: {err}", file=sys.stderr)
        return 2
    try:
        device, _ = pick_device_dtype(args.device)
        models = sdxl_fast.load(modes=(params.mode,), sources=sources, device=device, dtype=args.dtype,
                                cpu_offload=args.cpu_offload)
        if not args.cpu_offload:  # a single CLI run would spend longer compiling than generating: only if asked
            accel.apply(models, replace(accel.Acceleration.for_device(device), compile=args.compile, fp8=args.fp8))
    except sdxl_fast.ModelNotFoundError as err:
        print(f"sdxl-fast generate: {err}", file=sys.stderr)
        return 1
    if args.size is None and not args.from_png:  # the models' own size: 128² for the demo family
        args.seed = params.seed  # the one already drawn (and in the output name)
        params = params_from_args(args, default_side=sdxl_fast.native_side(models, params.mode))

    bar = tqdm(total=params.steps, desc=f"{params.mode} seed {params.seed}", unit="step", disable=args.quiet)

    def on_step(step: sdxl_fast.Step) -> None:
        bar.update(1)

    with warnings.catch_warnings():
        warnings.simplefilter("always", sdxl_fast.PromptTruncatedWarning)
        images = sdxl_fast.generate(models, params, callback=on_step)
    bar.close()
    for image, path in zip(images, paths):
        try:
            metadata.save_png(image, path)
        except OSError as err:  # the folder changed while generating
            print(f"sdxl-fast generate: error: cannot write {path}: {err.strerror or err}", file=sys.stderr)
            return 1
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "buckets":
        for width, height in SDXL_BUCKETS:
            print(bucket_label(width, height))
        return 0
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
