"""Where a benchmark's JSON lines go, and what each line says about how it was made.

Every row a benchmark writes carries `provenance(command)`: the command, the commit it ran on (`git rev-parse
--short HEAD`, null outside a checkout), the date and the versions of torch, diffusers, transformers and Python.
By default a run writes a new file under `benchmarks/results/new/` (ignored by git), named by date and device,
so that no run overwrites a tracked results file; see render.py for how such a file becomes part of
BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW_RESULTS = ROOT / "benchmarks" / "results" / "new"


def commit() -> str | None:
    """The short hash of the checkout's HEAD, with "+modified" when tracked files differ from it (the code that
    ran is then not that commit), or None when there is no git or no checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--exclude=*", "--abbrev=7", "--dirty=+modified"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def versions() -> dict[str, str]:
    """The versions that decide the figures, as the results files name them; a package not installed is left out."""
    found = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    found["python"] = platform.python_version()
    return found


def device_name(device) -> str:
    """The GPU's name as CUDA reports it, else "CPU, N cores"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores"


def provenance(command: str) -> dict:
    return {"command": command, "commit": commit(), "date": datetime.date.today().isoformat(), "versions": versions()}


def new_results_file(device: str, folder: Path | None = None) -> Path:
    """A path not yet taken under `folder` (NEW_RESULTS): DATE-DEVICE.jsonl, with -2, -3, ... when a run that day
    made one."""
    folder = NEW_RESULTS if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}"
    path, n = folder / f"{stem}.jsonl", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.jsonl"
    return path


class Writer:
    """Appends each row to `path` as one JSON line as soon as it is measured (a run cut short keeps its rows), and
    prints it."""

    def __init__(self, path: Path | None, echo: bool = True):
        self.path, self.echo = path, echo
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        if self.echo:
            print(line, flush=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
