"""Two GPU checks of the training job, on random weights (no downloads; timing depends on shapes only).

    # seconds/step and peak memory at 512², full-size SDXL UNets + full-size DINOv2 ViT-S, one GPU,
    # trying batch sizes until one runs out of memory:
    python -m sdxl_fast.distill.gpu_check benchmark --reference benchmarks/sdxl-configs --batch-sizes 1,2,4,8,16

    # the same short run on 1 and on N GPUs through accelerate: images/s of each, and whether every rank
    # ends with bit-identical student weights:
    python -m sdxl_fast.distill.gpu_check multi-gpu --reference benchmarks/sdxl-configs --gpus 2

Each training run is a subprocess (`python -m sdxl_fast.distill` or `accelerate launch -m sdxl_fast.distill`), so an out-of-memory
batch size cannot poison the next one, and the commands printed are the ones that reproduce the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from sdxl_fast.testing.tiny_data import make_dataset

REPO = Path(__file__).resolve().parents[2]  # the repository root: what the launched jobs import


def build_models(reference: str, work: Path, full_size: bool) -> str:
    """A random-weight SDXL base pipeline folder (full size from the public configs, or tiny) under `work`.

    Only the base is written (the teacher; the student is copied from it): the whole family is about 23 GB
    at full size and takes minutes to write, the base alone about 6.5 GB.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_fast.testing.random_weights import SDXL_SCHEDULER, clip_tokenizer, full_configs, tiny_configs

    folder = work / ("sdxl-full-base" if full_size else "sdxl-tiny-base")
    if not (folder / "model_index.json").is_file():
        configs = full_configs(reference) if full_size else tiny_configs()
        dtype = torch.float16 if full_size else torch.float32
        torch.manual_seed(0)
        StableDiffusionXLPipeline(
            vae=AutoencoderKL(**configs["vae"]).to(dtype),
            text_encoder=CLIPTextModel(configs["text_encoder"]).to(dtype),
            text_encoder_2=CLIPTextModelWithProjection(configs["text_encoder_2"]).to(dtype),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=UNet2DConditionModel(**configs["unet"]).to(dtype),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        ).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def run_config(teacher: str, data: str, output_dir: str, resolution: int, batch_size: int, steps: int,
               full_size: bool) -> dict:
    cfg = dict(
        teacher=teacher, data=data, output_dir=output_dir, resolution=resolution, batch_size=batch_size,
        max_steps=steps, num_workers=4, mixed_precision="bf16", gradient_checkpointing=True,
        disc_weights="random", checkpoint_every=0, validate_every=0, log_every=1, distill_space="pixel",
    )
    if not full_size:  # tiny ViT for a smoke test of this script itself
        cfg.update(disc_backbone_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2}, disc_blocks=(0, 2),
                   disc_image_size=56, resolution=64, mixed_precision="no")
    return cfg


def _args(cfg: dict) -> list[str]:
    out = []
    for key, value in cfg.items():
        out += [f"--{key}", json.dumps(list(value) if isinstance(value, tuple) else value)
                if isinstance(value, (dict, tuple, list)) else str(value)]
    return out


def launch(cfg: dict, num_processes: int = 1) -> tuple[dict | None, str, str]:
    """Run one training job; returns (summary or None on failure, command line, stderr tail)."""
    if num_processes > 1:
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", cfg.get("mixed_precision", "no"), "--dynamo_backend", "no", "-m", "sdxl_fast.distill"]
    else:
        cmd = [sys.executable, "-m", "sdxl_fast.distill"]
    cmd += _args(cfg)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = shlex.join(cmd)
    if proc.returncode != 0:
        return None, line, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), line, ""


def benchmark(args) -> list[dict]:
    work = Path(args.work)
    teacher = build_models(args.reference, work, full_size=not args.tiny)
    data = make_dataset(work / "data", "folder", n=max(64, 4 * max(args.batch_sizes)), corrupt=())
    results = []
    for batch_size in args.batch_sizes:
        cfg = run_config(teacher, data, str(work / f"bench-bs{batch_size}"), args.resolution, batch_size,
                         args.steps, full_size=not args.tiny)
        summary, cmd, err = launch(cfg)
        if summary is None:
            oom = "out of memory" in err.lower()
            results.append({"batch_size": batch_size, "failed": "out of memory" if oom else err[-500:], "command": cmd})
            print(json.dumps(results[-1]), flush=True)
            break
        results.append({"batch_size": batch_size, "seconds_per_step": summary["seconds_per_step"],
                        "images_per_s": summary["images_per_s"], "peak_gpu_mem_gb": summary["peak_gpu_mem_gb"],
                        "command": cmd})
        print(json.dumps(results[-1]), flush=True)
    return results


def multi_gpu(args) -> list[dict]:
    work = Path(args.work)
    teacher = build_models(args.reference, work, full_size=not args.tiny)
    data = make_dataset(work / "data", "folder", n=max(64, 4 * args.batch_size * args.gpus), corrupt=())
    results = []
    for n in (1, args.gpus):
        cfg = run_config(teacher, data, str(work / f"multi-{n}gpu"), args.resolution, args.batch_size, args.steps,
                         full_size=not args.tiny)
        summary, cmd, err = launch(cfg, num_processes=n)
        if summary is None:
            raise SystemExit(f"{n}-GPU run failed:\n{cmd}\n{err}")
        digests = summary["weight_digests"]
        results.append({"gpus": n, "images_per_s": summary["images_per_s"],
                        "seconds_per_step": summary["seconds_per_step"],
                        "ranks_identical": len(set(digests)) == 1 and len(digests) == n, "command": cmd})
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_fast.distill.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["benchmark", "multi-gpu"])
    parser.add_argument("--reference", default="benchmarks/sdxl-configs",
                        help="folder with the public SDXL configs (base/unet/config.json, ...)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "distill-gpu-check"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=2, help="per GPU, for multi-gpu")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny models, to check this script itself on a CPU")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = benchmark(args) if args.check == "benchmark" else multi_gpu(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
