"""The project's error policy: which failures a user can cause, and how a command reports them.

A failure the user caused (a bad option, a bad file, a busy or unwritable folder, a
checkpoint that does not fit, a full disk under a folder they named) is raised as a
``UserError`` and ends as one line on stderr, ``error: <what and where>``, exit code 2.
A run that diverged, or that ended answering at chance, exits 1 (``Diverged``); an
interrupt exits 130. Anything else (a ``ValueError`` raised inside JAX, orbax or numpy,
say) is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, ParamSpec

P = ParamSpec("P")


class UserError(Exception):
    """A failure the user caused: reported in one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A bad option, or options that do not go together; the message names them."""


class DataError(UserError, ValueError):
    """A data or model file, or a data source, is missing, malformed or fails its check;
    the message names it."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or one that does not fit the requested run."""


class NoGoodCheckpoint(CheckpointError):
    """Every step of a checkpoint folder failed to load."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint failed for a reason outside the checkpoint (a read error, a
    permission, memory): nothing was skipped or moved."""


class FolderBusy(UserError, RuntimeError):
    """Another process holds the folder's lock."""


class Diverged(FloatingPointError):
    """The loss or the parameters became NaN or infinite, or the network ended an epoch
    answering at chance: the run stops with exit code 1."""


def path_error(path: Path | str, error: OSError, doing: str = "cannot write") -> UserError:
    """A UserError for an OSError on a path the user named: '<path>: <doing> (<reason>)'."""
    reason = error.strerror or type(error).__name__
    return UserError(f"{path}: {doing} ({reason})")


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` (its first line) on stderr and return ``code``."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first}", file=sys.stderr, flush=True)
    return code


def command(fn: Callable[P, int]) -> Callable[P, int]:
    """Decorate a command's body (which returns an exit code) with the error policy."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except Diverged as e:
            return fail(str(e), 1)
        except UserError as e:
            return fail(str(e) or type(e).__name__)
        except KeyboardInterrupt as e:
            return fail(f"interrupted ({e})" if str(e) else "interrupted", 130)

    return run
