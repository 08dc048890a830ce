"""Training loop, OneCycle schedule, NaN stop, evaluation, checkpoints, seeds, device."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import helpers

TINY = (8, 16, 16, 16)
KEYS = {"epoch", "lr", "train_loss", "train_acc", "eval_split", "eval_loss", "eval_acc",
        "seconds", "images_per_s"}


def _loaders(x, y, batch_size=16, test=None):
    mean, _ = helpers.compute_mean_std(x)
    train_ds = helpers.CifarDataset(x, y, helpers.exercise_augmentations(mean, seed=0))
    tx, ty = test if test is not None else (x, y)
    return helpers.make_loaders(train_ds, helpers.CifarDataset(tx, ty), batch_size=batch_size,
                                num_workers=0)


def _brightest_channel(n_per_class: int, seed: int):
    """Learnable 3-class task: the label is the colour channel that is bright."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    x = rng.integers(0, 90, size=(len(y), 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, :, c] = rng.integers(160, 256, size=(32, 32))
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


@pytest.fixture
def random_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    return x, y


# --------------------------------------------------------------------------- fit
def test_fit_history_rows(random_data, cpu):
    helpers.set_seed(0)
    train, test = _loaders(*random_data)
    model = helpers.Net(TINY)
    recipe = helpers.Recipe(epochs=2, batch_size=16, widths=TINY)
    logged = []
    history = helpers.fit(model, train, test, recipe, cpu, progress=False, log=logged.append)
    assert len(history) == 2 and logged == history
    assert [h["epoch"] for h in history] == [1, 2]
    for row in history:
        assert KEYS <= set(row)
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["eval_acc"] <= 1.0
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
        assert row["eval_split"] == "test"
        assert row["seconds"] > 0 and row["images_per_s"] > 0
        assert 0 < row["lr"] <= recipe.lr


def test_fit_prints_rows_by_default(random_data, cpu, capsys):
    train, test = _loaders(*random_data)
    recipe = helpers.Recipe(epochs=1, batch_size=16, widths=TINY)
    helpers.fit(helpers.Net(TINY), train, test, recipe, cpu, progress=False)
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "acc" in out


def test_fit_lr_follows_one_cycle(random_data, cpu):
    train, test = _loaders(*random_data)
    recipe = helpers.Recipe(epochs=4, batch_size=16, lr=0.1, widths=TINY)
    history = helpers.fit(helpers.Net(TINY), train, test, recipe, cpu, progress=False,
                          log=None)
    lrs = [h["lr"] for h in history]
    assert all(math.isfinite(v) and v > 0 for v in lrs)
    assert lrs[0] < 0.5 * recipe.lr  # warm-up starts low
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1  # rises, then falls
    assert lrs[peak] == pytest.approx(recipe.lr, rel=0.05)
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_fit_learns_a_learnable_task(cpu):
    helpers.set_seed(0)
    x, y = _brightest_channel(32, seed=0)
    xt, yt = _brightest_channel(10, seed=1)
    train, test = _loaders(x, y, batch_size=16, test=(xt, yt))
    model = helpers.Net(TINY, num_classes=3)
    recipe = helpers.Recipe(epochs=4, batch_size=16, lr=0.1, widths=TINY)
    history = helpers.fit(model, train, test, recipe, cpu, progress=False, log=None)
    assert history[-1]["train_acc"] > 0.8  # chance is 1/3
    assert history[-1]["eval_acc"] > 0.8


def test_fit_checkpoint_written(random_data, cpu, tmp_path):
    train, test = _loaders(*random_data)
    recipe = helpers.Recipe(epochs=1, batch_size=16, widths=TINY)
    model = helpers.Net(TINY)
    path = tmp_path / "ck" / "model.pt"
    history = helpers.fit(model, train, test, recipe, cpu, progress=False, log=None,
                          checkpoint=path)
    fresh = helpers.Net(TINY)
    state = helpers.load_checkpoint(path, fresh)
    assert state["epoch"] == 1 and state["history"] == history
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v.contiguous(), check_stride=False)
    assert list(path.parent.glob("*.tmp")) == []


class _NaNImages(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((32, 32, 3), float("nan")), i % 10


def test_fit_stops_on_nan(cpu):
    loader = DataLoader(_NaNImages(), batch_size=16)
    recipe = helpers.Recipe(epochs=1, batch_size=16, widths=TINY)
    with pytest.raises(FloatingPointError, match=r"(?i)nan.*batch 0.*learning rate"):
        helpers.fit(helpers.Net(TINY), loader, loader, recipe, cpu, progress=False, log=None)


def test_train_one_epoch_stops_on_nan_loss(random_data, cpu):
    train, _ = _loaders(*random_data)
    model = helpers.Net(TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(logits, y):
        return logits.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="nan"):
        helpers.train_one_epoch(model, train, opt, None, nan_loss, cpu, progress=False)
    for a, b in zip(before, model.parameters()):  # no step taken with a NaN loss
        assert torch.equal(a, b)


def test_train_one_epoch_returns_mean_loss_and_accuracy(cpu):
    """A fixed linear model with lr 0: compare against a manual pass over the batches."""
    torch.manual_seed(0)
    x = torch.randn(24, 32, 32, 3)  # NHWC, as the loader gives
    y = torch.randint(0, 10, (24,))
    loader = DataLoader(list(zip(x, y)), batch_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        logits = model(x.permute(0, 3, 1, 2))
    ref_loss = F.cross_entropy(logits, y).item()
    ref_acc = (logits.argmax(1) == y).float().mean().item()
    loss, acc = helpers.train_one_epoch(model, loader, opt, None, nn.CrossEntropyLoss(), cpu,
                                        progress=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert acc == pytest.approx(ref_acc)


# --------------------------------------------------------------------------- evaluate
def test_evaluate_matches_manual_computation(cpu):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    loader = helpers.TensorBatches(x, y, batch_size=6)
    model = helpers.Net(TINY).eval()
    with torch.no_grad():
        xc = x.permute(0, 3, 1, 2).float()
        logits = model(xc)
        flipped = (logits + model(torch.flip(xc, dims=[3]))) / 2
    loss, acc = helpers.evaluate(model, loader, cpu)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    loss_t, acc_t = helpers.evaluate(model, loader, cpu, tta=True)
    assert 0.0 <= acc_t <= 1.0
    assert loss_t == pytest.approx(F.cross_entropy(flipped, y).item(), rel=1e-4)
    assert acc_t == pytest.approx((flipped.argmax(1) == y).float().mean().item())


def test_evaluate_leaves_model_in_eval_and_does_not_train(cpu):
    model = helpers.Net(TINY).train()
    loader = DataLoader([(torch.randn(32, 32, 3), 1) for _ in range(4)], batch_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    helpers.evaluate(model, loader, cpu, tta=True)
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(before[k], v), k


def _with_random_bn_statistics(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def test_fold_batchnorm_computes_the_same_function_without_batchnorm():
    model = _with_random_bn_statistics(helpers.Net(TINY, (1, 1, 1, 1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = helpers.fold_batchnorm(model)
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref, out = model(x.float()), folded(x.float())
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == len(convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # original kept
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_fold_batchnorm_leaves_batchnorm_that_follows_no_conv():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    model = _with_random_bn_statistics(model)
    folded = helpers.fold_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert [type(m) for m in folded] == [nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d]


def test_evaluate_scores_a_trained_net_as_the_unfolded_net_does(cpu):
    model = _with_random_bn_statistics(helpers.Net(TINY))
    x = torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (30,))
    with torch.no_grad():
        logits = model(x.permute(0, 3, 1, 2).float())
    loss, acc = helpers.evaluate(model, helpers.TensorBatches(x, y, batch_size=7), cpu)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = helpers.Net(TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randint(0, 256, (4, 3, 32, 32)).float()
    model(x).sum().backward()
    opt.step()
    model.eval()
    path = tmp_path / "sub" / "model.pt"
    helpers.save_checkpoint(path, model, opt, epoch=3, history=[{"epoch": 3}])
    assert path.is_file() and list(path.parent.glob("*.tmp")) == []
    other = helpers.Net(TINY).eval()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        assert not torch.allclose(other(x), model(x))
    state = helpers.load_checkpoint(path, other, other_opt)
    assert state["epoch"] == 3 and state["history"] == [{"epoch": 3}]
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    torch.testing.assert_close(other_opt.state_dict()["state"][0]["momentum_buffer"], buf)


def test_checkpoint_overwrite_is_clean(tmp_path):
    path = tmp_path / "m.pt"
    model = helpers.Net(TINY)
    helpers.save_checkpoint(path, model, epoch=1)
    helpers.save_checkpoint(path, model, epoch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert helpers.load_checkpoint(path, helpers.Net(TINY))["epoch"] == 2


def test_failed_save_leaves_no_temp_and_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    model = helpers.Net(TINY)
    helpers.save_checkpoint(path, model, epoch=1)

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        helpers.save_checkpoint(path, model, epoch=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert helpers.load_checkpoint(path, helpers.Net(TINY))["epoch"] == 1


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        helpers.load_checkpoint(tmp_path / "nothing.pt", helpers.Net(TINY))


def test_load_checkpoint_garbage(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00\x01 definitely not a checkpoint" * 20)
    with pytest.raises(RuntimeError) as e:
        helpers.load_checkpoint(bad, helpers.Net(TINY))
    assert str(bad) in str(e.value)


def test_load_checkpoint_wrong_model(tmp_path):
    path = tmp_path / "m.pt"
    helpers.save_checkpoint(path, helpers.Net(TINY))
    with pytest.raises(RuntimeError, match="m.pt"):
        helpers.load_checkpoint(path, helpers.Net((8, 16, 16, 32)))


# --------------------------------------------------------------------------- seeds, device
def test_set_seed_reproduces_draws():
    helpers.set_seed(42)
    a = (torch.randn(5), np.random.rand(5), random.random())
    helpers.set_seed(42)
    b = (torch.randn(5), np.random.rand(5), random.random())
    assert torch.equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    helpers.set_seed(43)
    assert not torch.equal(torch.randn(5), a[0])


def test_set_seed_makes_training_reproducible(random_data, cpu):
    recipe = helpers.Recipe(epochs=1, batch_size=16, widths=TINY)
    runs = []
    for _ in range(2):
        helpers.set_seed(0)
        train, test = _loaders(*random_data)
        model = helpers.Net(TINY)
        h = helpers.fit(model, train, test, recipe, cpu, progress=False, log=None)
        runs.append((h[0]["train_loss"], model.out[-1].weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_get_device_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    dev = helpers.get_device()
    assert dev == torch.device("cpu")
    assert "CPU" in capsys.readouterr().out
    helpers.get_device(verbose=False)
    assert capsys.readouterr().out == ""


def test_recipes_are_sane():
    assert set(helpers.RECIPES) == {"standard", "accurate", "fast", "small"}
    for name, r in helpers.RECIPES.items():
        assert r.epochs >= 1 and r.batch_size >= 1 and r.lr > 0, name
        model = helpers.build_model(r)
        assert helpers.count_parameters(model) < 200_000, name
        assert helpers.check_rules(model)["passed"].all(), name
        assert min(r.p_flip, r.p_affine, r.p_dropout) >= 0.25, name  # each on a quarter or more
    assert helpers.count_parameters(helpers.build_model(helpers.RECIPES["small"])) <= 50_000
    assert helpers.RECIPES["fast"].epochs <= 10
    # the default's budget: Run All of the notebook stays about an hour on a 2-core CPU
    assert helpers.RECIPES["standard"].epochs <= 15
    # "accurate" is the default's net and settings, trained for 50 epochs instead of 15
    assert helpers.RECIPES["accurate"] == replace(helpers.RECIPES["standard"], epochs=50)
    assert helpers.Recipe() == helpers.RECIPES["standard"]  # the defaults are the notebook's


# --------------------------------------------------------------------------- import, CLI
REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               NO_ALBUMENTATIONS_UPDATE="1", MPLBACKEND="Agg")
    env.update(extra)
    return env


def test_import_is_silent_and_writes_nothing(tmp_path):
    res = subprocess.run([sys.executable, "-c", "import helpers"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_all_names_exist():
    assert len(helpers.__all__) == len(set(helpers.__all__))
    missing = [n for n in helpers.__all__ if not hasattr(helpers, n)]
    assert missing == []


def test_cli_train_writes_run_folder(tmp_path, png_root):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "helpers.py"), "train", "--data-dir", str(png_root),
           "--epochs", "2", "--widths", "8", "16", "16", "16", "--batch-size", "16",
           "--out", str(out), "--no-progress", "--threads", "1", "--p-affine", "0.1",
           "--p-dropout", "0.2", "--weight-decay", "1e-4", "--label-smoothing", "0",
           "--act", "relu"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "log.jsonl", "summary.json",
                                               "model.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["epochs"] == 2 and config["recipe"]["widths"] == [8, 16, 16, 16]
    assert {k: config["recipe"][k] for k in ("p_affine", "p_dropout", "weight_decay",
                                             "label_smoothing", "act")} == dict(
        p_affine=0.1, p_dropout=0.2, weight_decay=1e-4, label_smoothing=0.0, act="relu")
    assert config["recipe"]["lr"] == helpers.RECIPES["standard"].lr  # not given: the recipe's
    assert config["recipe"]["depths"] == [1, 1, 1, 1]
    assert config["train_images"] == 30 and config["eval_images"] == 20
    assert config["eval_split"] == "test"
    assert config["params"] == helpers.count_parameters(helpers.Net(TINY))
    assert config["threads"] == 1
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(KEYS <= set(r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == rows[-1]["eval_acc"]
    assert {r["eval_split"] for r in rows} == {"test"}
    assert 0.0 <= summary["final_test_acc_flip_tta"] <= 1.0
    state = helpers.load_checkpoint(out / "model.pt", helpers.Net(TINY))
    assert state["epoch"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {"png", "run"}  # nothing else in cwd


def test_cli_model_options_reach_the_recipe():
    parse = helpers._build_parser().parse_args
    base = ["train", "--data-dir", "x", "--recipe", "small"]
    r = helpers._recipe_from_args(parse(base + [
        "--depths", "1", "2", "1", "1", "--act", "relu", "--epochs", "3"]))
    assert (r.depths, r.act, r.epochs) == ((1, 2, 1, 1), "relu", 3)
    assert r.widths == helpers.RECIPES["small"].widths
    r = helpers._recipe_from_args(parse(base))  # flags not given: the recipe's values
    assert r == helpers.RECIPES["small"]


def test_cli_val_fraction_holds_out_training_images(tmp_path, png_root):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "helpers.py"), "train", "--data-dir", str(png_root),
           "--epochs", "1", "--widths", "8", "16", "16", "16", "--batch-size", "16",
           "--out", str(out), "--no-progress", "--threads", "1", "--workers", "0",
           "--val-fraction", "0.2"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["train_images"], config["eval_split"], config["eval_images"]) == (24, "val", 6)
    summary = json.loads((out / "summary.json").read_text())
    assert "final_test_acc" not in summary
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["final_val_acc"] == rows[-1]["eval_acc"]
    assert {r["eval_split"] for r in rows} == {"val"}  # named for what was evaluated
    assert "val loss" in res.stdout and "test loss" not in res.stdout


def test_cli_missing_data_fails_clearly(tmp_path):
    cmd = [sys.executable, str(REPO / "helpers.py"), "train", "--data-dir",
           str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--epochs", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert "No CIFAR-10 data" in res.stderr and "none" in res.stderr
