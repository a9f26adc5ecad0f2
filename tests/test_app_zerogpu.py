"""On a ZeroGPU Space the `spaces` package is present and every model call must go through `spaces.GPU`."""

import importlib
import sys
import types


def test_handlers_are_wrapped_by_spaces_gpu_when_the_package_is_present(monkeypatch):
    wrapped = []

    def GPU(duration=None):
        def decorate(fn):
            def run(*args, **kwargs):
                wrapped.append(fn.__name__)
                return fn(*args, **kwargs)
            return run
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    import app

    app = importlib.reload(app)
    try:
        studio = app.Studio(None, {"fast": "no weights"})
        app.gpu(studio.live_fast)("Fast", "", 1, 0, "512x512", 1, 0, 0, 0, 0, 0, 0)
        assert wrapped == ["live_fast"]
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(app)  # back to the plain, unwrapped app for the other tests
    assert app.gpu(len) is len
