"""lenet-jax against the PyTorch baseline on the same machine: runs ``bench.throughput``
and ``bench.torch_baseline`` one after the other (never together: they would share the
device) and prints, for each setting, lenet-jax's rate against the best PyTorch form.

Targets: on the CPU, those of the CPU speed work (batch 1 10x, batch 256 1.3x, inference
1.5x); on a GPU, every setting at least 1.5x the best PyTorch form.

    pip install torch==2.13.0     # once; not a project requirement
    python -m bench.compare [--samples 10000] [--repeats 3] [--precision float32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from bench import common

LABELS = {
    "train_b1": "training, batch 1 (JAX: SDLM, torch: SGD)",
    "train_b256": "training, batch 256 (SGD), one epoch",
    "train_b4096": "training, batch 4096 (SGD), one epoch",
    "infer_b1000": "inference, batch 1000, test set",
}
CPU_TARGETS = {"train_b1": 10.0, "train_b256": 1.3, "infer_b1000": 1.5}
ACCELERATOR_TARGET = 1.5


def run(module: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", module, "--json", *args], capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"error: {module} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(jax_r: dict[str, Any], torch_r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setting both measured: each side's best rate, the best PyTorch form,
    the ratio and the target."""
    accelerated = jax_r["backend"] != "cpu"
    out = []
    for key, label in LABELS.items():
        if key not in jax_r["results"] or key not in torch_r["results"]:
            continue
        forms = {form: v["best"] for form, v in torch_r["results"][key].items()}
        best_form = max(forms, key=forms.get)
        ours = jax_r["results"][key]["best"]
        target = ACCELERATOR_TARGET if accelerated else CPU_TARGETS.get(key)
        ratio = ours / forms[best_form]
        out.append({"setting": key, "label": label, "lenet_jax": ours, "torch_forms": forms, "best_form": best_form,
                    "ratio": ratio, "target": target, "met": None if target is None else ratio >= target})
    return out


def table(jax_r: dict[str, Any], torch_r: dict[str, Any]) -> str:
    lines = [
        f"{common.describe(jax_r['machine'])}; {jax_r['framework']} ({jax_r['backend']}, "
        + ", ".join(f"{k} {v}" for k, v in jax_r["settings"].items() if k in ("conv_impl", "conv_impl_inference", "precision"))
        + f") against {torch_r['framework']}; best of {jax_r['settings']['repeats']}, images/s",
        f"{'setting':42s} {'lenet-jax':>11s} {'PyTorch (each form)':>40s} {'ratio':>7s} {'target':>7s}",
    ]
    for r in rows(jax_r, torch_r):
        forms = ", ".join(f"{f} {common.number(v)}" for f, v in r["torch_forms"].items())
        verdict = "" if r["target"] is None else f"{r['target']:5.1f}x  {'met' if r['met'] else 'missed'}"
        lines.append(f"{r['label']:42s} {common.number(r['lenet_jax']):>11s} {forms:>40s} {r['ratio']:6.2f}x {verdict}")
    refresh = jax_r["results"]["sdlm_refresh"]["best"]
    lines.append(f"SDLM Hessian refresh (500 patterns): {refresh:.4f} s; " + "; ".join(jax_r["notes"]))
    lines.append("compile (s): " + ", ".join(f"{k} {v:.2f}" for k, v in jax_r["compile_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="10000", help="batch-1 updates per timed repeat")
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--precision", default="float32", choices=("float32", "tf32"), help="both sides")
    parser.add_argument("--json", action="store_true", help="print both results and the rows as one JSON object")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("error: PyTorch is not installed; `pip install torch==2.13.0` (CPU build) to compare")
    common_args = ("--samples", args.samples, "--repeats", args.repeats, "--precision", args.precision)
    jax_r = run("bench.throughput", *common_args)
    torch_r = run("bench.torch_baseline", *common_args)
    print(json.dumps({"jax": jax_r, "torch": torch_r, "rows": rows(jax_r, torch_r)}) if args.json else table(jax_r, torch_r))


if __name__ == "__main__":
    main()
