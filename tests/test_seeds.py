"""Several seeds in one compiled program: each seed computes what its run alone computes,
saves a run folder of its own, resumes, and is evaluated seed by seed with the mean."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.errors import ConfigError
from lenet_jax.factories import create_states
from lenet_jax.inputs import pad_images
from lenet_jax.training import fit, fit_seeds, training_positions
from lenet_jax.updates import Strategy, epoch_batches, seeds_train_chunk, train_chunk, update_key

from conftest import QUIET, small


@pytest.mark.slow
def test_the_several_seed_chunk_computes_each_seeds_own_updates(mnist):
    """60 batch-1 SDLM updates with dropout, each model with its own weights, data order
    and randomness: the same parameters as each model's own chunk, to float32 rounding
    (the batched products add in another order; measured: 8e-6 relative at most for these
    seeds; early batch-1 SDLM amplifies rounding, so a wrong key or batch would show as
    differences of order one, not 1e-5)."""
    config = Config(dropout=0.2, hessian_samples=10)
    images, labels = pad_images(jnp.asarray(mnist.train_images[:60])), jnp.asarray(mnist.train_labels[:60])
    one, two = Strategy.build(config, 1, 60), Strategy.build(config, 2, 60)
    configs = [config.replace(seed=s) for s in (0, 1)]
    states = [one.refresh(state, images, labels, [c], [None], 1) for state, c in zip(create_states(config, 60, [0, 1]), configs)]
    batches = jnp.stack([epoch_batches(s, 1, 60, 1)[:60] for s in (0, 1)])
    keys = jnp.stack([update_key(s) for s in (0, 1)])
    together, m = seeds_train_chunk(two.stack(states), images, labels, batches, keys, objective=config.objective)
    for r, state in enumerate(states):
        alone, m_alone = train_chunk(state, images, labels, batches[r], keys[r], objective=config.objective)
        chex.assert_trees_all_close(two.unstack(together, r).params, alone.params, rtol=1e-4, atol=1e-6)
        assert int(m["errors"][r]) == int(m_alone["errors"])


@pytest.mark.slow
@pytest.mark.parametrize("validation", [0, 20])
def test_each_seed_of_a_run_of_seeds_is_the_run_of_that_seed(mnist, tmp_path, validation):
    """100 updates per seed (the curvature refresh included), against each seed's own run;
    with a validation split each seed holds out its own images, as its own run does."""
    data = small(mnist, 120 if validation else 100, 200)
    config = Config(epochs=1, hessian_samples=20, validation_size=validation)
    results = fit_seeds(config, [0, 1], data, tmp_path / "both", **QUIET)
    for seed, together in zip((0, 1), results):
        alone = fit(config.replace(seed=seed), data, tmp_path / f"alone{seed}", **QUIET)
        chex.assert_trees_all_close(together.state.params, alone.state.params, rtol=1e-5, atol=1e-6)
        assert together.history[-1]["test_error"] == alone.history[-1]["test_error"]
        if validation:
            assert together.history[-1]["val_error"] == alone.history[-1]["val_error"]
        assert json.loads((tmp_path / "both" / f"seed-{seed}" / "config.json").read_text())["seed"] == seed
    if validation:  # the two seeds held out different images, so their validation sets differ
        held = [training_positions(config.replace(seed=s), 120)[2] for s in (0, 1)]
        assert not np.array_equal(*held)


def stop_after(calls: int):
    """A ``stop`` that says yes from its ``calls``-th question on."""
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= calls

    return stop


@pytest.fixture(scope="module")
def three(mnist, tmp_path_factory):
    data = small(mnist, 120, 100)
    config = Config(epochs=3, hessian_samples=20, chunks=4)
    return data, config, fit_seeds(config, [0, 1, 2], data, tmp_path_factory.mktemp("straight"), **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("calls", [2, 4, 6, 14])
def test_three_seeds_stopped_anywhere_resume_bit_for_bit(three, tmp_path, calls):
    """Questions per epoch: after chunks 1-3 of 4, before the evaluation of seeds 1 and 2,
    after the epoch: 2 stops mid-epoch 1, 4 between two seeds' evaluations (saved with
    the evaluation still to do), 6 after epoch 1, 14 mid-epoch 3."""
    data, config, straight = three
    stopped = fit_seeds(config, [0, 1, 2], data, tmp_path, stop=stop_after(calls), **QUIET)
    assert not stopped[0].finished and len({r.position for r in stopped}) == 1
    said = []
    resumed = fit_seeds(config, [0, 1, 2], data, tmp_path, resume=True, log=said.append, progress=False)
    assert any(m.startswith(f"resuming {tmp_path / 'seed-0'} at") for m in said)
    for a, b in zip(straight, resumed):
        chex.assert_trees_all_equal(a.state.params, b.state.params)
        chex.assert_trees_all_equal(a.state.opt_state, b.state.opt_state)
        assert [r["test_error"] for r in a.history] == [r["test_error"] for r in b.history]
    for seed in (0, 1, 2):
        rows = [json.loads(line) for line in (tmp_path / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_three_seeds_as_one_command_stop_resume_and_evaluate(mnist, tmp_path, capfd):
    """On two cores or more the seeds train in worker processes (lenet_jax/spread.py),
    whose output reaches the command's own file descriptors."""
    work = tmp_path / "run"
    args = ["--seeds", "0,1,2", "--epochs", "2", "--train-subset", "120", "--hessian-samples", "20", "--workdir", str(work), "--no-progress"]
    assert train_main([*args[:3], "1", *args[4:]]) == 0  # one epoch first
    capfd.readouterr()
    assert train_main(["--workdir", str(work), "--resume", "--epochs", "2", "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert "resuming" in out and "mean " in out and "over 3 seed(s)" in out
    assert eval_main(["--workdir", str(work), "--json"]) == 0
    report = json.loads(capfd.readouterr().out)
    assert sorted(report["seeds"]) == ["0", "1", "2"] and all(r["epoch"] == 2 for r in report["seeds"].values())
    trained = {s: json.loads((work / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[-1])["test_error"] for s in (0, 1, 2)}
    assert {int(s): r["test_error"] for s, r in report["seeds"].items()} == trained  # what training measured after epoch 2
    assert report["mean_test_error"] == pytest.approx(np.mean(list(trained.values())), abs=1e-12)


def test_seeds_are_refused_where_they_cannot_work(mnist, tmp_path, capsys):
    assert train_main(["--seeds", "0,0", "--workdir", str(tmp_path / "x")]) == 2
    assert "give distinct whole numbers" in capsys.readouterr().err
    assert train_main(["--seeds", "0,1", "--seed", "3", "--workdir", str(tmp_path / "x")]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="the fused kernel trains one seed at a time"):
        fit_seeds(Config(update_impl="fused"), [0, 1], small(mnist, 50, 10), tmp_path / "y", **QUIET)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    jax.clear_caches()
