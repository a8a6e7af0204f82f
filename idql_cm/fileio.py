"""Files that a kill or a power cut cannot leave half-written, and their fingerprints (standard library only).

:func:`atomic_path` is the one atomic write of the package: checkpoints (``modules.checkpoint_io``), evaluation
reports and collected datasets go through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write to; when the block succeeds, the file is flushed to the disk
    (``fsync``) and replaces ``path`` in one ``os.replace``, and the folder is synced.

    The temporary file (``.<name>.<pid>.<random>.tmp``, created empty) sits in the target's own folder, so the
    rename never crosses file systems. If the block raises, it is removed and ``path`` is untouched; a process
    killed mid-write leaves ``path`` intact and a stray temporary file, which the next write into that folder
    removes.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    for entry in os.listdir(folder):
        if _is_stale_temp(entry, name):
            _unlink(os.path.join(folder, entry))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # fsync of any descriptor flushes the file's data (POSIX)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0; a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _is_stale_temp(entry: str, name: str) -> bool:
    """A temporary file of :func:`atomic_path` that no write will finish: its writing process is gone. A live
    writer's file is left alone, also one for the same ``name`` (its ``os.replace`` would fail without it)."""
    m = _TEMP.match(entry)
    return m is not None and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
