"""The paper's batch-1 SDLM update fused into one Pallas kernel per chunk of updates.

At batch size 1 an update of LeNet-5 is about 2.3 MFLOP spread over a few dozen small
XLA kernels, so on a GPU it is bound by their launch latency, not by arithmetic. This
module runs a whole chunk of updates inside one kernel launch: one program loops over
the chunk's patterns, and for each runs the forward pass, the backward pass and the SDLM
update, the parameters staying in the kernel's own buffers between patterns.

Everything is written with what the Triton backend of Pallas lowers: whole-array loads
of power-of-two blocks, gather loads from global memory by index tables, matrix products
of at least 16x16, elementwise arithmetic, reductions and loops. Every layer is laid out
on padded power-of-two blocks:

  C1     the 5x5 windows of the image gathered as (256 positions, 32 taps), once for each
         of the four 2x2 sub-grids that S2 sums, times the (32, 16) kernel;
  S2     the sum of the four sub-grids, times a coefficient, plus a bias, per map;
  C3     the windows of S2 gathered (from a scratch buffer) as (32 positions, 256 =
         25 taps x 6 maps), once per sub-grid of S4, times the masked (256, 16) kernel;
  S4     as S2;  C5 and F6: vector-matrix products;  the RBF and the MAP loss as written.

The backward pass is written out layer by layer; a convolution's input gradient is a
gather of the window gradients (the adjoint of the window gather) from a scratch buffer.
Between a store to a scratch buffer and the loads that read it back the kernel waits
at a barrier, so every thread sees every value.

Only the paper's configuration is fused (RBF head, MAP loss, scaled tanh, trainable
subsampling, table I, plain convolutions, SDLM, batch size 1, no dropout, distortion or
weight decay); ``check_supported`` says what else a config asks for. On the CPU the
kernel runs in Pallas' interpret mode (for testing: it computes what the compiled
kernel computes); ``tests/test_fused.py`` checks it against the XLA path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.experimental import pallas as pl

from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.config import Config
from lenet_jax.inputs import BACKGROUND, INK
from lenet_jax.layers import AMPLITUDE, C3_TABLE, SLOPE, connection_mask
from lenet_jax.sdlm import get_hessian

REQUIRED = dict(head="rbf", loss="map", activation="scaled_tanh", subsampling="trainable", c3="table", conv="plain",
                optimizer="sdlm", batch_size=1, dropout=0.0, distort=False, weight_decay=0.0)
"""The settings the fused kernel implements (the paper's configuration at batch 1)."""

SCALE = (INK - BACKGROUND) / 255.0
HIGHEST = jax.lax.Precision.HIGHEST


def check_supported(config: Config) -> None:
    """ValueError naming every setting of ``config`` the fused step does not implement."""
    other = [f"--{k.replace('_', '-')} {getattr(config, k)!r}" for k, v in REQUIRED.items() if getattr(config, k) != v]
    if config.precision != "float32":
        other.append(f"--precision {config.precision!r}")
    if other:
        raise ValueError("--step-impl fused runs the paper's configuration at batch 1 only; this run asks for " + ", ".join(other))


# --------------------------------------------------------------------------- index tables


def _tables() -> dict[str, np.ndarray]:
    """The gather tables of the padded layout (constants of the architecture)."""
    t = {}
    # C1 windows: for sub-grid (a, b), position (i, j) of S2 (row i*16 + j), tap (di, dj) (column di*5 + dj):
    # the image pixel (2i + a + di, 2j + b + dj) of the padded 32x32 image, as a flat index.
    c1, c1_mask = np.zeros((4, 256, 32), np.int32), np.zeros((4, 256, 32), np.float32)
    for g, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for i in range(14):
            for j in range(14):
                for di in range(5):
                    for dj in range(5):
                        c1[g, i * 16 + j, di * 5 + dj] = (2 * i + a + di) * 32 + (2 * j + b + dj)
                        c1_mask[g, i * 16 + j, di * 5 + dj] = 1.0
    t["c1"], t["c1_mask"] = c1, c1_mask
    # C3 windows: for sub-grid (a, b) of S4, position (u, v) (row u*5 + v), tap (di, dj) and S2 map m
    # (column (di*5 + dj)*6 + m): S2 at (2u + a + di, 2v + b + dj), map m, in the (256, 16) S2 buffer.
    c3, c3_mask = np.zeros((4, 32, 256), np.int32), np.zeros((4, 32, 256), np.float32)
    # The adjoint: the S2 gradient at (i, j), map m, gathers the window gradient of every C3 position and tap
    # that read it; one table per tap (the C3 position is then (i - di, j - dj)).
    back, back_mask = np.zeros((25, 256, 16), np.int32), np.zeros((25, 256, 16), np.float32)
    for g, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for u in range(5):
            for v in range(5):
                for di in range(5):
                    for dj in range(5):
                        for m in range(6):
                            i, j = 2 * u + a + di, 2 * v + b + dj
                            src = ((g * 32) + u * 5 + v) * 256 + (di * 5 + dj) * 6 + m
                            c3[g, u * 5 + v, (di * 5 + dj) * 6 + m] = (i * 16 + j) * 16 + m
                            c3_mask[g, u * 5 + v, (di * 5 + dj) * 6 + m] = 1.0
                            back[di * 5 + dj, i * 16 + j, m] = src
                            back_mask[di * 5 + dj, i * 16 + j, m] = 1.0
    t["c3"], t["c3_mask"], t["back"], t["back_mask"] = c3, c3_mask, back, back_mask
    mask = np.zeros((256, 16), np.float32)
    mask[:150] = np.tile(connection_mask(C3_TABLE, 6), (25, 1))  # row (tap*6 + m) reads map m
    t["w3_mask"] = mask
    rows = np.zeros(256, np.float32)
    rows[[i * 16 + j for i in range(14) for j in range(14)]] = 1.0
    t["s2_rows"] = np.repeat(rows[:, None], 16, axis=1)
    t["s4_rows"] = np.repeat((np.arange(32) < 25).astype(np.float32)[:, None], 16, axis=1)
    return t


TABLES = _tables()


# --------------------------------------------------------------------------- packing


def _pad(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def pack(params: Any) -> list[jax.Array]:
    """LeNet-5's parameter tree as the kernel's padded buffers, in kernel order."""
    p = params
    return [
        _pad(p["C1"]["kernel"].reshape(25, 6), (32, 16)), _pad(p["C1"]["bias"], (16,)),
        _pad(p["S2"]["coefficient"], (16,)), _pad(p["S2"]["bias"], (16,)),
        _pad(p["C3"]["kernel"].reshape(150, 16), (256, 16)), p["C3"]["bias"],
        p["S4"]["coefficient"], p["S4"]["bias"],
        _pad(p["C5"]["kernel"].reshape(400, 120), (512, 128)), _pad(p["C5"]["bias"], (128,)),
        _pad(p["F6"]["kernel"], (128, 128)), _pad(p["F6"]["bias"], (128,)),
    ]


def unpack(buffers: list[jax.Array], like: Any) -> Any:
    """The kernel's buffers back as a parameter tree shaped like ``like``."""
    w1, b1, c2, b2, w3, b3, c4, b4, w5, b5, w6, b6 = buffers
    tree = {
        "C1": {"kernel": w1[:25, :6].reshape(5, 5, 1, 6), "bias": b1[:6]},
        "S2": {"coefficient": c2[:6], "bias": b2[:6]},
        "C3": {"kernel": w3[:150].reshape(5, 5, 6, 16), "bias": b3},
        "S4": {"coefficient": c4, "bias": b4},
        "C5": {"kernel": w5[:400, :120].reshape(5, 5, 16, 120), "bias": b5[:120]},
        "F6": {"kernel": w6[:120, :84], "bias": b6[:84]},
    }
    return jax.tree.map(lambda new, old: new.astype(old.dtype), tree, like)


# --------------------------------------------------------------------------- the kernel


def _squash(a: jax.Array) -> jax.Array:
    return AMPLITUDE * jnp.tanh(SLOPE * a)


def _slope(y: jax.Array) -> jax.Array:
    """f'(a) from y = f(a)."""
    return SLOPE * (AMPLITUDE - y * y / AMPLITUDE)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


N_PARAMS = 12


def _kernel(*refs: Any, steps: int, mu: float, j: float, barrier: Callable[[], None]) -> None:
    (batch_ref, lr_ref, image_ref, label_ref, centre_ref, c1_ref, c1m_ref, c3_ref, c3m_ref, back_ref, backm_ref, w3m_ref,
     s2r_ref, s4r_ref) = refs[:14]
    hess = refs[14 : 14 + N_PARAMS]
    out = refs[14 + 2 * N_PARAMS :]  # the parameter inputs in between are aliased to the first outputs
    param_ref = out[:N_PARAMS]
    totals_ref, s2_ref, s4_ref, ds4_ref, dx3_ref = out[N_PARAMS:]
    w1_ref, b1_ref, c2_ref, b2_ref, w3_ref, b3_ref, c4_ref, b4_ref, w5_ref, b5_ref, w6_ref, b6_ref = param_ref
    rows16 = jax.lax.broadcasted_iota(jnp.int32, (16,), 0)

    def one(s: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        loss_sum, errors = carry
        idx = batch_ref[s]
        lr = lr_ref[s]
        label = label_ref[idx]
        w1, b1, c2, b2 = w1_ref[...], b1_ref[...], c2_ref[...], b2_ref[...]
        w3, b3, c4, b4 = w3_ref[...], b3_ref[...], c4_ref[...], b4_ref[...]
        w6, b6, b5 = w6_ref[...], b6_ref[...], b5_ref[...]

        # C1 and S2: the four sub-grids of C1 positions that S2's windows sum. The windows and
        # outputs of each sub-grid are computed again in the backward pass rather than held.
        def c1(g: int) -> tuple[jax.Array, jax.Array]:
            pixels = image_ref[idx, c1_ref[g]].astype(jnp.float32)
            x = (BACKGROUND + pixels * SCALE) * c1m_ref[g]
            return x, _squash(_dot(x, w1) + b1[None, :])

        def c3(g: int) -> tuple[jax.Array, jax.Array]:
            x = s2_ref[c3_ref[g]] * c3m_ref[g]
            return x, _squash(_dot(x, w3) + b3[None, :])

        y1_sum = (c1(0)[1] + c1(1)[1]) + (c1(2)[1] + c1(3)[1])
        y2 = _squash(y1_sum * c2[None, :] + b2[None, :]) * s2r_ref[...]
        s2_ref[...] = y2.reshape(256 * 16)
        barrier()

        # C3 and S4.
        y3_sum = (c3(0)[1] + c3(1)[1]) + (c3(2)[1] + c3(3)[1])
        y4 = _squash(y3_sum * c4[None, :] + b4[None, :]) * s4r_ref[...]
        s4_ref[...] = y4.reshape(512)
        barrier()

        # C5 and F6: vector-matrix products (C5's kernel 64 rows at a time).
        def c5_rows(c: int, acc: jax.Array) -> jax.Array:
            x = s4_ref[pl.ds(c * 64, 64)]
            return acc + jnp.sum(x[:, None] * w5_ref[pl.ds(c * 64, 64), :], axis=0)

        y5 = _squash(jax.lax.fori_loop(0, 8, c5_rows, jnp.zeros((128,), jnp.float32)) + b5)
        y6 = _squash(jnp.sum(y5[:, None] * w6, axis=0) + b6)

        # The RBF penalties and the MAP loss (appendix B), its gradient in closed form.
        diff = y6[None, :] - centre_ref[...]
        pen = jnp.sum(diff * diff, axis=1)
        valid = rows16 < 10
        neg = jnp.where(valid, -pen, -jnp.inf)
        top = jnp.maximum(jnp.max(neg), -j)
        lse = top + jnp.log(jnp.sum(jnp.where(valid, jnp.exp(neg - top), 0.0)) + jnp.exp(-j - top))
        loss = jnp.sum(jnp.where(rows16 == label, pen, 0.0)) + lse
        guess = jnp.argmin(jnp.where(valid, pen, jnp.inf)).astype(jnp.int32)
        d_pen = jnp.where(rows16 == label, 1.0, 0.0) - jnp.where(valid, jnp.exp(neg - lse), 0.0)

        # Backward through the RBF, F6 and C5 (C5's kernel updated 64 rows at a time, once read).
        d_y6 = jnp.sum(d_pen[:, None] * 2.0 * diff, axis=0)
        d_a6 = d_y6 * _slope(y6)
        d_y5 = jnp.sum(w6 * d_a6[None, :], axis=1)
        d_a5 = d_y5 * _slope(y5)

        def c5_back(c: int, unused: int) -> int:
            rows = pl.ds(c * 64, 64)
            w = w5_ref[rows, :]
            ds4_ref[rows] = jnp.sum(w * d_a5[None, :], axis=1)
            grad = s4_ref[rows][:, None] * d_a5[None, :]
            barrier()  # every thread has read these rows before any overwrites them
            w5_ref[rows, :] = w + (grad / (mu + hess[8][rows, :])) * (-lr)
            return unused

        jax.lax.fori_loop(0, 8, c5_back, 0)
        barrier()

        def pooled(d_pool: jax.Array, coefficient: jax.Array, y_sum: jax.Array, conv: Callable[[int], tuple[jax.Array, jax.Array]],
                   each: Callable[[int, jax.Array], None] = lambda g, d_a: None) -> list[jax.Array]:
            """The gradients of a subsampling layer (coefficient, bias) and of the
            convolution before it (kernel, bias), from the gradient of the subsampling's
            pre-activation: each of the four sub-grids of the convolution in turn."""
            d_kernel, d_bias = 0.0, 0.0
            for g in range(4):
                x, y = conv(g)
                d_a = d_pool * coefficient[None, :] * _slope(y)
                d_kernel = d_kernel + _dot(x.T, d_a)
                d_bias = d_bias + jnp.sum(d_a, axis=0)
                each(g, d_a)
            return [jnp.sum(d_pool * y_sum, axis=0), jnp.sum(d_pool, axis=0), d_kernel, d_bias]

        def c3_window_gradients(g: int, d_a: jax.Array) -> None:  # to a scratch buffer, for S2's gradient
            dx3_ref[pl.ds(g * 32 * 256, 32 * 256)] = _dot(d_a, w3.T).reshape(32 * 256)

        # S4 and C3.
        d_s4 = ds4_ref[...].reshape(32, 16) * _slope(y4) * s4r_ref[...]
        d_c4, d_b4, d_w3, d_b3 = pooled(d_s4, c4, y3_sum, c3, c3_window_gradients)
        barrier()

        # S2's gradient: for each tap, the window gradients of the C3 positions that read it.
        def back_tap(t: int, acc: jax.Array) -> jax.Array:
            return acc + dx3_ref[back_ref[t]] * backm_ref[t]

        d_y2 = jax.lax.fori_loop(0, 25, back_tap, jnp.zeros((256, 16), jnp.float32))
        d_s2 = d_y2 * _slope(y2) * s2r_ref[...]
        d_c2, d_b2, d_w1, d_b1 = pooled(d_s2, c2, y1_sum, c1)

        # The SDLM step of every other parameter: p + (g / (mu + h)) * -lr, as optax computes it.
        grads = [d_w1, d_b1, d_c2, d_b2, d_w3 * w3m_ref[...], d_b3, d_c4, d_b4, None, d_a5, y5[:, None] * d_a6[None, :], d_a6]
        for ref, h_ref, grad in zip(param_ref, hess, grads):
            if grad is not None:
                ref[...] = ref[...] + (grad / (mu + h_ref[...])) * (-lr)
        barrier()
        return loss_sum + loss, errors + (guess != label).astype(jnp.int32)

    loss_sum, errors = jax.lax.fori_loop(0, steps, one, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)))
    totals_ref[0] = loss_sum
    totals_ref[1] = errors.astype(jnp.float32)


def _no_barrier() -> None:
    """Interpret mode runs the kernel as one sequential program: nothing to wait for."""


@functools.partial(jax.jit, static_argnames=("schedule", "mu", "j", "interpret"), donate_argnames=("state",))
def fused_train_chunk(
    state: TrainState, images: jax.Array, labels: jax.Array, batches: jax.Array, key: jax.Array | None = None, *,
    schedule: Callable[[jax.Array], jax.Array], mu: float, j: float, interpret: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``steps.train_chunk`` for the paper's configuration at batch 1, as one kernel
    launch: ``images`` are the padded uint8 (N, 32, 32) training images, ``batches``
    (L, 1) indices into them; ``schedule`` gives the global step of each update from the
    optimiser's count, ``mu`` and ``j`` are SDLM's and the MAP criterion's constants."""
    del key  # the paper's configuration draws nothing per update
    steps = batches.shape[0]
    count = optax.tree_utils.tree_get(state.opt_state, "count")
    lrs = jax.vmap(schedule)(count + jnp.arange(steps)).astype(jnp.float32)
    tables = [TABLES[k] for k in ("c1", "c1_mask", "c3", "c3_mask", "back", "back_mask", "w3_mask", "s2_rows", "s4_rows")]
    centres = np.zeros((16, 128), np.float32)
    centres[:10, :84] = RBF_CENTRES
    params = pack(state.params)
    inputs = [batches[:, 0].astype(jnp.int32), lrs, images.reshape(images.shape[0], -1), labels.astype(jnp.int32), jnp.asarray(centres),
              *map(jnp.asarray, tables), *pack(get_hessian(state.opt_state)), *params]
    first_param = len(inputs) - N_PARAMS
    out_shape = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params] + [
        jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((256 * 16,), jnp.float32),
        jax.ShapeDtypeStruct((512,), jnp.float32), jax.ShapeDtypeStruct((512,), jnp.float32),
        jax.ShapeDtypeStruct((4 * 32 * 256,), jnp.float32)]
    if interpret:
        barrier, compiler_params = _no_barrier, None
    else:
        from jax.experimental.pallas import triton as plgpu

        barrier, compiler_params = plgpu.debug_barrier, plgpu.CompilerParams(num_warps=8, num_stages=1)
    kernel = functools.partial(_kernel, steps=steps, mu=mu, j=j, barrier=barrier)
    outs = pl.pallas_call(kernel, out_shape=out_shape, input_output_aliases={first_param + k: k for k in range(N_PARAMS)},
                          interpret=interpret, compiler_params=compiler_params, name="lenet5_sdlm_batch1")(*inputs)
    totals = outs[N_PARAMS]
    new_state = state.replace(params=unpack(list(outs[:N_PARAMS]), state.params), step=state.step + steps,
                              opt_state=optax.tree_utils.tree_set(state.opt_state, count=count + steps))
    return new_state, {"loss": totals[0], "errors": totals[1].astype(jnp.int32), "finite": jnp.isfinite(totals[0])}
