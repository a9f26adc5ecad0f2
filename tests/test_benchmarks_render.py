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
            "measured 2026-12-06.\n\n- A note on this machine.") in text  # each note a bullet of its own
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


SERVING = "python -m benchmarks.serving --configs benchmarks/sdxl-configs --work /tmp/serving"


def test_serving_rows_get_one_table_per_kind_per_device_with_command_and_commit(tmp_path):
    common = {"command": SERVING, "commit": "abc1234", "date": "2026-12-07", "versions": VERSIONS}
    _write(tmp_path, "serving.jsonl", [
        {"kind": "models saved", "device": "Some GPU", "seconds": 41.2, **common},
        {"kind": "start-up", "device": "Some GPU", "cache": "cold", "serving_s": 20.5, "first_fast_image_s": 22.0,
         "first_fast_call_ms": 1480.3, **common},
        {"kind": "first call", "device": "Some GPU", "api": "generate_fast", "mode": "fast", "size": "512x512",
         "images": 1, "steps": 1, "first_ms": 90.1, "later_ms": 31.0, **common},
        {"kind": "first call", "device": "Some GPU", "api": "generate_fast", "mode": "fast", "size": "512x512",
         "images": 1, "steps": 1, "compiled": True, "first_ms": 25.0, "later_ms": 24.2, **common},
        {"kind": "http", "device": "Some GPU", "size": "512x512", "calls": 30, "end_to_end_p50_ms": 30.2,
         "end_to_end_p95_ms": 33.0, "generate_alone_p50_ms": 17.1, "generate_alone_p95_ms": 18.0, **common},
        {"kind": "typists", "device": "Some GPU", "typists": 4, "size": "512x512", "requests": 300,
         "images_per_s": 30.0, "p50_ms": 120.5, "p95_ms": 150.0, "app_cpu_per_s": 0.97,
         "app_cpu_ms_per_request": 32.3, "batches": "2 images: 150 calls, p50 61.0 ms", **common},
        {"kind": "compiled", "device": "Some GPU", "shapes": 6, "after_s": 200.4, "log": ["compiled shapes: ..."],
         **{**common, "command": SERVING + " --phases cold"}},
        {"kind": "typists", "device": "Other GPU", "typists": 1, "size": "512x512", "requests": 90,
         "images_per_s": 9.0, "p50_ms": 100.0, "p95_ms": 110.0, **{**common, "commit": "def5678"}},
    ])
    text = render.render(render.load(tmp_path))

    assert "## Some GPU\n" not in text  # serving rows are not results rows
    some, other = text.split("## Serving on Some GPU")[1].split("## Serving on Other GPU")
    assert [line[4:] for line in some.splitlines() if line.startswith("### ")] == [
        "start-up", "first call", "http", "typists", "compiled", "models saved"]  # one table per kind, this order
    assert ("Some GPU; torch 2.11.0+cu130, diffusers 0.42.1, transformers 5.17.0, Python 3.12.3; measured "
            "2026-12-07.") in " ".join(some.split())
    assert "| cold |  | 20.5 | 22.0 | 1480.3 |  |  |  | [1] | abc1234 |" in some
    assert "| generate_fast | fast | 512² | 1 | 1 |  | 90.1 | 31.0 | [1] | abc1234 |" in some
    assert "| generate_fast | fast | 512² | 1 | 1 | yes | 25.0 | 24.2 | [1] | abc1234 |" in some
    assert "| 512² | 30 | 30.2 | 33.0 | 17.1 | 18.0 | [1] | abc1234 |" in some
    assert ("| 4 | 512² | 300 | 30.0 | 120.5 | 150.0 | 0.97 | 32.3 | 2 images: 150 calls, p50 61.0 ms | [1] | abc1234 |"
            in some)
    assert "| 6 | 200.4 | [2] | abc1234 |" in some and "| 41.2 | [1] | abc1234 |" in some
    assert f"1. `{SERVING}`" in some and f"2. `{SERVING} --phases cold`" in some
    assert "compiled shapes: ..." not in text  # the log is for reading the JSONL, not for the table
    assert "| 1 | 512² | 90 | 9.0 | 100.0 | 110.0 |  |  |  | [1] | def5678 |" in other and "### http" not in other
