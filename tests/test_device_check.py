"""The prepared accelerator check runs end to end (on the CPU, with tiny settings), so it
still works the day someone with a GPU runs it."""

from __future__ import annotations

import json

import pytest

from conftest import DATA_DIR, run_script


@pytest.mark.slow
def test_the_device_check_runs_every_stage_and_writes_its_summary(mnist, tmp_path):
    args = ["-m", "bench.device_check", "--quick", "--out", str(tmp_path)] + (["--data-dir", DATA_DIR] if DATA_DIR else [])
    out = run_script(*args, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["stages"]
    assert {"environment", "tests", "training", "throughput", "batch1", "compare"} <= set(stages)
    assert stages["batch1"]["result"]["results"]["agreement_after_100_updates"]["max_relative_difference"] < 1e-4
    assert stages["tests"]["passed"] > 10 and stages["tests"]["failed"] == 0
    assert stages["training"]["epochs"][0]["epoch"] == 1
    assert stages["throughput"]["result"]["results"]["train_b1"]["best"] > 0
    assert stages["compare"]["status"] == "ok"  # CI installs PyTorch's CPU build for this stage
    text = (tmp_path / "summary.md").read_text()
    assert "| stage | status | seconds |" in text and "train_b1:" in text
