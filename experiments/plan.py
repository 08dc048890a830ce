"""The screen of candidates for a 90% recipe, all runs side by side on one machine (meant for a
GPU), stopping itself before a time limit.

    python experiments/plan.py --data-dir DIR --out DIR --minutes 12 [--epochs 100] [--only NAME]

Every run trains on 45,000 training images and scores the 5,000 held out (``--val-fraction
0.1``, seed 0); the test set is not touched. Each run's folder, its printed log and a summary
table (``summary.md``: last epoch reached, validation accuracy) go to ``--out``. At the time
limit the runs still going get SIGTERM, which keeps their last checkpoint: the same command
with ``--resume`` (added by this script when a run's folder holds a partial run) continues them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# affine and cutout at p = 0.5; Run 1's settings (EXPERIMENTS.md): that, C4's downsampler dilated
AUG50 = ["--p-affine", "0.5", "--p-dropout", "0.5"]
RUN1 = ["--dilated-downs", "1", *AUG50]
# name: (options of experiments/v3.py, options of helpers.py train); each on the standard net
RUNS = {
    "base": ([], []),
    "extra-credit": ([], ["--dilated-downs", "1"]),
    "mixup": (["--mixup", "0.2"], []),
    "ema": (["--ema", "0.999"], []),
    "adamw-ema-mixup": (["--adamw", "0.004", "--ema", "0.999", "--mixup", "0.2"], []),
    # the CPU's first long candidate, alone and with mixup and EMA
    "extra-credit-aug50": ([], RUN1),
    "extra-credit-aug50-mixup-ema": (["--mixup", "0.2", "--ema", "0.999"], RUN1),
    # the CPU's second: C3's downsampler dilated too (16x16 -> 12x12 -> 8x8)
    "dilated-c3-aug50": ([], ["--dilated-downs", "2", *AUG50]),
    # two narrower blocks at 16x16 in place of one (192,794 parameters, 46.9 M multiply-adds)
    "deeper-c2": ([], ["--dilated-downs", "1", "--widths", "32", "48", "96", "128", "--depths",
                       "1", "2", "1", "1"]),
    # deeper, narrower nets with Run 1's settings (deep-3322: ResNet-20's stages at 32x32, 16x16)
    "deep-3322": ([], ["--widths", "16", "32", "64", "128", "--depths", "3", "3", "2", "2", *RUN1]),
    "deep-2222": ([], ["--widths", "24", "40", "80", "112", "--depths", "2", "2", "2", "2", *RUN1]),
    # Muon for the dense conv weights (EXPERIMENTS.md, *Muon*): alone, and with Run 1's settings
    "muon": ([], ["--muon-lr", "0.02"]),
    "muon0.01-run1": ([], ["--muon-lr", "0.01", *RUN1]),
    "muon0.02-run1": ([], ["--muon-lr", "0.02", *RUN1]),
    # `accurate` (the one above at lr 0.01) fits its augmented training images 2.8-3.7 points better
    # than the test images: regularisers for it
    "accurate-mixup": (["--mixup", "0.2"], ["--muon-lr", "0.01", *RUN1]),
    "accurate-ema": (["--ema", "0.999"], ["--muon-lr", "0.01", *RUN1]),
    "accurate-ls0.2": ([], ["--muon-lr", "0.01", "--label-smoothing", "0.2", *RUN1]),
    # ... and the affine on every image (cutout stays at p = 0.5)
    "accurate-affine1": ([], ["--muon-lr", "0.01", *RUN1, "--p-affine", "1"]),
    # more augmentation cost it a point: Muon at half the rate, or the augmentations at 0.25
    "accurate-muon0.005": ([], ["--muon-lr", "0.005", *RUN1]),
    "accurate-aug25": ([], ["--muon-lr", "0.01", "--dilated-downs", "1"]),
    # if neither: deep-3322 (which matched Run 1's net with SGD) with Muon, or no label smoothing
    "accurate-deep-3322": ([], ["--muon-lr", "0.01", "--widths", "16", "32", "64", "128",
                                "--depths", "3", "3", "2", "2", *RUN1]),
    "accurate-ls0": ([], ["--muon-lr", "0.01", "--label-smoothing", "0", *RUN1]),
}


def command(name: str, args: argparse.Namespace) -> list[str]:
    v3, train = RUNS[name]
    sgd = [] if "--muon-lr" in train else ["--muon-lr", "0"]  # screened before Muon: SGD
    out = args.out / name
    resume = ["--resume"] if (out / "config.json").exists() else []
    return [sys.executable, str(ROOT / "experiments" / "v3.py"), *v3, "--", "--data-dir",
            str(args.data_dir), "--recipe", "standard", "--epochs", str(args.epochs),
            "--val-fraction", "0.1", "--seed", "0", "--no-progress", "--out", str(out),
            "--threads", str(args.threads), "--workers", str(args.workers), *sgd, *train, *resume]


def summary(args: argparse.Namespace, names: list[str]) -> str:
    lines = ["| run | epochs done | val accuracy (last epoch) | train accuracy |",
             "|---|---|---|---|"]
    for name in names:
        log = args.out / name / "log.jsonl"
        rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        last = rows[-1] if rows else {}
        lines.append(f"| {name} | {last.get('epoch', 0)} / {args.epochs} | "
                     f"{100 * last.get('eval_acc', 0):.2f} | "
                     f"{100 * last.get('train_acc', 0):.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=12.0, help="stop every run after this long")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only")
    args = p.parse_args()
    names = args.only or list(RUNS)
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        with open(args.out / f"{name}.out", "a") as log:
            procs[name] = subprocess.Popen(command(name, args), stdout=log,
                                           stderr=subprocess.STDOUT, cwd=ROOT,
                                           env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    deadline = time.time() + 60 * args.minutes
    while time.time() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(5)
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # the run keeps its last checkpoint
    for p in procs.values():
        p.wait()
    table = summary(args, names)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
