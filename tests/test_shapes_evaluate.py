"""The evaluate command end to end on the tiny random-weight family: every row runs and the table is well formed.
With random weights the numbers mean nothing; the test checks the pipeline and the output format."""

import json
import math

import pytest
import torch

from sdxl_fast.shapes.cli import main
from sdxl_fast.shapes.evaluate import HEADER, REFERENCE, ROWS
from sdxl_fast.shapes.probe import save_probe, train_probe

EXPECTED_ROWS = [("teacher base+refiner", "50"), ("teacher base", "50"), ("teacher base", "1"), ("teacher base", "4"),
                 ("student (ADD)", "1"), ("student (ADD)", "2"), ("student (ADD)", "4")]


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    # A barely trained probe: the shipped weights are not what this test is about.
    return save_probe(train_probe(steps=2, train_images=16, batch_size=8), tmp_path_factory.mktemp("probe"))


def _table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(HEADER)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_evaluate_command_writes_the_full_table(tiny_family, probe_dir, tmp_path, capsys):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out, raw = tmp_path / "table.md", tmp_path / "table.json"
    assert main(["evaluate", "--base", str(tiny_family["base"]), "--refiner", str(tiny_family["refiner"]),
                 "--student", str(tiny_family["student"]), "--n", "2", "--probe", str(probe_dir),
                 "--out", str(out), "--json", str(raw), "--cache-interval", "2"]) == 0
    text = out.read_text()
    assert HEADER in capsys.readouterr().out
    rows = _table_rows(text)
    assert [(r[0], r[1]) for r in rows[:7]] == EXPECTED_ROWS == [(r.sampler, str(r.steps)) for r in ROWS]
    # then the multi-step rows again with the step cache, and the reference
    assert [(r[0], r[1]) for r in rows[7:12]] == [(f"{s}, step cache 2", n) for s, n in EXPECTED_ROWS if n != "1"]
    assert rows[12][0] == REFERENCE and len(rows) == 13
    for sampler, steps, accuracy, frechet, ms, accuracy_se, frechet_se in rows[:12]:
        assert 0.0 <= float(accuracy) <= 1.0
        assert float(frechet) >= 0.0 and math.isfinite(float(frechet))
        assert float(ms) > 0.0
        assert float(accuracy_se) == pytest.approx(math.sqrt(float(accuracy) * (1 - float(accuracy)) / 2), abs=1e-3)
        assert float(frechet_se) >= 0.0
    report = json.loads(raw.read_text())
    assert report["setup"]["n"] == 2 and len(report["rows"]) == 12
    assert all(set(r["accuracy"]) == {"shape", "colour", "position", "count", "all"} for r in report["rows"])


def test_refiner_row_is_reported_not_run_without_a_refiner(tiny_family, probe_dir, tmp_path):
    from sdxl_fast.shapes.evaluate import Row, evaluate, markdown

    report = evaluate(tiny_family["base"], None, tiny_family["student"], n=2, probe_dir=probe_dir,
                      rows=(Row("teacher base+refiner", "quality", 2, use_refiner=True),
                            Row("student (ADD)", "fast", 1)))
    rows = _table_rows(markdown(report))
    assert rows[0][:3] == ["teacher base+refiner", "2", "not run (no refiner given)"]
    assert rows[1][0] == "student (ADD)" and 0.0 <= float(rows[1][2]) <= 1.0


def test_evaluate_student_only_runs_the_student_rows(tiny_family, probe_dir, tmp_path):
    out = tmp_path / "table.md"
    assert main(["evaluate", "--base", str(tiny_family["base"]), "--refiner", "none", "--student",
                 str(tiny_family["student"]), "--n", "2", "--probe", str(probe_dir), "--student-only",
                 "--out", str(out)]) == 0
    rows = _table_rows(out.read_text())
    assert [(r[0], r[1]) for r in rows] == [(s, n) for s, n in EXPECTED_ROWS if s == "student (ADD)"] + [
        (REFERENCE, "–")]


def test_evaluate_selection_scores_other_heldout_captions(tiny_family, probe_dir, tmp_path):
    """--selection: candidates are compared on held-out seeds the evaluation set does not use."""
    from sdxl_fast.shapes import data

    out = tmp_path / "table.md"
    assert main(["evaluate", "--base", str(tiny_family["base"]), "--refiner", "none", "--student",
                 str(tiny_family["student"]), "--n", "2", "--probe", str(probe_dir), "--student-only",
                 "--selection", "--out", str(out)]) == 0
    first = data.HELDOUT_START + data.SELECTION_OFFSET
    assert f"held-out selection captions (seeds {first}..{first + 1})" in out.read_text()
    assert not set(data.heldout_seeds(200)) & set(data.heldout_seeds(200, selection=True))


def test_evaluate_rejects_a_single_caption(tiny_family, probe_dir):
    from sdxl_fast.shapes.evaluate import evaluate

    with pytest.raises(ValueError):
        evaluate(tiny_family["base"], None, tiny_family["student"], n=1, probe_dir=probe_dir)


def test_short_prompt_accuracy_counts_images_read_as_the_asked_shape_and_colour():
    from sdxl_fast.shapes import data
    from sdxl_fast.shapes.evaluate import SHORT_PROMPTS, short_prompt_accuracy
    from sdxl_fast.shapes.probe import load_probe

    drawn = {}  # (shape, colour) -> a real generated-by-code image of one such object
    for seed in range(5000):
        image, _, labels = data.sample(seed)
        if labels["count"] == 1 and labels["size"] == "large":
            drawn.setdefault((labels["shape"], labels["colour"]), image)
        if all(k in drawn for k in SHORT_PROMPTS):
            break

    def faithful(prompt, seed):
        _, colour, shape = prompt.split()
        return drawn[(shape, colour)]

    probe = load_probe()  # the shipped probe: it reads real images correctly
    assert short_prompt_accuracy(faithful, probe, seeds=1) >= 11 / 12
    assert short_prompt_accuracy(lambda prompt, seed: drawn[("circle", "red")], probe, seeds=2) == 1 / 12


def test_evaluate_adds_the_short_prompt_column_when_asked(tiny_family, probe_dir):
    from sdxl_fast.shapes.evaluate import Row, evaluate, markdown

    report = evaluate(tiny_family["base"], None, tiny_family["student"], n=2, probe_dir=probe_dir,
                      rows=(Row("student (ADD)", "fast", 1),), short_prompts=1)
    assert 0.0 <= report["rows"][0]["short_prompts"] <= 1.0
    assert "| student (ADD) | 1 | " in markdown(report).split("short prompts read as asked")[1]


def test_grid_holds_each_students_fast_images_row_by_row(tiny_family, tmp_path):
    import numpy as np
    from PIL import Image

    import sdxl_fast

    out = tmp_path / "grid.png"
    assert main(["grid", "--base", str(tiny_family["base"]), "--student", str(tiny_family["student"]),
                 "--student", str(tiny_family["turbo"]), "--prompt", "a red circle", "--prompt", "a blue star",
                 "--size", "64", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (128, 128, 3)
    models = sdxl_fast.load(modes=("fast",), device="cpu", dtype=torch.float32, sources=sdxl_fast.ModelSources(
        base=str(tiny_family["base"]), refiner=None, fast=str(tiny_family["turbo"])))
    (star,) = sdxl_fast.generate(models, sdxl_fast.GenerationParams("a blue star", mode="fast", steps=1, seed=7,
                                                                    width=64, height=64))
    assert np.array_equal(grid[64:, 64:], np.asarray(star))  # row 2 (turbo), column 2
    assert not np.array_equal(grid[:64, 64:], grid[64:, 64:])  # the other student's differs
