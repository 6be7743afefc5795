"""The configuration: its checks, its typed reading of JSON, and the named presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lenet_jax.config import MAX_SEED, MODERN, PRESETS, Config, load_config_file, preset
from lenet_jax.errors import ConfigError


def test_every_field_has_its_help_next_to_it():
    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(lr=float("inf")), "--lr must be a finite number"),
        (dict(weight_decay=float("inf")), "--weight-decay must be a finite number"),
        (dict(distort_translate=float("inf")), "--distort-translate must be a finite number"),
        (dict(init_scale=float("nan")), "--init-scale must be a finite number"),
        (dict(mu=float("inf")), "--mu must be a finite number"),
        (dict(init_exponent=float("inf")), "--init-exponent must be a finite number"),
        (dict(mu=0.0), "--mu must be positive"),
        (dict(lr=-1e-3), "--lr must be positive"),
        (dict(seed=MAX_SEED + 1), f"--seed must be at most {MAX_SEED}"),
        (dict(seed=-1), "--seed must be at least 0"),
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(optimizer="rmsprop"), "--optimizer 'rmsprop' is not one of: sdlm, sgd, momentum, adam"),
        (dict(precision="fp8"), "--precision 'fp8' is not one of: float32, tf32, bfloat16"),
        (dict(head="softmax"), "the softmax head takes loss xent"),
        (dict(batch_size="16"), "--batch-size must be int, got '16'"),
    ],
)
def test_bad_values_are_refused_naming_the_option(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Config(**changes).validate()


def test_from_dict_checks_types_and_names():
    assert Config.from_dict({"batch_size": 16, "lr": 1}).lr == 1.0  # an int where a float goes is fine
    for bad, message in [
        ([], "expected a JSON object of options, got list"),
        ({"batch_size": "16"}, "batch_size must be int, got '16'"),
        ({"batch_size": True}, "batch_size must be int, got True"),
        ({"distort": 1}, "distort must be bool, got 1"),
        ({"batchsize": 16}, "unknown option 'batchsize'"),
        ({"lr": "fast"}, "lr must be null or float, got 'fast'"),
    ]:
        with pytest.raises(ConfigError, match=f"run.json: {message}"):
            Config.from_dict(bad, "run.json")


def test_a_config_survives_its_json():
    config = Config(**MODERN).replace(seed=7, data_dir="/data")
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_presets_are_valid_and_named():
    assert set(PRESETS) >= {"paper", "paper-exact", "lush", "modern", "distort"}
    for name, p in PRESETS.items():
        assert p.description
        p.config().validate()  # raises for a preset that is not a valid config
    paper = preset("paper")  # the paper's setting, with the two documented departures (weights 2.4/F^0.6, half the step)
    assert (paper.head, paper.loss, paper.optimizer, paper.batch_size, paper.epochs, paper.c3, paper.subsampling) == \
        ("rbf", "map", "sdlm", 1, 20, "table", "trainable")
    assert (paper.mu, paper.hessian_samples, paper.hessian_estimator, paper.schedule, paper.learning_rate) == (0.02, 500, "paper", "paper", 2.5e-4)
    assert (paper.init_scale, paper.init_exponent, paper.activation, paper.distort, paper.dropout) == (2.4, 0.6, "scaled_tanh", False, 0.0)
    lush = preset("lush")
    assert (lush.init_scale, lush.init_exponent, lush.bias_init) == (1.0, 0.5, "zero")
    exact = preset("paper-exact")
    assert (exact.init_exponent, exact.lr, exact.init_scale) == (1.0, 5e-4, 2.4)
    assert preset("modern") == Config(**MODERN) and preset("distort").distort


def test_a_saved_config_file_is_a_preset(tmp_path):
    config = Config(batch_size=4, seed=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert preset(str(path)) == config == load_config_file(path)
    with pytest.raises(ConfigError, match="neither a preset"):
        preset("moden")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not JSON"):
        preset(str(tmp_path / "bad.json"))
