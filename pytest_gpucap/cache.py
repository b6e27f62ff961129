"""Build-once files shared by concurrent processes (generated models under pytest-xdist)."""

from __future__ import annotations

import fcntl
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
