"""Regenerate every result table and figure of the README and docs/, section by section.

    python -m bench.reproduce --list                 # the sections, what each regenerates, how long it takes here
    python -m bench.reproduce --only quick presets   # some sections
    python -m bench.reproduce                        # all of them (about 2 hours on a 2-core CPU)

Each section trains its runs with ``train.py`` (one command line per run, printed before
it runs) into ``runs/reproduce/SECTION/NAME``, continues a run that an interrupted
reproduction left there and skips a finished one, then prints its tables in the form the
docs give them and draws its figures. Sections that share runs (``distort`` and
``estimators`` compare against ``paper``'s) train them where they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "reproduce"
DOCS = ROOT / "docs"
SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------- running


def history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def seed_histories(run: Path) -> dict[int, list[dict]]:
    return {int(p.name[5:]): history(p) for p in sorted(run.glob("seed-*"))}


def train(section: str, name: str, *options: str, epochs: int = 20, final_at_chance: bool = False) -> Path:
    """The run ``name`` of ``section``: trained with ``train.py OPTIONS --epochs EPOCHS``,
    continued if an earlier reproduction left it unfinished, skipped if finished. A run
    expected to stop at chance (``final_at_chance``) is final once it has stopped."""
    run = RUNS / section / name
    seeds = "--seeds" in options
    done = seed_histories(run) if seeds else {0: history(run)}
    if done and all(len(h) >= epochs for h in done.values()) or (final_at_chance and any(done.values())):
        return run
    form = ["--one-program"] if seeds else []  # the form the docs' --seeds figures were measured in
    command = [sys.executable, "train.py", *options, *form, "--epochs", str(epochs), "--workdir", str(run), "--no-progress"]
    if run.exists():
        command = [sys.executable, "train.py", "--workdir", str(run), "--resume", *form, "--epochs", str(epochs), "--no-progress"]
    print("$", " ".join(command[1:]), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code != 0 and not (final_at_chance and code == 1):
        raise SystemExit(f"reproduce: {' '.join(command[1:])} failed with exit code {code}")
    return run


def module(*args: str) -> str:
    """``python -m ARGS`` from the repository root, its output."""
    print("$ python -m", " ".join(args), flush=True)
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"reproduce: python -m {' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return out.stdout


def pct(values: list[float], digits: int = 2) -> str:
    """'0.83% ± 0.10 (0.91, 0.71, 0.86)', or '0.87%' for one value."""
    if len(values) == 1:
        return f"{100 * values[0]:.{digits}f}%"
    listed = ", ".join(f"{100 * v:.{digits}f}" for v in values)
    return f"{100 * statistics.mean(values):.{digits}f}% ± {100 * statistics.stdev(values):.{digits}f} ({listed})"


def at(h: list[dict], epoch: int, key: str = "test_error") -> float:
    return next(r[key] for r in h if r["epoch"] == epoch)


def seconds(histories: list[list[dict]]) -> str:
    per_epoch = [r["seconds"] for h in histories for r in h[1:]]  # epoch 1 also compiles
    return f"{min(per_epoch):.1f}-{max(per_epoch):.1f} s"


# --------------------------------------------------------------------------- the sections


def quick() -> str:
    """README: the one-minute first run, its expected result (three seeds)."""
    runs = {s: train("quick", f"seed-{s}", "--preset", "quick", "--seed", str(s), epochs=4) for s in SEEDS}
    errors = [history(r)[-1]["test_error"] for r in runs.values()]
    return ("| `python train.py --preset quick` | test error after 4 epochs (15,000 images each) |\n|---|---|\n"
            f"| seeds 0, 1, 2 | {pct(errors)} |")


def paper() -> str:
    """README's results table and docs/reproduction.md's table of the paper's configuration."""
    h = [history(train("paper", f"seed-{s}", "--seed", str(s))) for s in SEEDS]
    together = seed_histories(train("paper", "seeds", "--seeds", ",".join(map(str, SEEDS))))
    rows = [
        ("test error after 20 epochs", "0.95%", pct([at(x, 20) for x in h])),
        ("training error of epoch 19, measured during the epoch", "about 0.35%", pct([at(x, 19, "train_error") for x in h])),
        ("test error after 10 epochs", '"stabilises after about 10"', pct([at(x, 10) for x in h])),
        ("seconds per epoch (refresh and test evaluation included)", "days for the whole training", seconds(h)),
    ]
    lines = ["| | paper | this project |", "|---|---|---|"] + [f"| {a} | {b} | **{c}** |" if i == 0 else f"| {a} | {b} | {c} |"
                                                               for i, (a, b, c) in enumerate(rows)]
    lines.append(f"\nthe same seeds as one run (`--seeds 0,1,2`): {pct([x[-1]['test_error'] for x in together.values()])} after 20 epochs, "
                 f"{pct([at(x, 10) for x in together.values()])} after 10; {seconds(list(together.values()))} per epoch for the three")
    return "\n".join(lines)


def distort() -> str:
    """docs/reproduction.md's distortion table and docs/distortion_curves.png."""
    from lenet_jax.plots import error_curves

    h = [history(train("distort", f"seed-{s}", "--preset", "distort", "--seed", str(s))) for s in SEEDS]
    plain = history(train("paper", "seed-0", "--seed", "0"))
    errors = [x[-1]["test_error"] for x in h]
    error_curves({"seed 0, with distortions": h[0], "seed 0, without": plain}, DOCS / "distortion_curves.png")
    return ("| | paper | this project (`python train.py --preset distort --seed S`) |\n|---|---|---|\n"
            f"| test error after 20 epochs | 0.8% (82 digits) | **{pct(errors)}**, i.e. {', '.join(str(round(e * 10_000)) for e in errors)} digits |\n"
            f"| seconds per epoch on this machine | | {seconds(h)} |\n\nwrote docs/distortion_curves.png")


def estimators() -> str:
    """docs/reproduction.md's table of what SDLM buys and docs/error_curves.png."""
    from lenet_jax.plots import error_curves

    runs = {
        "SDLM, `paper` estimator (the default)": [train("paper", f"seed-{s}", "--seed", str(s)) for s in SEEDS],
        "SDLM, `gauss_newton` estimator (exact diagonal of J^T H J)": [train("estimators", "gauss_newton", "--hessian-estimator", "gauss_newton")],
        "SDLM, `hutchinson` estimator (8 Rademacher probes per pattern)": [train("estimators", "hutchinson", "--hessian-estimator", "hutchinson")],
        "plain SGD, best constant learning rate (3e-4)": [train("estimators", "sgd", "--optimizer", "sgd", "--schedule", "constant", "--lr", "3e-4")],
    }
    lines = ["| optimiser | test error after 20 epochs | training error, last epoch (on the fly) |", "|---|---|---|"]
    for label, folders in runs.items():
        h = [history(f) for f in folders]
        first = pct([h[0][-1]["test_error"]])
        spread = f" (3 seeds: {pct([x[-1]['test_error'] for x in h])})" if len(h) > 1 else ""
        lowest = "" if len(h) > 1 else f" (lowest along the way {pct([min(r['test_error'] for r in h[0])])}; {pct([at(h[0], 10)])} after 10 epochs)"
        lines.append(f"| {label} | {first}{spread}{lowest if 'SGD' in label else ''} | {pct([h[0][-1]['train_error']])} |")
    error_curves({label: history(folders[0]) for label, folders in runs.items()}, DOCS / "error_curves.png")
    return "\n".join(lines) + "\n\nwrote docs/error_curves.png"


def sgd_sweep() -> str:
    """docs/reproduction.md: the two-epoch sweep that picked SGD's constant learning rate."""
    rates = ("3e-4", "1e-3", "3e-3", "1e-2")
    errors = [history(train("sgd-sweep", f"lr-{lr}", "--optimizer", "sgd", "--schedule", "constant", "--lr", lr, "--no-stop-at-chance",
                            epochs=2))[-1]["test_error"] for lr in rates]
    return "| plain SGD, constant learning rate | " + " | ".join(rates) + " |\n|---|" + "---|" * len(rates) + \
        "\n| test error after 2 epochs | " + " | ".join(pct([e]) for e in errors) + " |"


def presets() -> str:
    """docs/reproduction.md's table of the presets (paper-exact, lush, modern)."""
    exact = history(train("presets", "paper-exact", "--preset", "paper-exact", final_at_chance=True))
    lush = seed_histories(train("presets", "lush", "--preset", "lush", "--seeds", ",".join(map(str, SEEDS))))
    modern = history(train("presets", "modern", "--preset", "modern"))
    lush_h = list(lush.values())
    return "\n".join([
        "| preset | result |", "|---|---|",
        f"| `paper-exact` | stopped at chance after epoch {exact[-1]['epoch']}: {pct([exact[-1]['test_error']])} test error |",
        f"| `lush` (seeds 0, 1, 2 in one run) | **{pct([h[-1]['test_error'] for h in lush_h])}** after 20 epochs "
        f"({pct([at(h, 1) for h in lush_h])} after 1, {pct([at(h, 10) for h in lush_h])} after 10; {seconds(lush_h)} per epoch for the three) |",
        f"| `modern` | **{pct([modern[-1]['test_error']])}** after 20 epochs ({pct([at(modern, 10)])} after 10; {seconds([modern])} per epoch) |",
    ])


def lush_qmnist() -> str:
    """docs/reproduction.md's QMNIST-recipe table: the lush-qmnist preset, 3 seeds in one
    run, beside the figure Yadav and Bottou (2019) report for the authors' Lush LeNet-5."""
    runs = list(seed_histories(train("presets", "lush-qmnist", "--preset", "lush-qmnist", "--seeds", ",".join(map(str, SEEDS)), epochs=30)).values())
    return "\n".join([
        "| | Yadav and Bottou (2019) | `--preset lush-qmnist` (seeds 0, 1, 2 in one run) |", "|---|---|---|",
        f"| MNIST test error after 30 epochs | 0.82% ± 0.2 | **{pct([h[-1]['test_error'] for h in runs])}** |",
        f"| after 10 (end of the eta = 1e-4 phase) / 20 epochs | | {pct([at(h, 10) for h in runs])} / {pct([at(h, 20) for h in runs])} |",
        f"| training error of epoch 30, measured during the epoch | | {pct([at(h, 30, 'train_error') for h in runs])} |",
        f"| seconds per epoch for the three | | {seconds(runs)} |",
    ])


SIZES = (15_000, 30_000, 60_000)


def sizes() -> str:
    """docs/reproduction.md's table and docs/training_size.png, in the form of the paper's
    Fig. 6: test and training error after 20 epochs against the training-set size, without
    and with distortions, 3 seeds in one run per size (60,000 without distortions is the
    ``paper`` section's ``--seeds`` run)."""
    from lenet_jax.plots import size_curves

    seeds = ",".join(map(str, SEEDS))
    table = {}
    for distorted in (False, True):
        for n in SIZES:
            options = ("--preset", "distort") if distorted else ()
            if n == 60_000 and not distorted:
                run = train("paper", "seeds", "--seeds", seeds)
            else:
                run = train("sizes", f"{'distort' if distorted else 'plain'}-{n}", *options, "--train-subset", str(n), "--seeds", seeds)
            table[distorted, n] = list(seed_histories(run).values())
    lines = ["| training images | test error | training error (during epoch 20) | with distortions: test error | training error |",
             "|---|---|---|---|---|"]
    for n in SIZES:
        plain, dist = table[False, n], table[True, n]
        lines.append(f"| {n:,} | {pct([at(h, 20) for h in plain])} | {pct([at(h, 20, 'train_error') for h in plain])} | "
                     f"{pct([at(h, 20) for h in dist])} | {pct([at(h, 20, 'train_error') for h in dist])} |")
    errors = {(d, n, key): [at(h, 20, key) for h in table[d, n]] for d in (False, True) for n in SIZES for key in ("test_error", "train_error")}
    size_curves(list(SIZES), errors, DOCS / "training_size.png")
    return "\n".join(lines) + "\n\nwrote docs/training_size.png"


REJECTION_RUNS = {  # what the rejection table measures: (section, run, its train.py options, epochs)
    "paper (`--seeds 0,1,2 --one-program`)": ("paper", "seeds", ("--seeds", "0,1,2"), 20),
    "distort (seed 0)": ("distort", "seed-0", ("--preset", "distort", "--seed", "0"), 20),
    "lush (`--seeds 0,1,2 --one-program`)": ("presets", "lush", ("--preset", "lush", "--seeds", "0,1,2"), 20),
    "lush-qmnist (`--seeds 0,1,2 --one-program`)": ("presets", "lush-qmnist", ("--preset", "lush-qmnist", "--seeds", "0,1,2"), 30),
}


def eval_json(*options: str) -> dict:
    """``python eval.py OPTIONS --json``, parsed."""
    print("$ python eval.py", " ".join(options), "--json", flush=True)
    out = subprocess.run([sys.executable, "eval.py", *options, "--json"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"reproduce: eval.py {' '.join(options)} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def rejection() -> str:
    """README and docs/reproduction.md: the share of test digits rejected (smallest margin
    first) to bring the error on the rest to 0.5%, the paper's Fig. 10 measure."""
    lines = ["| model | test error | rejected for 0.5% error on the rest |", "|---|---|---|"]
    shipped = eval_json()
    lines.append(f"| the shipped model | {pct([shipped['test_error']])} | **{pct([shipped['rejection']['rejected_share']])}** |")
    for label, (section, name, options, epochs) in REJECTION_RUNS.items():
        run = train(section, name, *options, epochs=epochs)
        folders = sorted(run.glob("seed-*")) or [run]
        reports = [eval_json("--workdir", str(f), "--epoch", "latest") for f in folders]
        lines.append(f"| {label} | {pct([r['test_error'] for r in reports])} | **{pct([r['rejection']['rejected_share'] for r in reports])}** |")
    return "\n".join(lines)


TRIED = [  # (F^x, init scale, eta, j, other options, epochs): docs/reproduction.md's "what was tried" table
    ("1", None, "5e-4", "5", (), 3), ("1", None, "1e-4", "5", (), 3), ("0.5", "1", "5e-4", "5", (), 3),
    ("0.5", None, "5e-4", "5", (), 3), ("0.5", None, "5e-4", "1", (), 3), ("0.5", None, "5e-4", "20", (), 3),
    ("0.5", None, "5e-4", "5", ("--loss", "mse"), 3), ("0.5", None, "5e-4", "5", ("--hessian-estimator", "gauss_newton"), 9),
    ("0.5", None, "2.5e-4", "5", (), 20), ("0.5", None, "2.5e-4", "20", (), 3), ("0.6", None, "5e-4", "5", (), 3),
    ("0.7", None, "5e-4", "5", (), 3), ("0.8", None, "5e-4", "5", (), 3), ("0.6", None, "3.5e-4", "20", (), 3),
    ("0.6", None, "2.5e-4", "5", (), 3), ("0.6", None, "2.5e-4", "20", (), 3),
    ("1", None, "5e-4", "5", ("--hessian-reduce", "sum"), 3), ("1", None, "5e-4", "5", ("--init-fan-in", "inputs+bias"), 3),
    ("1", None, "5e-4", "5", ("--hessian-reduce", "sum", "--init-fan-in", "inputs+bias"), 3),
    ("1", None, "5e-4", "5", ("--hessian-refresh-first-epoch", "5000"), 3),
    ("1", None, "5e-4", "5", ("--hessian-refresh-first-epoch", "5000", "--hessian-reduce", "sum"), 3),
    ("1", None, "5e-4", "5", ("--rbf-curvature", "constant"), 3),
    ("1", None, "5e-4", "5", ("--rbf-curvature", "constant", "--hessian-reduce", "sum"), 20),
]


def tried() -> str:
    """docs/reproduction.md's table of what was tried before the two departures."""
    lines = ["| F^x | eta (epochs 1-2) | j | other | test error after epoch 1 / 2 / 3 |", "|---|---|---|---|---|"]
    for x, scale, eta, j, other, epochs in TRIED:
        name = f"x{x}-s{scale or '2.4'}-eta{eta}-j{j}" + "".join(o.lstrip("-") for o in other)
        options = ["--init-exponent", x, "--lr", eta, "--map-j", j, *other, "--no-stop-at-chance"] + (["--init-scale", scale] if scale else [])
        h = history(train("tried", name, *options, epochs=epochs))
        more = f"; {pct([h[-1]['test_error']])} after {epochs} epochs" if epochs > 3 else ""
        lines.append(f"| {x}{', scale ' + scale if scale else ''} | {eta} | {j} | {' '.join(other)} | "
                     + " / ".join(f"{100 * at(h, e):.2f}" for e in (1, 2, 3)) + f"%{more} |")
    return "\n".join(lines)


def ablation() -> str:
    """docs/variants.md's table and docs/ablation_10_epochs.json."""
    return module("bench.ablation", "--epochs", "10", "--json", str(DOCS / "ablation_10_epochs.json"))


def shipped() -> str:
    """The shipped model, trained again by the README's command (``python train.py``, in
    a run folder of this section's own) and compared with the package's, then the docs/
    figures of it (misclassified digits, confusion, feature maps, bitmaps, its curves)."""
    import numpy as np

    from lenet_jax import pretrained

    run = train("shipped", "again")  # python train.py, the README's command: a training of its own, not the one exported
    with tempfile.TemporaryDirectory() as tmp:
        module("lenet_jax.pretrained", str(run), "--to", f"{tmp}/again")
        again, _, meta = pretrained.load(f"{tmp}/again")
        ours, _, shipped_meta = pretrained.load()
        import jax

        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(ours)))
        figures = Path(tmp) / "figures"
        print("$ python eval.py --figures", figures, flush=True)
        subprocess.run([sys.executable, "eval.py", "--figures", str(figures)], cwd=ROOT, check=True, capture_output=True)
        for name, target in (("misclassified.png", "misclassified.png"), ("confusion.png", "confusion.png"), ("feature_maps.png", "feature_maps.png"),
                             ("rbf_bitmaps.png", "rbf_bitmaps.png"), ("error_curves.png", "pretrained_curves.png")):
            shutil.copy(figures / name, DOCS / target)
    return (f"trained again: test error {pct([meta['test_error']])} after epoch {meta['epoch']} (shipped: {pct([shipped_meta['test_error']])}); "
            f"parameters {'bit for bit the shipped ones' if same else 'NOT the shipped ones'}\n"
            "wrote docs/misclassified.png, confusion.png, feature_maps.png, rbf_bitmaps.png, pretrained_curves.png")


def speed() -> str:
    """docs/speed.md's tables: throughput (a whole epoch, three seeds, each convolution
    path), the per-layer profile, the C1 layouts tried, the comparison with PyTorch (needs
    torch), the demo page's speed, and docs/demo.png from the browser test."""
    out = [module("bench.throughput", "--pass", "--seeds", "3")]
    out += [module("bench.throughput", "--conv-impl", impl) for impl in ("patches", "xla")]
    out += [module("bench.profile_epoch"), module("bench.c1_layouts")]
    try:
        import torch  # noqa: F401

        out.append(module("bench.compare"))
    except ImportError:
        out.append("bench.compare skipped: PyTorch is not installed (pip install torch==2.13.0)")
    out.append(module("bench.demo", "--browser"))
    print("$ python -m pytest tests/test_demo.py -m slow -k browser   # with LENET_JAX_DEMO_SCREENSHOT=docs/demo.png", flush=True)
    shot = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_demo.py", "-m", "slow", "-k", "browser"], cwd=ROOT,
                          env={**os.environ, "LENET_JAX_DEMO_SCREENSHOT": str(DOCS / "demo.png")}, capture_output=True, text=True)
    out.append("wrote docs/demo.png" if shot.returncode == 0 else f"the browser test failed: {shot.stdout[-1500:]}")
    return "\n".join(out)


@dataclass(frozen=True)
class Section:
    run: Callable[[], str]
    regenerates: str
    minutes: str


SECTIONS: dict[str, Section] = {
    "quick": Section(quick, "README: the first run and its expected result", "1 (measured: 0.9)"),
    "paper": Section(paper, "README's results table; reproduction.md: the paper's configuration", "about 25 (estimated: 4 runs)"),
    "distort": Section(distort, "README; reproduction.md: training with distortions, distortion_curves.png", "about 15 (estimated)"),
    "estimators": Section(estimators, "reproduction.md: what SDLM buys, error_curves.png", "about 15 (estimated)"),
    "sgd-sweep": Section(sgd_sweep, "reproduction.md: the sweep behind SGD's learning rate", "about 2 (estimated)"),
    "presets": Section(presets, "reproduction.md: the presets (paper-exact, lush, modern)", "13 (measured: lush 10.5, the rest 2.7)"),
    "sizes": Section(sizes, "reproduction.md: error against the training-set size (the paper's Fig. 6), training_size.png",
                     "about 45 (estimated from its runs' epochs)"),
    "lush-qmnist": Section(lush_qmnist, "reproduction.md: the authors' QMNIST recipe (lush-qmnist), 3 seeds",
                           "about 15 (estimated: 29.8 s an epoch when idle)"),
    "rejection": Section(rejection, "README, reproduction.md: rejection for 0.5% error (paper, distort, lush, lush-qmnist, shipped)",
                         "about 2 given the runs of the other sections (estimated), else about 45"),
    "tried": Section(tried, "reproduction.md: what was tried", "about 15 (estimated)"),
    "ablation": Section(ablation, "variants.md: the ablation table, ablation_10_epochs.json", "about 25 (estimated)"),
    "shipped": Section(shipped, "README: the shipped model; the figures of docs/ drawn from it", "4 (measured: 3.5)"),
    "speed": Section(speed, "speed.md and demo.md: throughput, profile, C1 layouts, PyTorch, the demo page, demo.png", "about 15 (estimated)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION", help=f"run these sections only ({', '.join(SECTIONS)})")
    parser.add_argument("--list", action="store_true", help="list the sections, what each regenerates and how long it takes here")
    args = parser.parse_args(argv)
    if args.list:
        for name, s in SECTIONS.items():
            print(f"{name:<11} {s.minutes:<30} {s.regenerates}")
        return 0
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        table = SECTIONS[name].run()
        print(f"\n## {name} ({(time.perf_counter() - t0) / 60:.1f} min)\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
