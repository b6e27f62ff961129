"""Build-once files shared by concurrent processes (generated models under pytest-xdist)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable


def build_once(target: Path, build: Callable[[], object], complete: Callable[[Path], bool] = Path.exists) -> Path:
    """Build ``target`` unless it is complete, under a file lock beside it, so several processes
    asking at once build it once. ``build`` must write atomically (temp file, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if not complete(target):
                build()
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp)`` on a temp file in the same dir, then rename it to ``path``, so readers
    (other xdist workers, a server booting) never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def ensure_file(target: Path, validate: Callable[[], object], write: Callable[[Path], object]) -> Path:
    """``target`` if it exists, else validated and written once across concurrent processes."""
    if target.exists():
        return target
    validate()
    return build_once(target, lambda: write(target))
