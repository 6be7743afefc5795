"""The same LeNet-5 in PyTorch, in the forms a PyTorch user would pick for a small model,
measuring what ``bench.throughput`` measures on the same card.

The network: NCHW, the masked C3 as a convolution with a fixed mask buffer, trainable
subsampling, the RBF head with the same fixed bitmaps, the MAP loss; plain SGD. The forms:

  eager        the usual training loop and ``torch.no_grad()`` inference
  cuda_graph   (CUDA) the whole SGD step, forward, backward and update, captured in one
               CUDA graph and replayed per batch, indices copied into a static buffer
  compiled     (CUDA; --compile on the CPU) ``torch.compile(model)`` for inference

Float32 is exact by default, as lenet-jax's (TF32 off for matrix products and cuDNN);
--precision tf32 allows TF32. PyTorch is not a requirement of this project:

    pip install torch==2.13.0     # a CPU build; on a GPU machine use its CUDA build
    python -m bench.torch_baseline [--json] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np

from bench import common
from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.inputs import BACKGROUND, INK
from lenet_jax.layers import AMPLITUDE, C3_TABLE, SLOPE, connection_mask
from lenet_jax.losses import DEFAULT_J

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit("error: PyTorch is not installed; `pip install torch==2.13.0` (CPU build) to run the baseline") from e


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
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32), as lenet_jax.inputs.preprocess."""
    x = BACKGROUND + images.astype(np.float32) * ((INK - BACKGROUND) / 255.0)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=BACKGROUND)
    return torch.as_tensor(x[:, None])


class Bench:
    """The data on the device and a timer that waits for the device."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        ds = common.mnist()
        self.device, self.repeats = device, repeats
        self.x_train = preprocess(ds.train_images).to(device)
        self.y_train = torch.as_tensor(ds.train_labels.astype(np.int64)).to(device)
        self.x_test = preprocess(ds.test_images).to(device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, run: Callable[[], int]) -> dict[str, Any]:
        run()  # warm-up
        seconds, work = [], 0
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            work = run()
            self.sync()
            seconds.append(time.perf_counter() - t0)
        return common.rate(seconds, work)

    def order(self, batch: int, n: int) -> torch.Tensor:
        return torch.randperm(len(self.y_train), device=self.device)[: (n // batch) * batch].view(-1, batch)

    def eager_training(self, batch: int, n: int, lr: float) -> Callable[[], int]:
        model = LeNet5().to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def run() -> int:
            order = self.order(batch, n)
            for idx in order:
                opt.zero_grad(set_to_none=True)
                map_loss(model(self.x_train[idx]), self.y_train[idx]).backward()
                opt.step()
            return order.numel()

        return run

    def graphed_training(self, batch: int, n: int, lr: float) -> Callable[[], int]:
        """The whole SGD step captured once in a CUDA graph (PyTorch's whole-network
        capture recipe), replayed per batch with the batch's indices in a static buffer."""
        model = LeNet5().to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        idx = torch.zeros(batch, dtype=torch.long, device=self.device)

        def step() -> torch.Tensor:
            loss = map_loss(model(self.x_train[idx]), self.y_train[idx])
            loss.backward()
            opt.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            step()

        def run() -> int:
            order = self.order(batch, n)
            for row in order:
                idx.copy_(row)
                graph.replay()
            return order.numel()

        return run

    def inference(self, model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], int]:
        def run() -> int:
            with torch.no_grad():
                for i in range(0, len(self.x_test), 1000):
                    model(self.x_test[i : i + 1000]).argmin(1)
            return len(self.x_test)

        return run


def measure(samples: int = 10_000, eager_samples: int = 2_000, repeats: int = 3, threads: int = 2, device: str = "auto",
            precision: str = "float32", compile_on_cpu: bool = False) -> dict[str, Any]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    b = Bench(dev, repeats)
    cuda = dev.type == "cuda"
    n = len(b.y_train)
    results: dict[str, Any] = {"train_b1": {}, "train_b256": {}}
    results["train_b1"]["eager"] = b.time(b.eager_training(1, eager_samples if cuda else samples, 1e-4))
    results["train_b256"]["eager"] = b.time(b.eager_training(256, n, 1e-3))
    if cuda:
        results["train_b4096"] = {"eager": b.time(b.eager_training(4096, n, 1e-3))}
        results["train_b1"]["cuda_graph"] = b.time(b.graphed_training(1, samples, 1e-4))
        results["train_b256"]["cuda_graph"] = b.time(b.graphed_training(256, n, 1e-3))
        results["train_b4096"]["cuda_graph"] = b.time(b.graphed_training(4096, n, 1e-3))
    model = LeNet5().to(dev).eval()
    results["infer_b1000"] = {"eager": b.time(b.inference(model))}
    compile_s = {}
    if cuda or compile_on_cpu:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        b.inference(compiled)()
        b.sync()
        compile_s["infer_b1000_compiled"] = time.perf_counter() - t0
        results["infer_b1000"]["compiled"] = b.time(b.inference(compiled))
    accelerator = torch.cuda.get_device_name(dev) if cuda else None
    settings = {"precision": precision, "threads": torch.get_num_threads(), "repeats": repeats, "b1_samples": samples,
                "b1_eager_samples": eager_samples if cuda else samples}
    notes = ["training is plain SGD (the paper's SDLM has no PyTorch counterpart); the JAX side's batch-1 figure is SDLM"]
    return common.result(f"torch {torch.__version__}", dev.type, accelerator, settings, results, compile_s, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=10_000, help="batch-1 updates per timed repeat")
    parser.add_argument("--eager-samples", type=int, default=2_000, help="batch-1 updates per repeat of the eager form on CUDA (300 a second)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--precision", default="float32", choices=("float32", "tf32"))
    parser.add_argument("--compile", dest="compile_on_cpu", action="store_true", help="also torch.compile inference on the CPU")
    args = parser.parse_args(argv)
    common.emit(measure(args.samples, args.eager_samples, args.repeats, args.threads, args.device, args.precision, args.compile_on_cpu), args.json)


if __name__ == "__main__":
    main()
