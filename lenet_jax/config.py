"""Run configuration: every option of ``train.py``, with the paper's setting as the default.

Where the paper is silent, the default is this project's choice, named as such in the
field's comment and in the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lenet_jax.data import DATASETS, SOURCES
from lenet_jax.distort import Distortion
from lenet_jax.hessian import ESTIMATORS
from lenet_jax.layers import ACTIVATIONS, CONV_IMPLS
from lenet_jax.losses import DEFAULT_J, Objective
from lenet_jax.model import C3_KINDS, CONVS, HEADS, SUBSAMPLINGS
from lenet_jax.sdlm import PAPER_ETAS, PAPER_MU

OPTIMIZERS = ("sdlm", "sgd", "momentum", "adam")
SCHEDULES = ("paper", "constant", "cosine")

DEFAULT_LR = {"sdlm": PAPER_ETAS[0] / 2, "sgd": 1e-3, "momentum": 1e-3, "adam": 1e-3}
"""Starting step per optimiser: for SDLM half the paper's eta (at the paper's 5e-4 batch-1
SDLM is unstable in its second pass here; see README), the others this project's."""

MODERN = dict(
    activation="relu", subsampling="max", c3="dense", head="softmax", loss="xent", optimizer="adam", lr=1e-3,
    schedule="cosine", batch_size=16, dropout=0.25, weight_decay=1e-4, init_scale=2.45, init_exponent=0.5,
)
"""The modern configuration, every component swapped at once (``Config(**MODERN)``):
ReLU, max pooling, dense C3, softmax cross-entropy, Adam at 1e-3 with cosine decay over
mini-batches of 16, dropout 0.25 on C5/F6, weight decay 1e-4, He-uniform initial
weights (sqrt(6 / F) = 2.45 / F^0.5)."""

RESUMABLE = ("epochs", "lr", "data_source", "data_dir", "cache_dir", "devices", "conv_impl", "chunks", "eval_batch_size", "keep")
"""The fields a resumed run may change: the number of epochs, the global step (to go on
at a smaller one) and how the run is executed. Every other field shapes the model, the
data or the optimiser, so a checkpoint written under one value cannot be continued under
another."""


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "mnist"
    data_source: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None
    train_subset: int | None = None
    validation_size: int = 0  # the paper reports test error after a fixed number of passes
    # model and loss
    head: str = "rbf"
    loss: str = "map"
    map_j: float = DEFAULT_J  # not given in the paper
    init_scale: float = 2.4  # weights uniform in +-init_scale / fan_in**init_exponent
    init_exponent: float = 0.6  # the paper's is 1, with which SDLM diverges here (README)
    activation: str = "scaled_tanh"
    subsampling: str = "trainable"
    c3: str = "table"
    conv: str = "plain"
    dropout: float = 0.0
    # distortions (section III-B's second result); the ranges are this project's choice
    distort: bool = False
    distort_translate: float = Distortion.translate
    distort_scale: float = Distortion.scale
    distort_squeeze: float = Distortion.squeeze
    distort_shear: float = Distortion.shear
    distort_probability: float = Distortion.probability
    # optimisation
    optimizer: str = "sdlm"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    schedule: str = "paper"
    momentum: float = 0.9
    weight_decay: float = 0.0  # L2 on the weights (not biases), added to the gradient
    mu: float = PAPER_MU
    hessian_estimator: str = "paper"
    hessian_samples: int = 500
    hutchinson_probes: int = 8
    epochs: int = 20
    batch_size: int = 1
    seed: int = 0
    # running
    devices: int = 0  # data-parallel devices; 0: all local ones (one for batch size 1)
    conv_impl: str = "auto"  # "auto": "custom_vjp" to train on CPU, "xla" elsewhere
    chunks: int = 10  # compiled pieces per epoch, for the progress bar
    eval_batch_size: int = 1000
    keep: int = 3

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def objective(self) -> Objective:
        return Objective(self.head, self.loss, self.map_j)

    @property
    def distortion(self) -> Distortion | None:
        """The training distortion, None without ``--distort``."""
        if not self.distort:
            return None
        return Distortion(self.distort_translate, self.distort_scale, self.distort_squeeze, self.distort_shear, self.distort_probability)

    def validate(self) -> "Config":
        """Raise ValueError with a one-line message for any value out of range."""
        choices = {
            "dataset": DATASETS,
            "data_source": SOURCES,
            "head": HEADS,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "hessian_estimator": ESTIMATORS,
            "conv_impl": ("auto",) + CONV_IMPLS,
            "activation": tuple(ACTIVATIONS),
            "subsampling": SUBSAMPLINGS,
            "c3": C3_KINDS,
            "conv": CONVS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of: {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "hessian_samples", "hutchinson_probes", "chunks", "eval_batch_size", "keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.devices < 0:
            raise ValueError(f"--devices must be 0 (all) or more, got {self.devices}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"--train-subset must be at least 1, got {self.train_subset}")
        if self.validation_size < 0:
            raise ValueError(f"--validation-size must be 0 or more, got {self.validation_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"--lr must be positive, got {self.learning_rate}")
        if not self.mu > 0:
            raise ValueError(f"--mu must be positive, got {self.mu}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        Distortion(self.distort_translate, self.distort_scale, self.distort_squeeze, self.distort_shear, self.distort_probability).validate()
        self.objective  # checks head/loss/j together
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
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)
