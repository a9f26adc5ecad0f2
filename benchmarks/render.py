"""`python -m benchmarks.render`: write BENCHMARKS.md from the recorded results in `benchmarks/results/*.jsonl`.

Each line of a results file is one JSON object, of one of these kinds:

- a result (no "kind", or "kind": "result"): one measured (workload, path) on one device. Fields: device,
  workload, path, size ("512x512"), batch, median_ms, and where known min_ms, max_ms, images_per_s, peak_gib,
  error_vs_fp32, error_vs_eager_same_dtype, dtype, command (what produced it), commit (the code it ran on),
  date, versions ({"torch", "diffusers", "transformers", "python"}); a figure not measured here (a published
  one) has "source" instead of command and commit.
- "kind": "device": a sentence ("note") added to that device's conditions paragraph (with "section": "serving",
  to its serving section's).
- "kind": "ablation": an A/B that justifies a default: option, default, device, workload, unit, without, with
  (a number or a list of numbers), and note, command, commit, date, versions where known.
- "kind" one of SERVING_KINDS: a row of `python -m benchmarks.serving` (or `benchmarks.serving_overhead`), with
  device, command, commit, date, versions and the kind's fields (SERVING_COLUMNS); shown as one table per kind
  under "Serving on DEVICE".

Numbers are read as decimals, so they print with the digits they were recorded with. `--check` exits 1 when
BENCHMARKS.md differs from what this would write. Standard library only.

How a new run becomes part of BENCHMARKS.md: `python -m benchmarks.bench` and `python -m benchmarks.serving`
write their rows, each with its command, commit, date and versions, to a new file under
`benchmarks/results/new/` (git ignores it; `--json FILE` picks another file), never to a tracked one. Check the
rows, move or merge the lines to keep into `benchmarks/results/<device>.jsonl` (e.g. h100.jsonl; a row that a
new measurement replaces is deleted, since history lives in git), run `python -m benchmarks.render`, and commit
the results file and BENCHMARKS.md together. Within a device, rows print in file order.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = ROOT / "BENCHMARKS.md"

INTRO = """\
# Benchmarks

<!-- Written by `python -m benchmarks.render` from benchmarks/results/*.jsonl: edit those, then run it. -->

What is measured: `python -m benchmarks.bench` builds random-weight models of the full SDXL shapes (base,
refiner, and a student the shape of the base) from the public SDXL configs, and times diffusers' default
pipelines and ours on the same modules, in one process. Timing depends on the shapes, not on the weight
values. Each time is prompt string in -> PIL image out: the median of the timed calls after one untimed call,
with the fastest and slowest in brackets. Every call has a prompt not used before in the process, so the text
encoders always run, unless the workload says "same prompt" (then their output comes from the prompt cache).
The error is the final latents' relative L2 distance to our own loop in eager fp32, same seed.

- **diffusers default**: diffusers' `StableDiffusionXLPipeline` / `StableDiffusionXLImg2ImgPipeline` on the
  same modules (Fast: Euler ancestral, trailing, as SDXL-Turbo ships; Quality: the base to
  `denoising_end=0.8`, then the refiner).
- **ours + compile**: what the app and the CLI run on a CUDA GPU. The default `Acceleration`: the
  upsamplers as 2x2 convolutions, channels_last, fused QKV in the UNets and the text encoders, every
  cross-attention's text keys and values in one matmul per call, the VAE's attention as matmuls, group norms
  from per-channel statistics, the two text encoders on two CUDA streams, CUDA graphs of the whole Fast call
  and of each Quality UNet step; and torch.compile (mode "default", one static graph per shape, Inductor's
  combo kernels) of the UNets, the VAE decoder and the text encoders.
- **+ fp8** (`--fp8`) and **+ step cache 2** (`--cache-interval 2`) are opt-in because they change the
  numerics: e4m3 matmuls in the UNets' transformer blocks with input scales calibrated at load; the whole
  UNet on every other step and only its outermost level in between.
- **part** rows: `python -m benchmarks.fast_breakdown`, each part of a Fast call timed alone (median of 20
  calls). **timeline** rows: its `--timeline` spans, timed by host clock and CUDA events within whole calls.

The public SDXL configs (the JSON files of the SDXL base and refiner repositories, no weights) are in
`benchmarks/sdxl-configs`.

Every number below names the command that produced it and the commit of the code it ran on (for some rows of
"Why the defaults", the commit that recorded it). The commands are written for the current layout; at those
commits the bench was `sdxl-fast bench` and the other two were scripts under `tools/`, with the same options.
The versions are those of the measuring machine.
"""

TABLE_HEAD = ("| workload | path | size | batch | median ms (min–max) | images/s | peak GiB | error vs eager fp32 "
              "| command | commit |\n|---|---|---|---|---|---|---|---|---|---|")
SERVING_KINDS = ("start-up", "first call", "http", "typists", "serving path alone", "compiled", "models saved")
# The columns of each serving kind's table: (field, heading); then the command and the commit.
SERVING_COLUMNS = {
    "start-up": [("cache", "compile cache"), ("cache_mb", "cache MB"), ("serving_s", "serving after s"),
                 ("first_fast_image_s", "first Fast image after s"), ("first_fast_call_ms", "first Fast call ms"),
                 ("quality_ready_s", "Quality ready after s"),
                 ("defaults_compiled_after_s", "defaults compiled after s"), ("compiled", "shapes compiled")],
    "first call": [("api", "api"), ("mode", "mode"), ("size", "size"), ("images", "images"), ("steps", "steps"),
                   ("compiled", "compiled"), ("first_ms", "first call ms"), ("later_ms", "later calls, median ms")],
    "http": [("api", "event"), ("size", "size"), ("calls", "calls"), ("end_to_end_p50_ms", "over HTTP p50 ms"),
             ("end_to_end_p95_ms", "over HTTP p95 ms"), ("generate_alone_p50_ms", "generate() alone p50 ms"),
             ("generate_alone_p95_ms", "generate() alone p95 ms")],
    "typists": [("typists", "typists"), ("size", "size"), ("requests", "requests"), ("images_per_s", "images/s"),
                ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("app_cpu_per_s", "app CPU s per s"),
                ("app_cpu_ms_per_request", "app CPU ms per request"), ("batches", "live batches in generate()")],
    "serving path alone": [("typists", "typists"), ("model_ms", "stand-in model ms"), ("size", "size"),
                           ("requests", "requests"), ("images_per_s", "images/s"), ("p50_ms", "p50 ms"),
                           ("p95_ms", "p95 ms"), ("app_cpu_per_s", "app CPU s per s"),
                           ("app_cpu_ms_per_request", "app CPU ms per request"),
                           ("batches", "live batches in generate()")],
    "compiled": [("shapes", "shapes compiled"), ("after_s", "after s")],
    "models saved": [("seconds", "seconds")],
}
SERVING_INTRO = """\
`python -m benchmarks.serving` starts `python app.py` on random-weight SDXL and measures it over HTTP as a browser
gets its images (from joining the queue until the image bytes have arrived): start-up with empty ("cold") and
saved ("cached") compile caches, or a second start without compilation ("restart"), the first and later calls
of each size, the compiled calls, Fast over HTTP against `generate()` alone (the live event sends JPEGs inline in
its answer, the Generate button PNGs), and N typists at once."""

ABLATION_HEAD = ("| option | default | measured | without | with | device | command | commit |\n"
                 "|---|---|---|---|---|---|---|---|")


def load(results_dir: Path) -> list[dict]:
    """Every record of every results file, files in name order, lines in file order."""
    records = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line, parse_float=Decimal))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name}:{number}: not JSON ({error})") from None
    return records


def _unique(values) -> list:
    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    return str(value)


def _size(size: str | None) -> str:
    if not size:
        return ""
    width, _, height = size.partition("x")
    return f"{width}²" if width == height else size


def _versions(v: dict) -> str:
    return ", ".join(f"{name} {v[key]}" for key, name in
                     (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                      ("python", "Python")) if key in v)


class _Commands:
    """Numbers each distinct command in order of first use, for the list under a table."""

    def __init__(self):
        self.commands: list[str] = []

    def ref(self, command: str | None) -> str:
        if not command:
            return "–"
        if command not in self.commands:
            self.commands.append(command)
        return f"[{self.commands.index(command) + 1}]"

    def listing(self) -> str:
        return "\n".join(f"{i}. `{c}`" for i, c in enumerate(self.commands, 1))


def _conditions(device: str, rows: list[dict], notes: list[str]) -> str:
    measured = [r for r in rows if r.get("command")]
    parts = [device]
    dtypes = _unique(r["dtype"] for r in measured if r.get("dtype"))
    if dtypes:
        parts.append(", ".join(dtypes))
    text = ", ".join(parts)
    versions = _unique(_versions(r["versions"]) for r in measured if r.get("versions"))
    if versions:
        text += "; " + "; ".join(versions)
    dates = sorted(_unique(r["date"] for r in measured if r.get("date")))
    if dates:
        text += f"; measured {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
    bullets = [textwrap.fill(note, width=110, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)
               for note in notes]
    return "\n".join([textwrap.fill(text + ".", width=110, break_on_hyphens=False), *([""] if notes else []), *bullets])


def _result_row(r: dict, commands: _Commands) -> str:
    median = _number(r["median_ms"])
    if r.get("min_ms") is not None and r.get("max_ms") is not None:
        median += f" ({_number(r['min_ms'])}–{_number(r['max_ms'])})"
    error = format(float(r["error_vs_fp32"]), ".2e") if r.get("error_vs_fp32") is not None else ""
    command = commands.ref(r.get("command")) if r.get("command") else "published"
    cells = [r["workload"], r["path"], _size(r.get("size")), _number(r.get("batch")), median,
             _number(r.get("images_per_s")), _number(r.get("peak_gib")), error, command, r.get("commit") or "–"]
    return "| " + " | ".join(cells) + " |"


def device_section(device: str, rows: list[dict], notes: list[str]) -> str:
    commands = _Commands()
    table = "\n".join([TABLE_HEAD] + [_result_row(r, commands) for r in rows])
    return f"## {device}\n\n{_conditions(device, rows, notes)}\n\n{table}\n\n{commands.listing()}\n"


def ablation_section(rows: list[dict]) -> str:
    commands = _Commands()
    lines = [ABLATION_HEAD]
    for r in rows:
        unit = r.get("unit", "")
        measured = r["workload"] + (f" ({r['note']})" if r.get("note") else "")
        cells = [r["option"], r["default"], measured, f"{_number(r['without'])} {unit}".strip(),
                 f"{_number(r['with'])} {unit}".strip(), r["device"], commands.ref(r.get("command")),
                 r.get("commit") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    intro = textwrap.fill(
        "Each default of `Acceleration`, and each option left off, with the A/B that decided it: both sides on one "
        "machine, in one GPU call, unless the row says otherwise. In a command, [brackets] mark what differs "
        "between the two sides. Rows without a command were timed by a script that is not in the repository.",
        width=110, break_on_hyphens=False)
    return f"## Why the defaults\n\n{intro}\n\n" + "\n".join(lines) + f"\n\n{commands.listing()}\n"


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return _size(value) if value[:1].isdigit() and "x" in value else value
    return _number(value)


def serving_section(device: str, rows: list[dict], notes: list[str]) -> str:
    """One table per serving kind measured on this device, in SERVING_KINDS order, rows in file order."""
    commands = _Commands()
    parts = [f"## Serving on {device}", SERVING_INTRO,
             _conditions(device, rows, notes)]
    for kind in SERVING_KINDS:
        of_kind = [r for r in rows if r["kind"] == kind]
        if not of_kind:
            continue
        columns = SERVING_COLUMNS[kind]
        lines = ["| " + " | ".join([heading for _, heading in columns] + ["command", "commit"]) + " |",
                 "|" + "---|" * (len(columns) + 2)]
        for r in of_kind:
            cells = [_cell(r.get(key)) for key, _ in columns]
            cells += [commands.ref(r.get("command")), r.get("commit") or "–"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append(f"### {kind}\n\n" + "\n".join(lines))
    parts.append(commands.listing())
    return "\n\n".join(parts) + "\n"


def render(records: list[dict]) -> str:
    results = [r for r in records if r.get("kind", "result") == "result"]
    notes = [r for r in records if r.get("kind") == "device"]
    ablations = [r for r in records if r.get("kind") == "ablation"]
    serving = [r for r in records if r.get("kind") in SERVING_KINDS]
    sections = [INTRO]
    for device in _unique(r["device"] for r in results):
        sections.append(device_section(device, [r for r in results if r["device"] == device],
                                       [n["note"] for n in notes if n["device"] == device
                                        and n.get("section") != "serving"]))
    for device in _unique(r["device"] for r in serving):
        sections.append(serving_section(device, [r for r in serving if r["device"] == device],
                                        [n["note"] for n in notes if n["device"] == device
                                         and n.get("section") == "serving"]))
    if ablations:
        sections.append(ablation_section(ablations))
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of *.jsonl results files")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help="the markdown file to write")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is not up to date")
    args = parser.parse_args(argv)
    text = render(load(args.results))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != text:
            print(f"{args.output} is not what `python -m benchmarks.render` writes from {args.results}: "
                  "run it and commit the result", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
