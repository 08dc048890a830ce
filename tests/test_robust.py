"""Interruption and resume, the runs folder, safe checkpoints, and bad input refused up front.

README's "What it guards against" lists each fault with the test below that shows it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from conftest import make_arrays, write_batches

TINY = (8, 16, 16, 16)
REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "train_seconds", "images_per_s"}
# 30 training images in batches of 8: 3 steps per epoch.
RUN = ["--epochs", "3", "--widths", "8", "16", "16", "16", "--batch-size", "8", "--no-progress",
       "--threads", "1"]

# Runs helpers.main in a subprocess and parks it, writing OUT/paused, at a chosen moment:
# "batch": in the second training batch of epoch 2 (after the checkpoint of epoch 1);
# "save": inside the second checkpoint save, after the temp file is written, before rename.
DRIVER = """
import signal, sys, time
from pathlib import Path
import torch
import helpers
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
out, mode, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
count = [0]
def pause():
    (out / "paused").write_text("")
    time.sleep(600)
if mode == "batch":
    real_to_input = helpers.to_input
    def to_input(x, *a, **k):
        if (out / "model.pt").exists():
            count[0] += 1
            if count[0] == 2:
                pause()
        return real_to_input(x, *a, **k)
    helpers.to_input = to_input
else:
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        count[0] += 1
        if count[0] == 2:
            f.flush()
            pause()
    torch.save = save
sys.exit(helpers.main(argv))
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                NO_ALBUMENTATIONS_UPDATE="1", MPLBACKEND="Agg")


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "helpers.py"), "train", "--data-dir", str(data),
            "--out", str(out), *RUN, *extra]


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "log.jsonl").read_text().splitlines()]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """helpers.main in this process: (exit status, stderr)."""
    try:
        code = helpers.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_batches(root / "cifar-10-batches-py", *make_arrays(3, 1), *make_arrays(2, 2))
    return root


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run with one loader worker."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(_train_cmd(data_dir, out, "--workers", "1"), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    assert _rows(out) == _rows(ref) and len(_rows(ref)) == 3
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (ref, out))
    assert a["model"].keys() == b["model"].keys()
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, out))
    assert sa["final_test_acc"] == sb["final_test_acc"]
    assert sa["final_test_acc_flip_tta"] == sb["final_test_acc_flip_tta"]


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("moment, sig", [
    ("batch", signal.SIGKILL), ("batch", signal.SIGINT), ("batch", signal.SIGTERM),
    ("save", signal.SIGKILL)], ids=["kill-in-batch", "sigint-in-batch", "sigterm-in-batch",
                                    "kill-in-save"])
def test_interrupted_run_resumes_to_the_same_history_and_weights(
        moment, sig, data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(out), moment,
           *_train_cmd(data_dir, out, "--workers", "1")[2:]]
    log = tmp_path / "stderr"  # a file, not a pipe: an orphaned loader worker may hold it
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.time() + 300
    while not (out / "paused").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "paused").exists(), log.read_text()
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = log.read_text()
    (out / "paused").unlink()
    assert helpers.load_checkpoint(out / "model.pt", helpers.Net(TINY))["epoch"] == 1
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        if moment == "save":  # the killed save left its temp file behind
            assert list(out.glob("model.pt.*.tmp"))
    else:
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
        line = _one_line(err)
        assert f"interrupted by {sig.name}" in line and "keeps epoch 1" in line
        assert "--resume" in line
    # a rerun without --resume is refused, and changes nothing
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _cli(capsys, *_train_cmd(data_dir, out)[2:])
    assert code == 2 and "partial run" in _one_line(err)
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = subprocess.run(_train_cmd(data_dir, out, "--resume"), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "continuing" in res.stdout and "after epoch 1 of 3" in res.stdout
    assert not list(out.glob("*.tmp"))  # the stale temp file was ignored and removed
    _assert_same_run(out, reference)
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == 1  # recorded, and reused by --resume without --workers


def _fit_setup(seed=0):
    """Model, loader and test batches built as the CLI builds them (no workers)."""
    x, y = make_arrays(3, 1)
    helpers.set_seed(seed)
    mean, _ = helpers.compute_mean_std(x)
    recipe = helpers.Recipe(epochs=3, batch_size=8, widths=TINY)
    aug = helpers.EpochAugment(helpers.exercise_augmentations(mean, 0.5, 0.5, 0.5, seed=seed),
                               seed=seed)
    train, test = helpers.make_loaders(helpers.CifarDataset(x, y, aug),
                                       helpers.CifarDataset(x, y), 8, num_workers=0, seed=seed)
    return helpers.build_model(recipe), train, test, recipe


def test_fit_resume_equals_an_uninterrupted_fit(tmp_path, cpu):
    model, train, test, recipe = _fit_setup()
    straight = helpers.fit(model, train, test, recipe, cpu, progress=False, log=None)

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    path = tmp_path / "model.pt"
    first = _fit_setup()
    with pytest.raises(KeyboardInterrupt):
        helpers.fit(*first[:3], recipe, cpu, progress=False, log=stop_after_epoch_1,
                    checkpoint=path)
    again, train2, test2, _ = _fit_setup()
    torch.manual_seed(123)  # the global generators' state now must not matter
    np.random.seed(123)
    logged = []
    history = helpers.fit(again, train2, test2, recipe, cpu, progress=False,
                          log=logged.append, checkpoint=path, resume=True)
    assert [r["epoch"] for r in logged] == [2, 3]  # only the new rows are logged
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in h]
             for h in (straight, history)]
    assert strip[0] == strip[1]
    for name, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name


def test_fit_resume_without_a_checkpoint_starts_from_epoch_1(tmp_path, cpu):
    model, train, test, recipe = _fit_setup()
    history = helpers.fit(model, train, test, replace(recipe, epochs=1), cpu, progress=False,
                          log=None, checkpoint=tmp_path / "m.pt", resume=True)
    assert [r["epoch"] for r in history] == [1]
    with pytest.raises(ValueError, match="checkpoint"):
        helpers.fit(model, train, test, recipe, cpu, progress=False, log=None, resume=True)


def test_fit_resume_refuses_a_checkpoint_of_another_recipe(tmp_path, cpu):
    model, train, test, recipe = _fit_setup()
    path = tmp_path / "m.pt"
    helpers.fit(model, train, test, replace(recipe, epochs=1), cpu, progress=False,
                log=None, checkpoint=path)
    with pytest.raises(helpers.CheckpointError, match=r"epochs 1 -> 3"):
        helpers.fit(*_fit_setup()[:3], recipe, cpu, progress=False, log=None,
                    checkpoint=path, resume=True)
    helpers.save_checkpoint(path, model, epoch=1)  # the old format: weights only
    with pytest.raises(helpers.CheckpointError, match="cannot be resumed"):
        helpers.fit(*_fit_setup()[:3], recipe, cpu, progress=False, log=None,
                    checkpoint=path, resume=True)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    s = helpers.EpochSampler(20, seed=5)
    s.set_epoch(3)
    torch.manual_seed(0)
    a = list(s)
    torch.manual_seed(1)
    s.set_epoch(3)
    assert list(s) == a and sorted(a) == list(range(20))
    assert list(s) != a  # the pass after epoch 3 is epoch 4
    other = helpers.EpochSampler(20, seed=6)
    other.set_epoch(3)
    assert list(other) != a


def test_epoch_augment_stream_restarts_each_epoch():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def draws(aug, epoch, n=6):
        aug.set_epoch(epoch)
        return [aug(image=img)["image"] for _ in range(n)]

    def fresh():
        return helpers.EpochAugment(helpers.exercise_augmentations((0.5,) * 3, seed=0), seed=7)

    long_run = fresh()
    draws(long_run, 0)
    for a, b in zip(draws(long_run, 1), draws(fresh(), 1)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- runs folder
@pytest.fixture
def finished_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--data-dir", str(data_dir), "--out", str(out),
                     "--epochs", "1", "--widths", *map(str, TINY), "--batch-size", "8",
                     "--workers", "0", "--no-progress")
    assert code == 0, err
    return out


def _same_args(data_dir, out):
    return ["train", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1",
            "--widths", *map(str, TINY), "--batch-size", "8", "--workers", "0", "--no-progress"]


def test_finished_run_is_never_overwritten_silently(finished_run, data_dir, capsys):
    out = finished_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _cli(capsys, *_same_args(data_dir, out))
    line = _one_line(err)
    assert code == 2 and "finished run" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, err = _cli(capsys, *_same_args(data_dir, out), "--resume")
    assert code == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, err = _cli(capsys, *_same_args(data_dir, out), "--resume", "--overwrite")
    assert code == 2 and "not allowed with" in _one_line(err)
    (out / "notes.txt").write_text("mine")
    code, err = _cli(capsys, *_same_args(data_dir, out), "--overwrite", "--epochs", "2")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 2
    assert len(_rows(out)) == 2 and (out / "notes.txt").read_text() == "mine"


def test_resume_with_other_options_is_refused(finished_run, data_dir, capsys):
    (finished_run / "summary.json").unlink()  # now a partial run
    for extra, says in ((["--lr", "0.1"], "recipe.lr 0.2 -> 0.1"),
                        (["--seed", "3"], "seed 0 -> 3"), (["--workers", "1"], "workers 0 -> 1")):
        code, err = _cli(capsys, *_same_args(data_dir, finished_run), "--resume", *extra)
        assert code == 2 and says in _one_line(err), err


def test_config_records_what_changes_results(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    for key in ("recipe", "seed", "workers", "threads", "device", "data", "train_images",
                "eval_images", "eval_split", "train_subset", "test_subset", "val_fraction",
                "versions"):
        assert key in config, key
    assert config["workers"] == 0


def test_out_that_is_a_file_is_refused(data_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    code, err = _cli(capsys, *_same_args(data_dir, tmp_path / "f"))
    assert code == 2 and "is a file" in _one_line(err)


# --------------------------------------------------------------------------- checkpoints
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_never_run(tmp_path, data_dir, capsys):
    """A crafted model.pt ran a shell command on load."""
    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    torch.save({"model": _RunsCode(marker), "epoch": 1}, path)
    with pytest.raises(helpers.CheckpointError, match="refused.*could run code"):
        helpers.load_checkpoint(path, helpers.Net(TINY))
    assert not marker.exists()
    out = tmp_path / "run"  # the same file met by --resume
    code, _ = _cli(capsys, *_same_args(data_dir, out))
    assert code == 0
    torch.save({"model": _RunsCode(marker), "epoch": 1}, out / "model.pt")
    (out / "summary.json").unlink()
    code, err = _cli(capsys, *_same_args(data_dir, out), "--resume")
    assert code == 2 and "could run code" in _one_line(err)
    assert not marker.exists()


def test_broken_checkpoints_get_a_short_safe_message(tmp_path):
    import pickle
    import warnings
    files = {"empty.pt": b"", "garbage.pt": b"\x00\x01 not a checkpoint" * 20,
             "plain.pt": pickle.dumps({"model": [1, 2]}, protocol=4)}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        with warnings.catch_warnings(record=True) as seen, \
                pytest.raises(helpers.CheckpointError) as e:
            warnings.simplefilter("always")
            helpers.load_checkpoint(tmp_path / name, helpers.Net(TINY))
        assert name in str(e.value) and "weights_only" not in str(e.value)  # no unsafe advice
        assert "\n" not in str(e.value) and not seen


def test_stale_temp_file_is_ignored_and_cleaned(tmp_path):
    path = tmp_path / "model.pt"
    model = helpers.Net(TINY)
    helpers.save_checkpoint(path, model, epoch=1)
    stale = tmp_path / "model.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert helpers.load_checkpoint(path, helpers.Net(TINY))["epoch"] == 1
    helpers.save_checkpoint(path, model, epoch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_save_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or
                        real_replace(a, b))
    helpers.save_checkpoint(tmp_path / "m.pt", helpers.Net(TINY))
    assert events[:2] == ["fsync", "replace"]


def test_non_finite_weights_are_never_saved(tmp_path):
    path, model = tmp_path / "m.pt", helpers.Net(TINY)
    helpers.save_checkpoint(path, model, epoch=1)
    with torch.no_grad():
        model.c2[0][1].running_var[0] = float("inf")
    with pytest.raises(FloatingPointError, match="c2.0.1.running_var"):
        helpers.save_checkpoint(path, model, epoch=2)
    assert helpers.load_checkpoint(path, helpers.Net(TINY))["epoch"] == 1


class _GoodThenNaN:
    """Evaluation batches: real images, then (from the second pass) an image of inf."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = torch.as_tensor(x), torch.as_tensor(y), 0

    def __iter__(self):
        self.passes += 1
        x = self.x.float()
        if self.passes >= 2:
            x[0] = float("inf")
        yield x, self.y


def test_fit_stops_on_a_nan_evaluation_and_keeps_the_last_good_checkpoint(tmp_path, cpu):
    """In fit: the training loss stays finite, the evaluation loss does not."""
    model, train, _, recipe = _fit_setup()
    x, y = make_arrays(2, 2)
    path = tmp_path / "m.pt"
    logged = []
    with pytest.raises(FloatingPointError, match=r"Epoch 2: the test loss is nan.*keeps epoch 1"):
        helpers.fit(model, train, _GoodThenNaN(x, y), recipe, cpu, progress=False,
                    log=logged.append, checkpoint=path)
    assert [r["epoch"] for r in logged] == [1]
    assert helpers.load_checkpoint(path, helpers.Net(TINY))["epoch"] == 1


def test_fit_stops_on_non_finite_batchnorm_statistics(tmp_path, cpu):
    """Finite evaluation, but a BatchNorm buffer went inf: nothing is saved."""
    model, train, test, recipe = _fit_setup()
    bn, calls = model.c3[0][2], []

    def poison(module, inputs):
        calls.append(module.training)
        if sum(calls) == 4 and module.training:  # the first training step of epoch 2
            module.running_var[0] = float("inf")

    bn.register_forward_pre_hook(poison)
    with pytest.raises(FloatingPointError, match=r"Epoch 2: c3.0.2.running_var holds nan"):
        helpers.fit(model, train, test, recipe, cpu, progress=False, log=None,
                    checkpoint=tmp_path / "m.pt")
    assert helpers.load_checkpoint(tmp_path / "m.pt", helpers.Net(TINY))["epoch"] == 1


def test_cli_high_lr_stops_with_one_line_and_saves_nothing_bad(data_dir, tmp_path, capsys):
    """A learning rate far too high (1000) makes the loss nan; the run stops."""
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--data-dir", str(data_dir), "--out", str(out),
                     "--epochs", "3", "--lr", "1000", "--widths", *map(str, TINY),
                     "--batch-size", "8", "--workers", "0", "--no-progress")
    line = _one_line(err)
    assert code == 1 and "stopped" in line and "nan" in line and "learning rate" in line
    assert not (out / "summary.json").exists()
    if (out / "model.pt").exists():
        state = helpers.load_checkpoint(out / "model.pt", helpers.Net(TINY))
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.dtype.is_floating_point)


# --------------------------------------------------------------------------- bad options
BAD_OPTIONS = [  # (options, words the one-line error must hold)
    (["--val-fraction", "-0.2"], "--val-fraction: expected a number in (0, 1)"),
    (["--val-fraction", "1"], "--val-fraction: expected a number in (0, 1)"),
    (["--train-subset", "-10"], "--train-subset: expected an integer >= 1"),
    (["--threads", "0"], "--threads: expected an integer in [1, 1024]"),
    (["--epochs", "0"], "--epochs: expected an integer >= 1"),
    (["--test-subset", "0"], "--test-subset: expected an integer >= 1"),
    (["--train-subset", "0"], "--train-subset: expected an integer >= 1"),
    (["--widths", "0", "0", "0", "0"], "--widths: expected integers >= 1"),
    (["--widths", "8", "16", "16"], "--widths: expected 4 arguments"),
    (["--epochs", "1.5"], "--epochs: expected an integer >= 1"),
    (["--lr", "0"], "--lr: expected a number > 0"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--lr", "inf"], "--lr: expected a number > 0"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--weight-decay", "-0.001"], "--weight-decay: expected a number >= 0"),
    (["--label-smoothing", "1"], "--label-smoothing: expected a number in [0, 1)"),
    (["--p-affine", "1.5"], "--p-affine: expected a probability in [0, 1]"),
    (["--p-dropout", "-0.1"], "--p-dropout: expected a probability in [0, 1]"),
    (["--depths", "-1", "1", "1", "1"], "--depths: expected integers >= 0"),
    (["--depths", "1", "0", "1", "1"], "--depths: D2 must be >= 1"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
    (["--workers", "-1"], "--workers: expected an integer in [0, 64]"),
    (["--workers", "10000"], "--workers: expected an integer in [0, 64]"),
    (["--download-timeout", "0"], "--download-timeout: expected a number of seconds in (0,"),
    (["--download-timeout", "1e308"], "--download-timeout: expected a number of seconds in"),
    (["--out", ""], "--out: expected a folder name"),
    (["--act", "tanh"], "--act: invalid choice"),
    (["--recipe", "huge"], "--recipe: invalid choice"),
    (["--val-fraction", "0.2", "--test-subset", "5"], "--test-subset: not allowed with"),
    (["--resume", "--overwrite"], "--overwrite: not allowed with argument --resume"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("options, says", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_data_is_read(options, says, tmp_path, capsys):
    """Cases 3 and 4: the data folder does not exist, so reaching the data would say so."""
    code, err = _cli(capsys, "train", "--data-dir", str(tmp_path / "absent"),
                     "--out", str(tmp_path / "run"), *options)
    line = _one_line(err)
    assert code == 2 and says in line and "CIFAR-10" not in line
    assert not (tmp_path / "run").exists()


def test_bad_options_in_a_real_process(tmp_path):
    for options in (["--p-affine", "1.5"], ["--epochs", "0"]):
        res = subprocess.run([sys.executable, str(REPO / "helpers.py"), "train", "--data-dir",
                              str(tmp_path), *options], env=_env(), capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 2 and options[0] in _one_line(res.stderr)


@pytest.mark.parametrize("options, says", [
    (["--train-subset", "1000"], "--train-subset: 1000 is more than the 30 train images"),
    (["--test-subset", "21"], "--test-subset: 21 is more than the 20 test images"),
    (["--val-fraction", "0.01"], "--val-fraction: val_fraction 0.01 of 30 images leaves an "
                                 "empty validation split"),
])
def test_options_that_do_not_fit_the_data(options, says, data_dir, tmp_path, capsys):
    code, err = _cli(capsys, "train", "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "run"), *options)
    assert code == 2 and says in _one_line(err)


def test_every_option_has_help_and_widths_shows_c1_to_c4():
    parser = helpers._build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help and action.help.strip(), action.option_strings
    widths = next(a for a in train._actions if "--widths" in a.option_strings)
    assert widths.metavar == ("C1", "C2", "C3", "C4")
    assert "C1 C2 C3 C4" in train.format_help()


def test_check_recipe_refuses_values_that_would_fall_back():
    for field, value in (("act", "tanh"), ("p_dropout", 1.5), ("epochs", 0),
                         ("widths", (8, 16, 16)), ("depths", (1, 0, 1, 1)),
                         ("lr", float("nan")), ("epochs", 2.0)):
        with pytest.raises(ValueError, match=field):
            helpers.check_recipe(replace(helpers.Recipe(), **{field: value}))
    for recipe in helpers.RECIPES.values():
        helpers.check_recipe(recipe)
    with pytest.raises(ValueError, match="p_affine"):
        helpers.fit(helpers.Net(TINY), [], [], replace(helpers.Recipe(), p_affine=1.5),
                    torch.device("cpu"))


def test_subset_and_split_refuse_out_of_range_sizes():
    x, y = np.zeros((10, 1)), np.arange(10)
    for n in (0, -10):
        with pytest.raises(ValueError, match="subset"):
            helpers.subset(x, y, n)
    for f in (-0.2, 0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="val_fraction"):
            helpers.split_train_val(x, y, f)


def test_an_eleventh_class_folder_gets_an_eleventh_output(png_root, tmp_path, capsys):
    """Labels past 9 once crashed the first batch ("Target 10 is out of bounds")."""
    from PIL import Image
    for split in ("train", "test"):
        (png_root / split / "zebra").mkdir()
        Image.new("RGB", (32, 32)).save(png_root / split / "zebra" / "0.png")
    out = tmp_path / "run"
    code, err = _cli(capsys, "train", "--data-dir", str(png_root), "--out", str(out),
                     "--epochs", "1", "--widths", *map(str, TINY), "--batch-size", "8",
                     "--workers", "0", "--no-progress")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["classes"][-1] == "zebra"
    assert helpers.load_checkpoint(out / "model.pt", helpers.Net(TINY, num_classes=11))
