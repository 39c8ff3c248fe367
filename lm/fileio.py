"""Files that readers can trust: atomic writes, content digests and locks, one implementation each.

A file is written under a temporary name in its own directory, flushed to disk and renamed over
the final name, so a reader sees the old content or the new one, never a torn file (a process
killed mid-write, a full disk). Every writer of weights, checkpoints, manifests and results uses
:func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Temporary names say which process made them (pid@host), so that what a killed process left behind
# can be told from what a running one is writing, also in a work folder that several hosts share.
_HOST = socket.gethostname()
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)@(.+)-[0-9a-f]{8}$")


def temporary_name(name: str) -> str:
    """``.NAME.tmp-PID@HOST-XXXXXXXX``: where a file or folder is written before it is renamed into place."""
    return f".{name}.tmp-{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}"


def remove_abandoned(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in ``folder`` whose process (on this host) no longer exists: what a
    process killed mid-write left. Returns what was deleted."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or m.group(2) != _HOST or process_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (0 or less: no process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``data`` to ``path`` atomically: bytes, text (UTF-8), or a function that writes the
    file it is given (``lambda tmp: torch.save(obj, tmp)``). Returns the path."""
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block: one process at a time,
    the others wait. The kernel lets it go if its process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file lets the lock go
