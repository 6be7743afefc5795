"""The same LeNet-5 in PyTorch, written the way a competent PyTorch user would: an eager
``nn.Module`` (NCHW, the masked C3 as a conv with a fixed mask buffer, trainable
subsampling, the RBF head with the same fixed bitmaps, the MAP loss) trained with plain
SGD. It measures what ``bench/throughput.py`` measures and prints the same keys.

PyTorch is not a requirement of this project. To run this:

    pip install torch==2.13.0      # a CPU build; on the project's machine it is on disk
    python bench/torch_baseline.py [--json] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_jax.bitmaps import RBF_CENTRES  # noqa: E402
from lenet_jax.data import BACKGROUND, INK  # noqa: E402
from lenet_jax.layers import AMPLITUDE, C3_TABLE, SLOPE, connection_mask  # noqa: E402
from lenet_jax.losses import DEFAULT_J  # noqa: E402

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("error: PyTorch is not installed; `pip install torch==2.13.0` (CPU build) to run the baseline")


class ScaledTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return AMPLITUDE * torch.tanh(SLOPE * x)


class Subsampling(nn.Module):
    """2x2 sums times a per-map coefficient, plus a per-map bias."""

    def __init__(self, maps: int) -> None:
        super().__init__()
        self.coefficient = nn.Parameter(torch.empty(maps).uniform_(-0.6, 0.6))
        self.bias = nn.Parameter(torch.empty(maps).uniform_(-0.6, 0.6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) * (4 * self.coefficient[:, None, None]) + self.bias[:, None, None]


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 (out, in) connection mask."""

    def __init__(self, mask: np.ndarray, kernel_size: int = 5) -> None:
        n_in, n_out = mask.shape
        super().__init__(n_in, n_out, kernel_size)
        self.register_buffer("mask", torch.as_tensor(mask.T.copy())[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


class LeNet5(nn.Module):
    """Returns the 10 RBF penalties of a (B, 1, 32, 32) batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.s2 = Subsampling(6)
        self.c3 = MaskedConv2d(connection_mask(C3_TABLE, 6))
        self.s4 = Subsampling(16)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.f6 = nn.Linear(120, 84)
        self.squash = ScaledTanh()
        self.register_buffer("centres", torch.as_tensor(RBF_CENTRES, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.c1, self.s2, self.c3, self.s4, self.c5):
            x = self.squash(layer(x))
        x = self.squash(self.f6(x.flatten(1)))
        return ((x[:, None, :] - self.centres) ** 2).sum(-1)


def map_loss(penalties: torch.Tensor, labels: torch.Tensor, j: float = DEFAULT_J) -> torch.Tensor:
    """Mean of y_label + log(exp(-j) + sum_i exp(-y_i))."""
    rubbish = torch.full_like(penalties[:, :1], -j)
    lse = torch.logsumexp(torch.cat([-penalties, rubbish], dim=1), dim=1)
    return (penalties.gather(1, labels[:, None])[:, 0] + lse).mean()


def load_jax_params(model: LeNet5, params: Any) -> None:
    """Copy a ``lenet_jax`` parameter tree (HWIO kernels) into ``model`` (OIHW)."""

    def t(a: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, np.float32).copy())

    with torch.no_grad():
        for name in ("c1", "c3", "c5"):
            layer, p = getattr(model, name), params[name.upper()]
            layer.weight.copy_(t(p["kernel"]).permute(3, 2, 0, 1))
            layer.bias.copy_(t(p["bias"]))
        for name in ("s2", "s4"):
            getattr(model, name).coefficient.copy_(t(params[name.upper()]["coefficient"]))
            getattr(model, name).bias.copy_(t(params[name.upper()]["bias"]))
        model.f6.weight.copy_(t(params["F6"]["kernel"]).T)
        model.f6.bias.copy_(t(params["F6"]["bias"]))


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32), as lenet_jax.data.preprocess."""
    x = BACKGROUND + images.astype(np.float32) * ((INK - BACKGROUND) / 255.0)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=BACKGROUND)
    return torch.as_tensor(x[:, None])


def _repeat(fn: Callable[[], int], repeats: int) -> dict[str, float]:
    """Images per second of ``fn`` (which returns how many images it processed)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return {"best": max(rates), "median": statistics.median(rates)}


def measure(samples: int = 10_000, repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    from lenet_jax.data import load_dataset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ds = load_dataset("mnist", "auto", log=lambda m: None)
    x_train, y_train = preprocess(ds.train_images), torch.as_tensor(ds.train_labels.astype(np.int64))
    x_test = preprocess(ds.test_images)
    model = LeNet5()

    def train(batch: int, n: int, lr: float) -> Callable[[], int]:
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def run() -> int:
            order = torch.randperm(len(y_train))[: (n // batch) * batch].view(-1, batch)
            for idx in order:
                opt.zero_grad(set_to_none=True)
                map_loss(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
            return order.numel()

        return run

    def infer() -> int:
        with torch.no_grad():
            for i in range(0, len(x_test), 1000):
                model(x_test[i : i + 1000]).argmin(1)
        return len(x_test)

    train(1, 200, 1e-4)()  # warm-up: allocator, kernels
    b1 = _repeat(train(1, samples, 1e-4), repeats)
    b256 = _repeat(train(256, len(y_train), 1e-3), repeats)
    inf = _repeat(infer, repeats)
    return {
        "train_b1_images_per_s": b1["best"],
        "train_b256_images_per_s": b256["best"],
        "infer_b1000_images_per_s": inf["best"],
        "sdlm_refresh_s": None,  # the baseline trains with plain SGD
        "compile_s": 0.0,  # eager: nothing to compile
        "backend": "cpu",
        "devices": 1,
        "framework": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "median": {"train_b1_images_per_s": b1["median"], "train_b256_images_per_s": b256["median"], "infer_b1000_images_per_s": inf["median"]},
        "repeats": repeats,
        "b1_samples": samples,
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=10_000, help="batch-1 updates per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    r = measure(args.samples, args.repeats, args.threads)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['framework']} on {r['cpu']}, {r['threads']} threads, best (median) of {r['repeats']}")
    for key in ("train_b1_images_per_s", "train_b256_images_per_s", "infer_b1000_images_per_s"):
        print(f"  {key}: {r[key]:,.0f} ({r['median'][key]:,.0f})")


if __name__ == "__main__":
    main()
