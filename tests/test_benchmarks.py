"""The benchmarks run as users run them: bench writes its rows as JSONL (and a table with -o), fast_breakdown and
unet_probe time each part, and all of them time through benchmarks.timing."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import record
from benchmarks.bench import main as bench_main
from benchmarks.timing import Timing, time_calls
from sdxl_fast.accel.options import Acceleration


def _tool(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks.SCRIPT` with the given arguments, as a user would, capturing its output."""
    module = "benchmarks." + script.removesuffix(".py")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          check=check, cwd=Path(__file__).parent.parent)


ROW_FIELDS = ["device", "workload", "path", "size", "batch", "median_ms", "min_ms", "max_ms", "images_per_s",
              "peak_gib", "error_vs_fp32", "error_vs_eager_same_dtype", "dtype", "command", "commit", "date",
              "versions"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_harness_runs_and_writes_its_table(tmp_path, capsys):
    out, rows_file = tmp_path / "BENCH.md", tmp_path / "rows.jsonl"
    assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--step-cache", "2", "-o", str(out),
                       "--json", str(rows_file)]) == 0
    table = out.read_text()
    for workload in ("fast 1-step", "fast 4-step", "fast 1-step batch 16", "quality 50-step base+refiner CFG 5",
                     "quality 30-step base CFG 5"):
        assert f"| {workload} | ours |" in table
    assert "python -m benchmarks.bench --tiny --repeats 1" in table and "torch 2.14.1" in table
    rows = [line for line in table.splitlines() if line.startswith("| fast") or line.startswith("| quality")]
    exact = [row for row in rows if "step cache" not in row]
    assert all(float(row.split("|")[-2]) < 1e-5 for row in exact)  # on CPU only the upsampler rewrite: rounding
    assert all(float(row.split("|")[-3]) < 1e-3 for row in exact)  # fp32 on CPU: the same as the fp32 reference
    # The opt-in step cache gets rows of its own for the multi-step workloads, with the error it adds.
    cached = [row for row in rows if "| ours + step cache 2 |" in row]
    assert [row.split("|")[1].strip() for row in cached] == ["fast 4-step", "quality 50-step base+refiner CFG 5",
                                                              "quality 30-step base CFG 5"]
    assert all(float(row.split("|")[-2]) > 1e-4 for row in cached)

    # The same facts on the JSONL rows, which are in the schema benchmarks/render.py reads.
    rows = _rows(rows_file)
    for workload in ("fast 1-step", "fast 4-step", "fast 1-step batch 16", "quality 50-step base+refiner CFG 5",
                     "quality 30-step base CFG 5"):
        assert {"ours", "diffusers default"} <= {r["path"] for r in rows if r["workload"] == workload}
    ours = [r for r in rows if r["path"] != "diffusers default"]
    assert all(list(r) == ROW_FIELDS for r in ours)
    assert all(r["command"].startswith("python -m benchmarks.bench --tiny --repeats 1") for r in rows)
    assert all(r["versions"]["torch"].startswith("2.14.1") and r["dtype"] == "fp32" for r in rows)
    assert all(r["size"] == "64x64" and r["device"] == record.device_name("cpu") for r in rows)
    exact = [r for r in ours if "step cache" not in r["path"]]
    assert all(r["error_vs_eager_same_dtype"] < 1e-5 for r in exact)  # on CPU only the upsampler rewrite: rounding
    assert all(r["error_vs_fp32"] < 1e-3 for r in exact)  # fp32 on CPU: the same as the fp32 reference
    cached = [r for r in ours if r["path"] == "ours + step cache 2"]
    assert [r["workload"] for r in cached] == ["fast 4-step", "quality 50-step base+refiner CFG 5",
                                               "quality 30-step base CFG 5"]
    assert all(r["error_vs_eager_same_dtype"] > 1e-4 for r in cached)
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["images_per_s"] > 0 for r in rows)
    assert "| fast 1-step |" not in capsys.readouterr().out  # the table only goes to -o


def test_bench_writes_a_new_untracked_results_file_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "NEW_RESULTS", tmp_path / "new")
    (tmp_path / "new").mkdir()
    taken = record.new_results_file(record.device_name("cpu"))
    taken.write_text("an earlier run\n")
    assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--only", "fast 1-step"]) == 0
    written = sorted(set((tmp_path / "new").iterdir()) - {taken})
    assert len(written) == 1 and written[0].name == taken.name.replace(".jsonl", "-2.jsonl")
    assert taken.read_text() == "an earlier run\n"  # never overwritten
    assert [(r["workload"], r["path"]) for r in _rows(written[0])] == [("fast 1-step", "diffusers default"),
                                                                       ("fast 1-step", "ours")]
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/new/any.jsonl"],
                             cwd=Path(__file__).parent.parent)
    assert ignored.returncode == 0  # the real folder: git ignores it, so a run never touches a tracked file


def test_bench_compiled_only_skips_the_rows_without_compile(tmp_path):
    out = tmp_path / "BENCH.md"
    assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--only", "fast 1-step", "--compile",
                       "--compiled-only", "-o", str(out), "--json", str(tmp_path / "rows.jsonl")]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fast")]
    assert [row.split("|")[2].strip() for row in rows] == ["ours + compile"]  # on CPU compile is skipped, noted


def test_bench_reference_stays_fp32_while_the_same_modules_are_measured_in_half_precision():
    """The fp32 error baseline runs first on the very modules that are then cast in place (one copy of the
    weights on the GPU); with no options, ours is our eager loop exactly, and only the cast differs from fp32."""
    from benchmarks import bench
    from sdxl_fast.testing import random_weights

    rows, _ = bench.run_bench(random_weights.tiny_configs(), torch.device("cpu"), torch.bfloat16, 1, True,
                              Acceleration.none(), only=["fast 1-step"])
    ours = next(r for r in rows if r["path"] == "ours")
    assert ours["error_vs_eager_same_dtype"] == 0.0
    assert 1e-4 < ours["error_vs_fp32"] < 5e-2  # bf16 against fp32: the reference was not cast first


def test_bench_refuses_an_unknown_workload_before_building_anything(capsys, monkeypatch):
    from benchmarks import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--tiny", "--only", "fast 1 step"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fast 1 step'" in err and "'fast 1-step'" in err  # the valid names, listed


def test_bench_no_combo_kernels_compiles_without_them(tmp_path, monkeypatch):
    from benchmarks import bench
    from sdxl_fast import accel as acceleration

    applied, apply = [], acceleration.apply
    monkeypatch.setattr(bench.acceleration, "apply",
                        lambda models, options: applied.append(options) or apply(models, options))
    for flag, expected in (([], True), (["--no-combo-kernels"], False)):
        applied.clear()
        assert bench_main(["--tiny", "--repeats", "1", "--device", "cpu", "--only", "fast 1-step", "--compile",
                           "--compiled-only", *flag, "-o", str(tmp_path / "BENCH.md"),
                           "--json", str(tmp_path / "rows.jsonl")]) == 0
        assert [o.combo_kernels for o in applied if o.compile] == [expected]


def test_fast_breakdown_script_times_every_part(capsys):
    from benchmarks import fast_breakdown

    fast_breakdown.main(["--tiny", "--batch", "2", "3", "--without", "subpixel_upsample"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " ms " in line]
    assert len(lines) == 14 and all("median" in line for line in lines)
    assert [line.split("  ")[0] for line in lines[-3:]] == ["UNet step, batch 3", "VAE decode + uint8, batch 3",
                                                             "generate(), batch 3"]
    assert out.startswith("acceleration: \n")  # the CPU default less the one option turned off


def test_fast_breakdown_timeline_lists_the_stages_of_a_call_in_order(capsys):
    from benchmarks import fast_breakdown

    fast_breakdown.main(["--tiny", "--timeline"])
    stages = capsys.readouterr().out.split("host, ms from the call's start")[1].splitlines()[1:]
    names = [line.rsplit(None, 1)[0].strip() for line in stages]
    times = [float(line.rsplit(None, 1)[1]) for line in stages]
    assert names == ["generate() starts", "tokenising starts", "tokenising returns",
                     "waiting for the GPU, copying to the CPU starts", "waiting for the GPU, copying to the CPU returns",
                     "uint8 -> PIL starts", "uint8 -> PIL returns", "generate() returns"]  # on CPU: no graphs
    assert times == sorted(times) and times[0] == 0.0 < times[-1]


def test_fast_breakdown_batch_0_skips_the_batched_lines_and_sets_inductor_config():
    # As a user runs it, in a process of its own: --inductor changes Inductor's process-wide config.
    from benchmarks import fast_breakdown

    out = _tool("fast_breakdown.py", "--tiny", "--batch", "0", "--inductor", "triton.enable_pdl=True").stdout
    assert [line.split("  ")[0] for line in out.splitlines() if " ms " in line][-1] == (
        "uint8 images -> CPU (pageable memory) -> PIL")
    with pytest.raises(AttributeError, match="no_such_setting"):  # before anything is built or set
        fast_breakdown.main(["--tiny", "--batch", "0", "--inductor", "no_such_setting=1"])


def test_fast_breakdown_trace_reports_each_call_and_writes_a_chrome_trace(tmp_path, capsys):
    from benchmarks import fast_breakdown

    fast_breakdown.main(["--tiny", "--trace", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    calls = [line for line in out.splitlines() if line.startswith("call ")]
    assert len(calls) == 3 and all("GPU busy 0.000 ms" in line for line in calls)  # a CPU has no kernels
    assert "aten::" in out  # the CPU operations under each gap
    assert any(e.get("name") == "call 2" for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"])


def _probe_results(out: str) -> list[str]:
    results = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert all(float(line.split("median")[1].split()[0]) > 0 for line in results)
    return [line.split("]")[1].split()[0] for line in results]


def test_unet_probe_script_times_each_shape():
    out = _tool("unet_probe.py", "--tiny", "--model", "base", "--shapes", "64x1", "128x2").stdout
    assert _probe_results(out) == ["64x1", "128x2"]


@pytest.mark.parametrize("model", ["refiner", "vae"])
def test_unet_probe_times_the_refiner_and_the_vae_decoder(model, capsys):
    from benchmarks import unet_probe

    unet_probe.main(["--tiny", "--model", model, "--shapes", "64x1", "128x2"])
    assert _probe_results(capsys.readouterr().out) == ["64x1", "128x2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU is told")
@pytest.mark.parametrize("flags", [("--tiny", "--profile"), ("--tiny", "--blas", "cublaslt"), ("--gemm-micro",)])
def test_unet_probe_refuses_the_gpu_only_parts_clearly_on_a_cpu(flags, capsys, monkeypatch):
    from benchmarks import unet_probe

    monkeypatch.setattr(unet_probe, "build", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as exit_:
        unet_probe.main(list(flags))
    assert exit_.value.code == 2 and "need a CUDA GPU" in capsys.readouterr().err


def test_bench_prompts_are_new_on_every_call_unless_a_workload_repeats_one():
    from benchmarks.bench import PROMPT, time_workload, workloads

    seen = []
    fast, same = (next(w for w in workloads(tiny=True) if w.name == name)
                  for name in ("fast 1-step", "fast 1-step, same prompt"))
    for w in (fast, fast, same):  # the same workload twice, as two phases of one run measure it
        time_workload(lambda w, prompt: seen.append((w.same_prompt, prompt)), w, torch.device("cpu"), repeats=3)
    new = [prompt for same_prompt, prompt in seen if not same_prompt]
    assert len(new) == 8 and len(set(new)) == 8 and PROMPT not in new  # never served from the prompt cache
    assert [prompt for same_prompt, prompt in seen if same_prompt] == [PROMPT] * 4




def test_time_calls_warms_up_untimed_then_times_each_call():
    calls = []
    timing = time_calls(lambda: calls.append(len(calls)), repeats=4, warmup=2, sync=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4, 5] and len(timing.samples) == 4
    assert timing.min <= timing.median <= timing.max and all(s >= 0 for s in timing.samples)
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeats=0)


def test_timing_summarises_latencies_as_the_serving_benchmark_reports_them():
    from benchmarks.serving import ms

    timing = Timing((0.004, 0.001, 0.003, 0.002))
    assert (timing.median, timing.min, timing.max) == (0.0025, 0.001, 0.004)
    assert timing.percentile(50) == 0.003 and timing.percentile(95) == 0.004  # nearest rank
    assert timing.ms() == {"median_ms": 2.5, "min_ms": 1.0, "max_ms": 4.0}
    assert ms([0.004, 0.001, 0.003, 0.002], "end_to_end_") == {"end_to_end_p50_ms": 2.5, "end_to_end_p95_ms": 4.0}


def test_serving_overhead_serves_typists_through_the_real_app_with_a_stand_in_model(tmp_path):
    """The app's serving path with the model replaced by a fixed-time stand-in: every keystroke of every
    typist comes back as a frame over HTTP, and the rows say which stand-in they were measured with."""
    out = tmp_path / "overhead.jsonl"
    _tool("serving_overhead", "--model-ms", "5", "--size", "128x128", "--typists", "1,3", "--seconds", "1.5",
          "--port", "7893", "--json", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["typists"], r["model_ms"], r["size"]) for r in rows] == [
        ("serving path alone", 1, 5.0, "128x128"), ("serving path alone", 3, 5.0, "128x128")]
    assert all(r["requests"] >= r["typists"] and r["images_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] >= 5
               for r in rows)
    for r in rows:  # the app's batched calls, from its log, hold every request of the row (one image each)
        batches = [re.fullmatch(r"(\d+) images: (\d+) calls, p50 ([\d.]+) ms", b) for b in r["batches"].split("; ")]
        assert all(batches) and sum(int(b[1]) * int(b[2]) for b in batches) == r["requests"]
        assert all(float(b[3]) >= 5 for b in batches)  # each call took at least the stand-in model's time


def test_aot_loader_check_compiles_a_package_and_loads_it_in_a_new_process(tmp_path):
    out = tmp_path / "check.jsonl"
    _tool("aot_probe", "--loader-check", str(tmp_path / "packages"), "--out", str(out))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["kind"] == "aot loader check" and row["compile_returncode"] == row["load_returncode"] == 0
    assert row["max_abs_diff"] < 1e-4 and (tmp_path / "packages" / "loader-check.pt2").is_file()


def test_aot_loader_check_reports_a_loader_that_crashes(tmp_path, monkeypatch):
    from benchmarks import aot_probe

    monkeypatch.setattr(aot_probe, "LOADER_CHECK", "import os, signal, sys\n"
                        "if sys.argv[1] == 'load': os.kill(os.getpid(), signal.SIGSEGV)\n")
    row = aot_probe.loader_check(tmp_path)
    assert row["compile_returncode"] == 0 and row["load_returncode"] == -signal.SIGSEGV
    assert "max_abs_diff" not in row
