"""Shared by the app tests (no tests here): launch app.py's UI in-process on the tiny offline models."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(models, load_errors=None, max_size: int = 20, limits=None, delete_cache=None):
    """Yield (url, studio) for the app served on 127.0.0.1; closed afterwards. No limits unless given."""
    studio = app.Studio(models, load_errors, limits)
    demo = app.build_demo(studio, delete_cache=delete_cache)
    demo.queue(max_size=max_size).launch(server_name="127.0.0.1", server_port=free_port(),
                                         prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, studio
    finally:
        demo.close()
