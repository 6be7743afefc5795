"""The batch-1 path's threads (lenet_jax.cores): a command's XLA CPU pool of one thread,
the same numbers on one core as on all, and in a process with a larger pool the threads
pinned to one core while its chunks run; larger batches, several seeds, several devices
and accelerators untouched."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lenet_jax import cores, updates
from lenet_jax.config import Config
from lenet_jax.runs import restore_run
from lenet_jax.training import fit

from conftest import QUIET, ROOT, small

ALLOWED = os.sched_getaffinity(0)
TWO_CORES = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two cores")

POOL = """
import collections, json, os, sys
if sys.argv[2]:
    os.sched_setaffinity(0, {int(sys.argv[2])})
from lenet_jax import cores
got = cores.start_jax(one_thread=sys.argv[1] == "one")
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(json.dumps({"got": got, "eigen": names["tf_XLAEigen"], "allowed": sorted(os.sched_getaffinity(0)),
                  "each": sorted(sorted(os.sched_getaffinity(t)) for t in cores.thread_ids())[-1]}))
"""


ON_CORE = "import os, runpy, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
"""Runs a script held to one core from its start, as ``taskset -c N`` would."""


def pool(which: str, core: int | None = None, **env: str) -> dict:
    """What ``start_jax`` did in a fresh process (held to ``core`` from its start, if given):
    whether it sized one thread, XLA's Eigen threads counted by name, and the cores the
    process and its threads may use after."""
    done = subprocess.run([sys.executable, "-c", POOL, which, "" if core is None else str(core)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"} | env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@TWO_CORES
def test_a_command_at_batch_1_starts_xla_with_one_thread_and_keeps_every_core():
    one, usual = pool("one"), pool("all")
    assert one == {"got": True, "eigen": 1, "allowed": sorted(ALLOWED), "each": sorted(ALLOWED)}
    assert usual == {"got": False, "eigen": len(ALLOWED), "allowed": sorted(ALLOWED), "each": sorted(ALLOWED)}
    core = max(ALLOWED)  # the user's own taskset: one core, and one thread, already
    assert pool("one", core) == {"got": False, "eigen": 1, "allowed": [core], "each": [core]}


@TWO_CORES
@pytest.mark.parametrize("env", [{"JAX_PLATFORMS": "cuda,cpu"}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}],
                         ids=["an accelerator may be used", "several CPU devices"])
def test_the_pool_is_left_to_xla_where_one_thread_does_not_apply(env):
    if "JAX_PLATFORMS" in env:  # no accelerator here: ask the question alone, without starting JAX on a platform it lacks
        done = subprocess.run([sys.executable, "-c", "from lenet_jax import cores; print(cores.one_thread_applies())"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
        assert done.stdout.strip() == "False", done.stderr[-2000:]
        return
    assert pool("one", **env) == {"got": False, "eigen": 2, "allowed": sorted(ALLOWED), "each": sorted(ALLOWED)}


def test_a_started_backend_is_left_as_it_is():
    jax.devices()
    before = os.sched_getaffinity(0)
    assert cores.one_thread_applies() is False and cores.start_jax(one_thread=True) is False
    assert os.sched_getaffinity(0) == before


@pytest.mark.slow
@TWO_CORES
def test_a_batch_1_run_computes_the_same_on_one_core_as_on_every_core(tmp_path):
    """train.py on every core (XLA sized for one thread by the command) and under the
    user's own ``taskset`` to one core (XLA's own choice: one thread) end with the same
    parameters bit for bit; with XLA's pool of two threads they would not."""
    args = ["train.py", "--epochs", "2", "--train-subset", "3000", "--hessian-samples", "50", "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {}
    for name, prefix in (("all", []), ("one", ["-c", ON_CORE, str(max(ALLOWED))])):
        done = subprocess.run([sys.executable, *prefix, *args, "--workdir", str(tmp_path / name)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = done.stdout
    assert "threads: one XLA thread on the CPU" in runs["all"] and "threads:" not in runs["one"]
    for a, b in zip(saved_params(tmp_path / "all"), saved_params(tmp_path / "one")):
        np.testing.assert_array_equal(a, b)


def saved_params(workdir) -> list[np.ndarray]:
    state, _, _ = restore_run(workdir, "latest", log=lambda m: None)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


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


@pytest.mark.parametrize("platforms,expected", [("cpu", True), (" cpu ", True), ("cuda", False), ("cpu,cuda", False), ("tpu", False)])
def test_jax_platforms_decides_whether_only_the_cpu_may_be_used(monkeypatch, platforms, expected):
    monkeypatch.setattr(cores, "jax", SimpleNamespace(config=SimpleNamespace(jax_platforms=platforms)))
    assert cores.only_cpu() is expected


def test_an_installed_accelerator_plugin_means_jax_may_use_an_accelerator(monkeypatch):
    monkeypatch.setattr(cores, "jax", SimpleNamespace(config=SimpleNamespace(jax_platforms=None)))
    monkeypatch.delenv("PJRT_NAMES_AND_LIBRARY_PATHS", raising=False)
    assert cores.only_cpu() is True  # this machine: JAX's CPU wheel alone
    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "entry_points", lambda group: [f"a plugin in {group}"])
        assert cores.only_cpu() is False
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
        assert cores.only_cpu() is False
    with monkeypatch.context() as m:
        m.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", "cuda:/opt/libcuda_plugin.so")
        assert cores.only_cpu() is False


COPIES = """
import json, os, re
from lenet_jax import cores
cores.start_jax(one_thread=True)
import jax, jax.numpy as jnp
from lenet_jax.config import Config
from lenet_jax.factories import create_state
from lenet_jax.updates import compiled_train_chunk, update_key
config = Config(batch_size=1)
state = create_state(config, 40)
images, labels = jnp.zeros((40, 32, 32), jnp.uint8), jnp.arange(40, dtype=jnp.int32) % 10
batches = jnp.arange(10, dtype=jnp.int32).reshape(10, 1)
hlo = compiled_train_chunk.lower(state, images, labels, batches, update_key(0), objective=config.objective).compile().as_text()
body = re.search(r"while\\(.*?body=%?([\\w.\\-]+)", hlo).group(1)
start = hlo.index("%" + body + " (")
text = hlo[start:hlo.index("\\n}\\n", start)]
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "copies": len(re.findall(r"=\\s*\\S+\\s+copy\\(", text))}))
"""


@pytest.mark.slow
@TWO_CORES
@pytest.mark.parametrize("user_flags", [None, "--xla_cpu_copy_insertion_use_region_analysis=false"])
def test_a_one_thread_start_lets_the_batch_1_loop_update_in_place_unless_the_user_said_otherwise(user_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"} | ({"XLA_FLAGS": user_flags} if user_flags else {})
    done = subprocess.run([sys.executable, "-c", COPIES], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if user_flags is None:
        assert out == {"flags": " ".join(cores.ONE_THREAD_FLAGS), "copies": 0}
    else:
        assert out["flags"] == user_flags and out["copies"] > 0  # the user's own setting, and the kernels copied every update
