"""Stop a run cleanly on SIGTERM or SIGINT (what Colab, Kubernetes and batch schedulers
send before they take the machine away).

The first signal only asks: training finishes the compiled chunk it is in, writes a
checkpoint and returns. The handler then puts the default action back, so a second
signal ends the process at once, even while a compiled chunk is running.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that catches the first SIGTERM/SIGINT; calling it says whether
    one arrived. Outside the main thread (where Python cannot catch signals) it never fires."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.signal: int | None = None
        self._say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        self._say(
            f"{signal.Signals(signum).name}: stopping after the current chunk and writing a checkpoint; "
            "send it again to stop at once"
        )

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
