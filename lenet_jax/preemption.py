"""Stop a run cleanly on SIGTERM or SIGINT (what Colab, Kubernetes and batch schedulers
send before they take the machine away).

Before training starts (while the data loads, say) a signal interrupts the command at
once: there is nothing to save, and the command removes what it created. During
training (``asking``) the first signal only asks: training finishes the compiled chunk
it is in, writes a checkpoint and returns. The handler then puts the default action
back, so a second signal ends the process at once, even while a compiled chunk is running.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT that arrived before training started."""


class StopRequest:
    """A context manager that catches SIGTERM/SIGINT; calling it says whether a stop was
    asked for. Outside ``asking`` a signal raises ``Interrupted`` at once. Outside the
    main thread (where Python cannot catch signals) it never fires."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.signal: int | None = None
        self._asking = False
        self._say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def asking(self) -> Iterator["StopRequest"]:
        """During the block, a first signal is a request that training stops cleanly."""
        self._asking = True
        try:
            yield self
        finally:
            self._asking = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if not self._asking:
            raise Interrupted(f"{name} before training started")
        self._say(f"{name}: stopping after the current chunk and writing a checkpoint; send it again to stop at once")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
