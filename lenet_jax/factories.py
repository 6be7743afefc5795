"""What a Config builds: the model, the optimiser with its schedule, and a fresh TrainState."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from lenet_jax import batch_minor
from lenet_jax.config import Config
from lenet_jax.conv import FORWARD_DIFFERENTIABLE
from lenet_jax.layers import Init
from lenet_jax.model import LeNet5, init_params
from lenet_jax.sdlm import paper_schedule, sdlm


def make_schedule(config: Config, updates_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the update count: the paper's per-epoch table
    (rescaled to ``config.learning_rate``), a cosine decay over the run, a tenth of the rate
    at each phase of ``phase_epochs`` (the QMNIST recipe), or a constant."""
    lr = config.learning_rate
    if config.schedule == "paper":
        return paper_schedule(updates_per_epoch, lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, config.epochs * updates_per_epoch)
    if config.schedule == "phases":
        return optax.exponential_decay(lr, config.phase_epochs * updates_per_epoch, 0.1, staircase=True)
    return optax.constant_schedule(lr)


def make_optimizer(config: Config, updates_per_epoch: int) -> optax.GradientTransformation:
    """SDLM (the paper), plain SGD, SGD with momentum or Adam, on the configured schedule,
    with L2 weight decay on the weights (not the biases) when configured."""
    schedule = make_schedule(config, updates_per_epoch)
    if config.optimizer == "sdlm":
        tx = sdlm(schedule, mu=config.mu)
    elif config.optimizer == "sgd":
        tx = optax.sgd(schedule)
    elif config.optimizer == "momentum":
        tx = optax.sgd(schedule, momentum=config.momentum)
    else:
        tx = optax.adam(schedule)
    if config.weight_decay:
        weights_only = lambda params: jax.tree.map_with_path(lambda path, _: path[-1].key != "bias", params)  # noqa: E731
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=weights_only), tx)
    return tx


def conv_impl_for(config: Config, inference: bool = False, forward_mode: bool = False, backend: str | None = None) -> str:
    """The convolution implementation a model of ``config`` uses. "auto" resolves by
    backend: "custom_vjp" to train on the CPU (its hand-written gradient is the fastest
    inside the compiled epoch there), "xla" on GPUs and TPUs. Inference (no gradient)
    runs "custom_vjp" as "xla", the fastest forward pass; ``forward_mode`` (a model
    ``jax.jvp`` differentiates) runs it as "patches"."""
    impl = config.conv_impl
    if impl == "auto":
        impl = "custom_vjp" if (backend or jax.default_backend()) == "cpu" else "xla"
    if inference and impl == "custom_vjp":
        impl = "xla"  # custom_vjp is a hand-written gradient: with none to take, the fastest forward pass
    if forward_mode and impl not in FORWARD_DIFFERENTIABLE:
        impl = "patches"
    return impl


def update_impl_for(config: Config) -> str:
    """How a chunk of updates runs: "xla" or "fused" (``lenet_jax.fused``). "auto" is
    "xla" on every backend: the fused kernel has been checked on the CPU (in Pallas'
    interpret mode, and lowered for CUDA) but not yet measured on a GPU."""
    impl = "xla" if config.update_impl == "auto" else config.update_impl
    if impl == "fused":
        from lenet_jax.fused import check_supported

        check_supported(config)
    return impl


def resolve(config: Config) -> Config:
    """``config`` with each "auto" of how it runs replaced by what it resolves to here:
    the convolution path that trains it and the implementation of its updates. A run
    saves the resolved config, so its config.json and checkpoints name the path that
    trained it, whatever a later version or another backend would pick for "auto"."""
    return config.replace(conv_impl=conv_impl_for(config), update_impl=update_impl_for(config))


def make_model(config: Config, inference: bool = False, forward_mode: bool = False) -> LeNet5:
    """The LeNet5 module ``config`` describes (see ``conv_impl_for`` for the two flags).
    Every convolution implementation computes the same function of the same parameters."""
    return LeNet5(
        head=config.head, initialization=Init(exponent=config.init_exponent, scale=config.init_scale, bias=config.bias_init,
                            count_bias=config.init_fan_in == "inputs+bias"),
        conv_impl=conv_impl_for(config, inference, forward_mode), precision=config.precision,
        activation=config.activation, subsampling=config.subsampling, c3=config.c3, conv=config.conv, dropout=config.dropout,
        input_scaling=config.input_scaling, coefficient_init=config.coefficient_init,
    )


@dataclasses.dataclass(frozen=True)
class Inference:
    """``model.apply`` for evaluation. With ``batch_minor`` set, the class scores (the
    default method) of calls with at least ``batch_minor.MIN_IMAGES`` images come from
    ``lenet_jax.batch_minor``, the same function laid out for the CPU; smaller calls and
    every other method (``activations``, ``read``, ...) are the module's."""

    model: LeNet5
    batch_minor: bool

    def __call__(self, variables: dict[str, Any], x: jax.Array, method: Any = None, **kwargs: Any) -> Any:
        if self.batch_minor and method is None and not kwargs and np.prod(x.shape[:-3]) >= batch_minor.MIN_IMAGES:
            return batch_minor.scores(variables["params"], x, self.model)
        return self.model.apply(variables, x, method=method, **kwargs)


def make_inference(config: Config, backend: str | None = None) -> Inference:
    """The forward pass a training run evaluates each epoch with: on the CPU, where
    training runs "custom_vjp" (``conv_impl`` "auto" or "custom_vjp"), the batch-minor
    layout (about twice the rate of the NHWC convolutions at 1,000 images, for about 2 s
    more compiling; docs/speed.md); elsewhere, and for what that layout does not
    compute, the module itself."""
    model = make_model(config, inference=True)
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return Inference(model, on_cpu and conv_impl_for(config, backend="cpu") == "custom_vjp" and batch_minor.unsupported(model) is None)


_compiled_init = jax.jit(init_params, static_argnums=0)
"""``model.init`` compiled: the same parameters, in half the time of running it op by op."""


def create_states(config: Config, updates_per_epoch: int, seeds: list[int]) -> list[TrainState]:
    """A fresh TrainState for each seed of ``seeds`` (the config's own otherwise equal):
    parameters drawn from the seed, one model and one optimiser shared by all, so the
    states stack into one for several models trained at once. The schedule needs
    ``updates_per_epoch``."""
    model = make_model(config)
    tx = make_optimizer(config, updates_per_epoch)
    states = []
    for seed in seeds:
        params = _compiled_init(model, jax.random.fold_in(jax.random.key(seed), 0))
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        states.append(state.replace(step=jnp.zeros((), jnp.int32)))  # an array from the start: the first chunk is not traced twice
    return states


def create_state(config: Config, updates_per_epoch: int) -> TrainState:
    """A fresh TrainState for ``config``, its parameters drawn from its seed."""
    return create_states(config, updates_per_epoch, [config.seed])[0]
