"""``finite.all_finite``: the one test of "every value finite" that the compiled steps,
the pretrained loader and the checkpoints share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.finite import all_finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_entry_anywhere_makes_a_tree_not_finite(bad):
    tree = {"a": np.zeros((3, 2), np.float32), "b": [jnp.ones(4), np.arange(5)]}
    assert bool(all_finite(tree))
    tree["b"][0] = tree["b"][0].at[2].set(bad)
    assert not bool(all_finite(tree))
    assert not bool(jax.jit(all_finite)(tree))  # traced too, as the compiled steps use it


def test_leaves_that_cannot_be_non_finite_count_as_finite():
    assert bool(all_finite({"count": np.int32(3), "key": jax.random.key(0), "x": 1.5}))
    assert bool(all_finite({})) and not bool(all_finite([float("nan")]))
