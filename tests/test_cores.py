"""The batch-1 path's threads (lenet_jax.cores): pinned to one core while its chunks run,
every core again for the rest; larger batches, several seeds and accelerators untouched."""

from __future__ import annotations

import os
import threading

import pytest

from lenet_jax import cores, updates
from lenet_jax.config import Config
from lenet_jax.training import fit

from conftest import QUIET, small

ALLOWED = os.sched_getaffinity(0)


def test_pinned_moves_every_thread_to_the_core_and_back():
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        core = max(ALLOWED)
        with cores.pinned(core):
            inside = {tid: os.sched_getaffinity(tid) for tid in cores.thread_ids()}
        after = {tid: os.sched_getaffinity(tid) for tid in (threading.get_native_id(), other.native_id)}
    finally:
        release.set()
        other.join()
    assert other.native_id in inside and threading.get_native_id() in inside
    assert all(mask == {core} for mask in inside.values()), inside
    assert after == {threading.get_native_id(): ALLOWED, other.native_id: ALLOWED}


def test_pinned_with_no_core_changes_nothing():
    with cores.pinned(None):
        assert os.sched_getaffinity(0) == ALLOWED


@pytest.mark.parametrize("backend,batch_size,n_seeds", [("gpu", 1, 1), ("tpu", 1, 1), ("cpu", 2, 1), ("cpu", 256, 1), ("cpu", 1, 3)])
def test_only_one_seed_at_batch_1_on_the_cpu_is_pinned(backend, batch_size, n_seeds, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5})
    assert cores.batch1_core(backend, batch_size, n_seeds) is None
    assert cores.batch1_core("cpu", 1, 1) == 2


def test_a_process_already_on_one_core_is_left_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # the user's own taskset -c 3
    assert cores.batch1_core("cpu", 1, 1) is None


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_training_loop_runs_batch_1_chunks_on_one_core_and_the_rest_on_all(mnist, tmp_path, monkeypatch, batch_size):
    seen = []
    real = updates.compiled_train_chunk

    def recording(*args, **kwargs):
        seen.append(os.sched_getaffinity(0))
        return real(*args, **kwargs)

    monkeypatch.setattr(updates, "compiled_train_chunk", recording)  # what Strategy.build takes for one seed
    config = Config(epochs=1, train_subset=40, batch_size=batch_size, hessian_samples=10, chunks=2, stop_at_chance=False)
    fit(config, small(mnist, 40, 20), tmp_path, **QUIET)
    pinned = {min(ALLOWED)} if batch_size == 1 and len(ALLOWED) > 1 else ALLOWED
    assert seen == [pinned, pinned]
    assert os.sched_getaffinity(0) == ALLOWED
