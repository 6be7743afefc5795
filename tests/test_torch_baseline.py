"""The PyTorch baseline of bench/ computes the same function as lenet_jax: same weights
in, same MAP loss and gradients out. Skipped where PyTorch is not installed (it is not a
project requirement: `pip install torch==2.13.0`)."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lenet_jax.inputs import preprocess  # noqa: E402
from lenet_jax.layers import Init  # noqa: E402
from lenet_jax.losses import Objective  # noqa: E402
from lenet_jax.model import LeNet5, init_params  # noqa: E402


@pytest.fixture(scope="module")
def baseline():
    return importlib.import_module("bench.torch_baseline")


@pytest.mark.slow
def test_same_weights_same_loss_and_gradients(baseline, mnist):
    model = LeNet5(initialization=Init(exponent=0.6))
    params = init_params(model, jax.random.key(3))
    images, labels = mnist.train_images[:16], mnist.train_labels[:16]
    objective = Objective("rbf", "map")

    def loss(p):
        return objective.per_sample(model.apply({"params": p}, preprocess(images)), labels).mean()

    value, grads = jax.value_and_grad(loss)(params)

    net = baseline.LeNet5()
    baseline.load_jax_params(net, params)
    t_loss = baseline.map_loss(net(baseline.preprocess(images)), torch.as_tensor(labels.astype(np.int64)))
    t_loss.backward()
    assert abs(t_loss.detach().item() - float(value)) <= 1e-5 * abs(float(value))

    def close(t_grad, j_grad):
        j_grad = np.asarray(j_grad)
        assert np.max(np.abs(t_grad.numpy() - j_grad)) <= 1e-4 * np.max(np.abs(j_grad))

    for name in ("c1", "c3", "c5"):
        g = grads[name.upper()]
        close(getattr(net, name).weight.grad.permute(2, 3, 1, 0), g["kernel"])
        close(getattr(net, name).bias.grad, g["bias"])
    for name in ("s2", "s4"):
        close(getattr(net, name).coefficient.grad, grads[name.upper()]["coefficient"])
        close(getattr(net, name).bias.grad, grads[name.upper()]["bias"])
    close(net.f6.weight.grad.T, grads["F6"]["kernel"])
    close(net.f6.bias.grad, grads["F6"]["bias"])
