"""`python -m sdxl_fast.shapes write|train-probe|evaluate|train-demo|export-demo|pretrain-vit`; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdxl_fast.params import DEFAULT_GUIDANCE_SCALE

from .data import OMIT_PROBABILITY


def _write(args) -> int:
    from .writer import write_folder

    paths = write_folder(args.out, args.count, start=args.start, size=args.size, metadata=not args.no_metadata,
                         workers=args.workers, omit_probability=args.omit_probability)
    print(f"wrote {len(paths)} images with captions to {args.out}")
    return 0


def _train_probe(args) -> int:
    import shlex
    import time

    import torch

    from .probe import evaluate_real, save_probe, train_probe

    _set_threads(args)
    started = time.time()
    probe = train_probe(steps=args.steps, train_images=args.train_images, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, log_every=args.log_every)
    train_s = time.time() - started
    acc = evaluate_real(probe, args.eval_images)
    print("held-out accuracy on real images (%d seeds from 10**9): %s" % (
        args.eval_images, ", ".join(f"{k} {v:.4f}" for k, v in acc.items())))
    info = {
        "command": "python -m sdxl_fast.shapes " + " ".join(shlex.quote(a) for a in args.argv),
        "training": {"steps": args.steps, "train_images": args.train_images, "train_seeds": [0, args.train_images],
                     "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "torch_threads": torch.get_num_threads(), "train_seconds": round(train_s, 1)},
        "heldout_accuracy": {"n": args.eval_images, **{k: round(v, 4) for k, v in acc.items()}},
    }
    save_probe(probe, args.out, info)
    print(f"saved the probe to {args.out} (trained in {train_s:.0f} s)")
    return 0


def _evaluate(args) -> int:
    from .evaluate import ROWS, cached_rows, evaluate, write_report

    _set_threads(args)
    refiner = None if args.refiner.strip().lower() in ("", "none") else args.refiner
    rows = tuple(r for r in ROWS if r.mode == "fast" or not args.student_only)
    rows += cached_rows(args.cache_interval, rows) if args.cache_interval > 1 else ()
    report = evaluate(args.base, refiner, args.student, n=args.n, probe_dir=args.probe, size=args.size,
                      guidance_scale=args.guidance_scale, rows=rows, short_prompts=args.short_prompts,
                      selection=args.selection)
    print(write_report(report, args.out, args.json))
    return 0


def _grid(args) -> int:
    from .grid import PROMPTS, student_grid

    _set_threads(args)
    grid = student_grid(args.base, args.student, tuple(args.prompt or PROMPTS), seed=args.seed, steps=args.steps,
                        size=args.size)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(args.student)} rows x {len(args.prompt or PROMPTS)} prompts")
    return 0


def _train_demo(args) -> int:
    from .demo_config import DemoTrainConfig
    from .train_demo import run_stage

    _set_threads(args)
    run_stage(DemoTrainConfig(**_dataclass_values(args, DemoTrainConfig)), started=args.started)
    return 0


def _export_demo(args) -> int:
    from .export_demo import export_demo

    export_demo(args.work, args.out, parts=tuple(p for p in args.parts.split(",") if p), student=args.student,
                max_mb=args.max_mb)
    return 0


def _pretrain_vit(args) -> int:
    from .demo_config import PretrainConfig
    from .feature_net import pretrain

    _set_threads(args)
    pretrain(PretrainConfig(**_dataclass_values(args, PretrainConfig)),
             command="python -m sdxl_fast.shapes " + " ".join(args.argv))
    return 0


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _dataclass_values(args, cls) -> dict:
    """The options of `cls`'s fields that were given (unset ones keep the dataclass default)."""
    return {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__ and v is not None}


def _add_dataclass_options(parser, cls, skip=()) -> None:
    """One --option per dataclass field (underscores as dashes); unset options keep the dataclass default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        opt = "--" + f.name.replace("_", "-")
        if typing.get_origin(kind) is tuple:
            parser.add_argument(opt, dest=f.name, type=lambda s: tuple(float(v) for v in s.split(",")),
                                help=f"comma-separated (default {f.default})")
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(opt, dest=f.name, type=base, help=f"(default {f.default})")


def _add_write(sub) -> None:
    w = sub.add_parser("write", help="write seeds as NNNNNN.png + NNNNNN.txt (+ metadata.jsonl)")
    w.add_argument("--out", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--start", type=int, default=0, help="first seed (held-out seeds start at 1000000000)")
    w.add_argument("--size", type=int, default=128)
    w.add_argument("--no-metadata", action="store_true", help="skip metadata.jsonl")
    w.add_argument("--workers", type=int, default=1, help="parallel processes drawing and writing images")
    w.add_argument("--omit-probability", type=float, default=OMIT_PROBABILITY,
                   help="how often a caption leaves out each of size, position and background (default 1/3; "
                   "higher: more short captions such as 'a red circle'; the images are the same)")
    w.set_defaults(run=_write)


def _add_train_probe(sub) -> None:
    t = sub.add_parser("train-probe", help="train the probe classifier on real training-seed images")
    t.add_argument("--out", default=str(Path(__file__).resolve().parent / "probe_weights"))
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--train-images", type=int, default=20000, help="seeds 0..N-1, drawn once and reused")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-images", type=int, default=2000, help="held-out seeds used to report accuracy")
    _add_threads(t)
    t.add_argument("--log-every", type=int, default=100)
    t.set_defaults(run=_train_probe)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="the sampler table on held-out captions (accuracy, Fréchet distance, ms)")
    e.add_argument("--base", required=True, help="teacher base: a diffusers SDXL folder or hub id")
    e.add_argument("--refiner", default="none", help="teacher refiner folder, or none to skip its row")
    e.add_argument("--student", required=True, help="ADD student: a UNet-only folder or a full pipeline")
    e.add_argument("--n", type=int, default=200, help="held-out captions (seeds from 10**9)")
    e.add_argument("--probe", default=str(Path(__file__).resolve().parent / "probe_weights"))
    e.add_argument("--size", type=int, default=128, help="generation side in pixels (the data resolution)")
    e.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="teacher classifier-free guidance")
    _add_threads(e)
    e.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="also run the multi-step rows with sdxl_fast's step cache at this interval (opt-in option)")
    e.add_argument("--student-only", action="store_true",
                   help="only the student's rows (under a minute on 2 cores, the whole table about 9): to check a "
                   "new student before shipping it")
    e.add_argument("--short-prompts", type=int, default=0, metavar="K",
                   help='also score 12 short prompts ("a red circle", ...) at seeds 0..K-1 per row (0: off)')
    e.add_argument("--selection", action="store_true",
                   help="score on the selection captions (held-out seeds from 10**9 + 10**6) instead: pick among "
                   "candidate students there, then report the pick on the evaluation captions it was not chosen on")
    e.add_argument("--out", help="write the markdown table here")
    e.add_argument("--json", help="write the raw numbers here")
    e.set_defaults(run=_evaluate)


def _add_grid(sub) -> None:
    from .grid import PROMPTS

    g = sub.add_parser("grid", help="students' Fast images of three prompts at one seed, one row per student")
    g.add_argument("--base", default="demo_models/base", help="the base whose encoders and VAE the students use")
    g.add_argument("--student", action="append", required=True, help="a student folder (repeat: one row each)")
    g.add_argument("--prompt", action="append", help=f"a column (repeat; default: {', '.join(PROMPTS)})")
    g.add_argument("--seed", type=int, default=7)
    g.add_argument("--steps", type=int, default=1)
    g.add_argument("--size", type=int, default=128)
    g.add_argument("--out", required=True, help="image file (.png, .jpg, ...)")
    _add_threads(g)
    g.set_defaults(run=_grid)


def _add_train_demo(sub) -> None:
    from .demo_config import STAGES, DemoTrainConfig

    d = sub.add_parser("train-demo", help="train one stage of the demo family (see shapes/train_demo.py)")
    d.add_argument("--stage", required=True, choices=STAGES)
    _add_dataclass_options(d, DemoTrainConfig, skip=("stage",))
    _add_threads(d)
    d.set_defaults(run=_train_demo)


def _add_export_demo(sub) -> None:
    x = sub.add_parser("export-demo", help="fp16 diffusers folders base/refiner/student from a train-demo WORK dir")
    x.add_argument("--work", default="runs/demo")
    x.add_argument("--out", default="demo_models")
    x.add_argument("--parts", default="base,refiner,student", help="comma-separated subset of base,refiner,student")
    x.add_argument("--student", default="runs/demo/student/student", help="the UNet-only folder distill wrote")
    x.add_argument("--max-mb", type=float, default=25.0, help="fail if the written folders exceed this")
    x.set_defaults(run=_export_demo)


def _add_pretrain_vit(sub) -> None:
    from .demo_config import PretrainConfig

    v = sub.add_parser("pretrain-vit", help="pretrain the discriminator's DINOv2-architecture ViT on shapes labels")
    _add_dataclass_options(v, PretrainConfig)
    _add_threads(v)
    v.set_defaults(run=_pretrain_vit)


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdxl_fast.shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_write, _add_train_probe, _add_evaluate, _add_grid, _add_train_demo, _add_export_demo,
                _add_pretrain_vit):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import time

    started = time.time()  # train-demo's wall-clock budget counts from here
    args = build_parser().parse_args(argv)
    args.argv, args.started = argv, started
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
