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
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from lenet_jax.errors import ConfigError, FolderBusy, path_error

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
    time is spent; ConfigError naming ``what`` (an option) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise not_writable(what, folder, e) from None


def not_writable(what: str, folder: Path, e: OSError) -> ConfigError:
    """'<what> <folder>: not a writable folder (<reason>)'."""
    return ConfigError(f"{what} {folder}: not a writable folder ({e.strerror or type(e).__name__})")


LOCK = ".lock"


class RunFolder:
    """A folder this process holds the lock of, and the paths this process created in it.

    ``claim`` hands one out. Everything a command writes into a run folder is written
    after the lock is taken, and a command that fails removes only what it recorded here
    as created by itself (``created``), and only while it still holds the lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: list[Path] = []

    def record(self, path: Path) -> Path:
        """Note that this command created ``path`` (call before creating it, having
        checked it did not exist)."""
        self.created.append(path)
        return path

    def write(self, name: str, text: str) -> Path:
        """Write (or rewrite) ``name`` atomically, recording it as created when it did not exist."""
        target = self.path / name
        if not (target.exists() or target.is_symlink()):
            self.record(target)
        try:
            return atomic_write_text(target, text)
        except OSError as e:
            raise path_error(target, e) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def claim(folder: Path, what: str = "training", lock: bool = True, created: bool = False,
          durable: Callable[[Path], bool] = lambda folder: False) -> Iterator[RunFolder]:
    """Hold ``folder`` for the block: create it (and its parents) if needed, then take
    its lock before anything else is written; FolderBusy when another process holds it.

    When the block fails, what this claim created (the folder, its lock file and
    whatever was ``record``ed) is removed while the lock is still held, unless
    ``durable(folder)`` says the folder now holds work worth keeping (a checkpoint).
    ``created``: the caller made the folder for this command (``new_run_folder``).
    ``lock=False`` (the processes other than process 0 of a cluster) creates and
    removes nothing. The lock dies with its process, so a killed run never leaves a
    folder locked."""
    if not lock:
        yield RunFolder(folder)
        return
    held = RunFolder(folder)
    try:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise not_writable("--workdir", folder, e) from None
    created_folder = created or folder in missing
    lock_path = folder / LOCK
    new_lock = not (lock_path.exists() or lock_path.is_symlink())
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if created_folder:
            _remove_empty([folder])
        raise not_writable("--workdir", folder, e) from None
    try:
        # The lock file must still be the one at the path: a process cleaning up removes
        # it while holding it, and one that opened it before then must not go on.
        if not _try_lock(fd) or not _same_file(fd, lock_path):
            raise FolderBusy(f"{folder} is in use by another {what} process (it holds {lock_path})")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield held
        except BaseException:
            if not durable(folder):
                for path in reversed(held.created):
                    _remove(path)
                if new_lock:
                    lock_path.unlink(missing_ok=True)
                if created_folder:
                    _remove_empty([folder, *[p for p in folder.parents if p in missing]])
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove each folder in turn if it is empty (never anything in it)."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            return


def new_run_folder(parent: Path, stem: str) -> Path:
    """A folder ``parent/stem`` created now, or ``stem-2``, ``stem-3``... if taken, so two
    runs started in the same second never share one (pass ``created=True`` to ``claim``)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(parent, e, "cannot create a run folder here") from None
    for i in range(1, 10_000):
        candidate = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise path_error(candidate, e, "cannot create a run folder here") from None
    raise ConfigError(f"{parent}: could not find a free run folder name for {stem}")
