"""The Colab notebook runs top to bottom (tiny setting), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(mnist, monkeypatch):
    monkeypatch.setenv("LENET_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(ROOT / "notebooks" / "lenet5.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "test error after 1 epochs" in text
    assert "misclassified" in text and "true label:" in text and "shipped model:" in text
    assert "the demo page: http://127.0.0.1:" in text and '{"ok":true}' in text  # served from the kernel, and answering
    frames = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "<iframe" in str(o.get("data", {}).get("text/html", ""))]
    assert len(frames) == 1 and "http://127.0.0.1:" in str(frames[0]["data"]["text/html"])
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert images == 3


def test_the_install_cell_refuses_to_guess_where_the_package_lives(monkeypatch):
    """Where lenet_jax is not importable and no SOURCE is given, the install cell stops
    with one sentence; with one, pip gets it as it should."""
    import importlib.util
    import subprocess

    nb = nbformat.read(ROOT / "notebooks" / "lenet5.ipynb", as_version=4)
    parameters, install = nb.cells[1].source, nb.cells[2].source
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lenet_jax" else real(name, *a))
    monkeypatch.delenv("LENET_JAX_SOURCE", raising=False)
    scope: dict = {}
    exec(parameters, scope)
    with pytest.raises(RuntimeError, match=r"^lenet_jax is not installed here: set SOURCE \(or LENET_JAX_SOURCE\) to the repository's URL"):
        exec(install, scope)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    for source, spec in (("https://github.com/someone/lenet-jax", "lenet-jax[demo] @ git+https://github.com/someone/lenet-jax"),
                         (str(ROOT), f"{ROOT}[demo]"), ("/content/lenet_jax-0.1.0-py3-none-any.whl", "/content/lenet_jax-0.1.0-py3-none-any.whl")):
        monkeypatch.setenv("LENET_JAX_SOURCE", source)
        scope = {}
        exec(parameters, scope)
        exec(install, scope)
        assert calls[-1][:5] == [calls[-1][0], "-m", "pip", "install", "-q"] and calls[-1][5] == spec
