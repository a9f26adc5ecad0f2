"""Writing files so that a reader (another process, a resumed run, the next start) never sees half of one:
everything is written under a temporary name beside its destination, then renamed onto it, which is atomic on
one file system. A crash leaves the old file (or none) and a stray temporary name, never a truncated file."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def replace(temporary: str | Path, path: str | Path) -> Path:
    """Move a finished file or folder onto `path` in one rename; a folder already at `path` is removed first
    (a rename cannot replace a non-empty folder)."""
    path = Path(path)
    if Path(temporary).is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(temporary, path)
    return path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """`with atomic_write(path) as tmp: write to tmp` -> the file appears at `path` complete, or not at all.

    The temporary name is unique per call, so several processes may write the same destination at once (the
    last rename wins, each file whole). It ends in `.tmp`, so globs for the destination's suffix skip it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
        replace(temporary, path)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
