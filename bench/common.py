"""What every benchmark shares: the machine it ran on, MNIST on the device, timing, and
the result schema (one JSON object per run; ``compare`` reads two of them).

A result is ``{"framework", "backend", "machine": {...}, "settings": {...},
"results": {name: {"best", "median", "unit"}}, "compile_s": {...}, "notes": [...]}``;
rates are the best and the median of the timed repeats, each repeat waited for
(``block_until_ready``, ``torch.cuda.synchronize``) before the clock is read.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(accelerator: str | None = None) -> dict[str, Any]:
    """The host CPU (model, cores) and the accelerator the figures came from, if any."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "accelerator": accelerator, "platform": platform.platform()}


def describe(m: dict[str, Any]) -> str:
    host = f"{m['cpu']} ({m['cores']} cores)"
    return f"{m['accelerator']} (host: {host})" if m.get("accelerator") else host


def rate(seconds: list[float], work: float, unit: str = "images/s") -> dict[str, Any]:
    """Work per second of the fastest and the median repeat."""
    return {"best": work / min(seconds), "median": work / statistics.median(seconds), "unit": unit}


def repeat(run: Callable[[], Any], repeats: int, wait: Callable[[Any], Any]) -> list[float]:
    """Seconds of ``repeats`` calls of ``run``, each waited for with ``wait`` before the clock stops."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wait(run())
        out.append(time.perf_counter() - t0)
    return out


def result(framework: str, backend: str, accelerator: str | None, settings: dict[str, Any], results: dict[str, Any],
           compile_s: dict[str, float] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    return {"framework": framework, "backend": backend, "machine": machine(accelerator), "settings": settings,
            "results": results, "compile_s": compile_s or {}, "notes": notes or []}


def number(x: float) -> str:
    """A figure as people read it: thousands separated, three significant digits below 100."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def report(r: dict[str, Any]) -> str:
    """A result as lines of text."""
    lines = [f"{r['framework']} on {r['backend']}: {describe(r['machine'])}; " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())]
    for name, v in r["results"].items():
        if isinstance(v, dict) and "best" in v:
            lines.append(f"  {name}: {number(v['best'])} {v['unit']} (median {number(v['median'])})")
        elif isinstance(v, dict) and all(isinstance(x, dict) and "best" in x for x in v.values()):
            lines.append(f"  {name}: " + ", ".join(f"{form} {number(x['best'])} {x['unit']}" for form, x in v.items()))
        elif isinstance(v, dict):
            lines.append(f"  {name}: " + ", ".join(f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()))
        else:
            lines.append(f"  {name}: {v}")
    if r["compile_s"]:
        lines.append("  compile_s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["compile_s"].items()))
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def emit(r: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(r) if as_json else report(r), flush=True)


def refresh_curvature(state: Any, images: Any, labels: Any, config: Any, epoch: int) -> Any:
    """``state`` holding the curvature estimate a one-model run of ``config`` takes before
    ``epoch`` (what training does as the epoch starts, through ``Strategy.refresh``)."""
    from lenet_jax.updates import Strategy

    return Strategy.build(config, n_seeds=1, updates_per_epoch=1).refresh(state, images, labels, [config], [None], epoch)


def mnist() -> Any:
    """MNIST through the project's loader (cache, the IDX folder $LENET_JAX_DATA_DIR, ...)."""
    from lenet_jax.data import load_dataset

    return load_dataset("mnist", "auto", log=lambda m: None)


def as_uint8(x: Any) -> np.ndarray:
    return np.asarray(x, np.uint8)
