"""The recipe, the training step and loop, evaluation, checkpoints and weights, seeds, device,
and the train and evaluate commands on tiny data."""
from __future__ import annotations

import json
import math
import random
import subprocess
import warnings
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import helpers
from conftest import CLASSES, TINY, TINY_RUN, cli, env, helpers_cmd, one_line, tiny_loaders

KEYS = {"epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "train_seconds",
        "seconds", "images_per_s"}


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
    return rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64)


def _tiny(epochs=2, **kw):
    return helpers.Recipe(epochs=epochs, batch_size=16, widths=TINY, **kw)


# --------------------------------------------------------------------------- the recipe
def test_every_recipe_field_declares_help_range_and_an_option():
    parser_help = subprocess.run(helpers_cmd("train", "--help"), env=env(), capture_output=True,
                                 text=True, timeout=120).stdout
    for f in fields(helpers.Recipe):
        assert f.metadata["help"] and f.metadata["words"], f.name
        assert f"--{f.name.replace('_', '-')}" in parser_help, f.name
    assert "--widths C1 C2 C3 C4" in parser_help and "--depths D1 D2 D3 D4" in parser_help


@pytest.mark.parametrize("field, value", [
    ("act", "tanh"), ("p_dropout", 1.5), ("p_flip", -0.1), ("epochs", 0), ("epochs", 2.0),
    ("epochs", True), ("widths", (8, 16, 16)), ("widths", (0, 16, 16, 16)),
    ("depths", (1, 0, 1, 1)), ("depths", (-1, 1, 1, 1)), ("lr", float("nan")),
    ("lr", float("inf")), ("lr", 0), ("weight_decay", -1e-4), ("label_smoothing", 1.0),
    ("pct_start", 0.0), ("batch_size", 0), ("lr", 10 ** 400), ("muon_lr", 10 ** 400),  # too
    ("weight_decay", 10 ** 400), ("widths", (8, 10 ** 20, 16, 16)),  # large to be used
    ("lr", 1e39), ("muon_lr", 1e39), ("weight_decay", 1e39),  # too large for float32
    ("depths", (0, 200_000, 0, 0)),
    ("batch_size", 10 ** 8), ("epochs", 10 ** 6)], ids=lambda v: str(v)[:12])
def test_a_recipe_cannot_be_built_with_a_bad_value(field, value):
    with pytest.raises(ValueError, match=rf"^Recipe\.{field}: expected .*, got"):
        helpers.Recipe(**{field: value})
    with pytest.raises(ValueError, match=field):
        replace(helpers.RECIPES["small"], **{field: value})


def test_a_recipe_is_frozen_and_takes_lists_from_json():
    r = helpers.Recipe(**json.loads(json.dumps({"widths": [8, 16, 16, 16]})))
    assert r.widths == TINY and hash(r)
    with pytest.raises(AttributeError):
        r.lr = -1


def test_a_recipe_takes_numpy_numbers_as_pythons():
    r = helpers.Recipe(epochs=np.int64(20), lr=np.float32(0.5), widths=[np.int16(8), 16, 16, 16])
    assert (r.epochs, r.lr, r.widths) == (20, 0.5, TINY)
    assert type(r.epochs) is int and type(r.lr) is float and type(r.widths[0]) is int
    assert helpers.Recipe(**json.loads(json.dumps(asdict(r)))) == r
    with pytest.raises(ValueError, match="^Recipe.epochs: expected"):
        helpers.Recipe(epochs=np.bool_(True))


def test_defaults_come_from_the_recipe():
    default = helpers.Recipe()
    net = helpers.Net()
    assert [net.c1[0][0].out_channels, net.c2[0][0].out_channels, net.c3[0][1].out_channels,
            net.c4[0][1].out_channels] == list(default.widths)
    assert isinstance(net.c1[0][2], helpers.ACTIVATIONS[default.act])
    aug = helpers.exercise_augmentations((0.5,) * 3)
    assert [t.p for t in aug.transforms] == [default.p_flip, default.p_affine, default.p_dropout]


def test_recipes_obey_the_rules_and_their_budgets():
    assert set(helpers.RECIPES) == {"standard", "accurate", "fast", "small"}
    for name, r in helpers.RECIPES.items():
        model = helpers.build_model(r)
        assert helpers.count_parameters(model) < 200_000, name
        assert helpers.check_rules(model)["passed"].all(), name
        assert min(r.p_flip, r.p_affine, r.p_dropout) >= 0.25, name  # each on a quarter or more
    assert helpers.count_parameters(helpers.build_model(helpers.RECIPES["small"])) <= 50_000
    assert helpers.RECIPES["fast"].epochs <= 10
    assert helpers.RECIPES["standard"].epochs <= 10  # Run All: about 15 minutes on 2 cores
    assert helpers.RECIPES["accurate"] == replace(  # the extra credit: C4 shrinks by dilation
        helpers.RECIPES["standard"], epochs=100, dilated_downs=1, p_affine=0.5, p_dropout=0.5,
        muon_lr=0.01)
    assert helpers.Recipe() == helpers.RECIPES["standard"]  # the defaults are the notebook's


# --------------------------------------------------------------------------- the step and loop
def test_train_step_updates_once_and_counts_correct(random_data, cpu):
    x, y = torch.as_tensor(random_data[0][:16]), torch.as_tensor(random_data[1][:16])
    model = helpers.Net(TINY)
    t = helpers.start_training(model, _tiny(), steps_per_epoch=4)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss, correct = helpers.train_step(t, x, y)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and 0 <= correct.item() <= 16
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert t.scheduler.last_epoch == 1


def test_train_step_stops_on_nan_loss_before_the_update(random_data, cpu):
    x, y = torch.as_tensor(random_data[0][:16]), torch.as_tensor(random_data[1][:16])
    model = helpers.Net(TINY)
    t = helpers.start_training(model, _tiny(), steps_per_epoch=4)
    t.criterion = lambda logits, labels: logits.sum() * float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="nan"):
        helpers.train_step(t, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_step_the_loss_scaler_skips_moves_the_schedule_on_without_a_warning(random_data,
                                                                               cpu):
    x, y = torch.as_tensor(random_data[0][:16]), torch.as_tensor(random_data[1][:16])
    model = helpers.Net(TINY)
    t = helpers.start_training(model, _tiny(), steps_per_epoch=4)
    # as on a GPU, where float16 gradients often overflow at the first steps' loss scale
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    criterion = t.criterion
    t.criterion = lambda logits, labels: 1e10 * criterion(logits, labels)  # gradients inf
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        helpers.train_step(t, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped
    assert t.scheduler.last_epoch == 1 and t.scaler.get_scale() < 2.0 ** 127


def test_train_one_epoch_returns_mean_loss_accuracy_and_images(cpu):
    """A fixed linear model with lr 0: compare against a manual pass over the batches."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    t = helpers.start_training(model, _tiny(label_smoothing=0.0), 3)
    t.optimizer.param_groups[0]["lr"] = t.optimizer.param_groups[1]["lr"] = 0.0
    t.scheduler = None
    with torch.no_grad():
        logits = model(x.permute(0, 3, 1, 2).float())
    loss, acc, seen = helpers.train_one_epoch(t, DataLoader(list(zip(x, y)), batch_size=8),
                                              progress=False)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert seen == 20  # the last, partial batch counted as it is


def test_fit_history_rows_and_the_log(random_data, cpu):
    helpers.set_seed(0)
    train, test = tiny_loaders(*random_data, batch_size=16)
    recipe, logged = _tiny(), []
    history = helpers.fit(helpers.Net(TINY), recipe, train, test, progress=False,
                          log=lambda rows: logged.append([dict(r) for r in rows]))
    assert [len(x) for x in logged] == [1, 2] and logged[-1] == history
    assert [h["epoch"] for h in history] == [1, 2]
    for row in history:
        assert set(row) == KEYS
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["eval_acc"] <= 1.0
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
        assert row["seconds"] >= row["train_seconds"] > 0 and 0 < row["lr"] <= recipe.lr
        assert row["images_per_s"] == pytest.approx(64 / row["train_seconds"])


def test_images_per_s_counts_images_not_batch_size(cpu):
    """A batch larger than the data once counted 128 images for 10 (100x too high)."""
    x, y = np.zeros((10, 32, 32, 3), np.uint8), np.arange(10)
    train, test = tiny_loaders(x, y, batch_size=128)
    row = helpers.fit(helpers.Net(TINY), helpers.Recipe(epochs=1, widths=TINY), train, test,
                      progress=False, log=lambda rows: None)[0]
    assert row["images_per_s"] == pytest.approx(10 / row["train_seconds"])


def test_fit_prints_rows_by_default(random_data, cpu, capsys):
    train, test = tiny_loaders(*random_data, batch_size=16)
    helpers.fit(helpers.Net(TINY), _tiny(epochs=1), train, test, progress=False)
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "test loss" in out and "img/s" in out
    assert helpers.format_row(helpers.fit(helpers.Net(TINY), _tiny(epochs=1), train, test,
                                          progress=False, log=print)[0], "val").count("val") == 1


def test_fit_lr_follows_one_cycle(random_data, cpu):
    train, test = tiny_loaders(*random_data, batch_size=16)
    recipe = _tiny(epochs=4, lr=0.1)
    lrs = [h["lr"] for h in helpers.fit(helpers.Net(TINY), recipe, train, test,
                                        progress=False, log=lambda rows: None)]
    assert lrs[0] < 0.5 * recipe.lr  # warm-up starts low
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[peak] == pytest.approx(recipe.lr, rel=0.05)
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def _polar(m: torch.Tensor) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to ``m``: U V^T of its SVD."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(32, 3, 3, 3), (96, 64, 1, 1), (128, 128, 3, 3), (10, 200)])
def test_orthogonalise_moves_singular_values_near_one_keeping_the_directions(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    o = helpers.orthogonalise(g)
    m, mo = g.reshape(shape[0], -1), o.reshape(shape[0], -1)
    s = torch.linalg.svdvals(mo)
    assert o.shape == g.shape and 0.6 < s.min() and s.max() < 1.2
    assert torch.allclose(_polar(mo), _polar(m), atol=1e-3)


def test_muon_sgd_without_a_muon_group_steps_as_torch_sgd():
    torch.manual_seed(0)
    nets = (nn.Linear(5, 3), nn.Linear(5, 3))
    nets[1].load_state_dict(nets[0].state_dict())
    groups = [[dict(params=[n.weight], weight_decay=0.01), dict(params=[n.bias], weight_decay=0)]
              for n in nets]
    optimizers = (torch.optim.SGD(groups[0], lr=0.1, momentum=0.9, nesterov=True),
                  helpers.MuonSGD(groups[1], lr=0.1, momentum=0.9))
    for _ in range(5):
        x = torch.randn(4, 5)
        for net, opt in zip(nets, optimizers):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_a_muon_step_is_the_orthogonalised_momentum_on_a_rescaled_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    w, buf = conv.weight.detach().clone(), None
    opt = helpers.MuonSGD([dict(params=[conv.weight], lr=0.05, muon=True, weight_decay=0.1)],
                          lr=0.2, momentum=0.9)
    for _ in range(3):
        g = torch.randn_like(w)
        conv.weight.grad = g.clone()
        opt.step()
        buf = g if buf is None else 0.9 * buf + g  # Nesterov momentum, no weight decay
        w = w * (8 ** 0.5 / w.norm()) - 0.05 * helpers.orthogonalise(g + 0.9 * buf)
    assert torch.allclose(conv.weight, w, atol=1e-6)


def test_muon_lr_gives_the_dense_conv_weights_to_muon_at_their_own_peak(cpu):
    model = helpers.Net(TINY)
    assert type(helpers.start_training(model, _tiny(muon_lr=0.0), 10).optimizer) is \
        torch.optim.SGD
    t = helpers.start_training(model, _tiny(muon_lr=0.03), 10)
    dense = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    groups = t.optimizer.param_groups
    assert [{id(p) for p in g["params"]} == dense for g in groups] == [False, False, True]
    assert sorted(id(p) for g in groups for p in g["params"]) == \
        sorted(id(p) for p in model.parameters())  # each parameter in one group
    peaks, momenta = [0.0] * len(groups), []
    for _ in range(20):
        peaks = [max(peak, g["lr"]) for peak, g in zip(peaks, groups)]
        momenta.append(groups[2]["momentum"])
        t.optimizer.step()  # no gradients: changes nothing
        t.scheduler.step()
    assert peaks == pytest.approx([0.2, 0.2, 0.03], rel=0.05)
    assert (min(momenta), max(momenta)) == pytest.approx((0.85, 0.95), abs=0.01)  # cycled too
    assert [g["weight_decay"] for g in groups] == [5e-4, 0, 0]  # none on Muon's weights


def test_fit_learns_a_learnable_task(cpu):
    helpers.set_seed(0)
    x, y = _brightest_channel(32, seed=0)
    train, test = tiny_loaders(x, y, test=_brightest_channel(10, seed=1), batch_size=16)
    history = helpers.fit(helpers.Net(TINY, num_classes=3), _tiny(epochs=4, lr=0.1), train,
                          test, progress=False, log=lambda rows: None)
    assert history[-1]["train_acc"] > 0.8 and history[-1]["eval_acc"] > 0.8  # chance: 1/3


def test_fit_stops_on_nan_and_says_what_to_do(random_data, cpu, tmp_path):
    train, test = tiny_loaders(*random_data, batch_size=16)
    model = helpers.Net(TINY)
    model.register_forward_hook(lambda m, i, out: out * float("nan") if m.training else None)
    with pytest.raises(FloatingPointError, match=r"Epoch 1: the training loss became nan; "
                                                 r"stopped before saving \(no checkpoint"):
        helpers.fit(model, _tiny(epochs=1), train, test, tmp_path / "m.pt", progress=False,
                    log=None)
    assert not (tmp_path / "m.pt").exists()


def test_set_seed_makes_training_reproducible(random_data, cpu):
    runs = []
    for _ in range(2):
        helpers.set_seed(0)
        train, test = tiny_loaders(*random_data, batch_size=16)
        model = helpers.Net(TINY)
        h = helpers.fit(model, _tiny(epochs=1), train, test, progress=False,
                        log=lambda rows: None)
        runs.append((h[0]["train_loss"], model.out[-1].weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_set_seed_reproduces_draws():
    helpers.set_seed(42)
    a = (torch.randn(5), np.random.rand(5), random.random())
    helpers.set_seed(42)
    b = (torch.randn(5), np.random.rand(5), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    helpers.set_seed(43)
    assert not torch.equal(torch.randn(5), a[0])


def test_get_device_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert helpers.get_device() == torch.device("cpu")
    assert "CPU" in capsys.readouterr().out
    helpers.get_device(verbose=False)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- evaluation
def test_evaluate_matches_manual_computation(cpu):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    model = helpers.Net(TINY).eval()
    with torch.no_grad():
        xc = x.permute(0, 3, 1, 2).float()
        logits = model(xc)
        flipped = (logits + model(torch.flip(xc, dims=[3]))) / 2
    for tta, ref in ((False, logits), (True, flipped)):
        y = (ref.argmax(1) + (torch.arange(20) >= 7)) % 10  # 7 of 20 right
        loss, acc = helpers.evaluate(model, helpers.TensorBatches(x, y, batch_size=6), tta=tta)
        assert loss == pytest.approx(F.cross_entropy(ref, y).item(), rel=1e-4)
        assert acc == 0.35  # exactly: a count over a count, not float32's 0.3499999940395355


def test_evaluate_leaves_the_model_untouched(cpu):
    model = helpers.Net(TINY).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    helpers.evaluate(model, DataLoader([(x, 1) for x in images], batch_size=2), tta=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


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


def test_evaluate_scores_a_net_with_batchnorm_statistics_in_eval_mode(cpu):
    model = _with_random_bn_statistics(helpers.Net(TINY))
    x = torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (30,))
    with torch.no_grad():
        logits = model(x.permute(0, 3, 1, 2).float())
    loss, acc = helpers.evaluate(model, helpers.TensorBatches(x, y, batch_size=7))
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())


# --------------------------------------------------------------------------- checkpoints, weights
def test_fit_checkpoint_is_a_plain_dict_that_resumes(random_data, cpu, tmp_path):
    train, test = tiny_loaders(*random_data, batch_size=16)
    model, path = helpers.Net(TINY), tmp_path / "ck" / "model.pt"
    history = helpers.fit(model, _tiny(epochs=1), train, test, path, progress=False,
                          log=lambda rows: None)
    state = torch.load(path, weights_only=True)  # tensors and plain values only
    assert state["epoch"] == 1 and state["history"] == history
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "epoch", "history", "run"}
    assert state["run"]["seed"] == 0 and state["run"]["train_images"] == 64
    assert list(path.parent.glob("*.tmp")) == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like any other file


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Stop(Exception):
    """Raised by a ``log`` to end ``fit`` after an epoch is saved, as a disconnect would."""


def test_a_run_begun_without_loss_scaling_resumes_with_it(random_data, cpu, tmp_path,
                                                          monkeypatch):
    """A checkpoint saved where the loss scaler is off (the CPU, MPS: saved as {}) continues
    where it is on (a GPU): that scaler starts afresh instead of the checkpoint being refused."""
    train, test = tiny_loaders(*random_data, batch_size=16)
    path, recipe = tmp_path / "model.pt", _tiny(epochs=2)

    def stop(rows):
        raise _Stop

    with pytest.raises(_Stop):
        helpers.fit(helpers.Net(TINY), recipe, train, test, path, progress=False, log=stop)
    assert torch.load(path, weights_only=True)["scaler"] == {}
    start = helpers.start_training

    def scaled(model, recipe, steps_per_epoch):  # the scaler on, as start_training has it on a GPU
        t = start(model, recipe, steps_per_epoch)
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        return t

    monkeypatch.setattr(helpers, "start_training", scaled)
    history = helpers.fit(helpers.Net(TINY), recipe, train, test, path, resume=True,
                          progress=False, log=lambda rows: None)
    assert [row["epoch"] for row in history] == [1, 2]
    assert torch.load(path, weights_only=True)["scaler"]["scale"] == 2.0 ** 8


def test_save_weights_and_load_model_round_trip(tmp_path):
    recipe = helpers.Recipe(widths=TINY, depths=(0, 1, 1, 1), act="relu", dilated_downs=2)
    model = _with_random_bn_statistics(helpers.build_model(recipe, 7, (0.1, 0.2, 0.3),
                                                           (0.4, 0.5, 0.6)))
    helpers.save_weights(tmp_path / "w.pt", model, dict(recipe=asdict(recipe), seed=3))
    loaded, state = helpers.load_model(tmp_path / "w.pt")
    x = torch.randint(0, 256, (4, 3, 32, 32)).float()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training and state["run"]["seed"] == 3
    assert set(state) == {"model", "run", "history"} and state["history"] == []


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path, model = tmp_path / "m.pt", helpers.Net(TINY)
    helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=1))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(helpers.WriteError, match=r"cannot write .*m.pt: No space left"):
        helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("name, raw", [
    ("empty.pt", b""), ("garbage.pt", b"\x00\x01 not a checkpoint" * 20),
    ("plain.pt", __import__("pickle").dumps({"model": [1, 2]}, protocol=4))])
def test_broken_files_get_a_short_safe_message(tmp_path, name, raw):
    import warnings
    (tmp_path / name).write_bytes(raw)
    with warnings.catch_warnings(record=True) as seen, \
            pytest.raises(helpers.CheckpointError) as e:
        warnings.simplefilter("always")
        helpers.load_model(tmp_path / name)
    assert name in str(e.value) and "weights_only" not in str(e.value)  # no unsafe advice
    assert "\n" not in str(e.value) and not seen


def test_load_model_of_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(helpers.CheckpointError, match="nothing.pt is not a file"):
        helpers.load_model(tmp_path / "nothing.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(helpers.CheckpointError, match="other.pt holds no model"):
        helpers.load_model(tmp_path / "other.pt")
    recipe = helpers.Recipe(widths=TINY)  # a small file whose recipe asks for the largest net:
    helpers.save_weights(tmp_path / "w.pt", helpers.build_model(recipe), dict(recipe=asdict(
        replace(recipe, widths=(4096,) * 4, depths=(64,) * 4))))  # built, it took ~80 GB
    with pytest.raises(helpers.CheckpointError, match="not those of its recipe's net"):
        helpers.load_model(tmp_path / "w.pt")


# --------------------------------------------------------------------------- the commands
def test_import_is_silent_and_writes_nothing(tmp_path):
    res = subprocess.run(helpers_cmd()[:1] + ["-c", "import helpers"], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_all_names_exist_and_are_public():
    assert len(helpers.__all__) == len(set(helpers.__all__))
    assert [n for n in helpers.__all__ if not hasattr(helpers, n) or n.startswith("_")] == []


@pytest.mark.slow
def test_train_writes_the_run_folder_and_evaluate_scores_it(tmp_path, png_root):
    out = tmp_path / "run"
    res = subprocess.run(helpers_cmd(
        "train", "--data-dir", png_root, "--epochs", "2", "--widths", *TINY, "--batch-size",
        "16", "--out", out, "--no-progress", "--threads", "1", "--p-affine", "0.1",
        "--p-dropout", "0.2", "--p-flip", "0.3", "--weight-decay", "1e-4",
        "--label-smoothing", "0", "--act", "relu", "--pct-start", "0.3"),
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name for p in out.iterdir()} == {".lock", "config.json", "log.jsonl", "model.pt",
                                               "weights.pt", "summary.json"}
    config = json.loads((out / "config.json").read_text())
    assert {k: config["recipe"][k] for k in ("p_affine", "p_dropout", "p_flip", "weight_decay",
                                             "label_smoothing", "act", "pct_start")} == dict(
        p_affine=0.1, p_dropout=0.2, p_flip=0.3, weight_decay=1e-4, label_smoothing=0.0,
        act="relu", pct_start=0.3)
    assert config["recipe"]["lr"] == helpers.RECIPES["standard"].lr  # not given: the recipe's
    assert (config["train_images"], config["eval_images"], config["eval_split"]) == (30, 20,
                                                                                       "test")
    assert config["params"] == helpers.count_parameters(helpers.Net(TINY))
    assert len(config["mean"]) == len(config["std"]) == 3 and config["threads"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(set(r) == KEYS for r in log)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == log[-1]["eval_acc"]
    assert {p.name for p in tmp_path.iterdir()} == {"png", "run"}  # nothing else in cwd
    for weights in ("weights.pt", "model.pt"):  # the scorer reads either
        res = subprocess.run(helpers_cmd("evaluate", "--weights", out / weights, "--data-dir",
                                         png_root, "--threads", "1"),
                             env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        scored = json.loads(res.stdout.splitlines()[-2])
        assert scored["test_acc"] == summary["final_test_acc"]
        assert scored["test_acc_flip_tta"] == summary["final_test_acc_flip_tta"]
        assert f"test accuracy {100 * summary['final_test_acc']:.2f}%" in res.stdout


def test_evaluate_names_the_recipe_by_its_settings(tmp_path, png_root, capsys):
    """A checkpoint records the recipe's settings but not its name, and a run's weights the
    name of the recipe its options changed: evaluate names the recipe the settings are."""
    fast = helpers.RECIPES["fast"]
    for recipe, named, says in ((fast, None, "recipe fast, seed 4"),
                                (replace(fast, dilated_downs=1), "fast", "recipe custom, seed 4")):
        helpers.save_weights(tmp_path / "model.pt", helpers.build_model(recipe),
                             dict(recipe=asdict(recipe), seed=4, recipe_name=named))
        code, out, err = cli(capsys, "evaluate", "--weights", tmp_path / "model.pt",
                             "--data-dir", png_root, "--threads", "1")
        assert code == 0 and says in out, err


def test_evaluate_reads_only_the_test_images(tmp_path, png_root, capsys):
    """The scorer needs the test split alone: a damaged training image does not stop it (the
    training images are not decoded), while ``train`` names that image."""
    recipe = helpers.Recipe(widths=TINY)
    helpers.save_weights(tmp_path / "w.pt", helpers.build_model(recipe),
                         dict(recipe=asdict(recipe)))
    damaged = sorted(png_root.glob("train/*/*"))[0]
    damaged.write_bytes(b"not an image")
    code, out, err = cli(capsys, "evaluate", "--weights", tmp_path / "w.pt", "--data-dir",
                         png_root, "--threads", "1")
    assert code == 0 and "on 20 images of" in out, err
    code, _, err = cli(capsys, "train", "--data-dir", png_root, "--out", tmp_path / "run",
                       *TINY_RUN)
    assert code == 2 and damaged.name in one_line(err)


def test_evaluate_refuses_bad_weights_and_data_in_one_line(tmp_path, png_root, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for argv, says in (
            (["--weights", tmp_path / "none.pt", "--data-dir", png_root], "none.pt is not a file"),
            (["--weights", tmp_path / "junk.pt", "--data-dir", png_root], "junk.pt is damaged"),
            (["--weights", tmp_path / "junk.pt"], "required: --data-dir")):
        code, _, err = cli(capsys, "evaluate", *argv)
        assert code == 2 and says in one_line(err)
    recipe = helpers.Recipe(widths=TINY)
    helpers.save_weights(tmp_path / "w11.pt", helpers.build_model(recipe, 11),
                         dict(recipe=asdict(recipe)))
    code, _, err = cli(capsys, "evaluate", "--weights", tmp_path / "w11.pt", "--data-dir",
                       png_root)
    assert code == 2 and "11 outputs" in one_line(err) and "10 classes" in err
    helpers.save_weights(tmp_path / "w.pt", helpers.build_model(recipe, 10),
                         dict(recipe=asdict(recipe), classes=list(CLASSES)))
    assert cli(capsys, "evaluate", "--weights", tmp_path / "w.pt", "--data-dir", png_root)[0] == 0
    (tmp_path / "run").mkdir()  # a run's model.pt names no classes: its config.json does
    helpers.save_checkpoint(tmp_path / "run" / "model.pt", dict(
        model=helpers.build_model(recipe, 10).state_dict(), optimizer={},
        run=dict(recipe=asdict(recipe))))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"classes": list(CLASSES)}))
    state = torch.load(tmp_path / "w.pt", weights_only=True)  # helpers.py saves no nan: a
    state["model"]["out.1.weight"][0, 0] = float("nan")  # file made otherwise, once scored
    torch.save(state, tmp_path / "nan.pt")  # without a word
    code, _, err = cli(capsys, "evaluate", "--weights", tmp_path / "nan.pt", "--data-dir",
                       png_root)
    assert code == 2 and "out.1.weight holds nan or inf" in one_line(err)
    state["model"]["out.1.weight"][0, 0] = 0.0  # a variance under 0: nan too, once scored
    name = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][name][0] = -1.0
    torch.save(state, tmp_path / "negative.pt")
    code, _, err = cli(capsys, "evaluate", "--weights", tmp_path / "negative.pt", "--data-dir",
                       png_root)
    assert code == 2 and f"{name} holds a negative variance" in one_line(err)
    for split in ("train", "test"):  # the same number of classes, named otherwise
        (png_root / split / "cat").rename(png_root / split / "kitten")
    for weights in ("w.pt", "run/model.pt"):  # model.pt was scored, its labels shifted
        code, _, err = cli(capsys, "evaluate", "--weights", tmp_path / weights, "--data-dir",
                           png_root)
        assert code == 2 and "trained on the classes" in one_line(err) and "kitten" in err
    (tmp_path / "run" / "config.json").unlink()  # nothing names them: scored, and said so
    code, out, err = cli(capsys, "evaluate", "--weights", tmp_path / "run" / "model.pt",
                         "--data-dir", png_root)
    assert code == 0 and "names no classes: its outputs were read in the order of" in out, err
    for classes in ([1, 2, 3], [None] * 10, 5):  # a crafted file: a TypeError, with a traceback
        helpers.save_weights(tmp_path / "w.pt", helpers.build_model(recipe, 10),
                             dict(recipe=asdict(recipe), classes=classes))
        code, _, err = cli(capsys, "evaluate", "--weights", tmp_path / "w.pt", "--data-dir",
                           png_root)
        assert code == 2 and "classes are not a list of names" in one_line(err)


def test_weights_with_numpy_numbers_in_their_history_load(tmp_path):
    """save_weights wrote them; load_model refused them as "could run code"."""
    recipe = helpers.Recipe(widths=TINY)
    helpers.save_weights(tmp_path / "w.pt", helpers.build_model(recipe),
                         dict(recipe=asdict(recipe)), [dict(epoch=1, eval_acc=np.float64(0.5))])
    _, state = helpers.load_model(tmp_path / "w.pt")
    assert state["history"] == [dict(epoch=1, eval_acc=0.5)]


def test_val_fraction_holds_out_training_images(tmp_path, png_root, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--data-dir", png_root, "--epochs", "1",
                            "--widths", *TINY, "--batch-size", "16", "--out", out,
                            "--no-progress", "--threads", "1", "--val-fraction", "0.2")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["train_images"], config["eval_split"], config["eval_images"]) == (24, "val", 6)
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "final_test_acc" not in summary and summary["final_val_acc"] == log[-1]["eval_acc"]
    assert "val loss" in stdout and "test loss" not in stdout  # named for what was evaluated


def test_model_options_reach_the_recipe(tmp_path, png_root, capsys):
    code, _, err = cli(capsys, "train", "--data-dir", png_root, "--recipe", "small",
                       "--widths", *TINY, "--depths", "1", "2", "1", "1", "--act", "relu",
                       "--epochs", "1", "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    recipe = helpers.Recipe(**json.loads((tmp_path / "run" / "config.json").read_text())["recipe"])
    assert recipe == replace(helpers.RECIPES["small"], widths=TINY, depths=(1, 2, 1, 1),
                             act="relu", epochs=1)


def test_missing_data_fails_clearly(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data-dir", tmp_path / "none", "--out",
                       tmp_path / "run", "--epochs", "1")
    line = one_line(err)
    assert code == 2 and "No CIFAR-10 data" in line and "none" in line
    assert "--download" in line  # the command line's way to get it
    assert not (tmp_path / "run").exists()  # refused before anything was written
