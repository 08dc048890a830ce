"""Candidates for a more accurate recipe, screened on held-out training images before any of
them earns a place in helpers.py. Each option changes one thing of ``helpers.py train``:

    python experiments/v3.py [--mixup ALPHA] [--ema DECAY] [--adamw LR]
                             -- TRAIN OPTIONS (passed to helpers.py train unchanged)

  --mixup ALPHA   each batch mixed with a shuffled copy of itself, lambda ~ Beta(ALPHA, ALPHA),
                  ramped in linearly over the first half of training, off in the last 5 epochs
  --ema DECAY     an exponential moving average of the weights (per step) is what is scored
                  after every epoch and what the run ends with
  --adamw LR      AdamW (weight decay 0.05 on conv and linear weights) instead of SGD, with
                  the recipe's OneCycle schedule peaking at LR

The exercise's extra credit is a recipe setting of helpers.py (``--dilated-downs 1``: C4's
downsampler dilated; ``2``: C3's too); it replaces this script's earlier ``--extra-credit`` and
``--extra-credit --dilated-c3``, which built the same nets, output for output (a folder made
with those records no setting: add ``"dilated_downs"`` to its recipe before resuming or scoring).
Muon is one too (``--muon-lr LR``), replacing this script's ``--muon LR``, which trained the
same weights, bit for bit (a folder made with it needs ``"muon_lr"`` added the same way).

Each option survives ``--resume``: mixup's draws are a pure function of (--seed, step), and the
EMA is saved beside each checkpoint (``ema-<epoch>.pt`` in --out), so a run stopped and resumed
ends as one never stopped.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers  # noqa: E402


def use_adamw(lr: float) -> None:
    start = helpers.start_training

    def start_training(model, recipe, steps_per_epoch):
        t = start(model, replace(recipe, lr=lr, muon_lr=0.0), steps_per_epoch)  # SGD's groups
        groups = [dict(params=g["params"], weight_decay=0.05 if g["weight_decay"] else 0.0)
                  for g in t.optimizer.param_groups]
        t.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
        if t.scheduler is not None:
            t.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                t.optimizer, max_lr=lr, total_steps=recipe.epochs * steps_per_epoch,
                pct_start=recipe.pct_start, div_factor=10.0, final_div_factor=100.0)
        return t

    helpers.start_training = start_training


def _steps(t: helpers.Training, epochs: int) -> tuple[int, int]:
    """(steps taken so far, steps per epoch): the schedule counts them and is checkpointed."""
    return t.scheduler.last_epoch, t.scheduler.total_steps // epochs


def use_mixup(alpha: float, epochs: int, seed: int) -> None:
    step_once = helpers.train_step

    def train_step(t, x, y, check=True):
        """The library's step on a mixed batch: the model sees lam*x + (1-lam)*x[perm] and the
        loss mixes the two label sets alike (lam ramps from 1 to the Beta draw, then back to
        1 for the last five epochs)."""
        step, steps_per_epoch = _steps(t, epochs)
        total = epochs * steps_per_epoch
        ramp = min(1.0, step / (total / 2)) if step < total - 5 * steps_per_epoch else 0.0
        rng = np.random.default_rng([seed, step])
        b = rng.beta(alpha, alpha)
        lam = 1 - ramp * (1 - max(b, 1 - b))  # the batch's own labels keep the larger share
        perm = torch.from_numpy(rng.permutation(len(y))).to(t.device)
        y_perm = y.to(t.device)[perm]
        mixed = replace(t, model=lambda inp: t.model(lam * inp + (1 - lam) * inp[perm]),
                        criterion=lambda logits, target: lam * t.criterion(logits, target)
                        + (1 - lam) * t.criterion(logits, y_perm))
        return step_once(mixed, x, y, check)

    helpers.train_step = train_step


def use_ema(decay: float, epochs: int, out: Path) -> None:
    """Keep an EMA of the weights and BatchNorm statistics, updated every step: each epoch is
    scored with it, and the run ends with it (training itself goes on from the raw weights).
    The EMA of epoch e is saved as ``out/ema-<e>.pt`` before that epoch's checkpoint."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    state: dict = {}
    step, evaluate = helpers.train_step, helpers.evaluate

    def train_step(t, x, y, check=True):
        if "ema" not in state:
            steps, per_epoch = _steps(t, epochs)
            state["t"] = t
            state["ema"] = AveragedModel(t.model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                         use_buffers=True)
            if steps:  # resumed after epoch steps // per_epoch: continue its average
                saved = torch.load(out / f"ema-{steps // per_epoch}.pt")["model"]
                state["ema"].load_state_dict(saved)
        result = step(t, x, y, check)
        state["ema"].update_parameters(t.model)
        return result

    def ema_evaluate(model, batches, tta=False):
        t = state.get("t")
        if t is None or t.model is not model:
            return evaluate(model, batches, tta)  # not this run's model
        epoch, part = divmod(*_steps(t, epochs))
        if part:
            return evaluate(model, batches, tta)  # not at an epoch's end
        helpers.save_checkpoint(out / f"ema-{epoch}.pt", dict(model=state["ema"].state_dict()))
        (out / f"ema-{epoch - 2}.pt").unlink(missing_ok=True)
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state["ema"].module.state_dict())
        result = evaluate(model, batches, tta)
        if epoch < epochs:  # the last epoch ends with the averaged weights
            model.load_state_dict(raw)
        return result

    helpers.train_step, helpers.evaluate = train_step, ema_evaluate


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixup", type=float)
    p.add_argument("--ema", type=float)
    p.add_argument("--adamw", type=float)
    args, train = p.parse_known_args(argv)
    train = [a for a in train if a != "--"]
    parsed = helpers._build_parser().parse_args(["train", *train])
    recipe = helpers._recipe_from_args(parsed)
    if args.adamw:
        use_adamw(args.adamw)
    if args.mixup:
        use_mixup(args.mixup, recipe.epochs, parsed.seed)
    if args.ema:
        use_ema(args.ema, recipe.epochs, Path(parsed.out))
    return helpers.main(["train", *train])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
