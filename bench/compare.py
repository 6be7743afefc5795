"""lenet-jax against the PyTorch baseline, side by side: runs ``bench/throughput.py`` and
``bench/torch_baseline.py`` one after the other (never together: they would share the
cores) and prints the ratio table with the issue's targets.

    pip install torch==2.13.0     # once; not a project requirement
    python bench/compare.py [--samples 10000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

TARGETS = {
    "train_b1_images_per_s": ("training, batch 1 (JAX: SDLM, torch: SGD)", 10.0),
    "train_b256_images_per_s": ("training, batch 256 (SGD), one epoch", 1.3),
    "infer_b1000_images_per_s": ("inference, batch 1000, test set", 1.5),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(script: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE / script), "--json", *args], capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"error: {script} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(jax_r: dict[str, Any], torch_r: dict[str, Any]) -> str:
    lines = [
        f"CPU: {cpu_name()} ({os.cpu_count()} cores); {jax_r['framework']} ({jax_r['backend']}, conv {jax_r['conv_impl']}, inference {jax_r.get('conv_impl_inference', jax_r['conv_impl'])}) "
        f"vs {torch_r['framework']} ({torch_r['threads']} threads); best of {jax_r['repeats']}, images/s",
        f"{'setting':44s} {'lenet-jax':>11s} {'PyTorch':>11s} {'ratio':>7s} {'target':>7s}",
    ]
    for key, (label, target) in TARGETS.items():
        ratio = jax_r[key] / torch_r[key]
        mark = "met" if ratio >= target else "missed"
        lines.append(f"{label:44s} {jax_r[key]:11,.0f} {torch_r[key]:11,.0f} {ratio:6.1f}x {target:5.1f}x  {mark}")
    pass_s = jax_r["b1_pass_s"]
    share = jax_r["refresh_share_of_b1_pass"]
    lines.append(f"batch-1 SDLM pass of 60,000 (lenet-jax): {pass_s:.1f} s; PyTorch SGD at its rate: {60_000 / torch_r['train_b1_images_per_s']:.0f} s")
    lines.append(f"SDLM Hessian refresh (500 patterns): {jax_r['sdlm_refresh_s']:.3f} s = {share:.1%} of a pass (target < 3%: {'met' if share < 0.03 else 'missed'})")
    c = jax_r["compile_s"]
    lines.append(
        f"compile: batch-1 epoch {c['train_b1']:.2f} s, batch-256 epoch {c['train_b256']:.2f} s (target < 5 s: "
        f"{'met' if max(c['train_b1'], c['train_b256']) < 5 else 'missed'}), refresh {c['sdlm_refresh']:.2f} s, inference {c['infer_b1000']:.2f} s"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="10000", help="batch-1 updates per timed repeat")
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--json", action="store_true", help="print both results as one JSON object")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("error: PyTorch is not installed; `pip install torch==2.13.0` (CPU build) to compare")
    common = ("--samples", args.samples, "--repeats", args.repeats)
    jax_r = run("throughput.py", *common)
    torch_r = run("torch_baseline.py", *common)
    print(json.dumps({"jax": jax_r, "torch": torch_r}) if args.json else table(jax_r, torch_r))


if __name__ == "__main__":
    main()
