"""The project's error policy: which failures a user can cause, and how a command reports them.

A failure the user caused (a bad option, a bad file, a busy or unwritable folder, a
checkpoint that does not fit, a full disk under a folder they named) is raised as a
``UserError`` and ends as one line on stderr, ``error: <what and where>``, exit code 2.
A run that diverged, or that ended answering at chance, exits 1 (``Diverged``); an
interrupt exits 130. Anything else (a ``ValueError`` raised inside JAX, orbax or numpy,
say) is a bug and keeps its traceback.

A file the project wrote itself (a checkpoint, the data cache) that cannot be read
is *damage* only when the failure says so: ``is_damage`` (the exceptions of ``DAMAGE``,
TensorStore's data-loss statuses, the project's own size and format checks). Only damage
moves a checkpoint aside or discards a cache; any other failure of reading it is a bug or a
failure of the reading itself, and changes nothing on disk.
"""

from __future__ import annotations

import errno
import functools
import json
import re
import sys
import zipfile
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
    """Every checkpoint of a checkpoints folder failed to load."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint failed for a reason outside the checkpoint (a read error, a
    permission, memory): nothing was skipped or moved."""


class FolderBusy(UserError, RuntimeError):
    """Another process holds the folder's lock."""


class Damaged(Exception):
    """Mixed into the error of a size or format check of the project's own: a file it
    wrote (a checkpoint, the data cache) is missing, truncated or malformed."""


class Diverged(FloatingPointError):
    """The loss or the parameters became NaN or infinite, or the network ended an epoch
    answering at chance: the run stops with exit code 1."""


# --------------------------------------------------------------------------- damage

DAMAGE: tuple[type[BaseException], ...] = (
    Damaged,  # the project's own checks (checkpoint.DamagedCheckpoint and DamagedRecord, data.DamagedCache)
    json.JSONDecodeError,  # a truncated or overwritten JSON file (orbax's _METADATA, array_metadatas, a checkpoint's record)
    UnicodeDecodeError,  # a JSON file holding bytes that are not UTF-8
    FileNotFoundError,  # a file of the checkpoint is missing (orbax's JsonRestore of a deleted record)
    zipfile.BadZipFile,  # the cache's .npz: a bad CRC-32, a bad member header
    EOFError,  # a file cut short (numpy reading an emptied .npz)
)
"""The exceptions that mean "a file is damaged", whoever raises them (measured with
orbax-checkpoint 0.12.8, TensorStore 0.1.86 and numpy 2.4: see ``is_damage``)."""

TENSORSTORE_DAMAGE = ("OUT_OF_RANGE", "NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION")
"""TensorStore's statuses for stored data that cannot be read: a data file shorter than
the OCDBT index says (``OUT_OF_RANGE: ... Requested byte range [a, b) is not valid for
value of size n``), a deleted data file or manifest (``NOT_FOUND``; a deleted data file
inside OCDBT reads as ``FAILED_PRECONDITION: ... Truncated Zstd-compressed stream``), a
truncated manifest (``DATA_LOSS: ... Error decoding manifest``)."""

TENSORSTORE_STATUS = re.compile(r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|PERMISSION_DENIED|"
                                r"RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|"
                                r"DATA_LOSS|UNAUTHENTICATED): ")
OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
ORBAX_MISSING_ITEM = re.compile(r"Item \"\w+\" was not found in the checkpoint")
"""orbax's KeyError for a checkpoint whose item folder (``state/``, ``record/``) is gone."""


def unwrapped(e: BaseException) -> BaseException:
    """The error under orbax's wrapper: orbax re-raises a failed array read as a bare
    ``Exception('Encountered error while reading array index ...')`` from TensorStore's."""
    while type(e) is Exception and e.__cause__ is not None:
        e = e.__cause__
    return e


def tensorstore_status(e: BaseException) -> str | None:
    """The status of an error TensorStore raised (a ValueError whose message starts with
    its status, ``OUT_OF_RANGE: Error reading ...``), else None."""
    found = TENSORSTORE_STATUS.match(str(e)) if type(e) is ValueError else None  # TensorStore raises ValueError itself
    return found.group(1) if found else None


def os_error_code(e: BaseException) -> int | None:
    """The errno of an OSError, or the one a TensorStore error carries (``[os_error_code=28]``)."""
    if isinstance(e, OSError):
        return e.errno
    found = OS_ERROR_CODE.search(str(e)) if tensorstore_status(e) else None
    return int(found.group(1)) if found else None


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` (or the error under orbax's wrapper) says that a file is missing,
    truncated or malformed: one of ``DAMAGE``, orbax's KeyError for a missing item
    folder, or a TensorStore read or decode failure of one of the ``TENSORSTORE_DAMAGE``
    statuses that carries no operating-system error but a missing file's. Anything else (a TypeError, a tree that does not match, a read or
    permission error, memory) is not."""
    e = unwrapped(e)
    if isinstance(e, DAMAGE):
        return True
    if isinstance(e, KeyError) and ORBAX_MISSING_ITEM.search(str(e)):
        return True
    status = tensorstore_status(e)
    if status not in TENSORSTORE_DAMAGE or os_error_code(e) not in (None, errno.ENOENT):
        return False
    text = str(e)
    return any(words in text for words in ("Error reading", "Error decoding", "does not exist"))


def os_failure(e: BaseException) -> str | None:
    """The operating system's words when ``e`` is a failure of the system under a file
    (a full disk, a file size limit, a permission, an I/O error), as an OSError or as a
    TensorStore error that carries its errno; else None."""
    e = unwrapped(e)
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    code = os_error_code(e)
    if code is None:
        return "permission denied" if tensorstore_status(e) == "PERMISSION_DENIED" else None
    found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code", str(e))
    return f"{found.group(1) if found else 'OS error'} (errno {code})"


def path_error(path: Path | str, error: OSError, doing: str = "cannot write") -> UserError:
    """A UserError for an OSError on a path the user named: '<path>: <doing> (<reason>)'."""
    reason = error.strerror or type(error).__name__
    return UserError(f"{path}: {doing} ({reason})")


def first_line(error: BaseException | str, empty: str = "no detail", limit: int | None = None) -> str:
    """The first line of an error's message (at most ``limit`` characters), or ``empty``
    when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else empty


def fail(message: str, code: int = 2) -> int:
    """Print ``error: message`` (its first line) on stderr and return ``code``."""
    print(f"error: {first_line(message, 'failed')}", file=sys.stderr, flush=True)
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
