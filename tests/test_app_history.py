"""The session's gallery (app.add_to_history): newest first, one entry per typed sentence, bounded."""

from PIL import Image

import app
from sdxl_fast import metadata


def frames(*captions):
    return [(f"/tmp/{c}.png", c) for c in captions]


def live_frames(*captions):
    return [(metadata.jpeg_bytes(Image.new("RGB", (8, 8))), c) for c in captions]


def test_newest_first_with_the_last_typed_frame_before_each_click():
    shown, history, live = app.add_to_history(frames("a"), [], [])
    assert [c for _, c in shown] == ["a"] and live == []
    # Keystrokes replace the pending live frame; the next click puts the last one in, after its own results.
    shown, history, live = app.add_to_history(frames("b", "c"), history, live_frames("typed 12"))
    assert [c for _, c in shown] == ["b", "c", "typed 12", "a"] and live == []
    assert Image.open(shown[2][0]).format == "JPEG"  # the live frame, saved as a file for the gallery
    shown, history, live = app.add_to_history(frames("d"), history, live)  # nothing typed since
    assert [c for _, c in shown] == ["d", "b", "c", "typed 12", "a"]


def test_the_gallery_keeps_the_newest_history_size_entries():
    history = []
    for i in range(app.HISTORY_SIZE + 5):
        shown, history, _ = app.add_to_history(frames(f"image {i}"), history, [])
    assert len(shown) == len(history) == app.HISTORY_SIZE
    assert shown[0][1] == f"image {app.HISTORY_SIZE + 4}" and shown[-1][1] == "image 5"
