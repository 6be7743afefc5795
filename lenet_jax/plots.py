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


def confusion_matrix(confusion: Any, path: Path | str, title: str = "") -> Path:
    """The 10x10 confusion matrix (rows: true class), counts written in the cells."""
    import numpy as np

    plt = _pyplot()
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    off = confusion.astype(float).copy()
    np.fill_diagonal(off, np.nan)
    ax.imshow(off, cmap="Reds")
    dark = 0.6 * np.nanmax(off) if np.isfinite(np.nanmax(off)) and np.nanmax(off) > 0 else np.inf
    for (i, j), v in np.ndenumerate(confusion):
        colour = "tab:blue" if i == j else ("white" if v >= dark else "black")
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix: {confusion.trace()} of {confusion.sum()} right")
    return _save(fig, path)


def misclassified(images: Any, labels: Any, predictions: Any, path: Path | str, columns: int = 12, limit: int = 120) -> Path:
    """The misclassified digits in a grid, each titled 'true->predicted' (the paper's Fig. 8)."""
    import numpy as np

    plt = _pyplot()
    all_wrong = np.nonzero(np.asarray(labels) != np.asarray(predictions))[0]
    wrong = all_wrong[:limit]
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.75, rows * 0.9), dpi=120, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(np.asarray(images[i]), cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{labels[i]}->{predictions[i]}", fontsize=7)
    shown = "" if len(wrong) == len(all_wrong) else f", the first {len(wrong)} shown"
    fig.suptitle(f"{len(all_wrong)} misclassified test digits (true->predicted){shown}", fontsize=9)
    return _save(fig, path)


def feature_maps(image: Any, activations: Sequence[Any], path: Path | str) -> Path:
    """One digit, its six C1 maps and its sixteen C3 maps (after squashing)."""
    import numpy as np

    plt = _pyplot()
    c1, c3 = np.asarray(activations[0]), np.asarray(activations[2])
    fig = plt.figure(figsize=(9, 4), dpi=120)
    grid = fig.add_gridspec(4, 10)
    panels = [(fig.add_subplot(grid[0:2, 0:2]), np.asarray(image), "input")]
    panels += [(fig.add_subplot(grid[2 * (k // 3) : 2 * (k // 3) + 2, 2 + k % 3]), c1[..., k], f"C1.{k}") for k in range(6)]
    panels += [(fig.add_subplot(grid[k // 4, 6 + k % 4]), c3[..., k], f"C3.{k}") for k in range(16)]
    for ax, picture, title in panels:
        ax.imshow(picture, cmap="gray_r", interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    return _save(fig, path)


def rejection_curve(shares: Any, errors: Any, path: Path | str, target: float = 0.005, reached: float | None = None, title: str = "") -> Path:
    """Error on the patterns kept against the share rejected, the least confident first
    (the paper's Fig. 10 measure): the target error dashed, the share that reaches it marked."""
    import numpy as np

    plt = _pyplot()
    x, y = 100 * np.asarray(shares, float), 100 * np.asarray(errors, float)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(x, y, "-", color="C0", label="error on the patterns kept")
    ax.axhline(100 * target, ls="--", color="C3", lw=1.5, label=f"target: {target:.1%} error")
    if reached is not None:
        ax.plot([100 * reached], [np.interp(100 * reached, x, y)], "o", color="C3", ms=5, label=f"{reached:.2%} rejected reaches it")
    ax.set_xlim(0, min(100.0, max(1.0, 2.5 * 100 * (reached or 0))))
    ax.set_ylim(0, 1.15 * max(float(y[0]), 100 * target))
    ax.set_xlabel("patterns rejected, least confident first (%)")
    ax.set_ylabel("error on the patterns kept (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "rejection: error against the share rejected")
    return _save(fig, path)


def size_curves(sizes: Sequence[int], errors: dict[tuple[bool, int, str], Sequence[float]], path: Path | str) -> Path:
    """Test (solid) and training (dashed) error against the training-set size, without and
    with distortions, each point the mean over seeds with its spread as an error bar: the
    shape of the paper's Fig. 6. ``errors[(distorted, size, "test_error" | "train_error")]``
    holds one error per seed; a size missing from a curve is left out of it."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, distorted in enumerate((False, True)):
        for key, style, kind in (("test_error", "-o", "test"), ("train_error", "--s", "training")):
            shown = [n for n in sizes if (distorted, n, key) in errors]
            values = [100 * np.asarray(errors[distorted, n, key], float) for n in shown]
            spread = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(shown, [v.mean() for v in values], yerr=spread, fmt=style, color=f"C{i}", ms=4, capsize=3,
                        label=f"{'with' if distorted else 'without'} distortions: {kind}")
    ax.set_xlabel("training set size")
    ax.set_ylabel("error rate (%) after 20 passes")
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([f"{n // 1000}k" for n in sizes])
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
