"""Two processes through accelerate on the CPU (gloo): DDP keeps both ranks' student weights bit-identical.

The same code runs on GPUs with `accelerate launch --multi_gpu --num_processes N` (see docs/DISTILL.md and
distill/gpu_check.py); here torchrun starts the processes and ACCELERATE_USE_CPU selects gloo.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from sdxl_fast.testing.tiny_data import make_dataset, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_in_sync(tmp_path, tiny_family):
    source = make_dataset(tmp_path / "data", "webdataset", n=9, corrupt=(4,))
    overrides = tiny_overrides(str(tiny_family["base"]), source, str(tmp_path / "run"))
    overrides.update(max_steps=2, checkpoint_every=2)
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(list(value) if isinstance(value, tuple) else value)
                 if isinstance(value, (dict, tuple)) else str(value)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "sdxl_fast.distill", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert summary["num_processes"] == 2
    assert len(summary["weight_digests"]) == 2 and len(set(summary["weight_digests"])) == 1
    assert summary["skipped_images"] == 1  # counted on whichever rank met it, summed over ranks
    assert (Path(summary["student"]) / "diffusion_pytorch_model.safetensors").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-00000002"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
