"""The authors' QMNIST recipe (issue 29, section 4): a learning rate a tenth lower at each
phase of ``--phase-epochs``, the curvature estimated at the start of each phase, and the
``lush-qmnist`` preset built from them."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_jax import updates
from lenet_jax.config import LUSH, Config, preset
from lenet_jax.errors import ConfigError
from lenet_jax.factories import make_schedule
from lenet_jax.training import fit

from conftest import QUIET, small


def resolved_config(*argv: str) -> Config:
    """The config a train.py command line asks for."""
    from lenet_jax.cli.train import parse_command_line, resolve_config

    return resolve_config(*parse_command_line(list(argv)), note=lambda line: None)


def test_the_rate_is_a_tenth_lower_at_each_phase():
    schedule = make_schedule(Config(schedule="phases", phase_epochs=2, lr=1e-4), updates_per_epoch=5)
    counts = [0, 9, 10, 19, 20, 29, 30]  # phases of 2 epochs x 5 updates: updates 0-9, 10-19, 20-29, 30-
    rates = np.array([float(schedule(c)) for c in counts])
    np.testing.assert_allclose(rates, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6, 1e-7], rtol=1e-6)


@pytest.mark.parametrize("epoch,refreshed", [(1, True), (2, False), (10, False), (11, True), (12, False), (21, True), (30, False)])
def test_the_curvature_is_estimated_at_the_start_of_each_phase(epoch, refreshed):
    assert Config(hessian_refresh="phase", phase_epochs=10).refreshes_curvature(epoch) is refreshed


def test_the_loop_refreshes_before_the_first_epoch_of_each_phase(mnist, tmp_path, monkeypatch):
    refreshed = []
    real = updates.Strategy.refresh

    def recording(self, state, images, labels, configs, train_index, epoch):
        refreshed.append(epoch)
        return real(self, state, images, labels, configs, train_index, epoch)

    monkeypatch.setattr(updates.Strategy, "refresh", recording)
    config = Config(epochs=5, train_subset=20, hessian_samples=10, hessian_refresh="phase", phase_epochs=2, schedule="phases",
                    chunks=1, stop_at_chance=False)
    fit(config, small(mnist, 20, 10), tmp_path, **QUIET)
    assert refreshed == [1, 3, 5]


def test_the_lush_qmnist_preset_is_the_lush_one_with_the_qmnist_phases():
    config = preset("lush-qmnist")
    lush = preset("lush")
    changed = {k for k, v in config.to_dict().items() if v != lush.to_dict()[k]}
    assert changed == {"hessian_refresh", "hessian_samples", "schedule", "epochs"}  # phase_epochs 10 is the default
    assert (config.hessian_samples, config.hessian_refresh, config.schedule, config.phase_epochs, config.epochs) == (1000, "phase", "phases", 10, 30)
    assert (config.mu, config.lr, config.head, config.input_scaling) == (0.02, 1e-4, LUSH["head"], "lush")
    schedule = make_schedule(config, updates_per_epoch=60_000)
    rates = [float(schedule((epoch - 1) * 60_000)) for epoch in (1, 10, 11, 20, 21, 30)]
    np.testing.assert_allclose(rates, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6], rtol=1e-6)
    assert [e for e in range(1, 31) if config.refreshes_curvature(e)] == [1, 11, 21]


def test_phase_epochs_that_nothing_uses_is_one_line():
    with pytest.raises(ConfigError, match=r"--phase-epochs: --schedule paper \(the default\) and --hessian-refresh epoch \(the default\) "
                                          r"do not use it \(only --schedule phases and --hessian-refresh phase do\): drop it"):
        resolved_config("--phase-epochs", "5")
    assert resolved_config("--phase-epochs", "5", "--schedule", "phases").phase_epochs == 5
    assert resolved_config("--phase-epochs", "5", "--hessian-refresh", "phase").phase_epochs == 5
