"""`python -m shapes write|train-probe|evaluate`; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _write(args) -> int:
    from .writer import write_folder

    paths = write_folder(args.out, args.count, start=args.start, size=args.size, metadata=not args.no_metadata)
    print(f"wrote {len(paths)} images with captions to {args.out}")
    return 0


def _train_probe(args) -> int:
    import shlex
    import time

    import torch

    from .probe import evaluate_real, save_probe, train_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    probe = train_probe(steps=args.steps, train_images=args.train_images, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, log_every=args.log_every)
    train_s = time.time() - started
    acc = evaluate_real(probe, args.eval_images)
    print("held-out accuracy on real images (%d seeds from 10**9): %s" % (
        args.eval_images, ", ".join(f"{k} {v:.4f}" for k, v in acc.items())))
    info = {
        "command": "python -m shapes " + " ".join(shlex.quote(a) for a in args.argv),
        "training": {"steps": args.steps, "train_images": args.train_images, "train_seeds": [0, args.train_images],
                     "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "torch_threads": torch.get_num_threads(), "train_seconds": round(train_s, 1)},
        "heldout_accuracy": {"n": args.eval_images, **{k: round(v, 4) for k, v in acc.items()}},
    }
    save_probe(probe, args.out, info)
    print(f"saved the probe to {args.out} (trained in {train_s:.0f} s)")
    return 0


def _evaluate(args) -> int:
    import torch

    from .evaluate import evaluate, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    refiner = None if args.refiner.strip().lower() in ("", "none") else args.refiner
    report = evaluate(args.base, refiner, args.student, n=args.n, probe_dir=args.probe, size=args.size,
                      guidance_scale=args.guidance_scale)
    print(write_report(report, args.out, args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="write seeds as NNNNNN.png + NNNNNN.txt (+ metadata.jsonl)")
    w.add_argument("--out", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--start", type=int, default=0, help="first seed (held-out seeds start at 1000000000)")
    w.add_argument("--size", type=int, default=128)
    w.add_argument("--no-metadata", action="store_true", help="skip metadata.jsonl")
    w.set_defaults(run=_write)

    t = sub.add_parser("train-probe", help="train the probe classifier on real training-seed images")
    t.add_argument("--out", default=str(Path(__file__).resolve().parent / "probe_weights"))
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--train-images", type=int, default=20000, help="seeds 0..N-1, drawn once and reused")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-images", type=int, default=2000, help="held-out seeds used to report accuracy")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--log-every", type=int, default=100)
    t.set_defaults(run=_train_probe)

    e = sub.add_parser("evaluate", help="the sampler table on held-out captions (accuracy, Fréchet distance, ms)")
    e.add_argument("--base", required=True, help="teacher base: a diffusers SDXL folder or hub id")
    e.add_argument("--refiner", default="none", help="teacher refiner folder, or none to skip its row")
    e.add_argument("--student", required=True, help="ADD student: a UNet-only folder or a full pipeline")
    e.add_argument("--n", type=int, default=200, help="held-out captions (seeds from 10**9)")
    e.add_argument("--probe", default=str(Path(__file__).resolve().parent / "probe_weights"))
    e.add_argument("--size", type=int, default=128, help="generation side in pixels (the data resolution)")
    e.add_argument("--guidance-scale", type=float, default=5.0, help="teacher classifier-free guidance")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    e.add_argument("--out", help="write the markdown table here")
    e.add_argument("--json", help="write the raw numbers here")
    e.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
