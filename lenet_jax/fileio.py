"""Files written whole or not at all, stale temporaries cleaned up, and one run per folder.

Every file the project writes for a user to keep (the data cache, an exported model, a
run's config) goes through ``atomic_write``: a temporary file in the same folder, renamed
over the target once complete. The writer holds an exclusive lock on its temporary file,
so ``remove_stale_temporaries`` can tell a temporary left by a killed process (lock free)
from one still being written (lock held).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from lenet_jax.errors import FolderBusy

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temporaries are then left alone
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Write ``path`` through ``write(file)`` into a locked temporary file beside it, then
    rename it over ``path``; on any failure the temporary is removed and ``path`` is as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        _try_lock(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)  # while the lock is held: never seen half-written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(path: Path | str) -> list[Path]:
    """Delete the temporaries of ``path`` that a killed writer left behind (those whose
    lock is free); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    candidates = set(path.parent.glob(_temp_prefix(path) + "*" + TEMP_SUFFIX)) | set(path.parent.glob(path.name + "*" + TEMP_SUFFIX))
    for tmp in sorted(candidates):  # the second pattern: how earlier versions named them
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(fd) and fcntl is not None:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def check_writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and check that a file can be written in it, before any
    time is spent; ValueError naming ``what`` (an option) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {folder}: not a writable folder ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def exclusive(folder: Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder/name`` for the block; FolderBusy when
    another process holds it. The lock dies with its process, so a killed run never
    leaves a folder locked."""
    lock = folder / name
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise FolderBusy(f"{folder} is in use by another training process (it holds {lock})")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def new_run_folder(parent: Path, stem: str) -> Path:
    """A folder ``parent/stem`` created now, or ``stem-2``, ``stem-3``... if taken, so two
    runs started in the same second never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        candidate = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ValueError(f"{parent}: could not find a free run folder name for {stem}")
