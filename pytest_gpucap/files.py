"""Files shared by concurrent processes: build-once generated models, atomic writes, device locks
(pytest-xdist workers share the basetemp's parent directory)."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Callable


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


#: Device locks this process holds: path → [open file, holders]. flock conflicts between two open
#: files of one process too, so a second handle in the same process shares the first one's lock.
_HELD: dict[str, list] = {}


class DeviceLock:
    """An exclusive lock on one device (a GPU, or the host) across the processes that use ``path``
    (pytest-xdist workers share the basetemp's parent).

    ``acquire`` waits, telling ``progress`` every ``note_s`` seconds while another process holds it;
    ``release`` is idempotent. The lock dies with its process (flock), so a killed worker never
    leaves a device locked. Within one process it is shared, not exclusive: a process cannot wait
    for itself.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.held = False
        self.waited_s = 0.0

    def acquire(self, progress: Callable[[float], None] | None = None, note_s: float = 5.0) -> float:
        """Take the lock; returns the seconds spent waiting for it."""
        if self.held:
            return self.waited_s
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")  # noqa: SIM115 - held open for the lock's lifetime
        t0 = time.monotonic()
        next_note = t0 + note_s
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if progress is not None and now >= next_note:
                        progress(now - t0)
                        next_note = now + note_s
                    time.sleep(0.1)
        except BaseException:
            fh.close()
            raise
        _HELD[key] = [fh, 1]
        self.held = True
        self.waited_s = time.monotonic() - t0
        return self.waited_s

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.path.resolve())
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD[key]
            fh: IO[bytes] = entry[0]
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            finally:
                fh.close()
