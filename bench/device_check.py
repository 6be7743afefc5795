"""The check to run on a machine with a GPU or TPU, in one go, writing one summary.

    bash tests/device_check.sh [--out DIR] [--data-dir IDX_FOLDER] [--tables] [--full]

Stages, each a separate process with its own time limit (a stage that fails or runs out
of time is recorded and the next one runs):

  environment   JAX's version, backend and devices; nvidia-smi
  tests         the fast test tier (``pytest -m "not slow"``)
  training      ``train.py --epochs 2``: the default (paper) configuration, two epochs
  throughput    ``bench.throughput``: updates/s at batch 1, 256 and 4096, inference, refresh, compiles
  batch1        ``bench.batch1``: us per batch-1 update of the XLA path and of the fused Pallas
                kernel, and whether the two agree after 1,000 updates
  compare       ``bench.compare``: the same against PyTorch's eager, CUDA-graph and compiled forms
  --tables      throughput per convolution path and per precision (what ``--conv-impl auto`` and
                the precision table in docs/accelerators.md come from), and 8 seeds at once
  --full        the 20-epoch default training at each precision (time and test error)

Everything goes to DIR (default ``device_check/``): a log per stage, the JSON results,
``summary.json`` and ``summary.md``. MNIST comes from the cache, or from the IDX folder
given with --data-dir (``$LENET_JAX_DATA_DIR``) on a machine that cannot download it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def stage(name: str, argv: list[str], out: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one stage; its output goes to ``out/name.log``."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, stdout, stderr = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(f"$ {' '.join(argv)}\n{stdout}\n--- stderr\n{stderr}")
    print(f"{name}: {status} ({seconds:.0f} s)", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "stdout": stdout, "stderr_tail": stderr.strip().splitlines()[-5:]}


def last_json(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def training_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for m in re.finditer(r"^epoch\s+(\d+)\s+loss ([\d.]+)\s+train ([\d.]+)%.*?test ([\d.]+)%\s+([\d.]+)s", text, re.M):
        rows.append({"epoch": int(m[1]), "train_error": float(m[3]) / 100, "test_error": float(m[4]) / 100, "seconds": float(m[5])})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")  # PyTorch shares the card
    if args.data_dir:
        env["LENET_JAX_DATA_DIR"] = str(Path(args.data_dir).resolve())
    py = [sys.executable]
    quick = args.quick
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "stages": {}}
    s = summary["stages"]

    s["environment"] = stage("environment", py + ["-c", "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"], out, 120, env)
    if shutil.which("nvidia-smi"):
        s["nvidia_smi"] = stage("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], out, 60, env)

    tests = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow"] + (["tests/test_config.py", "tests/test_precision.py"] if quick else [])
    s["tests"] = stage("tests", py + tests, out, 60 if quick else 240, env)
    m = re.search(r"(\d+) passed", s["tests"]["stdout"])
    s["tests"]["passed"] = int(m[1]) if m else 0
    failed = re.search(r"(\d+) failed", s["tests"]["stdout"])
    s["tests"]["failed"] = int(failed[1]) if failed else 0

    train = ["train.py", "--epochs", "1" if quick else "2", "--workdir", str(out / "run"), "--no-progress"] + (["--train-subset", "500"] if quick else [])
    shutil.rmtree(out / "run", ignore_errors=True)
    s["training"] = stage("training", py + train, out, 60 if quick else 150, env)
    s["training"]["epochs"] = training_rows(s["training"]["stdout"])

    sizes = ["--samples", "500", "--repeats", "1"] if quick else ["--samples", "10000", "--repeats", "3"]
    s["throughput"] = stage("throughput", py + ["-m", "bench.throughput", "--json", *sizes], out, 120 if quick else 150, env)
    s["throughput"]["result"] = last_json(s["throughput"]["stdout"])

    batch1_sizes = ["--samples", "300", "--check", "100", "--repeats", "1"] if quick else ["--samples", "10000", "--check", "1000"]
    s["batch1"] = stage("batch1", py + ["-m", "bench.batch1", "--json", *batch1_sizes], out, 120 if quick else 240, env)
    s["batch1"]["result"] = last_json(s["batch1"]["stdout"])

    if importlib_available("torch"):
        compare_sizes = ["--samples", "500", "--repeats", "1"] if quick else ["--samples", "5000", "--repeats", "2"]
        s["compare"] = stage("compare", py + ["-m", "bench.compare", "--json", *compare_sizes], out, 180 if quick else 240, env)
        s["compare"]["result"] = last_json(s["compare"]["stdout"])
    else:
        s["compare"] = {"status": "skipped: PyTorch is not installed"}

    if args.tables:
        name = "throughput_seeds_8"
        s[name] = stage(name, py + ["-m", "bench.throughput", "--json", "--seeds", "8", *sizes], out, 240, env)
        s[name]["result"] = last_json(s[name]["stdout"])
        for impl in ("xla", "patches", "custom_vjp"):
            name = f"throughput_conv_{impl}"
            s[name] = stage(name, py + ["-m", "bench.throughput", "--json", "--conv-impl", impl, *sizes], out, 150, env)
            s[name]["result"] = last_json(s[name]["stdout"])
        for policy in ("tf32", "bfloat16"):
            name = f"throughput_{policy}"
            s[name] = stage(name, py + ["-m", "bench.throughput", "--json", "--precision", policy, *sizes], out, 150, env)
            s[name]["result"] = last_json(s[name]["stdout"])
    if args.full:
        for policy in ("float32", "tf32", "bfloat16"):
            name = f"paper_20_epochs_{policy}"
            shutil.rmtree(out / name, ignore_errors=True)
            s[name] = stage(name, py + ["train.py", "--precision", policy, "--workdir", str(out / name), "--no-progress"], out, 1800, env)
            s[name]["epochs"] = training_rows(s[name]["stdout"])

    for v in s.values():
        v.pop("stdout", None)
    summary["machine"] = common.machine((s["throughput"].get("result") or {}).get("machine", {}).get("accelerator"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary) + "\n")
    return summary


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the tables docs/accelerators.md takes."""
    s = summary["stages"]
    lines = [f"# Device check, {summary['started']}", "", f"machine: {common.describe(summary['machine'])}", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {v['status']} | {v.get('seconds', '')} |" for name, v in s.items()]
    t = s.get("tests", {})
    lines += ["", f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed"]
    if s.get("training", {}).get("epochs"):
        lines += ["", "| epoch | test error | seconds |", "|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['test_error']:.2%} | {r['seconds']} |" for r in s["training"]["epochs"]]
    for name, v in s.items():
        r = v.get("result")
        if r and "results" in r:
            lines += ["", f"## {name}", "", "```", common.report(r), "```"]
        elif r and "rows" in r:
            lines += ["", f"## {name}", "", "| setting | lenet-jax | best PyTorch form | ratio | target |", "|---|---|---|---|---|"]
            for row in r["rows"]:
                best = f"{row['best_form']} {common.number(row['torch_forms'][row['best_form']])}"
                lines.append(f"| {row['label']} | {common.number(row['lenet_jax'])} | {best} | {row['ratio']:.2f}x | {row['target']}x |")
        if v.get("epochs") and name.startswith("paper_20"):
            last = v["epochs"][-1]
            lines += ["", f"{name}: test error {last['test_error']:.2%} after {last['epoch']} epochs, "
                      f"{sum(r['seconds'] for r in v['epochs']):.0f} s of epochs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_check", help="folder of the logs and the summary")
    parser.add_argument("--data-dir", help="an IDX folder of MNIST, for a machine that cannot download it")
    parser.add_argument("--tables", action="store_true", help="also throughput per convolution path and per precision")
    parser.add_argument("--full", action="store_true", help="also the 20-epoch default training at each precision")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the check itself (on a CPU)")
    summary = run(parser.parse_args(argv))
    failed = [n for n, v in summary["stages"].items() if v["status"] not in ("ok",) and not v["status"].startswith("skipped")]
    print(f"summary: {Path(parser.parse_args(argv).out) / 'summary.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
