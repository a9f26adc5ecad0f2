"""`python -m sdxl_fast.distill [--config FILE] [--resume latest|CHECKPOINT] [--key value ...]`

Any TrainConfig field is an override: `--max_steps 100 --lr_student 5e-6 --student_timesteps 999,499`.
Multi-GPU / multi-node: `accelerate launch [--num_processes N --num_machines M ...] -m sdxl_fast.distill ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import TrainConfig, load_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_fast.distill", description="Adversarial Diffusion Distillation of an SDXL base UNet.",
        epilog="Config keys (each also a --key VALUE override): " + ", ".join(fields),
    )
    parser.add_argument("--config", help="a JSON or TOML file of TrainConfig fields")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in output_dir) or a checkpoint folder")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--"):
            parser.error(f"unexpected argument {key!r}")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
        else:
            parser.error(f"--{key} needs a value")
        if key not in fields:
            parser.error(f"unknown option --{key}")
        overrides[key] = value
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .train import train  # imported late: --help and --print_config need no torch start-up

    summary = train(cfg, resume=args.resume)
    if summary["process_index"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
