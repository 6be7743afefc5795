"""SDLM: the optax transformation, the schedule, and the three Hessian-diagonal estimators
checked against dense references and an independent numpy evaluation of the paper's recursion."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from lenet_jax import hessian
from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.config import Config
from lenet_jax.factories import make_optimizer
from lenet_jax.layers import AMPLITUDE, C3_TABLE, SLOPE, FullConnection, ScaledTanh, connection_mask
from lenet_jax.losses import Objective, softmax_cross_entropy
from lenet_jax.model import LeNet5
from lenet_jax.sdlm import PAPER_ETAS, PAPER_MU, get_hessian, paper_schedule, scale_by_inverse_curvature, sdlm, set_hessian

from conftest import compiled_init, gauss_newton_diagonal, hutchinson_diagonal, paper_diagonal

# --------------------------------------------------------------------------- the optimiser


def test_sdlm_step_matches_a_hand_computation():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    grads = {"a": jnp.array([0.3, -0.1]), "b": jnp.array(2.0)}
    h = {"a": jnp.array([0.0, 3.0]), "b": jnp.array(0.48)}
    tx = sdlm(learning_rate=1e-3, mu=0.02)
    state = set_hessian(tx.init(params), h)
    updates, _ = tx.update(grads, state, params)
    expected = {"a": [-1e-3 / 0.02 * 0.3, -1e-3 / 3.02 * -0.1], "b": -1e-3 / 0.5 * 2.0}
    chex.assert_trees_all_close(updates, {k: jnp.asarray(v) for k, v in expected.items()}, rtol=1e-6)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new["b"], jnp.asarray(0.5 - 0.004), rtol=1e-6)


def test_hessian_can_be_passed_as_an_extra_argument_and_is_kept():
    params = {"w": jnp.ones(3)}
    tx = scale_by_inverse_curvature(mu=0.5)
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state, hessian={"w": jnp.array([0.5, 1.5, 0.0])})
    chex.assert_trees_all_close(updates["w"], jnp.array([1.0, 0.5, 2.0]))
    updates, _ = tx.update({"w": jnp.ones(3)}, state)
    chex.assert_trees_all_close(updates["w"], jnp.array([1.0, 0.5, 2.0]))
    chex.assert_trees_all_close(get_hessian(state)["w"], jnp.array([0.5, 1.5, 0.0]))


def test_sdlm_chains_with_other_optax_transformations():
    params = {"w": jnp.ones(2)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), sdlm(0.1))
    state = set_hessian(tx.init(params), {"w": jnp.array([0.0, 0.98])})
    updates, _ = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, state, params)
    chex.assert_trees_all_close(updates["w"], jnp.array([-0.1 / 0.02 * 0.6, -0.1 / 1.0 * 0.8]), rtol=1e-5)


def test_masked_c3_weights_get_no_step(rbf_model, digits):
    model, params = rbf_model
    x, y = digits[0][:1], digits[1][:1]
    objective = Objective(j=3.0)  # the estimate below the recursion's test compiles too (one digit, this objective)
    h = paper_diagonal(model, objective, params, x, y)
    tx = sdlm(5e-4)
    state = set_hessian(tx.init(params), h)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(objective.per_sample(model.apply({"params": p}, x), y))))(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    off = connection_mask(C3_TABLE, 6) == 0
    assert np.all(np.asarray(updates["C3"]["kernel"])[:, :, off] == 0)
    assert np.all(np.asarray(h["C3"]["kernel"])[:, :, off] == 0)


def test_sdlm_converges_on_an_ill_conditioned_quadratic():
    """With the exact Hessian diagonal held, SDLM is a damped Newton step per coordinate:
    it solves a diagonal quadratic whose curvatures span 1e-3..1e3 in a few steps, where
    plain gradient descent at its largest stable step barely moves the flat coordinates."""
    curvature = jnp.logspace(-3, 3, 7)
    target = jnp.linspace(-1.0, 1.0, 7)
    loss = lambda w: 0.5 * jnp.sum(curvature * (w - target) ** 2)  # noqa: E731

    def solve(tx, hessian=None):
        w = jnp.zeros(7)
        state = tx.init(w) if hessian is None else set_hessian(tx.init(w), hessian)
        for _ in range(30):
            updates, state = tx.update(jax.grad(loss)(w), state, w)
            w = optax.apply_updates(w, updates)
        return w

    w = solve(sdlm(0.9, mu=1e-4), hessian=curvature)
    np.testing.assert_allclose(w, target, atol=1e-4)
    w_sgd = solve(optax.sgd(1.0 / float(curvature[-1])))
    assert float(jnp.abs(w_sgd - target)[0]) > 0.9 * float(jnp.abs(target[0]))


def test_sdlm_under_inject_hyperparams_and_jit():
    """The learning rate and mu become state that can be changed while compiled."""
    params = {"w": jnp.array([1.0, -2.0])}
    tx = optax.inject_hyperparams(sdlm)(learning_rate=1e-2, mu=0.5)
    state = set_hessian(tx.init(params), {"w": jnp.array([1.5, 0.0])})
    update = jax.jit(tx.update)
    updates, state = update({"w": jnp.array([2.0, 1.0])}, state, params)
    chex.assert_trees_all_close(updates["w"], jnp.array([-1e-2 * 2.0 / 2.0, -1e-2 * 1.0 / 0.5]), rtol=1e-6)
    state.hyperparams["mu"] = jnp.asarray(1.5)
    updates, _ = update({"w": jnp.array([2.0, 1.0])}, state, params)
    chex.assert_trees_all_close(updates["w"], jnp.array([-1e-2 * 2.0 / 3.0, -1e-2 * 1.0 / 1.5]), rtol=1e-6)
    chex.assert_trees_all_close(get_hessian(state)["w"], jnp.array([1.5, 0.0]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_sdlm_keeps_the_parameters_dtype(dtype):
    """A float32 estimate set on low-precision parameters is held, and steps, in their dtype."""
    params = {"w": jnp.ones(3, dtype)}
    tx = sdlm(paper_schedule(10), mu=PAPER_MU)
    state = set_hessian(tx.init(params), {"w": jnp.array([0.5, 1.0, 2.0], jnp.float32)})
    assert get_hessian(state)["w"].dtype == dtype
    updates, state = jax.jit(tx.update)({"w": jnp.ones(3, dtype)}, state, params)
    assert updates["w"].dtype == dtype and get_hessian(state)["w"].dtype == dtype
    _, state = tx.update({"w": jnp.ones(3, dtype)}, state, params, hessian={"w": jnp.ones(3, jnp.float32)})
    assert get_hessian(state)["w"].dtype == dtype


def test_a_bad_mu_is_refused_but_a_traced_one_is_not_checked():
    with pytest.raises(ValueError, match="mu must be positive"):
        scale_by_inverse_curvature(mu=0.0)

    def step(mu: jax.Array) -> jax.Array:  # mu traced: built and applied without the check
        tx = scale_by_inverse_curvature(mu)
        updates, _ = tx.update({"w": jnp.full(2, 3.0)}, tx.init({"w": jnp.ones(2)}), hessian={"w": jnp.array([0.5, 1.0])})
        return updates["w"]

    chex.assert_trees_all_close(jax.jit(step)(jnp.asarray(0.25)), jnp.array([3.0 / 0.75, 3.0 / 1.25]))


def test_sdlm_without_an_estimate_says_so_and_never_steps_silently():
    params = {"w": jnp.ones(3)}
    tx = sdlm(1e-3)
    state = tx.init(params)
    with pytest.raises(ValueError, match="sdlm has no curvature estimate"):
        tx.update({"w": jnp.ones(3)}, state, params)
    updates, _ = jax.jit(tx.update)({"w": jnp.ones(3)}, state, params)  # traced: the estimate cannot be looked at
    assert bool(jnp.all(jnp.isnan(updates["w"])))
    updates, _ = tx.update({"w": jnp.ones(3)}, set_hessian(state, {"w": jnp.zeros(3)}), params)
    chex.assert_trees_all_close(updates["w"], jnp.full(3, -1e-3 / PAPER_MU))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_sdlm_on_the_other_schedules_steps_by_the_rate_of_each_update(schedule):
    """The optimiser a config builds: SDLM's step -eta(t) g / (mu + h), eta(t) constant or
    lr (1 + cos(pi t / T)) / 2 over the run's T updates, computed here by hand."""
    config = Config(schedule=schedule, lr=1e-3, epochs=2)
    params = {"w": jnp.ones(2)}
    tx = make_optimizer(config, updates_per_epoch=5)
    state = set_hessian(tx.init(params), {"w": jnp.array([0.0, 0.48])})
    for t in range(10):
        updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params)
        eta = 1e-3 if schedule == "constant" else 1e-3 * (1 + np.cos(np.pi * t / 10)) / 2
        chex.assert_trees_all_close(updates["w"], jnp.array([-eta / 0.02 * 1.0, -eta / 0.5 * 2.0]), rtol=1e-5, atol=1e-12)


def test_momentum_is_sgd_with_a_velocity():
    """--optimizer momentum: v <- m v + g, w <- w - lr v (the velocity carried between updates)."""
    config = Config(optimizer="momentum", lr=0.1, momentum=0.9, schedule="constant")
    params = {"w": jnp.zeros(2)}
    tx = make_optimizer(config, updates_per_epoch=10)
    state = tx.init(params)
    velocity = np.zeros(2)
    for g in ([1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        velocity = 0.9 * velocity + np.asarray(g)
        chex.assert_trees_all_close(updates["w"], jnp.asarray(-0.1 * velocity, jnp.float32), rtol=1e-6)


def test_estimators_are_registered_with_their_differentiation_mode():
    assert set(hessian.ESTIMATORS) == {"paper", "gauss_newton", "hutchinson"}
    assert [name for name, e in hessian.ESTIMATORS.items() if e.forward_mode] == ["hutchinson"]
    assert isinstance(LeNet5(), hessian.CurvatureModel)
    with pytest.raises(ValueError, match="unknown Hessian estimator 'exact'; choose from paper, gauss_newton, hutchinson"):
        hessian.get_estimator("exact")


def test_paper_schedule_by_pass():
    """Every update of 20 epochs of 7 updates steps at its own epoch's rate: a change of
    rate one update early or late fails (the first and the last update of each epoch)."""
    spp = 7
    schedule = paper_schedule(spp)
    by_update = np.asarray(jax.vmap(schedule)(jnp.arange(20 * spp)))
    by_pass = [5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 8
    np.testing.assert_allclose(by_update, np.repeat(by_pass, spp), rtol=1e-6)
    np.testing.assert_allclose(float(paper_schedule(spp, 1e-2)(3 * spp)), 1e-2 * PAPER_ETAS[3] / PAPER_ETAS[0], rtol=1e-6)


# --------------------------------------------------------------------------- dense reference


def _flat(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([jnp.ravel(l) for l in leaves])


def dense_output_curvature(objective, out, label):
    """H w.r.t. the network output, built with jax.hessian (not from curvature_factor)."""
    if objective.head == "softmax":
        return jax.hessian(lambda z: softmax_cross_entropy(z[None], label[None])[0])(out)
    centres = jnp.asarray(RBF_CENTRES)
    penalties = lambda x: jnp.sum((x[None] - centres) ** 2, -1)
    lse = lambda p: jax.nn.logsumexp(jnp.concatenate([-p, jnp.array([-objective.j])]))
    jac = jax.jacfwd(penalties)(out)
    return 2 * jnp.eye(out.shape[0]) + jac.T @ jax.hessian(lse)(penalties(out)) @ jac


def dense_gauss_newton_diagonal(model, objective, params, x, y):
    """diag(J^T H J) per sample, J by jax.jacrev over the flattened parameters, averaged."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    @jax.jit
    def one(xi, yi):
        f = lambda w: model.apply({"params": unravel(w)}, xi[None], method="outputs")[0]  # noqa: E731
        jac = jax.jacrev(f)(flat)
        h = dense_output_curvature(objective, f(flat), yi)
        return jnp.einsum("oi,op,pi->i", jac, h, jac)

    return unravel(sum(one(x[i], y[i]) for i in range(x.shape[0])) / x.shape[0])


@pytest.mark.slow  # a dense Jacobian (~10 s); the fast tier checks the estimator against the paper's where the two coincide
@pytest.mark.parametrize("head,loss", [("rbf", "map"), ("softmax", "xent")])
def test_gauss_newton_estimator_equals_the_dense_diagonal(head, loss, digits):
    model = LeNet5(head=head)
    params = compiled_init(model, jax.random.key(1))
    objective = Objective(head, loss, 3.0)
    x, y = digits[0][:1], digits[1][:1]
    got = gauss_newton_diagonal(model, objective, params, x, y)
    expected = dense_gauss_newton_diagonal(model, objective, params, x, y)
    chex.assert_trees_all_close(got, expected, rtol=2e-3, atol=1e-7)
    assert all(float(jnp.min(l)) >= 0 for l in jax.tree.leaves(got))


@pytest.mark.slow
def test_hutchinson_converges_to_the_gauss_newton_diagonal(rbf_model, digits):
    model, params = rbf_model
    objective = Objective()
    x, y = digits[0][:2], digits[1][:2]
    exact = _flat(gauss_newton_diagonal(model, objective, params, x, y))

    def rel_error(probes):
        est = _flat(hutchinson_diagonal(model, objective, params, x, y, jax.random.key(7), probes=probes))
        assert float(jnp.min(est)) >= 0
        return float(jnp.linalg.norm(est - exact) / jnp.linalg.norm(exact))

    few, many = rel_error(4), rel_error(1024)
    assert many < few / 4  # Monte Carlo error shrinks like 1/sqrt(probes): 16x -> 4x
    assert many < 0.15


# --------------------------------------------------------------------------- the paper's recursion


def _np_conv(x, k):
    win = sliding_window_view(x, k.shape[:2], axis=(0, 1))  # (Ho, Wo, C, kh, kw)
    return np.einsum("hwcij,ijcf->hwf", win, k)


def numpy_paper_diagonal(params, image, out_curvature_diag, subsampling="trainable"):
    """The spec's recursion, evaluated layer by layer in float64 numpy on one image:
    d2E/da^2 = f'(a)^2 d2E/dx^2, d2E/dx_j^2 = sum_i w_ij^2 d2E/da_i^2,
    d2E/dw_ij^2 = x_j^2 d2E/da_i^2 summed over the connections sharing w. With a fixed
    subsampling, S2/S4 have no parameters and pass d2E/da^2 to their inputs with weight
    1/16 each (average) or 1 to the window's maximum (max; 1/n^2 each for n tied maxima)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    mask = connection_mask(C3_TABLE, 6).astype(np.float64)
    f = lambda a: AMPLITUDE * np.tanh(SLOPE * a)
    fprime = lambda a: AMPLITUDE * SLOPE / np.cosh(SLOPE * a) ** 2
    kernels = {"C1": p["C1"]["kernel"], "C3": p["C3"]["kernel"] * mask, "C5": p["C5"]["kernel"]}

    def sub(x, q):
        h, w, c = x.shape
        win = x.reshape(h // 2, 2, w // 2, 2, c)
        if subsampling == "average":
            return win.mean((1, 3))
        if subsampling == "max":
            return win.max((1, 3))
        return win.sum((1, 3)) * q["coefficient"] + q["bias"]

    xs, pre = [np.asarray(image, np.float64)], []
    for name in ("C1", "S2", "C3", "S4", "C5", "F6"):
        x = xs[-1]
        if name in kernels:
            a = _np_conv(x, kernels[name]) + p[name]["bias"]
        elif name.startswith("S"):
            a = sub(x, p.get(name))
        else:
            a = x.reshape(-1) @ p[name]["kernel"] + p[name]["bias"]
        pre.append(a)
        xs.append(f(a))

    out = {}
    d2x = np.asarray(out_curvature_diag, np.float64)
    for idx in reversed(range(6)):
        name = ("C1", "S2", "C3", "S4", "C5", "F6")[idx]
        x_in, d2a = xs[idx], fprime(pre[idx]) ** 2 * d2x
        if name == "F6":
            xin = x_in.reshape(-1)
            out[name] = {"kernel": np.outer(xin**2, d2a), "bias": d2a}
            d2x = ((p[name]["kernel"] ** 2) @ d2a).reshape(x_in.shape)
        elif name.startswith("S") and subsampling == "average":
            d2x = np.repeat(np.repeat(d2a / 16, 2, 0), 2, 1)
        elif name.startswith("S") and subsampling == "max":
            h, w, c = x_in.shape
            windows = x_in.reshape(h // 2, 2, w // 2, 2, c).transpose(0, 2, 4, 1, 3).reshape(h // 2, w // 2, c, 4)
            tied = (windows == windows.max(-1, keepdims=True)).astype(np.float64)  # flat background: many ties
            weight = tied / tied.sum(-1, keepdims=True)  # the gradient's share of each tied maximum
            d2x = (weight**2 * d2a[..., None]).reshape(h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2).reshape(h, w, c)
        elif name.startswith("S"):
            h, w, c = x_in.shape
            sq = (x_in**2).reshape(h // 2, 2, w // 2, 2, c).sum((1, 3))
            out[name] = {"coefficient": (sq * d2a).sum((0, 1)), "bias": d2a.sum((0, 1))}
            d2x = np.repeat(np.repeat(d2a * p[name]["coefficient"] ** 2, 2, 0), 2, 1)
        else:
            k = kernels[name]
            kh, kw = k.shape[:2]
            ho, wo = d2a.shape[:2]
            win = sliding_window_view(x_in**2, (kh, kw), axis=(0, 1))
            kernel_h = np.einsum("hwcij,hwf->ijcf", win, d2a) * (mask if name == "C3" else 1.0)
            out[name] = {"kernel": kernel_h, "bias": d2a.sum((0, 1))}
            d2x = np.zeros_like(x_in)
            for i in range(kh):
                for j in range(kw):
                    d2x[i : i + ho, j : j + wo] += d2a @ (k[i, j] ** 2).T
    return out


def test_paper_estimator_equals_a_numpy_evaluation_of_the_recursion(rbf_model, digits):
    model, params = rbf_model
    objective = Objective(j=3.0)
    x, y = digits[0][:1], digits[1][:1]
    got = paper_diagonal(model, objective, params, x, y)
    outputs = model.apply({"params": params}, x, method="outputs")
    factor = objective.curvature_factor(outputs[0], y[0])
    expected = numpy_paper_diagonal(params, np.asarray(x[0]), np.sum(np.asarray(factor) ** 2, 0))
    for name in expected:
        for leaf in expected[name]:
            np.testing.assert_allclose(np.asarray(got[name][leaf]), expected[name][leaf], rtol=1e-3, atol=1e-9, err_msg=f"{name}/{leaf}")


@pytest.mark.parametrize("subsampling", ["max", pytest.param("average", marks=pytest.mark.slow)])
def test_paper_estimator_with_a_fixed_subsampling_follows_the_recursion(subsampling, digits):
    model = LeNet5(subsampling=subsampling)
    params = compiled_init(model, jax.random.key(3))
    objective = Objective(j=3.0)
    x, y = digits[0][1:2], digits[1][1:2]
    got = paper_diagonal(model, objective, params, x, y)
    assert "S2" not in got and "S4" not in got
    outputs = model.apply({"params": params}, x, method="outputs")
    factor = objective.curvature_factor(outputs[0], y[0])
    expected = numpy_paper_diagonal(params, np.asarray(x[0]), np.sum(np.asarray(factor) ** 2, 0), subsampling)
    for name in expected:
        for leaf in expected[name]:
            np.testing.assert_allclose(np.asarray(got[name][leaf]), expected[name][leaf], rtol=1e-3, atol=1e-9, err_msg=f"{name}/{leaf}")


class SinglePathNet(nn.Module):
    """One hidden layer of 5 squashed units and one output: every weight reaches the output
    along exactly one path, so the paper's recursion has no cross terms to ignore."""

    def setup(self):
        self.hidden = FullConnection(5)
        self.out = FullConnection(1)
        self.squash = ScaledTanh()

    def trace(self, x):
        hidden = self.squash(self.hidden(x))
        return self.out(hidden), [hidden]

    def outputs(self, x):
        return self.trace(x)[0]

    def squared_network(self, x, activations):
        (hidden,) = activations
        a = self.hidden(jnp.square(x))
        slope = AMPLITUDE * SLOPE * (1 - (hidden / AMPLITUDE) ** 2)
        u = jax.lax.stop_gradient(hidden**2) + jax.lax.stop_gradient(slope**2) * (a - jax.lax.stop_gradient(a))
        return self.out(u)


def test_paper_estimator_equals_gauss_newton_where_the_two_coincide():
    net = SinglePathNet()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    y = jnp.zeros(6, jnp.int32)
    params = net.init(jax.random.key(1), x, method="trace")["params"]
    objective = Objective("rbf", "mse")  # curvature 2 on the single output
    paper = paper_diagonal(net, objective, params, x, y)
    exact = gauss_newton_diagonal(net, objective, params, x, y)
    chex.assert_trees_all_close(paper, exact, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_paper_and_gauss_newton_differ_on_lenet5(rbf_model, digits):
    model, params = rbf_model
    x, y = digits[0][:2], digits[1][:2]
    paper = paper_diagonal(model, Objective(), params, x, y)
    exact = gauss_newton_diagonal(model, Objective(), params, x, y)
    a, b = paper["C1"]["kernel"], exact["C1"]["kernel"]  # shared weights, many paths
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) > 0.01
    chex.assert_trees_all_close(paper["F6"]["bias"], exact["F6"]["bias"], rtol=1e-4)  # one path
    assert float(jnp.min(_flat(paper))) >= 0
