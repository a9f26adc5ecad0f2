"""`python -m shapes write|train-probe|evaluate`; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys


def _write(args) -> int:
    from .writer import write_folder

    paths = write_folder(args.out, args.count, start=args.start, size=args.size, metadata=not args.no_metadata)
    print(f"wrote {len(paths)} images with captions to {args.out}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
