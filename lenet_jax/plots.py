"""Figures, drawn headless with matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path | str) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def error_curves(runs: dict[str, Sequence[dict[str, Any]]], path: Path | str, title: str = "") -> Path:
    """Training (dashed, measured during each pass) and test (solid) error against passes,
    one colour per run: the shape of the paper's Fig. 5."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, history) in enumerate(runs.items()):
        colour = f"C{i}"
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [100 * r["test_error"] for r in history], "-o", color=colour, ms=3, label=f"{label}: test")
        ax.plot(epochs, [100 * r["train_error"] for r in history], "--", color=colour, label=f"{label}: training")
    ax.set_xlabel("training set iterations (passes)")
    ax.set_ylabel("error rate (%)")
    ax.set_ylim(0, None)
    ax.set_xticks(range(0, max(len(h) for h in runs.values()) + 1, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def rbf_bitmaps(path: Path | str) -> Path:
    """The ten fixed 7x12 RBF centres as pictures (ink black, background white)."""
    from lenet_jax.bitmaps import DIGIT_BITMAPS

    plt = _pyplot()

    fig, axes = plt.subplots(1, 10, figsize=(8, 1.8), dpi=120)
    for digit, ax in enumerate(axes):
        ax.imshow(-DIGIT_BITMAPS[digit], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(str(digit), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
