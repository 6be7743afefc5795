"""LeNet-5's forward pass laid out with the batch as the minor axis: the fastest
inference on the CPU.

Every stage works on (maps, rows, columns, batch) arrays. A convolution and the 2x2
subsampling after it are computed together, once for each of the four sub-grids of
positions that the subsampling adds up: each sub-grid's convolution is a sum of
stride-2 slices of the input maps times kernel scalars, squashed, and the four are
then summed (or averaged, or their maximum taken) per map. XLA fuses a whole stage
into one loop vectorised over the batch, so no window matrix and no full-size C1 or
C3 output ever goes through memory, where the NHWC convolutions spend most of their
time at these map counts (docs/speed.md). C3 computes only the connections its table
has (60 of 96 for table I): output maps that read the same pattern of input maps,
shifted cyclically, are computed together (``groups``). C5, F6 and the output layer
are matrix products on the (features, batch) arrays.

It computes the function ``LeNet5.__call__`` computes, with the sums taken in another
order, so the scores agree to float32 rounding, not bit for bit. Only the forward pass
of the plain network at float32 is written here (``unsupported`` says what else a model
asks for); training keeps its own paths (``lenet_jax.conv``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.inputs import rescale
from lenet_jax.layers import ACTIVATIONS
from lenet_jax.model import LeNet5

Group = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]
"""(output maps, reads): output map ``maps[g]`` reads input map ``reads[k][g]`` as its
k-th connection."""


def unsupported(model: LeNet5) -> str | None:
    """Why this layout cannot compute ``model``'s scores, or None when it can."""
    if model.conv != "plain":
        return f"{model.conv} convolutions"
    if model.precision != "float32":
        return f"the {model.precision} precision policy"
    return None


def groups(table: Sequence[Sequence[int]] | None, n_inputs: int, n_outputs: int) -> list[Group]:
    """The output maps of a connection table grouped by the pattern of input maps they
    read, up to a cyclic shift: table I's 16 rows make four groups (six maps reading three
    neighbours, six reading four, three reading two pairs, one reading all six). A dense
    layer (``table=None``) is one group."""
    rows = [tuple(range(n_inputs))] * n_outputs if table is None else [tuple(sorted(set(r))) for r in table]
    by_pattern: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for f, row in enumerate(rows):
        pattern, start = min((tuple(sorted((c - s) % n_inputs for c in row)), s) for s in row)
        by_pattern.setdefault(pattern, []).append((f, start))
    return [(tuple(f for f, _ in members), tuple(tuple((s + o) % n_inputs for _, s in members) for o in pattern))
            for pattern, members in by_pattern.items()]


def _wraps(index: tuple[int, ...], n: int) -> bool:
    """Whether ``index`` runs through the maps in cyclic order past the last one."""
    return len(index) > 1 and all((b - a) % n == 1 for a, b in zip(index, index[1:])) and index[0] + len(index) > n


def _maps(x: jax.Array, index: tuple[int, ...]) -> jax.Array:
    """``x[index]`` along the maps axis as a slice: a broadcast when every index is the
    same, else a run of maps in cyclic order (``x`` holds its maps once more after the
    last where a run wraps around; table I's all run so). A gather there would keep XLA
    from vectorising the stage's loop."""
    if len(set(index)) == 1:
        return x[index[0] : index[0] + 1]
    if all(b - a == 1 for a, b in zip(index, index[1:])):
        return x[index[0] : index[-1] + 1]
    return jnp.concatenate([x[c : c + 1] for c in index])


def _conv_subsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, group_list: list[Group],
                    squash: Callable[[jax.Array], jax.Array], pool: str) -> list[tuple[np.ndarray, jax.Array]]:
    """A 'VALID' k x k convolution of (C, H, W, B) maps, squashed, then each 2x2 window
    pooled ("sum" or "max"): per group, its output maps and their (G, (H-k+1)/2,
    (W-k+1)/2, B) pooled values. The groups stay apart: putting them back in map order
    would make XLA fuse a gather into the loop and compute it unvectorised."""
    k = kernel.shape[0]
    size = (x.shape[1] - k + 1) // 2
    span = 2 * size - 1
    n = x.shape[0]
    extra = max((len(r) - 1 for _, reads in group_list for r in reads if _wraps(r, n)), default=0)
    if extra:  # the first maps once more after the last: a run that wraps around is a slice
        x = jnp.concatenate([x, x[:extra]])
    parts = []
    for maps, reads in group_list:
        maps_ = np.array(maps)
        w = kernel[:, :, np.array(reads), maps_]  # (k, k, K, G)
        inputs = [_maps(x, tuple(c + n if _wraps(r, n) and c < r[0] else c for c in r)) for r in reads]  # K arrays (G or 1, H, W, B)
        pooled = None
        for dy in range(2):
            for dx in range(2):
                a = bias[maps_][:, None, None, None]
                for m, xm in enumerate(inputs):
                    for i in range(k):
                        for j in range(k):
                            a = a + xm[:, dy + i : dy + i + span : 2, dx + j : dx + j + span : 2, :] * w[i, j, m][:, None, None, None]
                y = squash(a)
                pooled = y if pooled is None else (jnp.maximum(pooled, y) if pool == "max" else pooled + y)
        parts.append((maps_, pooled))
    return parts


def _subsampled(x: jax.Array, conv: dict[str, jax.Array], kind: str, sub_params: dict[str, jax.Array] | None,
                table: Sequence[Sequence[int]] | None, squash: Callable[[jax.Array], jax.Array]) -> list[tuple[np.ndarray, jax.Array]]:
    """A convolution stage and the subsampling stage after it (``kind`` as in
    ``LeNet5.subsampling``), both squashed, per group of output maps."""
    n_out = conv["kernel"].shape[-1]
    parts = _conv_subsample(x, conv["kernel"], conv["bias"], groups(table, x.shape[0], n_out), squash,
                            "max" if kind == "max" else "sum")
    out = []
    for maps, pooled in parts:
        if kind == "trainable":
            pooled = pooled * sub_params["coefficient"][maps][:, None, None, None] + sub_params["bias"][maps][:, None, None, None]
        elif kind == "average":
            pooled = pooled * 0.25
        out.append((maps, squash(pooled)))
    return out


def _in_order(parts: list[tuple[np.ndarray, jax.Array]]) -> jax.Array:
    """The groups' maps as one (F, H, W, B) array in map order."""
    maps = np.concatenate([m for m, _ in parts])
    out = jnp.concatenate([p for _, p in parts]) if len(parts) > 1 else parts[0][1]
    return out if np.array_equal(maps, np.arange(len(maps))) else out[np.argsort(maps)]


def _dense(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """(in, B) -> (out, B) for a kernel stored (in, out)."""
    y = jax.lax.dot_general(layer["kernel"], x, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    return y + jnp.asarray(layer["bias"])[..., None]


CHUNK = 256
"""Images per step of each stage: the inputs and outputs of a step stay in the cache."""

MIN_IMAGES = CHUNK
"""The fewest images in one call for which ``lenet_jax.factories.Inference`` takes this
layout: it compiles in about 2.8 s against 0.1 s for the module, and saves 5 ms a call
at 256 images (16 ms at 1,000), so smaller calls (tests, single digits) keep the module."""

LANES = 16
"""From this many images on, a step's images are a multiple of this (the batch padded up
to it): the vector width of float32 on AVX-512, so XLA's loops over the batch leave no
remainder. Fewer images make one step as they are."""


def scores(params: Any, x: jax.Array, model: LeNet5) -> jax.Array:
    """``model``'s class scores for (..., 32, 32, 1) inputs: what
    ``model.apply({"params": params}, x)`` returns, computed batch-minor.

    The images go through each of the two convolution stages in steps of at most
    ``CHUNK`` (a ``lax.map``), so one stage's output is written once, whole, before the
    next reads it many times over; within one step XLA would instead fuse it into many
    slice copies of its own."""
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"the batch-minor forward pass does not compute {reason}")
    lead = x.shape[:-3]
    n = int(np.prod(lead, dtype=np.int64))
    steps = max(1, -(-n // CHUNK))
    size = -(-n // steps) if n < LANES else -(-n // (steps * LANES)) * LANES
    squash = ACTIVATIONS[model.activation]()
    if x.shape[-3:] != (32, 32, 1):
        raise ValueError(f"the batch-minor forward pass reads (..., 32, 32, 1) images, got {x.shape}")
    u = rescale(x, model.input_scaling).reshape(n, 32 * 32)
    u = jnp.pad(u, ((0, steps * size - n), (0, 0))).reshape(steps, size, 32 * 32).transpose(0, 2, 1).reshape(steps, 1, 32, 32, size)
    u = jax.lax.map(lambda v: _in_order(_subsampled(v, params["C1"], model.subsampling, params.get("S2"), None, squash)), u)
    group_maps = [np.array(maps) for maps, _ in groups(model.c3_table, u.shape[1], params["C3"]["kernel"].shape[-1])]
    parts = jax.lax.map(lambda v: [p for _, p in _subsampled(v, params["C3"], model.subsampling, params.get("S4"), model.c3_table, squash)], u)
    c5 = jnp.moveaxis(params["C5"]["kernel"], 2, 0)  # (maps, k, k, 120): C5 reads S4 whole
    m = steps * size
    u = sum(_dense(jnp.moveaxis(p, 0, -2).reshape(int(np.prod(p.shape[1:4])), m), {"kernel": c5[maps].reshape(-1, c5.shape[-1]), "bias": 0.0})
            for maps, p in zip(group_maps, parts))
    u = squash(u + params["C5"]["bias"][:, None])
    if model.head == "squashed":
        out = squash(_dense(u, params["output"]))
    else:
        u = squash(_dense(u, params["F6"]))
        out = _dense(u, params["output"]) if model.head == "softmax" else \
            jnp.sum(jnp.square(u[None] - jnp.asarray(RBF_CENTRES, u.dtype)[:, :, None]), axis=1)
    return out[:, :n].T.reshape(*lead, out.shape[0])
