"""The procedural data set: determinism, captions <-> labels, held-out split, image-folder output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_fast.shapes import data
from sdxl_fast.shapes.data import HELDOUT_START, heldout_seeds, parse_caption, sample

PROBE_KEYS = ("shape", "colour", "position", "count")


def test_same_seed_same_sample_and_different_seeds_differ():
    a_img, a_cap, a_lab = sample(123)
    b_img, b_cap, b_lab = sample(123)
    assert a_img.tobytes() == b_img.tobytes() and a_cap == b_cap and a_lab == b_lab
    images = {sample(s)[0].tobytes() for s in range(50)}
    assert len(images) == 50


def test_image_format_and_size():
    image, _, _ = sample(0)
    assert image.mode == "RGB" and image.size == (128, 128)
    assert sample(0, size=256)[0].size == (256, 256)
    with pytest.raises(ValueError):
        sample(0, size=8)


@pytest.mark.parametrize("seed", list(range(0, 400, 1)) + heldout_seeds(100))
def test_caption_states_exactly_the_stated_labels(seed):
    _, caption, labels = sample(seed)
    stated = data.stated_labels(labels)
    assert parse_caption(caption) == {k: stated[k] for k in PROBE_KEYS}
    # Multiple objects share shape and colour and name no position; a single object always has one.
    assert (labels["position"] is None) == (labels["count"] > 1)
    assert (labels["size"] in caption) == ("size" not in labels["unstated"])
    assert ("background" in caption) == ("background" not in labels["unstated"])
    # The evaluation's caption states everything.
    full = data.full_caption(labels)
    assert parse_caption(full) == {k: labels[k] for k in PROBE_KEYS}
    assert labels["size"] in full and labels["background"] in full


def test_captions_vary_in_detail_down_to_short_prompts():
    captions, unstated = set(), {a: 0 for a in data.OPTIONAL}
    for seed in range(3000):
        _, caption, labels = sample(seed)
        captions.add(caption)
        for a in labels["unstated"]:
            unstated[a] += 1
    # Each optional attribute is left out about a third of the time (position: of single objects only).
    assert 800 < unstated["size"] < 1200 and 800 < unstated["background"] < 1200
    assert 200 < unstated["position"] < 500
    assert any(c.count(" ") == 2 for c in captions)  # "a red circle"-like: colour and shape only


# sha256 prefixes of the images of seeds 0, 1, 2 and HELDOUT_START, taken at DATA_VERSION 1 (full captions).
EXPECTED_DIGESTS = ['cf6b531cf6e1affb', '1b3ba6648cfbeb9e', 'c81e0fb43197169c', 'f04cf9a10eb61f3a']


def test_caption_detail_does_not_change_the_images():
    """The detail choice has its own random stream: the image of a seed is what it was with full captions
    (these digests were taken before captions varied), so VAEs and probes trained on them stay valid."""
    import hashlib
    digests = [hashlib.sha256(sample(s)[0].tobytes()).hexdigest()[:16] for s in (0, 1, 2, HELDOUT_START)]
    assert digests == EXPECTED_DIGESTS


def test_omit_probability_leaves_out_more_detail_and_keeps_the_image():
    """A higher omit probability leaves out a superset of what the default does (same stream), draws the
    same image, and at 1 makes every single-object caption as short as "a red circle"."""
    for seed in range(40):
        image, _, labels = sample(seed)
        image_0, caption_0, labels_0 = sample(seed, omit_probability=0.0)
        image_1, caption_1, labels_1 = sample(seed, omit_probability=1.0)
        assert image_0.tobytes() == image.tobytes() == image_1.tobytes()
        assert labels_0["unstated"] == [] and caption_0 == data.full_caption(labels)
        assert set(labels["unstated"]) <= set(labels_1["unstated"])
        if labels["count"] == 1:
            words = f"{labels['colour']} {labels['shape']}"
            assert caption_1 in (f"a {words}", f"an {words}", f"a picture of a {words}", f"a picture of an {words}")


def test_parse_short_prompts():
    assert parse_caption("a red circle") == {"shape": "circle", "colour": "red", "position": None, "count": 1}
    assert parse_caption("three blue crosses on an orange background") == {
        "shape": "cross", "colour": "blue", "position": None, "count": 3}
    assert parse_caption("an orange background with a small green star on the left")["position"] == "left"


def test_every_label_value_occurs_and_background_differs_from_object():
    seen = {k: set() for k in PROBE_KEYS}
    for seed in range(600):
        _, caption, labels = sample(seed)
        for k in PROBE_KEYS:
            seen[k].add(labels[k])
        assert labels["background"] != labels["colour"]
        assert " a orange" not in caption and not caption.startswith("a orange")
    assert seen["shape"] == set(data.SHAPES) and seen["colour"] == set(data.COLOUR_NAMES)
    assert seen["count"] == {1, 2, 3} and seen["position"] == set(data.POSITIONS) | {None}


def test_object_pixels_have_the_named_colour_and_sit_in_the_named_cell():
    """Check the drawing against the labels: find the pixels nearest the object colour's family."""
    checked = 0
    for seed in range(200):
        image, _, labels = sample(seed)
        if labels["count"] != 1 or labels["texture"] != "plain":
            continue
        px = np.asarray(image, float)
        target = np.array(data.COLOURS[labels["colour"]])
        close = np.linalg.norm(px - target, axis=-1) < 40
        assert close.sum() > 30, (seed, labels)
        ys, xs = np.nonzero(close)
        col = int(np.clip(xs.mean() / 128 * 3, 0, 2))
        row = int(np.clip(ys.mean() / 128 * 3, 0, 2))
        assert data.POSITIONS[row * 3 + col] == labels["position"], (seed, labels)
        checked += 1
    assert checked >= 10


def test_heldout_split_is_fixed_and_disjoint_from_training_seeds():
    assert heldout_seeds(3) == [HELDOUT_START, HELDOUT_START + 1, HELDOUT_START + 2]
    assert min(heldout_seeds(1000)) >= HELDOUT_START
    assert sample(HELDOUT_START)[0].tobytes() != sample(0)[0].tobytes()


def test_write_command_makes_png_txt_pairs(tmp_path):
    out = tmp_path / "folder"
    subprocess.run([sys.executable, "-m", "sdxl_fast.shapes", "write", "--out", str(out), "--count", "5", "--start", "40"],
                   check=True, cwd=Path(__file__).resolve().parent.parent)
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for i, (png, row) in enumerate(zip(pngs, rows)):
        image, caption, labels = sample(40 + i)
        with Image.open(png) as im:
            assert im.size == (128, 128) and im.convert("RGB").tobytes() == image.tobytes()
        assert png.with_suffix(".txt").read_text().strip() == caption
        assert row["file_name"] == png.name and row["text"] == caption and row["seed"] == 40 + i
        assert {k: row[k] for k in labels} == labels


def test_write_command_omit_probability(tmp_path):
    subprocess.run([sys.executable, "-m", "sdxl_fast.shapes", "write", "--out", str(tmp_path), "--count", "3",
                    "--omit-probability", "1", "--no-metadata"], check=True, cwd=Path(__file__).resolve().parent.parent)
    assert [p.read_text().strip() for p in sorted(tmp_path.glob("*.txt"))] == [
        sample(i, omit_probability=1.0)[1] for i in range(3)]
    from sdxl_fast.shapes.writer import write_folder

    with pytest.raises(ValueError, match="omit_probability"):
        write_folder(tmp_path, 1, omit_probability=1.5)


def test_written_folder_reads_through_distill_indexer(tmp_path):
    """The format is the one `distill` reads: same-name .txt captions next to the images."""
    from sdxl_fast.distill import data as distill_data
    from sdxl_fast.shapes.writer import write_folder

    write_folder(tmp_path, 3, start=7)
    records = distill_data.index_folder(str(tmp_path))
    assert [r.caption for r in records] == [sample(7 + i)[1] for i in range(3)]
