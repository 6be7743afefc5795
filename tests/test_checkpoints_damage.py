"""What a damaged checkpoint looks like to the user (issue 26, section 6), and which
failures count as damage at all (issue 27, section 2): each kind of damage orbax and
TensorStore report is recognised by ``errors.is_damage``, named in one line in words, and
orbax's own noise (the unraisable exceptions of its abandoned coroutines, the TensorStore
spec, the repr of a bound method) never reaches the terminal."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
from test_hostile_round3 import quick

from lenet_jax import checkpoint as ckpt
from lenet_jax.config import Config
from lenet_jax.errors import is_damage
from lenet_jax.factories import create_state

from conftest import run_script

NOISE = ("Exception ignored", "Traceback", "pybind11", "<bound method", "TensorStore", "tensorstore_spec")


def largest_data_file(step: Path) -> Path:
    """The largest of the OCDBT data files of a step's state (several arrays in it)."""
    return max((step / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_a_truncated_array_file_is_one_line_in_words_and_nothing_else(tmp_path):
    """train.py --resume over a newest step whose largest data file was cut to 10 bytes
    (a killed copy, a full disk): exit 0, the step moved aside and named in words with
    where it went, training goes on from the epoch before; eval.py on the same folder
    names it too (the demo server reads it the same way) and moves nothing. Neither
    prints a traceback, orbax's 'Exception ignored in: <coroutine object ...>' reports,
    the TensorStore spec or a bound method's repr. (Orbax printed those on about a third
    of such reads, as the garbage collector and TensorStore's threads fell; the test of
    ``quiet`` below shows them every time.)"""
    run = tmp_path / "R"
    first = run_script(*quick(tmp_path, "--epochs", "2", "--workdir", str(run)))
    assert first.returncode == 0, first.stderr[-3000:]
    step = run / "checkpoints" / "16"  # 64 images, batch 8: 8 updates an epoch
    data = largest_data_file(step)
    data.write_bytes(data.read_bytes()[:10])
    damaged = files_of(step)
    notice = (r"skipping checkpoint 16: its state does not load \(the end of epoch 2: "
              r"array (params|opt_state)(/\w+)+ could not be read \(a truncated file\)\)")

    evaluated = run_script("eval.py", "--workdir", str(run), "--epoch", "latest", "--summary")
    said = evaluated.stdout + evaluated.stderr
    assert evaluated.returncode == 0, said[-3000:]
    skipped = [line for line in evaluated.stderr.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and re.fullmatch(notice, skipped[0]) and "skipping" not in evaluated.stdout, said[-3000:]
    assert not [n for n in NOISE if n in said], said[-3000:]
    assert files_of(step) == damaged  # a reader moves nothing

    resumed = run_script(*quick(tmp_path, "--epochs", "3", "--workdir", str(run), "--resume"))
    said = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, said[-3000:]
    assert not [n for n in NOISE if n in said], said[-3000:]
    aside = run / "checkpoints" / "unloadable-16"
    skipped = [line for line in said.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and re.fullmatch(notice + re.escape(f"; moved to {aside}"), skipped[0]), skipped
    assert f"resuming {run} at the end of epoch 1" in resumed.stdout
    assert "done: test error" in resumed.stdout and "after 3 epochs" in resumed.stdout
    assert files_of(aside) == damaged  # moved whole, never deleted
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"8", "16", "24", "unloadable-16"}  # epoch 2 trained again


# --------------------------------------------------------------------------- which failures are damage


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoints folder holding one step (10) of a small SGD state."""
    folder = tmp_path_factory.mktemp("saved") / "checkpoints"
    mngr = ckpt.writer(folder)
    record = {"epoch": 1, "update": 10, "updates_per_epoch": 10, "config": Config(optimizer="sgd").to_dict()}
    ckpt.save(mngr, 10, create_state(Config(optimizer="sgd"), 10), record)
    mngr.close()
    return folder


def cut(path: Path, size: int | None = None) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 if size is None else size])


DAMAGES = {
    # the damage: (what it does to step 10, what orbax/TensorStore raise, which the notice names)
    "data file cut in half": (lambda s: cut(largest_data_file(s)), r"array \S+ could not be read \(a truncated file\)"),
    "data file emptied": (lambda s: cut(largest_data_file(s), 0), r"array \S+ could not be read \(a truncated file\)"),
    "data file deleted": (lambda s: largest_data_file(s).unlink(), r"array \S+ could not be read \(a truncated or damaged file\)"),
    "every data file cut": (lambda s: [cut(f, 10) for f in (s / "state").rglob("d/*")], r"array \S+ in state/d/\w+ could not be read"),
    "manifests deleted": (lambda s: [f.unlink() for f in (s / "state").rglob("manifest.ocdbt")], r"could not be read \(a missing file\)"),
    "manifests cut": (lambda s: [cut(f) for f in (s / "state").rglob("manifest.ocdbt")],
                      r"in state/manifest.ocdbt could not be read \(a truncated or damaged file\)"),
    "_METADATA cut": (lambda s: cut(s / "state" / "_METADATA", 5), r"state/_METADATA is not valid JSON \(a truncated or damaged file"),
    "_METADATA deleted": (lambda s: (s / "state" / "_METADATA").unlink(), r"state/_METADATA is missing"),
    "_METADATA other JSON": (lambda s: (s / "state" / "_METADATA").write_text('{"tree_metadata": 3}'), r"not orbax's tree metadata"),
    "array metadata cut": (lambda s: [cut(f, 5) for f in (s / "state" / "array_metadatas").iterdir()],
                           r"state/array_metadatas/\w+ is not valid JSON"),
    "state deleted": (lambda s: shutil.rmtree(s / "state"), r"state/_METADATA is missing"),
    "record cut": (lambda s: cut(s / "record" / "metadata", 5), r"record/metadata is not valid JSON"),
    "record deleted": (lambda s: (s / "record" / "metadata").unlink(), r"record/metadata is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_kind_of_damage_is_recognised_and_named_in_words(saved, tmp_path, damage):
    """What orbax 0.12.8 and TensorStore 0.1.86 raise for each damage (a bare Exception
    from orbax over TensorStore's OUT_OF_RANGE, FAILED_PRECONDITION, NOT_FOUND or
    DATA_LOSS ValueError; JSONDecodeError; FileNotFoundError; for a deleted _METADATA or
    state folder a tree-mismatch ValueError or a KeyError, which only the project's own
    check tells from a bug) is damage, and the one line says what could not be read."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    change, named = DAMAGES[damage]
    change(folder / "10")
    mngr = ckpt.reader(folder)
    target = create_state(Config(optimizer="sgd"), 10)
    with ckpt.quiet() as attempt, pytest.raises(Exception) as raised:  # the project's check first, then orbax
        attempt.failed = True
        ckpt.restore(mngr, 10, target)
    assert is_damage(raised.value), repr(raised.value)
    said = []
    with pytest.raises(ckpt.NoGoodCheckpoint, match="no checkpoint loads"):
        ckpt.restore_newest_good(mngr, lambda record: target, log=said.append)
    mngr.close()
    assert len(said) == 1 and said[0].startswith("skipping checkpoint 10: its "), said
    assert re.search(named, said[0]) and not [n for n in NOISE if n in said[0]], said[0]


def test_orbax_itself_raises_what_errors_names_as_damage(saved, tmp_path):
    """Straight from orbax (the project's own check bypassed): a cut data file and a cut
    manifest raise what ``is_damage`` recognises; a state of another tree, the same
    on-disk step intact, raises a ValueError that is not damage."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    mngr = ckpt.reader(folder)
    other_tree = create_state(Config(optimizer="adam"), 10)
    with pytest.raises(ValueError, match="tree structures do not match") as raised:
        mngr.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore(other_tree)))
    assert not is_damage(raised.value)
    cut(largest_data_file(folder / "10"), 10)
    target = create_state(Config(optimizer="sgd"), 10)
    with ckpt.quiet() as attempt:
        try:
            mngr.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            attempt.failed = True
            assert type(e) is Exception and "bound method" in str(e)  # orbax's wrapper: its message is no use
            assert type(e.__cause__) is ValueError and str(e.__cause__).startswith("OUT_OF_RANGE: Error reading")
            assert is_damage(e)
        else:
            raise AssertionError("a data file cut to 10 bytes loaded")
    for f in (folder / "10" / "state").rglob("manifest.ocdbt"):
        cut(f)
    with ckpt.quiet() as attempt, pytest.raises(ValueError, match="^DATA_LOSS: .*Error decoding") as raised:
        attempt.failed = True
        mngr.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    assert is_damage(raised.value)
    shutil.rmtree(folder / "10" / "record")  # an item folder gone (a step half deleted by a writer's prune)
    with pytest.raises(KeyError, match='Item "record" was not found in the checkpoint') as raised:
        mngr.restore(10, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    assert is_damage(raised.value) and not is_damage(KeyError("record"))
    mngr.close()


def test_a_step_a_writer_prunes_while_it_is_read_is_passed_over_whatever_orbax_raises(saved, tmp_path, monkeypatch):
    """A reader racing a writer's prune meets whatever orbax raises for a folder half
    deleted; a failure that is not damage, on a step that is gone an instant later, was
    a prune: passed over quietly, the next step read."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    shutil.copytree(folder / "10", folder / "20")
    real = ckpt.restore

    def pruned_under_the_reader(mngr, step, target):
        if step == 20:  # the writer's delete finishes an instant after the read failed
            threading.Timer(0.1, shutil.rmtree, (folder / "20",)).start()
            raise RuntimeError("whatever orbax raises for a folder that goes")
        return real(mngr, step, target)

    monkeypatch.setattr(ckpt, "restore", pruned_under_the_reader)
    mngr = ckpt.reader(folder)
    said = []
    step, _, _ = ckpt.restore_newest_good(mngr, lambda record: create_state(Config(optimizer="sgd"), 10), log=said.append)
    mngr.close()
    assert step == 10 and said == []


def test_a_state_of_another_tree_is_a_bug_not_damage_and_moves_nothing(saved, tmp_path):
    """A restore whose target no longer matches the saved tree (a changed model or
    optimiser: a bug in the code, not in the file) propagates orbax's ValueError as it
    is; the step is not skipped, not moved, not named as damaged."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    before = files_of(folder)
    mngr = ckpt.writer(folder)
    said, moved = [], []
    with pytest.raises(ValueError, match="tree structures do not match"):
        ckpt.restore_newest_good(mngr, lambda record: create_state(Config(optimizer="adam"), 10), log=said.append,
                                 damaged=lambda step: moved.append(step) or str(ckpt.move_aside(mngr, step)))
    mngr.close()
    assert said == [] and moved == [] and files_of(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["data file cut in half", "manifests deleted"])
def test_orbax_leaves_no_noise_behind_a_failed_read_and_puts_everything_back(saved, tmp_path, monkeypatch, recwarn, damage):
    """What orbax abandons when the read of one array fails (the reads of the others, on
    an event loop it has closed) is finished off inside ``quiet``. Left to the garbage
    collector and to TensorStore, about two of them per failed read print 'Exception
    ignored in: <coroutine object _read_array_index_and_device_put>' and the TensorStore
    spec, up to a second later, and now and then asyncio logs 'Task exception was never
    retrieved', or (a deleted manifest) Python warns 'coroutine
    'Store._get_array_metadatas' was never awaited'. Nothing reaches the hook, the
    asyncio logger or the warnings that were there before, during or after; the hook
    and the loggers' levels are as they were."""
    import gc
    import logging
    import sys
    import time

    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    DAMAGES[damage][0](folder / "10")
    reached = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reached.append(repr(unraisable.exc_value)))
    handler = logging.Handler()
    handler.emit = lambda record: reached.append(f"{record.name}: {record.getMessage()}")
    logging.getLogger("asyncio").addHandler(handler)
    hook, levels = sys.unraisablehook, [logging.getLogger(n).level for n in ckpt.quiet.LOGGERS]
    mngr = ckpt.reader(folder)
    target = create_state(Config(optimizer="sgd"), 10)
    try:
        for _ in range(8):
            with pytest.raises(ckpt.NoGoodCheckpoint):
                ckpt.restore_newest_good(mngr, lambda record: target, log=lambda m: None)
            time.sleep(0.2)
            gc.collect()
        mngr.close()
        time.sleep(0.5)
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert reached == [] and [str(w.message) for w in recwarn if "never awaited" in str(w.message)] == []
    assert sys.unraisablehook is hook and [logging.getLogger(n).level for n in ckpt.quiet.LOGGERS] == levels
    with ckpt.quiet() as attempt:  # anything that is not orbax's still reaches the hook
        attempt.failed = True
        sys.unraisablehook(type("Unraisable", (), {"object": None, "exc_value": KeyError("mine")})())
    assert reached == ["KeyError('mine')"]
