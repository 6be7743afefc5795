"""Several seeds spread over the CPU's cores (lenet_jax/spread.py): which runs are spread
and how, the parent's handling of its workers, and, on real workers, that each seed is
trained on its own core exactly as its own run, across a stop and a resume."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_jax import spread, training
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.errors import ConfigError, Diverged
from lenet_jax.fileio import claim
from lenet_jax.runs import restore_run
from lenet_jax.training import fit

from conftest import QUIET, one_line

PAPER = Config()


P = spread.Part


def test_plan_gives_each_allowed_core_an_even_share_of_the_epochs():
    assert spread.plan([7, 3], PAPER, "cpu", 1, {5, 2, 9}) == [[P(7)], [P(3)]]  # as many cores as seeds, the lowest allowed
    assert spread.plan([0, 1, 2, 3], PAPER, "cpu", 1, {0, 1}) == [[P(0), P(1)], [P(2), P(3)]]
    # 60 epochs on two cores: 30 each, seed 1's first 10 on core 1 before seed 2, its last 10 on core 0 after seed 0
    assert spread.plan([0, 1, 2], PAPER, "cpu", 1, {0, 1}) == [[P(0), P(1, after=10)], [P(1, until=10), P(2)]]
    assert spread.plan([0, 1, 2, 3, 4], PAPER, "cpu", 1, {0, 1, 2}) == [
        [P(0), P(1, after=6)], [P(1, until=6), P(2), P(3, after=12)], [P(3, until=12), P(4)]]


@pytest.mark.parametrize("seeds, epochs, cores, done", [
    ([0, 1, 2], 20, 2, {}), ([0, 1, 2], 3, 2, {}), ([0, 1, 2], 1, 2, {}), ([0, 1, 2, 3, 4, 5, 6], 7, 3, {}),
    ([0, 1, 2, 3, 4], 20, 3, {}), ([5, 6, 7], 20, 2, {5: 20, 6: 5}), ([0, 1, 2], 20, 2, {0: 3, 1: 17, 2: 0}),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8], 13, 4, {2: 13, 4: 1, 7: 12}),
])
def test_share_deals_every_remaining_epoch_once_evenly_and_in_order(seeds, epochs, cores, done):
    """Simulated on cores of equal speed, an epoch a unit of time, a part that waits
    starting when its seed's first part has paused: every epoch still to train is
    trained once, in order, and no core works longer than the even share (rounded up),
    or the longest seed."""
    parts = spread.share(seeds, epochs, cores, done)
    assert len(parts) <= cores
    left = {s: epochs - done.get(s, 0) for s in seeds}
    bound = max(-(-sum(left.values()) // cores), *left.values())
    trained: dict[int, list[tuple[int, int, int]]] = {s: [] for s in seeds}  # (first epoch, last epoch, time it ends)
    clocks = [0] * len(parts)
    queues = [list(q) for q in parts]
    while any(queues):
        progressed = False
        for c, queue in enumerate(queues):
            if not queue:
                continue
            part = queue[0]
            before = trained[part.seed]
            if part.after is not None and not before:
                continue  # its first part has not run yet
            start = max(clocks[c], before[-1][2] if before else 0)
            first = (before[-1][1] if before else done.get(part.seed, 0)) + 1
            last = epochs if part.until is None else part.until
            assert part.after is None or part.after == first - 1
            clocks[c] = start + max(0, last - first + 1)
            trained[part.seed].append((first, last, clocks[c]))
            queue.pop(0)
            progressed = True
        assert progressed, "a part waits for one that never runs"
    for seed in seeds:
        stretches = trained[seed]
        assert stretches[0][0] == done.get(seed, 0) + 1 and stretches[-1][1] == max(epochs, done.get(seed, 0))
        assert all(a[1] + 1 == b[0] for a, b in zip(stretches, stretches[1:]))
    assert max(clocks) <= bound
    assert list(dict.fromkeys(p.seed for q in parts for p in q)) == seeds  # the outcomes come back in the seeds' order


@pytest.mark.parametrize("seeds, config, backend, processes, allowed", [
    ([0, 1], PAPER, "gpu", 1, {0, 1}),                            # an accelerator: the seeds share it in one program
    ([0, 1], PAPER.replace(batch_size=2), "cpu", 1, {0, 1}),      # batch > 1 uses every core in one program
    ([0], PAPER, "cpu", 1, {0, 1}),                               # one seed: nothing to spread
    ([0, 1], PAPER, "cpu", 2, {0, 1}),                            # several processes (a cluster)
    ([0, 1], PAPER.replace(devices=2), "cpu", 1, {0, 1}),         # data parallelism asked for
    ([0, 1], PAPER, "cpu", 1, {3}),                               # one core allowed (a user's taskset)
])
def test_plan_leaves_every_other_run_to_one_program(seeds, config, backend, processes, allowed):
    assert spread.plan(seeds, config, backend, processes, allowed) is None


def test_plan_leaves_several_cpu_devices_to_one_program():
    assert spread.plan([0, 1], PAPER, "cpu", 1, {0, 1}, local_devices=2) is None  # XLA_FLAGS asked for them


def test_as_many_workers_as_fit_in_memory():
    each, shared = training.seed_memory(PAPER, 60_000)
    one = each + shared
    assert spread.processes_that_fit(PAPER, 60_000, 4, None) == 4  # memory unknown
    assert spread.processes_that_fit(PAPER, 60_000, 4, int(3.5 * one / training.MEMORY_SHARE)) == 3
    assert spread.processes_that_fit(PAPER, 60_000, 4, one) == 1
    with pytest.raises(ConfigError, match="--seeds: one seed needs about"):
        spread.processes_that_fit(PAPER, 60_000, 4, one - 1)


# --------------------------------------------------------------------------- the parent, with stand-in workers


def standing_in(monkeypatch, ready: Path, codes: dict[int, int | None]) -> None:
    """Workers that are plain Python: core C's runs until SIGTERM, then exits 0 (None),
    or exits with ``codes[C]`` once core 0's is running. Each says it runs with a file in ``ready``."""
    ready.mkdir()
    until_asked = ("import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                   "pathlib.Path({mark!r}).touch()\nwhile True: time.sleep(0.01)")
    failing = "import pathlib, sys, time\nwhile not pathlib.Path({first!r}).exists(): time.sleep(0.01)\nsys.exit({code})"

    def command(core, parts, config, workdir, resume, report):
        code, mark = codes[core], str(ready / str(core))
        script = until_asked.format(mark=mark) if code is None else failing.format(first=str(ready / "0"), code=code)
        return [sys.executable, "-c", script]

    monkeypatch.setattr(spread, "worker_command", command)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})


@pytest.mark.parametrize("code, error, message", [
    (1, Diverged, r"^seed\(s\) 1: exit code 1 \(its error is above\)"),
    (2, spread.WorkerFailed, r"^seed\(s\) 1: exit code 2 \(its error is above\)"),
])
def test_a_failed_worker_stops_the_others_and_names_its_seeds(monkeypatch, tmp_path, code, error, message):
    standing_in(monkeypatch, tmp_path / "ready", {0: None, 1: code})  # core 0's would run for ever unless asked to stop
    with pytest.raises(error, match=message):
        spread.fit_spread(PAPER, [[P(0)], [P(1)]], tmp_path / "run", say=lambda m: None)


def test_a_stop_request_reaches_every_worker(monkeypatch, tmp_path):
    standing_in(monkeypatch, tmp_path / "ready", {0: None, 1: None})
    both_running = lambda: len(list((tmp_path / "ready").iterdir())) == 2  # noqa: E731
    assert spread.fit_spread(PAPER, [[P(0), P(2)], [P(1)]], tmp_path / "run", say=lambda m: None, stop=both_running) == []


def test_completed_epochs_counts_the_rows_of_each_seeds_metrics_log(tmp_path):
    (tmp_path / "seed-0").mkdir()
    (tmp_path / "seed-0" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')  # a row cut short
    (tmp_path / "seed-1").mkdir()
    (tmp_path / "seed-1" / "metrics.jsonl").write_bytes(b"\xff\xfe")  # not text: counted as none
    assert spread.completed_epochs(tmp_path, [0, 1, 2]) == {0: 2, 1: 0, 2: 0}


class Finished:
    def __init__(self, finished: bool) -> None:
        self.history, self.finished = [{"epoch": 1}], finished


def working(monkeypatch, tmp_path: Path, parts: list, on_fit=lambda seed: None) -> tuple[list[tuple[int, int | None]], Path]:
    """``spread.work`` in this process, its core, data and training stood in for: the
    (seed, pause_after) of each ``fit`` it calls, and its report's path."""
    import lenet_jax.data

    calls: list[tuple[int, int | None]] = []

    def fake_fit(config, dataset, workdir, resume, log, progress, stop, pause_after):
        calls.append((config.seed, pause_after))
        on_fit(config.seed)
        return Finished(pause_after is None)

    monkeypatch.setattr(spread, "die_with_parent", lambda parent: None)
    monkeypatch.setattr(spread, "settle_on", lambda core: None)
    monkeypatch.setattr(lenet_jax.data, "load_dataset", lambda *a, **k: None)
    monkeypatch.setattr(training, "fit", fake_fit)
    tmp_path.mkdir(exist_ok=True)
    report = tmp_path / "core-0.json"
    args = spread._parser().parse_args(["--core", "0", "--parts", json.dumps([[p.seed, p.until, p.after] for p in parts]),
                                        "--workdir", str(tmp_path / "run"), "--config", "{}", "--report", str(report), "--parent", "1"])
    assert spread.work(args) == 0
    return calls, report


def test_a_worker_marks_how_each_first_part_ended_and_waits_only_for_one_that_paused(monkeypatch, tmp_path):
    calls, report = working(monkeypatch, tmp_path, [P(1, until=10), P(2)])
    assert calls == [(1, 10), (2, None)] and spread.ended_mark(report, 1).read_text() == spread.PAUSED
    spread.ended_mark(report, 3).write_text(spread.STOPPED)  # seed 3's first part, elsewhere, was stopped
    calls, _ = working(monkeypatch, tmp_path, [P(0), P(1, after=10), P(3, after=5)])
    assert calls == [(0, None), (1, None)]  # seed 1's first part paused: its rest trains; seed 3's never will


def test_a_stopped_worker_marks_its_first_parts_stopped_so_no_other_waits_for_ever(monkeypatch, tmp_path):
    import signal

    stop_at = lambda seed: os.kill(os.getpid(), signal.SIGTERM) if seed == 0 else None  # noqa: E731
    calls, report = working(monkeypatch, tmp_path / "a", [P(0), P(4, until=3), P(5, after=2)], on_fit=stop_at)
    assert calls == [(0, None)]  # stopped in seed 0: seed 4's first part never ran, and is marked so
    assert spread.ended_mark(report, 4).read_text() == spread.STOPPED
    calls, report = working(monkeypatch, tmp_path / "b", [P(4, until=3)], on_fit=lambda seed: os.kill(os.getpid(), signal.SIGTERM))
    assert calls == [(4, 3)] and spread.ended_mark(report, 4).read_text() == spread.STOPPED  # stopped while in it


# --------------------------------------------------------------------------- real workers


def params(run: Path) -> list[np.ndarray]:
    import jax

    state, _, _ = restore_run(run, "latest", log=lambda m: None)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_spread_seeds_are_each_their_own_run_on_their_own_core_across_a_stop(mnist, tmp_path, capfd):
    """Three seeds on two cores, stopped once seed 0 has saved its first epoch (seed 2,
    core 0's second, not started), then resumed; then three seeds as ``plan`` shares them,
    the second trained in two parts, its first epoch on core 1 and the rest on core 0:
    each seed's parameters are bit for bit those of its own single run, and its threads
    ran on its core only."""
    config = Config(epochs=3, train_subset=120, hessian_samples=20)
    root = tmp_path / "spread"
    first_saved = lambda: any(p.name.isdigit() for p in (root / "seed-0" / "checkpoints").glob("*"))  # noqa: E731
    places = [[P(0), P(2)], [P(1)]]
    stopped = spread.fit_spread(config, places, root, say=lambda m: None, stop=first_saved)
    ended = {o.seed: o.finished for o in stopped}  # seed 1, on the other core, may have been starting or ending then
    assert ended[0] is False and 2 not in ended and (root / "seed-2").is_dir() and not any((root / "seed-2").iterdir())
    resumed = spread.fit_spread(config, places, root, resume=True, say=lambda m: None)
    assert [o.seed for o in resumed] == [0, 2, 1] and all(o.finished for o in resumed)
    resumed = sorted(resumed, key=lambda o: o.seed)
    assert {o.seed: o.cores for o in resumed} == {0: [0], 1: [1], 2: [0]}
    split = tmp_path / "split"
    places = spread.plan([0, 1, 2], config, "cpu", 1, {0, 1})
    assert places == [[P(0), P(1, after=1)], [P(1, until=1), P(2)]]
    told: list[str] = []
    capfd.readouterr()
    outcomes = spread.fit_spread(config, places, split, say=told.append)
    out = capfd.readouterr().out.splitlines()  # what the workers printed
    paused, resumed_at = out.index("seed 1: paused after epoch 1: the rest of this seed trains in another process"), out.index(
        f"seed 1: resuming {split / 'seed-1'} at the end of epoch 1")
    assert paused < resumed_at and sum(line.startswith("seed 1: epoch ") for line in out) == 3
    assert told == ["seeds 0,1 (from epoch 2) on core 0; 1 (to epoch 1),2 on core 1: a process per core, its seeds one after the other"]
    assert [o.seed for o in outcomes] == [0, 1, 2] and all(o.finished for o in outcomes)
    assert {o.seed: o.cores for o in outcomes} == {0: [0], 1: [0], 2: [1]}  # seed 1 ended on core 0
    assert [r["epoch"] for r in outcomes[1].history] == [1, 2, 3]
    waits = tmp_path / "waits"  # core 0 has nothing to do but wait for seed 0's first two epochs on core 1
    (waited,) = spread.fit_spread(config, [[P(0, after=2)], [P(0, until=2)]], waits, say=lambda m: None)
    assert waited.finished and [r["epoch"] for r in waited.history] == [1, 2, 3] and waited.cores == [0]
    for seed in (0, 1, 2):
        alone = fit(config.replace(seed=seed), mnist, tmp_path / f"alone-{seed}", **QUIET)
        assert [r["test_error"] for r in alone.history] == [r["test_error"] for r in resumed[seed].history]
        for a, b in zip(params(root / f"seed-{seed}"), params(alone.workdir)):
            np.testing.assert_array_equal(a, b)
        assert [r["test_error"] for r in alone.history] == [r["test_error"] for r in outcomes[seed].history]
        for a, b in zip(params(split / f"seed-{seed}"), params(alone.workdir)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(params(waits / "seed-0"), params(tmp_path / "alone-0")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_paused_run_stops_at_its_epoch_and_at_once_when_resumed_beyond_it(mnist, tmp_path):
    """What a worker's first part of a seed relies on (``fit(pause_after=K)``): it saves
    and returns after epoch K, returns at once when the run already stands there or
    beyond (a resumed command's plan), and the rest resumed is the run without a pause."""
    config = Config(epochs=3, train_subset=60, hessian_samples=10)
    said: list[str] = []
    first = fit(config, mnist, tmp_path / "paused", pause_after=1, log=said.append, progress=False)
    assert not first.finished and [r["epoch"] for r in first.history] == [1] and first.position.epoch == 1
    assert said[-1] == "paused after epoch 1: the rest of this seed trains in another process"
    again = fit(config, mnist, tmp_path / "paused", resume=True, pause_after=1, log=said.append, progress=False)
    assert not again.finished and [r["epoch"] for r in again.history] == [1] and said[-1].startswith("paused after epoch 1")
    rest = fit(config, mnist, tmp_path / "paused", resume=True, pause_after=3, **QUIET)
    alone = fit(config, mnist, tmp_path / "alone", **QUIET)
    timeless = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert rest.finished and timeless(rest.history) == timeless(alone.history)
    for a, b in zip(params(tmp_path / "paused"), params(alone.workdir)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_worker_that_cannot_start_fails_the_command_and_the_other_saves(mnist, tmp_path):
    config = Config(epochs=4, train_subset=120, hessian_samples=20)
    root = tmp_path / "spread"
    with claim(root / "seed-1"):  # another command holds seed 1's folder
        with pytest.raises(spread.WorkerFailed, match=r"seed\(s\) 1: exit code 2"):
            spread.fit_spread(config, [[P(0)], [P(1)]], root, say=lambda m: None)
    rows = (root / "seed-0" / "metrics.jsonl").read_text().splitlines() if (root / "seed-0" / "metrics.jsonl").exists() else []
    assert len(rows) < 4  # stopped, not trained to the end


# --------------------------------------------------------------------------- the command


def test_one_program_is_refused_without_seeds(tmp_path, capsys):
    assert "--one-program is for --seeds" in one_line(capsys, train_main(["--one-program", "--workdir", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_command_spreads_its_seeds_unless_asked_for_one_program(mnist, tmp_path, capfd):
    base = ["--seeds", "0,1", "--epochs", "1", "--train-subset", "60", "--hessian-samples", "10", "--no-progress"]
    assert train_main([*base, "--workdir", str(tmp_path / "spread")]) == 0
    out = capfd.readouterr().out
    assert "seeds 0 on core 0; 1 on core 1: a process per core" in out and "seed 1: epoch   1" in out
    assert train_main([*base, "--one-program", "--workdir", str(tmp_path / "one")]) == 0
    out = capfd.readouterr().out
    assert "on core" not in out and "seeds 0,1" in out  # the one program's first line names both seeds
