"""Several seeds in one compiled program: each seed computes what its run alone computes,
saves a run folder of its own, resumes, and is evaluated seed by seed with the mean."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import pytest

from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.factories import create_state
from lenet_jax.inputs import pad_images
from lenet_jax.replicas import fit_seeds, replicated_train_chunk, stack, unstack
from lenet_jax.steps import epoch_batches, refresh_curvature, step_keys, train_chunk
from lenet_jax.training import fit

from conftest import QUIET, small


@pytest.mark.slow
def test_the_replicated_chunk_computes_each_models_own_updates(mnist):
    """60 batch-1 SDLM updates with dropout, each model with its own weights, data order
    and randomness: the same parameters as each model's own chunk, to float32 rounding
    (the batched products add in another order; measured: 8e-6 relative at most for these
    seeds; early batch-1 SDLM amplifies rounding, so a wrong key or batch would show as
    differences of order one, not 1e-5)."""
    config = Config(dropout=0.2, hessian_samples=10)
    images, labels = pad_images(jnp.asarray(mnist.train_images[:60])), jnp.asarray(mnist.train_labels[:60])
    template = create_state(config, 60)
    states = [refresh_curvature(template.replace(params=create_state(config.replace(seed=s), 60).params), images, labels,
                                config.replace(seed=s), 1) for s in (0, 1)]
    batches = jnp.stack([epoch_batches(s, 1, 60, 1)[:60] for s in (0, 1)])
    keys = jnp.stack([step_keys(s) for s in (0, 1)])
    together, m = replicated_train_chunk(stack(states), images, labels, batches, keys, objective=config.objective)
    for r, state in enumerate(states):
        alone, m_alone = train_chunk(state, images, labels, batches[r], keys[r], objective=config.objective)
        chex.assert_trees_all_close(unstack(together, r).params, alone.params, rtol=1e-4, atol=1e-6)
        assert int(m["errors"][r]) == int(m_alone["errors"])


@pytest.mark.slow
def test_each_seed_of_a_run_of_seeds_is_the_run_of_that_seed(mnist, tmp_path):
    """100 updates per seed (the curvature refresh included), against each seed's own run."""
    data = small(mnist, 100, 200)
    config = Config(epochs=1, hessian_samples=20)
    results = fit_seeds(config, [0, 1], data, tmp_path / "both", **QUIET)
    for seed, together in zip((0, 1), results):
        alone = fit(config.replace(seed=seed), data, tmp_path / f"alone{seed}", **QUIET)
        chex.assert_trees_all_close(together.state.params, alone.state.params, rtol=1e-5, atol=1e-6)
        assert together.history[-1]["test_error"] == alone.history[-1]["test_error"]
        assert json.loads((tmp_path / "both" / f"seed-{seed}" / "config.json").read_text())["seed"] == seed


@pytest.mark.slow
def test_three_seeds_as_one_command_stop_resume_and_evaluate(mnist, tmp_path, capsys):
    work = tmp_path / "run"
    args = ["--seeds", "0,1,2", "--epochs", "2", "--train-subset", "120", "--hessian-samples", "20", "--workdir", str(work), "--no-progress"]
    assert train_main([*args[:3], "1", *args[4:]]) == 0  # one epoch first
    capsys.readouterr()
    assert train_main(["--workdir", str(work), "--resume", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "mean " in out and "over 3 seed(s)" in out
    assert eval_main(["--workdir", str(work), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["seeds"]) == ["0", "1", "2"] and all(r["checkpoint_step"] == 2 for r in report["seeds"].values())
    errors = [r["test_error"] for r in report["seeds"].values()]
    assert report["mean_test_error"] == pytest.approx(sum(errors) / 3)


def test_seeds_are_refused_where_they_cannot_work(mnist, tmp_path, capsys):
    with pytest.raises(ValueError, match="--validation-size would hold out different images"):
        fit_seeds(Config(validation_size=10), [0, 1], small(mnist, 50, 10), tmp_path, **QUIET)
    assert train_main(["--seeds", "0,0", "--workdir", str(tmp_path / "x")]) == 2
    assert "give distinct whole numbers" in capsys.readouterr().err
    assert train_main(["--seeds", "0,1", "--seed", "3", "--workdir", str(tmp_path / "x")]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
    jax.clear_caches()
