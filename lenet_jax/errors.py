"""The project's error policy: which failures a user can cause, and how a command reports them.

A user-caused failure (a bad option, a bad file, a busy or unwritable folder, a
checkpoint that does not fit) is one line on stderr, ``error: <what and where>``, and
exit code 2; a run whose loss diverged exits 1; an interrupt exits 130. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, ParamSpec

P = ParamSpec("P")


class DataError(ValueError):
    """A data file or source is missing, malformed or fails its check; the message names it."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the requested run."""


class NoGoodCheckpoint(CheckpointError):
    """Every step of a checkpoint folder failed to load."""


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, CheckpointError, FolderBusy, OSError)
"""What a command turns into one line and exit code 2 (DataError is a ValueError; OSError
covers missing, unreadable and unwritable files, and full disks)."""


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
        except FloatingPointError as e:
            return fail(str(e), 1)
        except USER_ERRORS as e:
            return fail(str(e) or type(e).__name__)
        except KeyboardInterrupt:
            return fail("interrupted", 130)

    return run
