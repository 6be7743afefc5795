"""The figures are written as real PNG files."""

from __future__ import annotations

from lenet_jax.plots import error_curves, rbf_bitmaps


def test_figures_are_png_files(tmp_path):
    history = [{"epoch": e, "train_error": 0.1 / e, "test_error": 0.12 / e} for e in range(1, 4)]
    for path in (error_curves({"run": history}, tmp_path / "a.png"), rbf_bitmaps(tmp_path / "b.png")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
