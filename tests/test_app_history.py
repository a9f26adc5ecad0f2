"""The session's gallery (app.add_to_history): newest first, one slot for the as-you-type image, bounded."""

import app


def frames(*captions):
    return [(f"/tmp/{c}.png", c) for c in captions]


def test_newest_first_and_typing_replaces_its_one_slot():
    shown, history = app.add_to_history(frames("a"), [])
    shown, history = app.add_live_to_history(frames("typed 1"), history)
    shown, history = app.add_live_to_history(frames("typed 12"), history)  # replaces "typed 1"
    assert [c for _, c in shown] == ["typed 12", "a"]
    shown, history = app.add_to_history(frames("b", "c"), history)  # the live image stays for good
    assert [c for _, c in shown] == ["b", "c", "typed 12", "a"]


def test_the_gallery_keeps_the_newest_history_size_entries():
    history = []
    for i in range(app.HISTORY_SIZE + 5):
        shown, history = app.add_to_history(frames(f"image {i}"), history)
    assert len(shown) == len(history) == app.HISTORY_SIZE
    assert shown[0][1] == f"image {app.HISTORY_SIZE + 4}" and shown[-1][1] == "image 5"
