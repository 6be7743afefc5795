"""Each epoch's evaluation in a second process, alongside the next epoch's training.

At batch 1 on the CPU a run trains on one XLA thread (``lenet_jax.cores``), and the
evaluation of the test set after each epoch takes that thread 0.55-0.6 s of a 5-6 s
epoch on the machine of docs/speed.md, while the other cores have nothing to do. One
process cannot overlap the two: its CPU device runs one computation at a time, and a
second device makes XLA size the pool for two threads again. So ``train.py`` hands each
epoch's parameters to a helper process (``python -m lenet_jax.alongside``) and trains
the next epoch meanwhile; the epoch's row is logged, printed and checkpointed when the
scores are back, normally within the next epoch's first chunks.

The helper starts JAX as the training process did, with a pool of one thread and the
same XLA flags, and runs the same compiled evaluation, so its losses and errors are the
ones the training process would compute, bit for bit. A helper that fails (or cannot
start) is given up with a one-line warning and the run evaluates in its own process
from then on: the same numbers, only later. The helper never outlives the run: it reads
the parameters from its standard input and ends when that closes, and Linux ends it
with its parent (the parent-death signal).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
HEADER = struct.Struct("<Q")
CLOSE_SECONDS = 10.0
"""How long a helper is given to end after its input closes before it is killed."""
MAX_MESSAGE = 1 << 30
ANSWER_SECONDS = 60.0
"""How long the run waits for scores it needs now (they have had a whole epoch already;
an evaluation takes about a second) before it gives the helper up."""


class HelperFailed(RuntimeError):
    """The helper process ended or answered with an error; the message says which."""


def scores(params: Any, infer_fn: Callable, test: tuple[Any, Any], validation: tuple[Any, Any] | None, objective: Any,
           batch_size: int) -> dict[str, Any]:
    """The evaluation of ``params`` on the test set (and the validation set, when there is
    one) that ends an epoch: ``evaluation.evaluate``'s report of each. The one function
    both processes run."""
    from lenet_jax.evaluation import evaluate

    return {"test": evaluate(params, infer_fn, *test, objective, batch_size),
            "validation": None if validation is None else evaluate(params, infer_fn, *validation, objective, batch_size)}


def _send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    """The next message, or None once the other side has closed the stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    size = HEADER.unpack(head)[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size:,} bytes announced: not one of ours")
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


@contextlib.contextmanager
def _spawning_on(on: set[int]) -> Iterator[None]:
    """The calling thread on the cores ``on`` for the block: a process it starts inherits
    them from its first instruction, so the helper's start-up (Python, the imports, JAX)
    never runs on the training's core."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, on)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Helper:
    """The training process's side: start the helper, hand it an epoch's parameters, ask
    whether its scores are back, take them."""

    MODULE = "lenet_jax.alongside"
    """What the helper runs (``python -m``)."""

    def __init__(self, process: subprocess.Popen, log: Path, logs: tempfile.TemporaryDirectory) -> None:
        self._process, self._log, self._logs = process, log, logs
        self._waiting = False

    @classmethod
    def start(cls, config: Any, test: tuple[Any, Any], validation: tuple[Any, Any] | None, on: set[int]) -> "Helper":
        """A helper for runs of ``config`` (resolved), evaluating on these host arrays, its
        threads on the cores ``on`` (those the training does not use). HelperFailed if it
        cannot be started."""
        try:
            logs = tempfile.TemporaryDirectory(prefix="lenet-jax-alongside-")
        except OSError as e:
            raise HelperFailed(f"the evaluation process could not start ({e})") from e
        log, setup = Path(logs.name) / "stderr.txt", Path(logs.name) / "setup.pickle"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", cls.MODULE, "--parent", str(os.getpid()), "--setup", str(setup),
                   "--cores", ",".join(map(str, sorted(on)))]
        try:  # the data through a file: the pipe would hold the run until the helper has imported JAX
            with open(setup, "wb") as f:
                pickle.dump({"config": config.to_dict(), "test": tuple(map(np.asarray, test)),
                             "validation": None if validation is None else tuple(map(np.asarray, validation))}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            with open(log, "wb") as err, _spawning_on(on):
                process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                           start_new_session=True)  # a Ctrl-C stops the run, which then ends the helper
        except OSError as e:
            logs.cleanup()
            raise HelperFailed(f"the evaluation process could not start ({e})") from e
        return cls(process, log, logs)

    def submit(self, params: Any) -> None:
        """Hand over an epoch's parameters (host arrays); its scores come from ``result``.
        They go through a file and the pipe carries its name: a write of a few bytes to
        an empty pipe never waits, even for a helper that has stopped reading."""
        path = Path(self._logs.name) / "params.pickle"
        try:
            with open(path, "wb") as f:
                pickle.dump(params, f, protocol=pickle.HIGHEST_PROTOCOL)
        except OSError as e:
            raise self._failed(str(e)) from e
        self._put(str(path))
        self._waiting = True

    def ready(self) -> bool:
        """Whether the scores of the parameters handed over are back (or the helper has
        ended, which ``result`` then reports)."""
        return self._waiting and self._readable(0)

    def _readable(self, seconds: float) -> bool:
        poll = select.poll()
        poll.register(self._process.stdout, select.POLLIN)
        return bool(poll.poll(seconds * 1000))

    def result(self, timeout: float = ANSWER_SECONDS) -> dict[str, Any]:
        """The scores of the parameters handed over (``scores``), waiting for them up to
        ``timeout`` seconds (then the helper is ended and HelperFailed raised)."""
        self._waiting = False
        if not self._readable(timeout):
            self._process.kill()
            raise self._failed(f"no answer within {timeout:g} s")
        try:
            answer = _receive(self._process.stdout)
        except Exception as e:  # a garbled answer, whatever it breaks in the reading
            self._process.kill()
            raise self._failed(f"{type(e).__name__}: {e}") from e
        if not isinstance(answer, dict) or "test" not in answer:
            raise self._failed("it ended without an answer")
        return answer

    def close(self) -> None:
        """End the helper (it holds nothing to save): SIGTERM, and a kill after
        ``CLOSE_SECONDS``."""
        process = self._process
        with contextlib.suppress(OSError):
            process.stdin.close()
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(OSError):
            process.stdout.close()
        self._logs.cleanup()

    def _put(self, message: Any) -> None:
        try:
            _send(self._process.stdin, message)
        except (OSError, ValueError) as e:
            raise self._failed(str(e)) from e

    def _failed(self, why: str) -> HelperFailed:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=CLOSE_SECONDS)
        code = self._process.poll()
        last = ""
        with contextlib.suppress(OSError):
            lines = [line for line in self._log.read_text(errors="replace").splitlines() if line.strip()]
            last = f": {lines[-1].strip()}" if lines else ""
        ended = f"exit code {code}" if code is not None else "still running"
        return HelperFailed(f"the evaluation process failed ({why}; {ended}{last})")


def serve(setup: dict[str, Any], inbox: BinaryIO, outbox: BinaryIO) -> int:
    """The helper: start JAX as a batch-1 run does, then answer every parameter set read
    from ``inbox`` with its ``scores`` until the input closes."""
    from lenet_jax import cores

    cores.start_jax(one_thread=True)
    import jax

    from lenet_jax.config import Config
    from lenet_jax.factories import make_inference

    config = Config.from_dict(setup["config"])
    infer_fn = make_inference(config)
    test = tuple(jax.device_put(a) for a in setup["test"])
    validation = None if setup["validation"] is None else tuple(jax.device_put(a) for a in setup["validation"])
    while (path := _receive(inbox)) is not None:
        with open(path, "rb") as f:
            params = pickle.load(f)
        os.unlink(path)
        answer = scores(params, infer_fn, test, validation, config.objective, config.eval_batch_size)
        _send(outbox, answer | {"cores": cores.threads_cores()})  # where it ran: tests check the placement
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lenet_jax.alongside", description="The evaluation helper of train.py (internal).")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--setup", type=Path, required=True, help="the config and the evaluation data, pickled")
    parser.add_argument("--cores", required=True, help="the cores to run on, comma-separated")
    args = parser.parse_args(argv)
    from lenet_jax import cores

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run decides when this ends
    if not cores.end_with_parent(args.parent):
        return 1
    cores.move_threads({int(c) for c in args.cores.split(",")})  # before JAX starts: its threads inherit them
    sys.stdout.flush()
    outbox = os.fdopen(os.dup(1), "wb")  # the answers own the pipe: anything else written to fd 1 goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with open(args.setup, "rb") as f:
        setup = pickle.load(f)
    os.unlink(args.setup)  # nothing left behind, even if the run is killed
    return serve(setup, sys.stdin.buffer, outbox)


if __name__ == "__main__":
    sys.exit(main())
