"""Two CPU processes under FSDP2 (torch fully_shard, gloo): the student and the discriminator heads are sharded,
both ranks end with the same whole weights, which match a DDP run of the same config up to float rounding, the
sharded checkpoint resumes bit-identically (weights, optimisers, EMA, RNG, data position) and the exported
student is one ordinary diffusers folder. The DDP run keeps both ranks bit-identical on its own.

The same code runs on GPUs with `accelerate launch --multi_gpu --num_processes N` (see docs/DISTILL.md and
distill/gpu_check.py); here torchrun starts the processes and ACCELERATE_USE_CPU selects gloo.

accelerate's FSDP settings come from configs/accelerate/fsdp.yaml, turned into the FSDP_* environment that
`accelerate launch --config_file` sets; tests/fsdp_cpu_launch.py lets accelerate use FSDP on CPU processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from sdxl_fast.testing.tiny_data import make_dataset, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_env() -> dict:
    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    env = {key.upper(): str(value).lower() if isinstance(value, bool) else str(value) for key, value in fsdp.items()}
    return dict(env, ACCELERATE_USE_FSDP="true")


def _run(overrides: dict, *extra: str, fsdp: bool = True) -> dict:
    args = list(extra)
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(list(value) if isinstance(value, tuple) else value)
                 if isinstance(value, (dict, tuple)) else str(value)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), **(_fsdp_env() if fsdp else {}))
    program = [str(REPO / "tests" / "fsdp_cpu_launch.py")] if fsdp else ["-m", "sdxl_fast.distill"]  # else DDP
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         *program, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # the tracebacks
    assert proc.returncode == 0, (ranks or proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # printed by rank 0 only


def test_two_cpu_processes_train_under_fsdp(tmp_path, tiny_family):
    from diffusers import UNet2DConditionModel

    source = make_dataset(tmp_path / "data", "webdataset", n=9, corrupt=(4,))
    base = tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run"))
    base.update(max_steps=2, checkpoint_every=1, ema_decay=0.5)
    summary = _run(base)
    assert summary["distributed_type"] == "FSDP" and summary["num_processes"] == 2
    assert len(summary["weight_digests"]) == 2 and len(set(summary["weight_digests"])) == 1  # whole weights
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-00000001"
    # Sharded: each model and optimiser is a torch.distributed.checkpoint folder with one file per process.
    assert {p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert (ckpt / "optimizer_1").is_dir()

    student = Path(summary["student"])
    unet = UNet2DConditionModel.from_pretrained(student)
    teacher = UNet2DConditionModel.from_pretrained(tiny_family["base"], subfolder="unet")
    assert unet.state_dict().keys() == teacher.state_dict().keys()  # plain names, no FSDP prefixes
    assert all(torch.isfinite(v).all() for v in unet.state_dict().values())

    # Resume from the sharded step-1 checkpoint into a fresh output folder: the same step-2 result, bit for bit.
    resumed = _run(dict(base, output_dir=str(tmp_path / "resumed")), "--resume", str(ckpt))
    assert resumed["weight_digests"] == summary["weight_digests"]
    assert resumed["skipped_images"] == summary["skipped_images"]
    a = load_file(student / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "student" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the EMA resumed too

    # DDP on the same config: the same training up to float rounding (reduction order differs). This catches
    # what sharding can silently get wrong: per-rank head initialisations, L_adv gradients left on the heads.
    ddp = _run(dict(base, output_dir=str(tmp_path / "ddp"), checkpoint_every=2), fsdp=False)
    assert ddp["distributed_type"] == "MULTI_CPU" and ddp["num_processes"] == 2
    assert len(set(ddp["weight_digests"])) == 1  # DDP keeps both ranks' weights bit-identical
    assert ddp["skipped_images"] == 1  # counted on whichever rank met it, summed over ranks
    ddp_ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint-00000002"
    assert {p.name for p in ddp_ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    c = load_file(Path(ddp["student"]) / "diffusion_pytorch_model.safetensors")
    t = load_file(next((Path(tiny_family["base"]) / "unet").glob("*.safetensors")))
    moved = max((c[k] - t[k]).abs().max().item() for k in c)  # how far training moved the weights
    assert moved > 1e-5
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=moved * 0.02) for k in a)
