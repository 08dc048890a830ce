"""Candidates for a more accurate recipe, screened on held-out training images before any of
them earns a place in helpers.py. The option changes one thing of ``helpers.py train``:

    python experiments/v3.py [--adamw LR] -- TRAIN OPTIONS (passed to helpers.py train unchanged)

  --adamw LR      AdamW (weight decay 0.05 on conv and linear weights) instead of SGD, with
                  the recipe's OneCycle schedule peaking at LR

Candidates that earned their place are recipe settings of helpers.py now: the exercise's extra
credit (``--dilated-downs``), mixup (``--mixup``) and the weights' moving average (``--ema``).
This script's earlier ``--extra-credit`` and ``--dilated-c3`` built the nets of
``--dilated-downs 1`` and ``2``, and its ``--mixup`` and ``--ema`` trained as those settings do,
step for step. A run folder made with those options records none of them and kept its average
beside each checkpoint (``ema-<epoch>.pt``): a finished one scores, none resumes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers  # noqa: E402


def use_adamw(lr: float) -> None:
    start = helpers.start_training

    def start_training(model, recipe, steps_per_epoch, seed=0):
        t = start(model, replace(recipe, lr=lr), steps_per_epoch, seed)
        groups = [dict(params=g["params"], weight_decay=0.05 if g["weight_decay"] else 0.0)
                  for g in t.optimizer.param_groups]
        t.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
        if t.scheduler is not None:
            t.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                t.optimizer, max_lr=lr, total_steps=recipe.epochs * steps_per_epoch,
                pct_start=recipe.pct_start, div_factor=10.0, final_div_factor=100.0)
        return t

    helpers.start_training = start_training


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adamw", type=float)
    args, train = p.parse_known_args(argv)
    train = [a for a in train if a != "--"]
    if args.adamw:
        use_adamw(args.adamw)
    return helpers.main(["train", *train])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
