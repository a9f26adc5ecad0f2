"""BENCHMARKS.md is rendered from benchmarks/results/*.jsonl: each number with its command and commit."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import render

ROOT = Path(__file__).resolve().parent.parent

VERSIONS = {"torch": "2.11.0+cu130", "diffusers": "0.42.1", "transformers": "5.17.0", "python": "3.12.3"}
BENCH = 'python -m benchmarks.bench --configs sdxl-configs --compile --only "fast 1-step"'


def _write(folder: Path, name: str, records: list[dict]) -> None:
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_device_table_names_each_number_with_its_command_and_commit(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write(results, "gpu.jsonl", [
        {"device": "Some GPU", "workload": "fast 1-step", "path": "ours + compile", "size": "512x512", "batch": 1,
         "median_ms": 16.0, "min_ms": 15.9, "max_ms": 16.4, "images_per_s": 62.4, "peak_gib": 13.13,
         "error_vs_fp32": 7.21e-4, "dtype": "fp16", "command": BENCH, "commit": "abc1234", "date": "2026-12-06",
         "versions": VERSIONS},
        {"device": "Some GPU", "workload": "fast 1-step", "path": "diffusers default", "size": "512x512", "batch": 1,
         "median_ms": 128.6, "dtype": "fp16", "command": BENCH, "commit": "abc1234", "date": "2026-12-06",
         "versions": VERSIONS},
        {"device": "Some GPU", "workload": "fast 4-step", "path": "TensorRT (published)", "size": "512x512",
         "batch": 1, "median_ms": 83.8, "source": "a vendor's published figure"},
        {"kind": "device", "device": "Some GPU", "note": "A note on this machine."},
    ])
    _write(results, "why.jsonl", [
        {"kind": "ablation", "option": "combo kernels", "default": "on", "device": "Some GPU",
         "workload": "Fast 1-step", "unit": "ms", "without": 16.9, "with": 16.5, "command": BENCH + " [--x]",
         "commit": "def5678", "date": "2026-11-24"},
    ])
    output = tmp_path / "BENCHMARKS.md"
    assert render.main(["--results", str(results), "-o", str(output)]) == 0
    text = output.read_text()

    assert "## Some GPU" in text
    assert ("Some GPU, fp16; torch 2.11.0+cu130, diffusers 0.42.1, transformers 5.17.0, Python 3.12.3; "
            "measured 2026-12-06. A note on this machine.") in " ".join(text.split())  # a wrapped paragraph
    assert ("| fast 1-step | ours + compile | 512² | 1 | 16.0 (15.9–16.4) | 62.4 | 13.13 | 7.21e-04 | [1] "
            "| abc1234 |") in text
    assert "| fast 1-step | diffusers default | 512² | 1 | 128.6 |  |  |  | [1] | abc1234 |" in text
    assert "| fast 4-step | TensorRT (published) | 512² | 1 | 83.8 |  |  |  | published | – |" in text
    assert f"1. `{BENCH}`" in text
    assert "| combo kernels | on | Fast 1-step | 16.9 ms | 16.5 ms | Some GPU | [1] | def5678 |" in text
    assert f"1. `{BENCH} [--x]`" in text

    assert render.main(["--results", str(results), "-o", str(output), "--check"]) == 0
    output.write_text(text + "edited by hand\n")
    assert render.main(["--results", str(results), "-o", str(output), "--check"]) == 1


def test_numbers_keep_the_digits_they_were_recorded_with(tmp_path):
    (tmp_path / "r.jsonl").write_text(
        '{"device": "G", "workload": "w", "path": "p", "size": "1024x768", "batch": 1, "median_ms": 10.80, '
        '"peak_gib": 15.10, "command": "c", "commit": "x"}\n')
    text = render.render(render.load(tmp_path))
    assert "| w | p | 1024x768 | 1 | 10.80 |  | 15.10 |  | [1] | x |" in text


def test_the_committed_benchmarks_md_is_the_rendering_of_the_committed_results():
    done = subprocess.run([sys.executable, "-m", "benchmarks.render", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert ".carry" not in text and "runs/" not in text and "ession " not in text
