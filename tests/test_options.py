"""Options that must not be silently ignored or wrongly taken (issue 26, section 5): each
either does what it says, or ends as one ``error:`` line and exit code 2, or is dropped
with a one-line note saying what is used instead."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest

from lenet_jax import checkpoint as ckpt
from lenet_jax import training
from lenet_jax.checkpoint import Position
from lenet_jax.cli.evaluate import build_parser as eval_parser
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import build_parser as train_parser
from lenet_jax.cli.train import curvature_sample_used, parse_command_line, resolve_config
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import LUSH, Config
from lenet_jax.errors import ConfigError
from lenet_jax.factories import create_state
from lenet_jax.inputs import pad_images
from lenet_jax.training import fit_seeds, seed_groups, seed_memory
from lenet_jax.updates import curvature_model, seeds_estimate, seeds_train_chunk

from conftest import QUIET, one_line, small


def resolved(*argv: str) -> tuple[Config, list[str]]:
    """The config of a train.py command line, and the notes it printed."""
    notes: list[str] = []
    return resolve_config(*parse_command_line(list(argv)), note=notes.append), notes


# --------------------------------------------------------------------------- 1, 2. eval.py's --epoch and --step


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder whose checkpoints hold epoch 1 (10 updates) of a small SGD state."""
    run = tmp_path_factory.mktemp("run")
    config = Config(optimizer="sgd")
    mngr = ckpt.writer(run / ckpt.CHECKPOINTS)
    ckpt.save(mngr, 10, create_state(config, 10), {"epoch": 1, "update": 10, "updates_per_epoch": 10, "config": config.to_dict(), "history": []})
    mngr.close()
    return run


def test_step_and_epoch_together_are_one_line(capsys):
    message = one_line(capsys, eval_main(["--workdir", "/nonexistent/run", "--step", "19", "--epoch", "20"]))
    assert "--epoch 20 and --step 19: --step is the earlier name of --epoch; give one of them" in message


@pytest.mark.parametrize("mode", [[], ["--summary"], ["--image", "digit.png"], ["--serve", "--port", "0"], ["--figures", "FIGS"], ["--json"]],
                         ids=["evaluation", "summary", "image", "serve", "figures", "json"])
@pytest.mark.parametrize("choice", [["--epoch", "3"], ["--step", "3"], ["--epoch", "best"]], ids=["epoch", "step", "best"])
def test_an_epoch_without_a_run_is_one_line_in_every_mode(mode, choice, tmp_path, capsys):
    mode = [str(tmp_path / "figs") if m == "FIGS" else m for m in mode]
    message = one_line(capsys, eval_main([*choice, *mode]))
    assert f"{' '.join(choice)} selects an epoch of a run: give its --workdir or --checkpoint" in message
    assert not (tmp_path / "figs").exists()


def test_the_earlier_step_option_selects_an_epoch_of_a_run_with_a_note(run_folder, capsys):
    assert eval_main(["--workdir", str(run_folder), "--step", "1", "--summary"]) == 0
    captured = capsys.readouterr()
    assert "note: --step 1 selects epoch 1 (checkpoints are numbered by update); use --epoch" in captured.err
    assert "C1" in captured.out and "total" in captured.out
    assert eval_main(["--workdir", str(run_folder), "--epoch", "1", "--summary"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_help_lists_one_option_for_the_epoch(capsys):
    """--step is kept as --epoch's earlier name, but the help names only --epoch: one
    meaning of the word "step" (an update) in what a user reads."""
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--epoch" in shown and "--step" not in shown


def test_the_earlier_update_impl_name_is_the_same_option_with_a_note(tmp_path, capsys):
    config, _ = resolved("--step-impl", "xla")
    assert config.update_impl == "xla"
    assert train_parser().parse_args(["--step-impl=fused"]).update_impl == "fused"
    assert "--step-impl is its earlier name" in " ".join(train_parser().format_help().split())
    assert train_main(["--step-impl", "xla", "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "note: --step-impl is now --update-impl (the same option); the earlier name goes in a later version", err
    assert err[1].startswith("error: --resume needs the --workdir")


def test_a_saved_config_with_the_earlier_update_impl_name_loads_as_the_new_one():
    """A config.json or checkpoint record written before the rename reads (and resumes)."""
    assert Config.from_dict({"step_impl": "fused", "seed": 3}).update_impl == "fused"
    with pytest.raises(ConfigError, match="'step_impl' is the earlier name of 'update_impl'; give one of them"):
        Config.from_dict({"step_impl": "fused", "update_impl": "xla"})


# --------------------------------------------------------------------------- 3. the loss follows the head


def test_a_loss_not_given_follows_the_head():
    assert resolved("--head", "squashed") == (Config(head="squashed", loss="edist"), [])  # the default loss is no choice: no note
    assert resolved("--head", "softmax") == (Config(head="softmax", loss="xent"), [])
    config, notes = resolved("--preset", "lush", "--head", "rbf")
    assert config == Config(**LUSH).replace(head="rbf", loss="map")
    assert notes == ["note: the rbf head does not take the lush preset's loss edist: it trains with map"]
    config, notes = resolved("--preset", "modern", "--loss", "xent", "--head", "softmax")
    assert config.loss == "xent" and notes == []


@pytest.mark.parametrize("args,message", [
    (["--head", "squashed", "--loss", "map"], "the squashed head takes loss edist, not 'map'"),
    (["--preset", "lush", "--loss", "map"], "the squashed head takes loss edist, not 'map'"),
    (["--loss", "xent"], "the rbf head takes loss map or mse, not 'xent'"),
])
def test_a_loss_given_that_the_head_does_not_take_is_one_line(args, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        resolved(*args)
    assert message in one_line(capsys, train_main([*args, "--workdir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 4. --hessian-samples beyond the training set


def test_hessian_samples_beyond_the_training_images_are_recorded_as_the_number_used():
    notes: list[str] = []
    config = curvature_sample_used(Config(train_subset=256, hessian_samples=10_000_000), 60_000, notes.append)
    assert config == Config(train_subset=256, hessian_samples=256)
    assert notes == ["note: --hessian-samples 10,000,000 is more than the 256 training images: the Hessian estimate averages "
                     "over all 256, and config.json records 256"]
    assert curvature_sample_used(Config(validation_size=100, hessian_samples=500), 300, notes.append).hessian_samples == 200
    assert curvature_sample_used(Config(train_subset=256), 60_000, notes.append) == Config(train_subset=256, hessian_samples=256)
    unchanged = [Config(train_subset=1000), Config(optimizer="adam", train_subset=256)]
    assert [curvature_sample_used(c, 60_000, notes.append) for c in unchanged] == unchanged and len(notes) == 3


@pytest.mark.slow
def test_a_run_records_the_hessian_samples_it_used(mnist, tmp_path, capsys):
    work = tmp_path / "run"
    assert train_main(["--train-subset", "16", "--hessian-samples", "10000000", "--epochs", "1", "--workdir", str(work), "--no-progress"]) == 0
    assert json.loads((work / "config.json").read_text())["hessian_samples"] == 16
    assert "note: --hessian-samples 10,000,000 is more than the 16 training images" in capsys.readouterr().out


# --------------------------------------------------------------------------- 5. options the optimiser does not use


@pytest.mark.parametrize("args,message", [
    (["--optimizer", "adam", "--hessian-refresh", "once", "--hessian-sample", "first"],
     "--hessian-sample, --hessian-refresh: --optimizer adam does not use them (only --optimizer sdlm does): drop them"),
    (["--preset", "modern", "--mu", "0.1"], "--mu: the modern preset's --optimizer adam does not use it (only --optimizer sdlm does)"),
    (["--preset", "lush", "--optimizer", "sgd", "--hessian-samples", "50"], "--hessian-samples: --optimizer sgd does not use it"),
    (["--momentum", "0.5"], "--momentum: --optimizer sdlm (the default) does not use it (only --optimizer momentum does)"),
    (["--hutchinson-probes", "4"], "--hutchinson-probes: --hessian-estimator paper (the default) does not use it "
                                   "(only --hessian-estimator hutchinson does)"),
])
def test_an_option_the_optimizer_does_not_use_is_one_line(args, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved(*args)
    args = [*args, "--train-subset", "8", "--epochs", "1", "--no-progress", "--workdir", str(tmp_path / "run")]
    assert message in one_line(capsys, train_main(args))
    assert not (tmp_path / "run").exists()


def test_a_presets_values_the_optimizer_does_not_use_are_dropped_with_a_note():
    config, notes = resolved("--preset", "lush", "--optimizer", "sgd")
    dropped = {k: v for k, v in LUSH.items() if k not in ("lr", "hessian_samples", "hessian_sample", "hessian_refresh")}
    assert config == Config(**dropped).replace(optimizer="sgd") and config.learning_rate == 1e-3
    assert notes == ["note: dropped the lush preset's learning rate 0.0001 (chosen for sdlm) and --hessian-samples 100, "
                     "--hessian-sample first, --hessian-refresh once (--optimizer sgd does not use them); sgd starts at its "
                     "default learning rate 0.001 (--lr chooses)"]
    config, notes = resolved("--preset", "lush", "--optimizer", "sgd", "--lr", "0.01")
    assert config.lr == 0.01 and "learning rate" not in notes[0]
    config, notes = resolved("--preset", "lush", "--optimizer", "sdlm")  # the preset's own optimiser: nothing dropped
    assert config == Config(**LUSH) and notes == []
    config, notes = resolved("--preset", "modern", "--optimizer", "sdlm")
    assert config.lr is None and notes == ["note: dropped the modern preset's learning rate 0.001 (chosen for adam); sdlm starts "
                                           "at its default learning rate 0.00025 (--lr chooses)"]


def test_the_rules_are_in_the_help():
    text = " ".join(train_parser().format_help().split())
    for rule in ["An option the optimizer does not use is refused", "a preset's own values of those are dropped with a note",
                 "not given, it follows the head", "a --loss the head does not take is refused",
                 "train.py says so and config.json records the number used", "a preset's is dropped when --optimizer changes"]:
        assert rule in text, rule
    text = " ".join(eval_parser().format_help().split())
    assert "refused without a run" in text


# --------------------------------------------------------------------------- 6. many seeds


def test_seeds_beyond_the_memory_go_in_groups_that_fit():
    config = Config(train_subset=256)
    each, shared = seed_memory(config, 60_000)
    assert each >= 66_693_570_944 / 1001  # what 1,001 such seeds ran out of allocating (issue 26)
    seeds = list(range(1001))
    assert seed_groups(config, seeds, 60_000, available=10**15) == [seeds]
    groups = seed_groups(config, seeds, 60_000, available=int((100 * each + shared) / training.MEMORY_SHARE))
    assert [s for g in groups for s in g] == seeds and len(groups) == 11 and {len(g) for g in groups} == {91}
    assert seed_groups(config, [7, 3], 60_000, available=each + shared) == [[7], [3]]
    with pytest.raises(ConfigError, match=r"--seeds: one seed needs about 0.\d+ GB, more than the 1e-06 GB available"):
        seed_groups(config, [0, 1], 60_000, available=1000)


@pytest.mark.slow
def test_the_estimate_covers_what_the_compiled_programs_take():
    """The memory XLA plans for two seeds' curvature estimate and chunk of updates (the
    paper's configuration on 256 images, and Adam at batch 64), per seed, is within the
    estimate."""
    images, labels = pad_images(jnp.zeros((256, 28, 28), jnp.uint8)), jnp.zeros((256,), jnp.int32)
    keys = jax.eval_shape(lambda: jnp.stack([jax.random.key(0)] * 2))
    for config in [Config(train_subset=256), Config(optimizer="adam", batch_size=64)]:
        state = jax.eval_shape(lambda: jax.tree.map(lambda x: jnp.stack([x, x]), create_state(config, 10)))
        each, _ = seed_memory(config, 60_000)
        batches = jax.ShapeDtypeStruct((2, 4, config.batch_size), jnp.int32)
        planned = seeds_train_chunk.lower(state, images, labels, batches, keys, objective=config.objective).compile().memory_analysis()
        assert planned.temp_size_in_bytes / 2 < each
        if config.optimizer == "sdlm":
            pick = jax.ShapeDtypeStruct((2, 256), jnp.int32)
            planned = seeds_estimate.lower(state.params, images, labels, pick, keys, estimator="paper", model=curvature_model(config),
                                                objective=config.objective, probes=8).compile().memory_analysis()
            assert 0.5 * each < planned.temp_size_in_bytes / 2 < each  # measured: 67 MB of 86 MB


def test_seeds_of_which_not_one_fits_are_one_line(mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "available_memory", lambda device=None: 10**6)
    message = one_line(capsys, train_main(["--seeds", "0,1", "--train-subset", "256", "--epochs", "1", "--workdir", str(tmp_path / "run")]))
    assert "--seeds: one seed needs about" in message and "more than the 0.001 GB available" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_seeds_in_groups_compute_what_each_group_computes_alone(mnist, tmp_path, monkeypatch):
    data = small(mnist, 20, 50)
    config = Config(epochs=1, optimizer="sgd", chunks=1, keep=1, stop_at_chance=False)
    alone = fit_seeds(config, [0, 1], data, tmp_path / "alone01", **QUIET) + fit_seeds(config, [2], data, tmp_path / "alone2", **QUIET)
    each, shared = seed_memory(config, 20)
    monkeypatch.setattr(training, "available_memory", lambda device=None: int((2 * each + shared) / training.MEMORY_SHARE))
    said: list[str] = []
    grouped = fit_seeds(config, [0, 1, 2], data, tmp_path / "grouped", log=said.append, progress=False)
    assert any("3 seeds need about" in m and "training them in 2 groups of up to 2, one after the other" in m for m in said)
    for a, b in zip(alone, grouped, strict=True):
        chex.assert_trees_all_equal(a.state.params, b.state.params)
        assert [r["test_error"] for r in a.history] == [r["test_error"] for r in b.history]


def test_a_stop_leaves_the_groups_not_yet_trained_to_resume(tmp_path, monkeypatch):
    """What ``fit_seeds`` does around its groups (each group's training, ``_fit``, is
    replaced by one that says what it was asked and stops if asked): a stop ends the run
    after the group it came in, and each seed not trained gets an empty folder, which a
    resume trains."""
    calls = []

    def one_group(config, seeds, dataset, workdir, resume, log, progress, stop, several, layout=None):
        calls.append((seeds, resume, layout))
        for seed in seeds:
            (workdir / f"seed-{seed}" / "checkpoints" / "5").mkdir(parents=True, exist_ok=True)
        done = 5 if stop() else 10
        return [training.RunResult(None, [], workdir / f"seed-{seed}", Position(1, done, 10), 1) for seed in seeds]

    monkeypatch.setattr(training, "_fit", one_group)
    monkeypatch.setattr(training, "seed_groups", lambda config, seeds, n, available=None: [seeds[:2], seeds[2:4], seeds[4:]])
    data = small_dataset()
    stops = iter([False, False, True])  # inside the first group, before the second, inside the second
    results = fit_seeds(Config(), [5, 6, 7, 8, 9], data, tmp_path, stop=lambda: next(stops, True), **QUIET)
    assert [r.workdir.name for r in results] == ["seed-5", "seed-6", "seed-7", "seed-8"] and not results[-1].finished
    assert calls == [([5, 6], False, [5, 6, 7, 8, 9]), ([7, 8], False, [5, 6, 7, 8, 9])]
    assert (tmp_path / "seed-9").is_dir() and not any((tmp_path / "seed-9").iterdir())
    assert [p.name for p in ckpt.seed_folders(tmp_path).values()] == [f"seed-{s}" for s in (5, 6, 7, 8, 9)]
    calls.clear()
    assert all(r.finished for r in fit_seeds(Config(), [5, 6, 7, 8, 9], data, tmp_path, resume=True, **QUIET))
    assert [c[0] for c in calls] == [[5, 6], [7, 8], [9]] and all(c[1] for c in calls)


def small_dataset():
    from lenet_jax.data import Dataset

    images = jnp.zeros((10, 28, 28), jnp.uint8)
    return Dataset(images, jnp.zeros((10,), jnp.int32), images, jnp.zeros((10,), jnp.int32))
