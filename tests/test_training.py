"""Training end to end: learning on real MNIST, checkpoints numbered by the optimiser
step, exact resume, the kept steps, damaged checkpoints, divergence."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lenet_jax import checkpoint as ckpt
from lenet_jax.config import Config
from lenet_jax.errors import ConfigError
from lenet_jax.evaluation import evaluate, evaluate_arrays
from lenet_jax.factories import create_state, resolve
from lenet_jax.layers import C3_TABLE, connection_mask
from lenet_jax.runs import restore_run
from lenet_jax.training import fit
from lenet_jax.updates import CHUNK_STATIC, train_chunk

from conftest import QUIET, small


@pytest.mark.slow
def test_paper_configuration_learns_real_digits(mnist, tmp_path):
    """Two passes of batch-1 SDLM over 4,000 real digits (measured: 6.75% test error)."""
    config = Config(epochs=2, train_subset=4000)
    result = fit(config, small(mnist, 4000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.085
    assert result.history[-1]["train_error"] < result.history[0]["train_error"]
    kernel = np.asarray(result.state.params["C3"]["kernel"])
    assert np.all(kernel[:, :, connection_mask(C3_TABLE, 6) == 0] == 0)  # masked weights stay exactly zero


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,batch,bound", [("sgd", 16, 0.16), ("adam", 32, 0.17), ("sdlm", 8, 0.10)])
def test_other_optimizers_and_minibatches_learn(mnist, tmp_path, optimizer, batch, bound):
    """Each bound is about 1.25x the measured test error after 2 passes over 3,000 digits
    (12.6%, 13.35% and 7.7%; chance is 90%)."""
    lr = {"sdlm": 1e-3}.get(optimizer)
    config = Config(optimizer=optimizer, batch_size=batch, epochs=2, train_subset=3000, schedule="constant", lr=lr)
    result = fit(config, small(mnist, 3000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < bound


@pytest.mark.slow
def test_softmax_head_learns(mnist, tmp_path):
    config = Config(head="softmax", loss="xent", optimizer="adam", batch_size=32, epochs=2, train_subset=3000)
    result = fit(config, small(mnist, 3000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.14  # 10.95% measured


@pytest.mark.slow
def test_run_is_reproducible_from_its_seed_and_resume_is_exact(mnist, tmp_path):
    data = small(mnist, 120, 100)
    config = Config(epochs=3, hessian_samples=20)
    straight = fit(config, data, tmp_path / "a", **QUIET)
    again = fit(config, data, tmp_path / "b", **QUIET)
    chex.assert_trees_all_equal(straight.state.params, again.state.params)
    fit(config.replace(epochs=2), data, tmp_path / "c", **QUIET)
    resumed = fit(config, data, tmp_path / "c", resume=True, **QUIET)
    chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    chex.assert_trees_all_equal(straight.state.opt_state, resumed.state.opt_state)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.finished and resumed.position == ckpt.Position(3, 120, 120)
    assert int(resumed.state.step) == 360  # the position is the optimiser step


@pytest.mark.slow
def test_checkpoints_are_numbered_by_step_and_pruned(mnist, tmp_path):
    """keep=1 with a validation split: the last pass and the best one stay; steps are
    optimiser steps (40 updates per pass here)."""
    data = small(mnist, 400, 300)
    config = Config(epochs=3, validation_size=80, train_subset=40, keep=1, optimizer="sgd", batch_size=8, lr=1e-3)
    result = fit(config, data, tmp_path, **QUIET)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    best_epoch = min(result.history, key=lambda r: (r["val_error"], r["epoch"]))["epoch"]
    assert steps == sorted({5 * best_epoch, 15})
    state, restored_config, record = restore_run(tmp_path, "latest")
    assert record["epoch"] == 3 and restored_config == resolve(config)  # the path that trained it, not "auto"
    chex.assert_trees_all_equal(state.params, result.state.params)
    _, _, best_record = restore_run(tmp_path, "best")
    assert best_record["epoch"] == best_epoch
    r = evaluate(state.params, state.apply_fn, data.test_images, data.test_labels, config.objective)
    assert abs(r["error"] - result.history[-1]["test_error"]) < 1e-9
    assert r["confusion"].sum() == 300


@pytest.mark.slow
def test_a_restored_state_carries_the_runs_own_schedule(mnist, tmp_path):
    """Training on from ``restore_run`` must step as the run would have: the optimiser's
    schedule depends on the updates per pass."""
    data = small(mnist, 60, 50)
    result = fit(Config(epochs=3, hessian_samples=10), data, tmp_path, **QUIET)
    state, _, _ = restore_run(tmp_path, "latest")
    grads = jax.tree.map(jnp.ones_like, state.params)
    expected, _ = result.state.tx.update(grads, result.state.opt_state, result.state.params)
    got, _ = state.tx.update(grads, state.opt_state, state.params)
    chex.assert_trees_all_close(got, expected)


def test_evaluation_takes_padded_images_too(rbf_model, mnist):
    """32x32 images padded here with numpy (the background's pixel value, 0) evaluate as
    the 28x28 ones the evaluation pads itself."""
    model, params = rbf_model
    images, labels = mnist.test_images[:50], jnp.asarray(mnist.test_labels[:50])
    from lenet_jax.losses import Objective

    plain = evaluate_arrays(params, model.apply, jnp.asarray(images), labels, Objective(), 20)
    padded = evaluate_arrays(params, model.apply, jnp.asarray(np.pad(images, ((0, 0), (2, 2), (2, 2)))), labels, Objective(), 20)
    chex.assert_trees_all_equal(plain, padded)


@pytest.mark.slow
def test_refuses_to_overwrite_or_resume_a_different_model(mnist, tmp_path):
    data = small(mnist, 100, 100)
    fit(Config(epochs=1, hessian_samples=20), data, tmp_path, **QUIET)
    with pytest.raises(Exception, match="already holds checkpoints"):
        fit(Config(epochs=1), data, tmp_path, **QUIET)
    with pytest.raises(Exception, match=r"head \('rbf' there, 'softmax' here\)"):
        fit(Config(epochs=2, head="softmax", loss="xent"), data, tmp_path, resume=True, **QUIET)


def test_sizes_larger_than_the_data_are_refused(mnist, tmp_path):
    with pytest.raises(ConfigError, match="larger than the 100 training images"):
        fit(Config(batch_size=101, train_subset=100), small(mnist, 100), tmp_path, **QUIET)
    with pytest.raises(ConfigError, match="--train-subset 500 is larger than the 100 training images"):
        fit(Config(train_subset=500), small(mnist, 100), tmp_path, **QUIET)


def damage(step_folder, fault: str) -> None:
    if fault == "truncate_data":
        for f in (step_folder / "state").rglob("d/*"):
            f.write_bytes(f.read_bytes()[:10])
    elif fault == "delete_manifest":
        for f in (step_folder / "state").rglob("manifest.ocdbt"):
            f.unlink()
    elif fault == "truncate_metadata":
        (step_folder / "state" / "_METADATA").write_text("{\"tr")
    else:
        (step_folder / "record" / "metadata").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["truncate_data", "delete_manifest", "truncate_metadata", "delete_record"])
def test_a_damaged_newest_checkpoint_is_skipped_and_named(mnist, tmp_path, fault):
    data = small(mnist, 100, 100)
    config = Config(epochs=2, hessian_samples=20)
    fit(config, data, tmp_path, **QUIET)
    damage(tmp_path / "checkpoints" / "200", fault)
    damaged = sorted(str(p.relative_to(tmp_path / "checkpoints" / "200")) for p in (tmp_path / "checkpoints" / "200").rglob("*"))
    said = []
    _, _, record = restore_run(tmp_path, "latest", log=said.append)  # a reader: it names the step and touches nothing
    assert record["epoch"] == 1
    assert len(said) == 1 and said[0].startswith("skipping checkpoint 200:")
    assert (tmp_path / "checkpoints" / "200").is_dir()
    said = []
    resumed = fit(config.replace(epochs=3), data, tmp_path, resume=True, log=said.append, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    aside = tmp_path / "checkpoints" / "unloadable-200"  # moved aside, whole, never deleted
    assert any(m.startswith("skipping checkpoint 200:") and m.endswith(f"moved to {aside}") for m in said)
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == damaged
    restored, _, record = restore_run(tmp_path, "latest", log=said.append)
    assert record["epoch"] == 3 and int(restored.step) == 300


@pytest.mark.slow
def test_a_read_error_on_resume_stops_and_moves_or_deletes_nothing(mnist, tmp_path, monkeypatch):
    """An OSError while reading the newest step (a flaky disk, a permission, NFS) is not
    damage: the resume stops with one line and every step stays where it was."""
    import errno

    data = small(mnist, 100, 100)
    config = Config(epochs=2, hessian_samples=20)
    fit(config, data, tmp_path, **QUIET)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    real = ckpt.restore

    def flaky(mngr, step, target):
        if step == 200:
            raise OSError(errno.EIO, "Input/output error")
        return real(mngr, step, target)

    monkeypatch.setattr(ckpt, "restore", flaky)
    with pytest.raises(ckpt.CheckpointReadError, match=r"reading checkpoint 200 failed \(OSError: \[Errno 5\] Input/output error\); nothing was skipped"):
        fit(config.replace(epochs=3), data, tmp_path, resume=True, **QUIET)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before == ["100", "200"]
    monkeypatch.setattr(ckpt, "restore", real)
    resumed = fit(config.replace(epochs=3), data, tmp_path, resume=True, **QUIET)  # the disk is back: from step 200
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


@pytest.mark.slow
def test_a_diverging_run_stops_naming_where_and_keeps_the_last_good_checkpoint(mnist, tmp_path):
    data = small(mnist, 200, 100)
    fit(Config(optimizer="sgd", lr=1e-3, epochs=1, train_subset=200), data, tmp_path, **QUIET)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite in epoch 2, updates 1-20 of 200; "
                                                 r"the last good checkpoint is the end of epoch 1 in"):
        fit(Config(optimizer="sgd", lr=1e38, epochs=2, train_subset=200), data, tmp_path, resume=True, **QUIET)
    _, _, record = restore_run(tmp_path, "latest", log=lambda m: None)
    assert record["epoch"] == 1


@pytest.mark.slow
def test_the_compiled_chunk_is_traced_once_for_a_whole_run(mnist, tmp_path, monkeypatch):
    """The project's own loop: the chunks of a pass, and the next pass after a curvature
    refresh, all reuse one compiled program. A change that made the state's structure or
    dtypes drift between calls (and so traced every chunk again) fails here."""
    from lenet_jax import updates

    traced = jax.jit(chex.assert_max_traces(train_chunk, n=1), static_argnames=CHUNK_STATIC, donate_argnames=("state",))
    monkeypatch.setattr(updates, "compiled_train_chunk", traced)  # what Strategy.build takes for one model
    config = Config(epochs=2, train_subset=60, hessian_samples=10, dropout=0.1, chunks=3, stop_at_chance=False)
    result = fit(config, small(mnist, 60, 20), tmp_path, **QUIET)
    assert int(result.state.step) == 120 and [r["epoch"] for r in result.history] == [1, 2]


def rewrite_record(step_folder, change) -> None:
    """Edit the JSON record orbax wrote for a step, as an earlier version would have written it."""
    path = step_folder / "record" / "metadata"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.slow
def test_runs_of_the_earlier_layouts_are_read(mnist, tmp_path):
    """Format 2 named updates_per_epoch steps_per_epoch: read and resumed. The first
    layout numbered steps by epoch, with no format: read (its updates per epoch derived
    from a 60,000-image set), not resumed."""
    data = small(mnist, 100, 100)
    config = Config(epochs=1, hessian_samples=20)
    fit(config, data, tmp_path / "v2", **QUIET)

    def as_format_2(record):
        record["format"], record["steps_per_epoch"] = 2, record.pop("updates_per_epoch")

    rewrite_record(tmp_path / "v2" / "checkpoints" / "100", as_format_2)
    state, _, record = restore_run(tmp_path / "v2", "latest")
    assert record["epoch"] == 1 and int(state.step) == 100
    resumed = fit(config.replace(epochs=2), data, tmp_path / "v2", resume=True, **QUIET)
    assert [r["epoch"] for r in resumed.history] == [1, 2]

    old = tmp_path / "v1" / "checkpoints"  # written with orbax as the first version did: step = epoch
    full = Config(epochs=2)
    template = create_state(full, 60_000)
    params = jax.tree.map(lambda p: p + 1.0, template.params)
    mngr = ckpt.writer(old)
    mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(template.replace(params=params)),
                                         record=ocp.args.JsonSave({"epoch": 2, "config": full.to_dict(), "history": []})))
    mngr.wait_until_finished()
    mngr.close()
    state, restored_config, record = restore_run(tmp_path / "v1", "2")
    assert record["epoch"] == 2 and restored_config == full
    chex.assert_trees_all_equal(state.params, params)
    with pytest.raises(ckpt.CheckpointError, match="written by an earlier lenet-jax"):
        fit(full.replace(train_subset=100), data, tmp_path / "v1", resume=True, **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("change", [dict(precision="bfloat16"), dict(conv_impl="patches"), dict(devices=1), dict(update_impl="fused")])
def test_a_resume_may_change_how_the_run_executes(mnist, tmp_path, change):
    data = small(mnist, 40, 100)
    config = Config(epochs=1, hessian_samples=10)
    fit(config, data, tmp_path, **QUIET)
    resumed = fit(config.replace(epochs=2, **change), data, tmp_path, resume=True, **QUIET)
    assert resumed.finished and [r["epoch"] for r in resumed.history] == [1, 2]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert all(saved[k] == v for k, v in change.items())
    _, _, record = restore_run(tmp_path, "latest")
    assert all(record["config"][k] == v for k, v in change.items())


@pytest.mark.slow
def test_a_whole_run_compiles_its_chunk_and_its_refresh_once(mnist, tmp_path):
    """Three epochs (a refresh before each, four chunks in each): one program for the
    chunk and one for the refresh. A state placed differently from the data after the
    first chunk or refresh (a sharding drift) would compile each again."""
    from lenet_jax.updates import compiled_train_chunk, estimate_hessian

    config = Config(epochs=3, train_subset=40, hessian_samples=10, chunks=4, stop_at_chance=False, map_j=19.0)  # a j no other test uses
    chunks, refreshes = compiled_train_chunk._cache_size(), estimate_hessian._cache_size()  # jit's count of compiled programs
    fit(config, small(mnist, 40, 20), tmp_path, **QUIET)
    assert (compiled_train_chunk._cache_size() - chunks, estimate_hessian._cache_size() - refreshes) == (1, 1)
