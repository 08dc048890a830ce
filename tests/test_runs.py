"""The run folder: resume after an interruption, one writer at a time, --overwrite that loses
nothing, damaged files refused, write failures, and bad input refused up front.

README's "What it guards against" lists each fault with the test below that shows it.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from conftest import (TINY, cli, env, helpers_cmd, make_arrays, one_line, rows, snapshot,
                      tiny_loaders, train_args, write_batches, write_image_folder)

# Runs helpers.main in a subprocess and parks it, writing OUT/paused, at a chosen moment:
# "first": in the first training batch of the run;
# "batch": in the second training batch after a model.pt exists (epoch 1's checkpoint);
# "save": in the second checkpoint save, once its temp file is written, before the rename.
DRIVER = """
import os, sys, time
from pathlib import Path
import helpers
out, mode, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
count = [0]
def pause():
    (out / "paused").write_text(str(os.getpid()))
    time.sleep(600)
if mode in ("first", "batch"):
    real_to_input = helpers.to_input
    def to_input(x, *a, **k):
        if mode == "first" or (out / "model.pt").exists():
            count[0] += 1
            if count[0] == (1 if mode == "first" else 2):
                pause()
        return real_to_input(x, *a, **k)
    helpers.to_input = to_input
else:
    real_replace = os.replace
    def replace(a, b):
        if str(a).endswith(".tmp") and str(b).endswith("model.pt"):
            count[0] += 1
            if count[0] == 2:
                pause()
        real_replace(a, b)
    os.replace = replace
sys.exit(helpers.main(argv))
"""


def _start_paused(tmp_path: Path, out: Path, moment: str, argv: list) -> subprocess.Popen:
    """helpers.main(argv) in a subprocess, parked at ``moment`` (see DRIVER)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    log = open(tmp_path / f"stderr-{time.monotonic_ns()}", "w+")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(out), moment,
                             *map(str, argv)], env=env(), stdout=subprocess.DEVNULL, stderr=log)
    proc.stderr_file = log
    deadline = time.time() + 300
    while not (out / "paused").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "paused").exists(), Path(log.name).read_text()
    (out / "paused").unlink()
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()


def _run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(helpers_cmd(*argv), env=env(), capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run with one loader worker."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _run(*train_args(data_dir, out, "--workers", "1"))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    assert rows(out) == rows(ref) and len(rows(ref)) == 3
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (ref, out))
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, out))
    assert sa["final_test_acc"] == sb["final_test_acc"]
    assert sa["final_test_acc_flip_tta"] == sb["final_test_acc_flip_tta"]


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize("moment, sig", [
    ("batch", signal.SIGKILL), ("batch", signal.SIGINT), ("batch", signal.SIGTERM),
    ("save", signal.SIGKILL)], ids=["kill-in-batch", "sigint-in-batch", "sigterm-in-batch",
                                    "kill-in-save"])
def test_interrupted_run_resumes_to_the_same_history_and_weights(
        moment, sig, data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start_paused(tmp_path, out, moment, train_args(data_dir, out, "--workers", "1"))
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert torch.load(out / "model.pt", weights_only=True)["epoch"] == 1
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        if moment == "save":  # the killed save left its temp file behind
            assert list(out.glob("model.pt.*.tmp"))
    else:
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
        line = one_line(_stderr(proc))
        assert f"interrupted by {sig.name}" in line and "keeps epoch 1" in line
        assert "--resume" in line
    before = snapshot(out)  # a rerun without --resume is refused, and changes nothing
    code, _, err = cli(capsys, *train_args(data_dir, out))
    assert code == 2 and "partial run" in one_line(err) and "keeps epoch 1" in err
    assert "--resume" in err and "--overwrite" in err and snapshot(out) == before
    res = _run(*train_args(data_dir, out, "--resume"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "continuing" in res.stdout and "keeps epoch 1" in res.stdout
    assert not list(out.glob("*.tmp"))  # the stale temp file was ignored and removed
    _assert_same_run(out, reference)
    assert json.loads((out / "config.json").read_text())["workers"] == 1  # reused by --resume


def _fit_setup(seed=0, **settings):
    """Model, recipe and loaders built as the command line builds them (no workers)."""
    helpers.set_seed(seed)
    train, test = tiny_loaders(*make_arrays(3, 1), seed=seed)
    recipe = helpers.Recipe(epochs=3, batch_size=8, widths=TINY, p_affine=0.5, p_dropout=0.5,
                            **settings)
    return helpers.build_model(recipe), recipe, train, test


@pytest.mark.parametrize("settings", [{}, {"muon_lr": 0.02}], ids=["sgd", "muon"])
def test_fit_resume_equals_an_uninterrupted_fit(tmp_path, cpu, settings):
    model, recipe, train, test = _fit_setup(**settings)
    straight = helpers.fit(model, recipe, train, test, progress=False, log=lambda r: None)

    def stop_after_epoch_1(history):
        raise KeyboardInterrupt

    path = tmp_path / "model.pt"
    with pytest.raises(KeyboardInterrupt):
        helpers.fit(*_fit_setup(**settings), path, progress=False, log=stop_after_epoch_1)
    again, *rest = _fit_setup(**settings)
    torch.manual_seed(123)  # the global generators' state now must not matter
    np.random.seed(123)
    logged = []
    history = helpers.fit(again, *rest, path, resume=True, progress=False,
                          log=lambda h: logged.append(h[-1]["epoch"]))
    assert logged == [2, 3]  # only the new epochs are logged
    timing = {"seconds", "train_seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in straight] == \
        [{k: v for k, v in r.items() if k not in timing} for r in history]
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in model.state_dict().items())


def test_fit_resumed_with_the_same_loader_after_a_stop_in_an_epoch(tmp_path, cpu):
    """As in the notebook: the training cell stopped during epoch 2, then run again with
    RESUME = True on the same loader. The augmentation went on from where the stop left its
    random stream instead of restarting epoch 2's."""
    model, recipe, train, test = _fit_setup()
    straight = helpers.fit(model, recipe, train, test, progress=False, log=lambda r: None)
    again, recipe, train, test = _fit_setup()
    path, real_step, steps = tmp_path / "model.pt", helpers.train_step, []

    def stop_in_epoch_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == len(train) + 2:  # two batches into epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    helpers.train_step = stop_in_epoch_2
    try:
        with pytest.raises(KeyboardInterrupt):
            helpers.fit(again, recipe, train, test, path, progress=False, log=lambda r: None)
    finally:
        helpers.train_step = real_step
    history = helpers.fit(again, recipe, train, test, path, resume=True, progress=False,
                          log=lambda r: None)
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in straight]
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in model.state_dict().items())


def test_fit_resume_without_a_checkpoint_starts_from_epoch_1(tmp_path, cpu):
    model, recipe, train, test = _fit_setup()
    history = helpers.fit(model, replace(recipe, epochs=1), train, test, tmp_path / "m.pt",
                          resume=True, progress=False, log=lambda r: None)
    assert [r["epoch"] for r in history] == [1]
    with pytest.raises(ValueError, match="checkpoint"):
        helpers.fit(model, recipe, train, test, resume=True, progress=False)


def test_fit_refuses_a_folder_as_its_checkpoint_before_training(tmp_path, cpu):
    model, recipe, train, test = _fit_setup()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="is a folder"):
        helpers.fit(model, recipe, train, test, tmp_path, progress=False)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())


def test_fit_refuses_a_checkpoint_of_another_run(tmp_path, cpu):
    model, recipe, train, test = _fit_setup()
    path = tmp_path / "m.pt"
    helpers.fit(model, replace(recipe, epochs=1), train, test, path, progress=False,
                log=lambda r: None)
    with pytest.raises(helpers.CheckpointError, match=r"another run \(recipe.epochs 1 -> 3\)"):
        helpers.fit(*_fit_setup(), path, resume=True, progress=False)
    model1, recipe1, train1, test1 = _fit_setup(seed=1)  # the same recipe, another seed
    with pytest.raises(helpers.CheckpointError, match="seed 0 -> 1; augment_seed 0 -> 1"):
        helpers.fit(model1, replace(recipe1, epochs=1), train1, test1, path, resume=True,
                    progress=False)
    helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=1))  # weights only
    with pytest.raises(helpers.CheckpointError, match="cannot be resumed: it lacks optimizer"):
        helpers.fit(*_fit_setup(), path, resume=True, progress=False)


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
        return helpers.EpochAugment(helpers.exercise_augmentations((0.5,) * 3, 0.5, 0.5, 0.5,
                                                                   seed=0), seed=7)

    long_run = fresh()
    draws(long_run, 0)
    for a, b in zip(draws(long_run, 1), draws(fresh(), 1)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- the run folder
@pytest.fixture
def finished_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_args(data_dir, out, "--epochs", "1"))
    assert code == 0, err
    return out


@pytest.fixture
def partial_run(data_dir, tmp_path, capsys, monkeypatch):
    """A 3-epoch run interrupted (as by Ctrl-C) once epoch 1 is saved."""
    return _interrupted(data_dir, tmp_path / "run", capsys, monkeypatch)


def _interrupted(data_dir, out, capsys, monkeypatch, *extra):
    """``out`` holding a 3-epoch run (train options ``extra``) stopped once epoch 1 is saved."""
    monkeypatch.setattr(helpers, "format_row", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    code, _, err = cli(capsys, *train_args(data_dir, out, *extra))
    monkeypatch.undo()
    assert code == 130 and "keeps epoch 1" in err
    return out


def test_finished_run_is_never_overwritten_silently(finished_run, data_dir, capsys):
    out, args = finished_run, train_args(data_dir, finished_run, "--epochs", "1")
    before = snapshot(out)
    code, _, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and "finished run" in line and "--overwrite" in line
    assert snapshot(out) == before
    code, stdout, _ = cli(capsys, *args, "--resume")
    assert code == 0 and "nothing to do" in stdout and snapshot(out) == before
    code, _, err = cli(capsys, *args, "--resume", "--overwrite")
    assert code == 2 and "not allowed with" in one_line(err)
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *args[:-4], "--overwrite", "--epochs", "2")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 2
    assert len(rows(out)) == 2 and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".replaced").exists()


def test_resume_of_a_finished_run_rebuilds_its_deleted_log_and_weights(finished_run, data_dir,
                                                                          capsys):
    """log.jsonl cut short and weights.pt deleted: --resume writes both again from model.pt
    (and removes the temp files of writers killed before their rename)."""
    out, before = finished_run, snapshot(finished_run)
    weights = torch.load(out / "weights.pt", weights_only=True)
    (out / "log.jsonl").write_text((out / "log.jsonl").read_text()[:-20])
    (out / "weights.pt").unlink()
    for stale in ("model.pt.12345.tmp", "summary.json.12345.tmp"):
        (out / stale).write_bytes(b"half a file")
    code, stdout, err = cli(capsys, *train_args(data_dir, out, "--epochs", "1", "--resume"))
    assert code == 0 and "nothing to do" in stdout, err
    assert not list(out.glob("*.tmp"))
    assert (out / "log.jsonl").read_bytes() == before["log.jsonl"]
    again = torch.load(out / "weights.pt", weights_only=True)
    assert again["run"] == weights["run"] and again["history"] == weights["history"]
    for name, tensor in weights["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["missing data", "too large a subset", "corrupt image",
                                    "interrupted while loading"])
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(
        damage, finished_run, data_dir, tmp_path, capsys, monkeypatch):
    before = snapshot(finished_run)
    data, extra = data_dir, []
    if damage == "missing data":
        data = tmp_path / "mistyped"
    elif damage == "too large a subset":
        extra = ["--train-subset", "1000"]
    elif damage == "corrupt image":
        data = write_image_folder(tmp_path / "png", *make_arrays(3, 1), *make_arrays(2, 2))
        (data / "train" / "cat" / "0010.png").write_bytes(b"not a png")
    else:
        monkeypatch.setattr(helpers, "load_cifar10", lambda *a, **k: (_ for _ in ()).throw(
            KeyboardInterrupt()))
    code, _, err = cli(capsys, *train_args(data, finished_run, "--epochs", "2", "--overwrite",
                                           *extra))
    assert code == (130 if damage.startswith("interrupted") else 2), err
    one_line(err)
    assert snapshot(finished_run) == before and not (finished_run / ".replaced").exists()


@pytest.mark.slow
def test_a_killed_overwrite_gives_the_old_run_back(finished_run, data_dir, tmp_path, capsys):
    before = snapshot(finished_run)
    proc = _start_paused(tmp_path, finished_run, "first", train_args(
        data_dir, finished_run, "--epochs", "3", "--overwrite"))
    assert (finished_run / ".replaced").exists() and not (finished_run / "model.pt").exists()
    proc.kill()  # before the new run's first checkpoint: the old run must come back
    proc.wait(timeout=60)
    code, stdout, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1",
                                                "--resume"))
    assert code == 0, err
    assert "restored the run" in stdout and "nothing to do" in stdout
    assert snapshot(finished_run) == before
    proc = _start_paused(tmp_path, finished_run, "save", train_args(
        data_dir, finished_run, "--epochs", "3", "--overwrite"))
    proc.kill()  # in the new run's second save: its first checkpoint is on disk
    proc.wait(timeout=60)
    assert not (finished_run / ".replaced").exists()  # dropped once epoch 1 was saved
    code, stdout, err = cli(capsys, *train_args(data_dir, finished_run, "--resume"))
    assert code == 0 and "keeps epoch 1" in stdout and len(rows(finished_run)) == 3, err


def test_no_run_is_made_where_overwrite_keeps_an_old_run(finished_run, data_dir, capsys):
    before = snapshot(finished_run)
    for inside in (".replaced", ".discarded", ".replaced/sub"):
        code, _, err = cli(capsys, *train_args(data_dir, finished_run / inside, "--epochs", "1"))
        assert code == 2 and "a run set aside by --overwrite" in one_line(err)
        code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1",
                                               "--resume"))
        assert code == 0 and snapshot(finished_run) == before
    (finished_run / ".replaced").write_text("not ours")
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "is not a folder that --overwrite made" in one_line(err)
    assert (finished_run / ".replaced").read_text() == "not ours"
    (finished_run / ".replaced").unlink()
    other = finished_run.parent / "other"
    shutil.copytree(finished_run, other)
    (other / "config.json").write_text("{}")
    (finished_run / ".replaced").symlink_to(other)  # a link to another run's folder
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "is not a folder that --overwrite made" in one_line(err)
    assert snapshot(finished_run) == before and (other / "config.json").read_text() == "{}"


@pytest.mark.parametrize("name, marked", [(".replaced", False), (".discarded", False),
                                          (".overwriting", False), (".replaced", True),
                                          (".discarded", True)])
def test_a_users_folder_named_as_overwrites_own_is_left_alone(name, marked, finished_run,
                                                              data_dir, tmp_path, capsys):
    """A folder of the name --overwrite uses, that it did not make (even beside the file with
    which --overwrite marks its own), in a run folder or in a new one: refused, and nothing in
    it or beside it is moved or deleted."""
    (finished_run.parent / "mine").mkdir()
    for out in (finished_run, finished_run.parent / "mine"):
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("mine")
        if marked:
            (out / ".overwriting").touch()
        before = snapshot(out)
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, _, err = cli(capsys, *train_args(data_dir, out, "--epochs", "1", *extra))
            assert code == 2 and "that --overwrite made: move it away" in one_line(err)
            assert snapshot(out) == before
            assert out == finished_run or not (out / ".lock").exists()  # none made for it left
    inner = tmp_path / "new" / ".replaced"  # a run made inside a folder with no run yet
    assert cli(capsys, *train_args(data_dir, inner, "--epochs", "1"))[0] == 0
    before = snapshot(inner.parent)
    code, _, err = cli(capsys, *train_args(data_dir, inner.parent, "--epochs", "1"))
    assert code == 2 and snapshot(inner.parent) == before


def test_a_run_set_aside_by_an_older_version_is_kept_and_named(finished_run, data_dir, capsys):
    """An --overwrite of the code before the mark existed, killed: its .replaced is not
    taken, and the refusal says where its files go back."""
    (finished_run / ".replaced").mkdir()
    for name in ("weights.pt", "summary.json"):
        os.replace(finished_run / name, finished_run / ".replaced" / name)
    before = snapshot(finished_run)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and f"go back into {finished_run}" in one_line(err)
    assert snapshot(finished_run) == before


def test_out_inside_the_images_read_as_data_is_refused_first(jpeg_root, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("HOME", str(jpeg_root.parent))  # "~/jpeg" was read, but not checked
    for data, out in ((jpeg_root, jpeg_root / "train" / "cat" / "run"),
                      (jpeg_root, jpeg_root / "test"), ("~/jpeg", jpeg_root / "train")):
        code, _, err = cli(capsys, *train_args(data, out, "--epochs", "1"))
        assert code == 2 and f"argument --out: {out} is inside" in one_line(err)
    assert not (jpeg_root / "train" / "cat" / "run").exists()
    code, _, err = cli(capsys, *train_args(jpeg_root, jpeg_root / "runs" / "r", "--epochs", "1"))
    assert code == 0, err  # beside train/ and test/ is fine


@pytest.mark.parametrize("layout", ["data_dir", "jpeg_root"])  # batches, image folders
def test_a_loop_of_links_as_the_run_folder_is_one_line(layout, request, tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    data = request.getfixturevalue(layout)
    code, _, err = cli(capsys, *train_args(data, tmp_path / "a" / "run"))
    assert code == 2 and "symbolic links" in one_line(err)


@pytest.mark.slow
def test_one_writer_per_run_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = _start_paused(tmp_path, out, "batch", train_args(data_dir, out))
    for extra in ([], ["--resume"], ["--overwrite"], ["--seed", "1", "--overwrite"]):
        res = _run(*train_args(data_dir, out, *extra))
        line = one_line(res.stderr)
        assert res.returncode == 2 and f"in use by another command (PID {first.pid})" in line
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    resumed = _start_paused(tmp_path, out, "batch", train_args(data_dir, out, "--resume"))
    res = _run(*train_args(data_dir, out, "--resume"))
    assert res.returncode == 2 and f"(PID {resumed.pid})" in one_line(res.stderr)
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=60) == 143
    res = _run(*train_args(data_dir, out, "--resume"))
    assert res.returncode == 0, res.stderr
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]  # no row twice


def test_a_lock_file_deleted_before_it_is_locked_is_made_again(data_dir, tmp_path, capsys,
                                                               monkeypatch):
    """Another command that ends (refused) deletes the .lock it made; one that opened that file
    just before locks a file without a name, and a third command would not be refused. The
    command must lock the .lock that the folder holds."""
    import fcntl
    out, real, calls = tmp_path / "run", fcntl.lockf, []

    def lockf(f, op):
        calls.append(op)
        if len(calls) == 1:
            (out / ".lock").unlink()  # as the command that made it does when refused
        return real(f, op)

    monkeypatch.setattr(fcntl, "lockf", lockf)
    code, _, err = cli(capsys, *train_args(data_dir, out))
    assert code == 0, err
    assert len(calls) == 2 and (out / ".lock").is_file()
    assert (out / ".lock").stat().st_mode & 0o111 == 0  # not executable


def test_a_lock_holder_that_has_not_written_its_pid_yet(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli(capsys, *train_args(data_dir, out))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and "in use by another command (PID not yet written)" in one_line(err)


def test_a_refused_command_leaves_the_users_empty_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = cli(capsys, *train_args(tmp_path / "no-data", out))
    assert code == 2 and "no-data" in one_line(err)
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_stop_between_the_last_checkpoint_and_its_log_row_loses_no_row(
        data_dir, tmp_path, capsys, monkeypatch):
    """Stopped once model.pt holds epoch 3 but before log.jsonl has its row: the message names
    epoch 3, and --resume, with no epoch left to train, still writes every row."""
    out, real, logs = tmp_path / "run", os.replace, []

    def replace(src, dst):
        if Path(dst).name == "log.jsonl":
            logs.append(dst)
            if len(logs) == 3:
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = cli(capsys, *train_args(data_dir, out))
    monkeypatch.undo()
    assert code == 130 and "keeps epoch 3" in one_line(err)
    assert len(rows(out)) == 2
    code, _, err = cli(capsys, *train_args(data_dir, out, "--resume"))
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3] and (out / "summary.json").exists()


def test_a_second_stop_while_the_old_run_is_put_back_loses_nothing(finished_run, data_dir,
                                                                    capsys, monkeypatch):
    """Ctrl-C in --overwrite's first epoch, then again while the old run is being put back:
    the next command on the folder finishes putting it back."""
    before, real = snapshot(finished_run), os.replace
    monkeypatch.setattr(helpers, "to_input", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))

    def replace(src, dst):
        if Path(src).parent.name == ".replaced" and Path(dst).name == "weights.pt":
            raise KeyboardInterrupt  # the second Ctrl-C, half-way through
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--overwrite"))
    monkeypatch.undo()
    assert code == 130, err
    assert (finished_run / ".replaced" / "weights.pt").exists()
    code, stdout, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1",
                                                "--resume"))
    assert code == 0 and "restored the run" in stdout and "nothing to do" in stdout, err
    assert snapshot(finished_run) == before


def test_an_old_run_put_back_after_a_kill_keeps_no_file_of_the_new_one(finished_run, data_dir,
                                                                        capsys):
    """The folder as SIGKILL leaves it while --overwrite's new run saves its first checkpoint
    (the old run set aside, a new config and a temp file): the next command puts the old run
    back exactly, without the new run's files."""
    before, aside = snapshot(finished_run), finished_run / ".replaced"
    names = [p.name for p in finished_run.iterdir() if p.name != ".lock"]
    (finished_run / ".overwriting").touch()  # as --overwrite marks the folders it makes
    aside.mkdir()
    for name in names:
        os.replace(finished_run / name, aside / name)
    (aside / ".complete").write_text(" ".join(os.listdir(aside)))
    (finished_run / "config.json").write_text("{}")
    (finished_run / "model.pt.4242.tmp").write_bytes(b"half a checkpoint")
    code, stdout, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1",
                                                "--resume"))
    assert code == 0 and "restored the run" in stdout, err
    assert snapshot(finished_run) == before


def test_a_stop_while_the_old_run_is_deleted_keeps_the_new_one(finished_run, data_dir, tmp_path,
                                                                capsys, monkeypatch):
    """Ctrl-C while --overwrite deletes the old run (its new checkpoint saved): none of the old
    files come back over the new run, which --resume then finishes as if never stopped."""
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if (Path(path) / ".complete").exists():
            (Path(path) / ".complete").unlink()  # part of the old run deleted, then stopped
            raise KeyboardInterrupt
        real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--overwrite"))
    monkeypatch.undo()
    assert code == 130 and "keeps epoch 1" in one_line(err)
    assert json.loads((finished_run / "config.json").read_text())["recipe"]["epochs"] == 3
    assert not (finished_run / "summary.json").exists()
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--resume"))
    assert code == 0, err
    fresh = tmp_path / "fresh"
    assert cli(capsys, *train_args(data_dir, fresh))[0] == 0
    assert rows(finished_run) == rows(fresh)
    assert sorted(p.name for p in finished_run.iterdir()) == sorted(p.name for p in fresh.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_starts_is_one_line(sig, status, data_dir, tmp_path):
    """Ctrl-C or SIGTERM while numpy and torch are still loading: no traceback either (ten
    times, since where in the imports the signal lands varies)."""
    for _ in range(10):
        proc = subprocess.Popen(helpers_cmd(*train_args(data_dir, tmp_path / "run")), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        status_file, deadline = Path(f"/proc/{proc.pid}/status"), time.time() + 30
        while status_file.exists() and time.time() < deadline:  # Linux: wait for the handlers
            caught = int(status_file.read_text().split("SigCgt:")[1].split()[0], 16)
            if caught >> (signal.SIGTERM - 1) & 1:  # helpers.py's first lines have run
                break
            time.sleep(0.005)
        else:
            time.sleep(0.3)  # no /proc: a guess at when Python has started
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == status and "interrupted by" in one_line(err)


def test_the_early_signal_handlers_come_before_every_other_import():
    """The window before them, where a signal is a traceback, holds only Python's own start:
    the standard library's imports came first, and a signal among them was a traceback."""
    import ast
    tree = ast.parse(Path(helpers.__file__).read_text())
    first_if = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.If))
    assert "signal.signal" in ast.unparse(tree.body[first_if])
    before = {a.name for node in tree.body[:first_if] if isinstance(node, ast.Import)
              for a in node.names}
    after = [n for n in tree.body[first_if:] if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert before == {"os", "signal", "sys"} and after, before


@pytest.mark.slow
def test_a_closed_output_stops_the_run_in_one_line_and_it_resumes(data_dir, tmp_path):
    """As in ``helpers.py train ... | head -1``: once its output cannot be written the run stops,
    as a program killed by SIGPIPE would (141), but in one line; --resume finishes it."""
    out = tmp_path / "run"
    proc = subprocess.Popen(helpers_cmd(*train_args(data_dir, out)), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 141 and "stopped: its output was closed" in one_line(err)
    res = _run(*train_args(data_dir, out, "--resume"))
    assert res.returncode == 0 and len(rows(out)) == 3, res.stderr


def test_both_outputs_closed_or_full_are_the_status_alone(data_dir, tmp_path):
    """``2>&1 | head -1`` or ``>/dev/full 2>&1``: the line saying so could not be written
    either, and its error escaped as a traceback with status 1 (a diverged run's)."""
    read, write = os.pipe()
    proc = subprocess.Popen(helpers_cmd(*train_args(data_dir, tmp_path / "run")), env=env(),
                            stdout=write, stderr=write)
    os.close(write)
    os.close(read)  # the reader has gone before the first line
    assert proc.wait(timeout=600) == 141
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            res = subprocess.run(helpers_cmd(*train_args(data_dir, tmp_path / "run2")),
                                 env=env(), stdout=full, stderr=full, timeout=600)
        assert res.returncode == 74
    res = _run(*train_args(data_dir, tmp_path / "run", "--resume"))
    assert res.returncode == 0 and len(rows(tmp_path / "run")) == 3, res.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_a_command_ends_is_no_traceback(sig, finished_run, data_dir, capsys,
                                                     monkeypatch):
    """Ctrl-C or SIGTERM once the command is done, as its signal handlers are put back: it
    ends nothing, and no exception escapes."""
    real, calls = signal.signal, []

    def put_back(s, handler):
        calls.append(s)
        if s == signal.SIGTERM and calls.count(s) == 2:  # main puts back the handler it found
            signal.raise_signal(sig)  # whose Python handler runs here, as the command ends
        return real(s, handler)

    monkeypatch.setattr(signal, "signal", put_back)
    try:
        code, stdout, err = cli(capsys, "evaluate", "--weights", finished_run / "weights.pt",
                                "--data-dir", data_dir)
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped main")
    assert calls.count(signal.SIGTERM) == 2 and code == 0 and "test accuracy" in stdout
    assert err == ""


@pytest.mark.parametrize("edit", ["history not a list", "run not a dict", "a row missing",
                                  "a row twice", "momentum of another shape", "epoch infinite",
                                  "epoch a tensor", "seed a tensor", "a row's loss a tensor",
                                  "schedule shortened", "schedule without phases",
                                  "momentum a string", "learning rate doubled",
                                  "run nested too deeply", "a row without its seconds",
                                  "momentum a number", "momentum an int", "a weight complex"])
def test_a_crafted_checkpoint_is_refused_in_one_line(edit, partial_run, data_dir, capsys):
    """Loadable but inconsistent: refused, naming model.pt, before any training (and without
    --resume, the refusal names the partial run)."""
    path = partial_run / "model.pt"
    state = torch.load(path, weights_only=True)
    if edit == "history not a list":
        state["history"] = 5
    elif edit == "run not a dict":
        state["run"] = "x"
    elif edit == "a row missing":
        state["history"] = state["history"][:-1]
    elif edit == "a row twice":
        state["history"] = state["history"] * 2
    elif edit == "momentum of another shape":
        state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)
    elif edit in ("momentum a number", "momentum an int"):  # tracebacks at the first step
        state["optimizer"]["state"][0]["momentum_buffer"] = (
            torch.tensor(0.5) if edit.endswith("number") else 5)
    elif edit == "a row without its seconds":  # a traceback once the run ended
        del state["history"][0]["seconds"]
    elif edit == "a weight complex":  # its imaginary part dropped, with a warning
        state["model"]["out.1.weight"] = state["model"]["out.1.weight"].to(torch.complex64)
    elif edit.startswith("epoch"):
        state["epoch"] = float("inf") if edit == "epoch infinite" else torch.tensor([1, 2])
    elif edit == "seed a tensor":
        state["run"]["seed"] = torch.tensor(0)
    elif edit.startswith("schedule"):  # torch failed a step later, with a traceback
        state["scheduler"].update({"total_steps": state["scheduler"]["last_epoch"]} if
                                  edit.endswith("shortened") else {"_schedule_phases": []})
    elif edit in ("momentum a string", "learning rate doubled"):  # a traceback; silently used
        group = state["optimizer"]["param_groups"][0]
        group.update(momentum="x") if edit.startswith("momentum") else group.update(
            lr=2 * group["lr"])
    elif edit == "run nested too deeply":  # 980 deep: read, then a recursion error later
        state["run"]["data"] = json.loads("[" * 100 + "]" * 100)
    else:
        state["history"][0]["train_loss"] = torch.tensor([0.5, 0.5])
    torch.save(state, path)
    before = snapshot(partial_run)
    code, _, err = cli(capsys, *train_args(data_dir, partial_run, "--resume"))
    assert code == 2 and "model.pt" in one_line(err)
    code, _, err = cli(capsys, *train_args(data_dir, partial_run))
    assert code == 2 and "already holds a partial run" in one_line(err)
    assert snapshot(partial_run) == before


@pytest.mark.parametrize("muon_lr", ["0.02", "0"])  # MuonSGD, torch's SGD
def test_a_checkpoint_with_settings_another_torch_saves_resumes(muon_lr, data_dir, tmp_path,
                                                                capsys, monkeypatch):
    """A key this torch does not know, in the schedule's state and an optimizer group, or one
    it fills in, as an older or newer torch may save, and a rate off in its last bits: not a
    reason to refuse (config.json notes the version)."""
    out = _interrupted(data_dir, tmp_path / "run", capsys, monkeypatch, "--muon-lr", muon_lr)
    state = torch.load(out / "model.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    state["scheduler"]["_a_later_setting"] = 1
    group.update(a_later_option=False, lr=group["lr"] * (1 + 1e-12))  # another maths library
    group.pop("fused", None)  # an earlier torch's SGD: this one fills in False (made: None)
    torch.save(state, out / "model.pt")
    code, _, err = cli(capsys, *train_args(data_dir, out, "--muon-lr", muon_lr, "--resume"))
    assert code == 0, err


def _flip_a_byte_of_a_tensor(path: Path) -> None:
    """One bit of a tensor's bytes inverted in torch's zip file, which torch.load still reads."""
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename),  # tensors' bytes
                     key=lambda i: i.file_size)  # the largest
    data = bytearray(path.read_bytes())
    at = member.header_offset  # the local header: 30 bytes, the name, the extra field
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(
        data[at + 28:at + 30], "little")
    data[start + member.file_size // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_a_flipped_bit_is_refused(finished_run, data_dir, capsys):
    _flip_a_byte_of_a_tensor(finished_run / "weights.pt")
    torch.load(finished_run / "weights.pt", weights_only=True)  # torch reads it without a word
    code, _, err = cli(capsys, "evaluate", "--weights", finished_run / "weights.pt",
                       "--data-dir", data_dir)
    assert code == 2 and "weights.pt is damaged" in one_line(err) and "checksum" in err
    if hasattr(torch.serialization, "set_crc32_options"):  # torch 2.6 and later
        torch.serialization.set_crc32_options(False)  # a file saved without checksums is read
        try:
            torch.save(torch.load(finished_run / "model.pt", weights_only=True),
                       finished_run / "no-crc.pt")
        finally:
            torch.serialization.set_crc32_options(True)
        code, _, err = cli(capsys, "evaluate", "--weights", finished_run / "no-crc.pt",
                           "--data-dir", data_dir)
        assert code == 0, err
    _flip_a_byte_of_a_tensor(finished_run / "model.pt")
    (finished_run / "summary.json").unlink()  # a partial run, now resumed
    before = snapshot(finished_run)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "model.pt is damaged" in one_line(err) and "checksum" in err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("edit, says", [("seed 1", "does not agree with model.pt"),
                                        ("accuracy a tensor", "model.pt is damaged")])
def test_a_finished_run_with_another_runs_checkpoint_is_refused(edit, says, finished_run,
                                                                  data_dir, capsys):
    path = finished_run / "model.pt"
    state = torch.load(path, weights_only=True)
    if edit == "seed 1":
        state["run"]["seed"] = 1  # the same epoch and accuracy, but not this run's
    else:
        state["history"][-1]["eval_acc"] = torch.tensor([0.5, 0.5])
    torch.save(state, path)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and says in one_line(err)


@pytest.mark.parametrize("name, text, says", [
    ("config.json", "null", "config.json is damaged: it lacks recipe"),
    ("config.json", "[1, 2]", "config.json is damaged: it lacks recipe"),
    ("config.json", "{not json", "config.json is damaged (Expecting"),
    ("summary.json", "{not json", "summary.json is damaged"),
    ("summary.json", '{"final_test_acc": 0.5}', "summary.json does not agree with model.pt"),
    ("model.pt", "garbage", "model.pt is damaged or not a checkpoint")])
def test_damaged_run_files_are_refused_naming_the_file(name, text, says, finished_run,
                                                        data_dir, capsys):
    (finished_run / name).write_text(text)
    if name == "model.pt":
        (finished_run / "summary.json").unlink()  # a partial run, now resumed
    before = snapshot(finished_run)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and says in one_line(err) and snapshot(finished_run) == before
    if name == "model.pt":  # and without --resume, the refusal says so too
        code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1"))
        assert code == 2 and "model.pt is damaged" in one_line(err)
        assert "no checkpoint yet" not in err


def test_run_files_of_the_wrong_kind_are_refused_in_one_line(finished_run, data_dir, capsys):
    config = json.loads((finished_run / "config.json").read_text())
    (finished_run / "config.json").write_text(json.dumps(dict(config, recipe=5)))
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "summary.json does not agree with model.pt" in one_line(err)
    (finished_run / "config.json").write_text(json.dumps(config))
    shutil.copy(finished_run / "weights.pt", finished_run / "model.pt")  # weights, no epoch
    (finished_run / "summary.json").unlink()
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1"))
    assert code == 2 and "model.pt holds no epoch" in one_line(err)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "cannot be resumed: it lacks optimizer" in one_line(err)


def test_run_settings_of_the_wrong_kind_are_refused_in_one_line(partial_run, data_dir, capsys):
    config = (partial_run / "config.json").read_text()
    for text, says in ((json.dumps(dict(json.loads(config), threads="abc")), ": bad threads"),
                       (json.dumps(dict(json.loads(config), threads=-3)), ": bad threads"),
                       (json.dumps(dict(json.loads(config), workers=-1)), ": bad workers"),
                       (json.dumps(dict(json.loads(config), threads=2 ** 40)), ": bad threads"),
                       (json.dumps(dict(json.loads(config), workers=65)), ": bad workers"),
                       (json.dumps(dict(json.loads(config), seed="x")), ": bad seed"),
                       (json.dumps(dict(json.loads(config), seed=True)), ": bad seed"),
                       (json.dumps(dict(json.loads(config), train_subset=0)), ": bad train_subset"),
                       (json.dumps(dict(json.loads(config), test_subset=2.5)), ": bad test_subset"),
                       (json.dumps(dict(json.loads(config), val_fraction=1)), ": bad val_fraction"),
                       ("[" * 100_000 + "]" * 100_000, " (maximum recursion"),
                       (json.dumps(dict(json.loads(config), data="X")).replace(
                           '"X"', "[" * 100 + "]" * 100), " (nested too deeply)")):
        (partial_run / "config.json").write_text(text)
        before = snapshot(partial_run)
        code, _, err = cli(capsys, *train_args(data_dir, partial_run, "--resume"))
        assert code == 2 and f"config.json is damaged{says}" in one_line(err)
        assert snapshot(partial_run) == before


@pytest.mark.parametrize("name", ["config.json", "log.jsonl", "model.pt", "weights.pt",
                                  "summary.json"])
def test_a_folder_in_place_of_a_run_file_is_refused_and_kept(name, finished_run, data_dir,
                                                               capsys):
    """A folder of the user's (here another run) at a run file's name: --overwrite moved it
    aside with the run and deleted it; --resume said to pass --overwrite."""
    (finished_run / name).unlink()
    (finished_run / name / "run").mkdir(parents=True)
    (finished_run / name / "run" / "weights.pt").write_bytes(b"another run's weights")
    before = snapshot(finished_run)
    for extra in (["--resume"], ["--overwrite"], []):
        code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", *extra))
        assert code == 2 and f"{name} is a folder, not a file of a run" in one_line(err)
        assert snapshot(finished_run) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("name", ["config.json", "summary.json", "log.jsonl"])
def test_a_pipe_in_place_of_a_run_file_is_not_waited_on(name, finished_run, data_dir, capsys):
    """A named pipe at a run file's name: --resume waited forever on it. The log is written
    again from model.pt; the others are refused, naming the file."""
    (finished_run / name).unlink()
    os.mkfifo(finished_run / name)
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"waited on {name}"))
    signal.alarm(60)
    try:
        code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1",
                                               "--resume"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if name == "log.jsonl":
        assert code == 0 and len(rows(finished_run)) == 1, err
    else:
        assert code == 2 and f"{name} is damaged (not a file)" in one_line(err)


def test_a_pipe_in_place_of_the_lock_is_refused_in_one_line(data_dir, tmp_path, capsys):
    """A named pipe at .lock: it was status 74 and a line naming no file."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / ".lock")
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "run", "--epochs", "1"))
    assert code == 2 and ".lock is not a file: move it away" in one_line(err)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_files_named_as_temp_files_that_are_not_ours_are_kept(finished_run, data_dir, capsys):
    """Only a killed writer's NAME.PID.tmp files are removed: a folder so named was a
    traceback (and left an --overwrite's old run set aside), a user's file was deleted."""
    (finished_run / "config.json.x.tmp").mkdir()
    (finished_run / "log.jsonl.notes.tmp").write_text("mine")
    (finished_run / "model.pt.123.tmp").mkdir()
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 0, err
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "2", "--seed",
                                           "1", "--overwrite"))
    assert code == 0, err
    assert json.loads((finished_run / "config.json").read_text())["seed"] == 1
    assert (finished_run / "log.jsonl.notes.tmp").read_text() == "mine"
    assert (finished_run / "config.json.x.tmp").is_dir() and not (finished_run / ".replaced"
                                                                   ).exists()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(finished_run, data_dir,
                                                                    tmp_path, capsys):
    """The lock was opened through the link and truncated: another run's weights lost."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".lock").symlink_to(finished_run / "weights.pt")
    before = snapshot(finished_run)
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "new", "--epochs", "1"))
    assert code == 2 and ".lock is a link" in one_line(err) and snapshot(finished_run) == before
    (tmp_path / "new" / ".lock").unlink()
    os.link(finished_run / "weights.pt", tmp_path / "new" / ".lock")  # a hard link
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "new", "--epochs", "1"))
    assert code == 2 and ".lock is a link" in one_line(err) and snapshot(finished_run) == before


def test_a_refused_out_through_dot_dot_keeps_the_users_folder(tmp_path, capsys):
    """new/../mine: "new" was counted as made, then "mine" (the user's, empty) removed."""
    (tmp_path / "mine").mkdir()
    code, _, err = cli(capsys, *train_args(tmp_path / "absent", tmp_path / "new" / ".." / "mine"))
    assert code == 2 and "No CIFAR-10 data" in one_line(err)
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "new").exists()


def test_a_checkpoint_of_another_run_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        monkeypatch.setattr(helpers, "format_row", lambda *a: (_ for _ in ()).throw(
            KeyboardInterrupt()))
        assert cli(capsys, *train_args(data_dir, out, "--seed", str(seed)))[0] == 130
        runs[seed] = out
    monkeypatch.undo()
    shutil.copy(runs[1] / "model.pt", runs[0] / "model.pt")
    before = snapshot(runs[0])
    code, _, err = cli(capsys, *train_args(data_dir, runs[0], "--resume"))
    line = one_line(err)
    assert code == 2 and "belongs to another run" in line and "seed 1 -> 0" in line
    assert snapshot(runs[0]) == before


def test_resume_with_other_options_is_refused(partial_run, data_dir, capsys):
    before = snapshot(partial_run)
    for extra, says in ((["--lr", "0.1"], "recipe.lr 0.2 -> 0.1"), (["--seed", "3"], "seed 0 -> 3"),
                        (["--workers", "1"], "workers 0 -> 1"),
                        (["--train-subset", "20"], "train_subset None -> 20")):
        code, _, err = cli(capsys, *train_args(data_dir, partial_run, "--resume", *extra))
        assert code == 2 and says in one_line(err), err
    assert snapshot(partial_run) == before


def test_resume_needs_only_the_folder(data_dir, tmp_path, capsys, monkeypatch):
    """``--out DIR --resume`` alone continues with the run's own recipe (and the options it was
    given), seed, subset, split and workers, to the result of an uninterrupted run; an option
    given must still agree."""
    options = ("--recipe", "small", "--lr", "0.1", "--seed", "3", "--train-subset", "24",
               "--val-fraction", "0.25", "--workers", "0")
    ref = tmp_path / "ref"
    assert cli(capsys, *train_args(data_dir, ref, *options))[0] == 0
    run = _interrupted(data_dir, tmp_path / "run", capsys, monkeypatch, *options)
    code, _, err = cli(capsys, "train", "--data-dir", data_dir, "--out", run, "--resume",
                       "--no-progress")
    assert code == 0, err
    assert rows(run) == rows(ref) and len(rows(ref)) == 3
    a, b = (torch.load(p / "weights.pt", weights_only=True) for p in (ref, run))
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())
    config = json.loads((run / "summary.json").read_text())
    assert config["recipe_name"] == "small" and config["recipe"]["lr"] == 0.1
    assert (config["seed"], config["train_subset"], config["eval_split"]) == (3, 24, "val")
    code, _, err = cli(capsys, "train", "--data-dir", data_dir, "--out", run, "--resume",
                       "--seed", "0")
    assert code == 2 and "seed 3 -> 0" in one_line(err)
    code, out, err = cli(capsys, "train", "--data-dir", data_dir, "--out", run, "--resume",
                         "--recipe", "small")  # its own name: its own settings (lr 0.1)
    assert code == 0 and "nothing to do" in out, err
    code, _, err = cli(capsys, "train", "--data-dir", data_dir, "--out", run, "--resume",
                       "--recipe", "standard")
    assert code == 2 and "made with the recipe 'small', not 'standard'" in one_line(err)
    config = json.loads((run / "config.json").read_text())
    config["recipe"]["lr"] = "fast"  # hand-edited: no recipe can be built from it
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").unlink()
    code, _, err = cli(capsys, "train", "--data-dir", data_dir, "--out", run, "--resume")
    assert code == 2 and "config.json holds a recipe" in one_line(err) and "Recipe.lr" in err


def _drop_setting(out: Path, name: str) -> None:
    """Make the run in ``out`` look as if made before Recipe had the setting ``name``."""
    for file in ("config.json", "summary.json"):
        if (out / file).exists():
            config = json.loads((out / file).read_text())
            config["recipe"].pop(name, None)
            (out / file).write_text(json.dumps(config))
    state = torch.load(out / "model.pt", weights_only=True)
    del state["run"]["recipe"][name]
    helpers.save_checkpoint(out / "model.pt", state)


@pytest.mark.parametrize("name, option, value, other, says", [
    ("dilated_downs", "--dilated-downs", "0", "1", "0 -> 1"),
    ("muon_lr", "--muon-lr", "0", "0.02", "0.0 -> 0.02")])
def test_a_run_made_before_a_recipe_setting_existed_resumes(data_dir, tmp_path, capsys,
                                                            monkeypatch, name, option, value,
                                                            other, says):
    """The setting it lacks is read at the value such runs trained with (no dilated
    downsampler, SGD); the recipe's other value is refused, naming the setting."""
    run = _interrupted(data_dir, tmp_path / "run", capsys, monkeypatch, option, value)
    _drop_setting(run, name)
    args = train_args(data_dir, run, "--resume")
    code, _, err = cli(capsys, *args, option, other)
    assert code == 2 and f"recipe.{name} {says}" in one_line(err)
    code, _, err = cli(capsys, *args, option, value)
    assert code == 0 and (run / "summary.json").exists(), err
    _drop_setting(run, name)  # now a finished run made before the setting
    code, out, err = cli(capsys, *args, option, value)
    assert code == 0 and "nothing to do" in out, err


def test_resume_of_a_finished_run_with_other_options_is_refused(finished_run, data_dir, capsys):
    before = snapshot(finished_run)
    args = train_args(data_dir, finished_run, "--epochs", "1", "--resume")
    code, out, err = cli(capsys, *args)
    assert code == 0 and "is finished: nothing to do" in out, err
    for extra, says in ((["--seed", "3"], "seed 0 -> 3"),
                        (["--lr", "0.1"], "recipe.lr 0.2 -> 0.1")):
        code, _, err = cli(capsys, *args, *extra)
        assert code == 2 and says in one_line(err), err
    assert snapshot(finished_run) == before


def test_config_records_what_changes_results(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    for key in ("recipe", "recipe_name", "seed", "workers", "threads", "device", "data",
                "classes", "train_images", "eval_images", "eval_split", "train_subset",
                "test_subset", "val_fraction", "mean", "std", "images_sha256", "versions"):
        assert key in config, key
    assert config["workers"] == 0
    assert set(config["versions"]) == {"torch", "numpy", "albumentations", "opencv", "pillow"}


def test_resume_on_other_images_is_refused(data_dir, tmp_path, capsys, monkeypatch):
    """New test images, or two classes' images swapped, of the same counts (and, by chance or
    design, the same mean): resumed without a word, the history mixed two data sets."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = _interrupted(data, tmp_path / "run", capsys, monkeypatch)
    before = snapshot(out)
    x, y = make_arrays(2, 7)  # another test set of the same size
    write_batches(data / "cifar-10-batches-py", *make_arrays(3, 1), x, y)
    code, _, err = cli(capsys, *train_args(data, out, "--resume"))
    assert code == 2 and "images_sha256" in one_line(err) and snapshot(out) == before
    config = json.loads((out / "config.json").read_text())
    del config["images_sha256"]  # a run made before the fingerprint was recorded: resumed
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, *train_args(data, out, "--resume"))
    assert code == 0, err


def test_resume_from_the_data_moved_elsewhere_is_a_note(png_root, tmp_path, capsys,
                                                       monkeypatch):
    """The same images in a folder of another name: "data 'image folder png' -> ..." refused
    the resume, whose only way on was --overwrite (the images' hash says they are the same)."""
    out = _interrupted(png_root, tmp_path / "run", capsys, monkeypatch)
    moved = png_root.rename(tmp_path / "cifar")
    code, stdout, err = cli(capsys, *train_args(moved, out, "--resume"))
    assert code == 0 and len(rows(out)) == 3, err
    assert "note: resuming with data 'image folder png' -> 'image folder cifar': the same " \
        "images" in stdout
    (out / "weights.pt").unlink()  # the run, finished there, is still its own: rebuilt
    code, _, err = cli(capsys, *train_args(moved, out, "--resume"))
    assert code == 0 and (out / "weights.pt").exists(), err


def test_a_run_finished_by_another_version_resumes(finished_run, data_dir, capsys):
    """summary.json holds what the version that finished the run recorded: a fingerprint that
    config.json (written by an earlier version) lacks, a figure a later version dropped."""
    config = json.loads((finished_run / "config.json").read_text())
    del config["images_sha256"]
    (finished_run / "config.json").write_text(json.dumps(config))
    summary = json.loads((finished_run / "summary.json").read_text())
    (finished_run / "summary.json").write_text(json.dumps(dict(summary, median_images_per_s=812.5)))
    (finished_run / "weights.pt").unlink()
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 0 and (finished_run / "weights.pt").exists(), err


@pytest.mark.parametrize("damage", ["cut", "other weights"])
def test_resume_of_a_finished_run_writes_damaged_weights_again(damage, finished_run, data_dir,
                                                                capsys):
    """A cut weights.pt, or one with other tensors, was kept: "finished: nothing to do"."""
    good = (finished_run / "weights.pt").read_bytes()
    if damage == "cut":
        (finished_run / "weights.pt").write_bytes(good[:1000])
    else:
        state = torch.load(finished_run / "weights.pt", weights_only=True)
        state["model"]["out.1.bias"] += 1
        torch.save(state, finished_run / "weights.pt")
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 0, err
    state = torch.load(finished_run / "weights.pt", weights_only=True)
    assert torch.equal(state["model"]["out.1.bias"], torch.load(
        finished_run / "model.pt", weights_only=True)["model"]["out.1.bias"])


def test_running_out_of_memory_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    """torch's "can't allocate memory" (a RuntimeError) was a traceback with status 1; another
    fault that speaks of memory is not taken for it."""
    def fails(message):
        def fit(*_, **__):
            raise RuntimeError(message)
        return fit
    monkeypatch.setattr(helpers, "fit", fails("DefaultCPUAllocator: can't allocate memory: you "
                                              "tried to allocate 360000000000 bytes"))
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "run"))
    assert code == 1 and "out of memory" in one_line(err) and "--batch-size" in err
    monkeypatch.setattr(helpers, "fit", fails("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a fault: its traceback
        cli(capsys, *train_args(data_dir, tmp_path / "run2"))


def test_a_net_over_the_exercises_budget_is_said(data_dir, tmp_path, capsys):
    code, out, err = cli(capsys, *train_args(data_dir, tmp_path / "run", "--epochs", "1",
                                             "--widths", "64", "128", "256", "512"))
    assert code == 0 and "\nnote: 1,291,466 parameters, over the exercise's 200,000\n" in out, err


def test_a_summary_edited_is_not_written_into_the_weights(finished_run, data_dir, capsys):
    """summary.json's settings (another activation, seed) went into a rebuilt weights.pt."""
    summary = json.loads((finished_run / "summary.json").read_text())
    summary["recipe"]["act"], summary["seed"] = "relu", 7
    (finished_run / "summary.json").write_text(json.dumps(summary))
    (finished_run / "weights.pt").unlink()
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and "summary.json does not agree" in one_line(err)
    assert not (finished_run / "weights.pt").exists()


@pytest.mark.parametrize("edit, says", [
    (lambda s: s["recipe"].update(note="relu next"), "(recipe.note None -> 'relu next')"),
    (lambda s: s.update(final_test_acc=0.99), "final_test_acc"),
    (lambda s: s.pop("median_epoch_seconds"), "(median_epoch_seconds missing)"),
    (lambda s: s.update(final_test_acc_flip_tta="high"), "summary.json is damaged"),
    (lambda s: s.update(final_test_acc_flip_tta=0.99), "summary.json and weights.pt disagree"),
    (lambda s: s.update(device="tpu"), "(device 'cpu' -> 'tpu'")])
def test_a_summary_edited_anywhere_is_refused(edit, says, finished_run, data_dir, capsys):
    """An edit that was not compared (the flip TTA figure, a key added) was written into the
    intact weights.pt by --resume; a key added to its recipe left it unreadable."""
    summary = json.loads((finished_run / "summary.json").read_text())
    edit(summary)
    (finished_run / "summary.json").write_text(json.dumps(summary))
    before = snapshot(finished_run)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))
    assert code == 2 and says in one_line(err) and snapshot(finished_run) == before
    if "weights.pt" in says:  # the figure model.pt cannot tell: as summary.json says it
        (finished_run / "weights.pt").unlink()
        assert cli(capsys, *train_args(data_dir, finished_run, "--epochs", "1", "--resume"))[
            0] == 0
        assert helpers.load_model(finished_run / "weights.pt")[1]["run"][
            "final_test_acc_flip_tta"] == 0.99


def test_images_that_cannot_be_normalised_are_bad_input(tmp_path, capsys):
    """A channel that never varies (std 0) gave nan, reported as divergence (status 1)."""
    x, y = make_arrays(3, 1)
    x[..., 2] = 0
    write_batches(tmp_path / "data" / "cifar-10-batches-py", x, y, *make_arrays(2, 2))
    code, _, err = cli(capsys, *train_args(tmp_path / "data", tmp_path / "run"))
    assert code == 2 and "do not vary in channel B" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_a_signal_after_the_command_changes_nothing(finished_run, data_dir, capsys):
    """``python helpers.py`` stops at once on a signal while torch loads; once the command had
    ended that handler came back, and a signal then ended a finished command with 143."""
    old = signal.signal(signal.SIGTERM, helpers._interrupted_early)  # as the script sets it
    try:
        code, _, err = cli(capsys, "evaluate", "--weights", finished_run / "weights.pt",
                           "--data-dir", data_dir)
        assert code == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, err
    finally:
        signal.signal(signal.SIGTERM, old)


def test_out_that_is_a_file_or_cannot_be_made_is_refused_before_reading(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for out, says in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "run", "cannot write to")):
        code, _, err = cli(capsys, *train_args(tmp_path / "absent", out))
        assert code == 2 and says in one_line(err) and "CIFAR-10" not in err


def _limited(megabytes: float):
    limit = int(megabytes * 2 ** 20)
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_write_failure_is_one_line_and_keeps_the_last_good_checkpoint(partial_run, data_dir):
    size = (partial_run / "model.pt").stat().st_size
    res = _run(*train_args(data_dir, partial_run, "--resume"), preexec_fn=_limited(size / 2 ** 21))
    line = one_line(res.stderr)
    assert res.returncode == 74 and "cannot write" in line and "model.pt: File too large" in line
    assert torch.load(partial_run / "model.pt", weights_only=True)["epoch"] == 1
    assert not list(partial_run.glob("*.tmp")) and not (partial_run / "summary.json").exists()
    res = _run(*train_args(data_dir, partial_run, "--resume"))  # with room again: it finishes
    assert res.returncode == 0 and len(rows(partial_run)) == 3


def test_a_file_size_limit_or_a_full_output_is_one_line(data_dir, tmp_path, finished_run):
    """Writing the PID into .lock under a limit of 0 bytes, or printing to a full device, was a
    traceback."""
    res = _run(*train_args(data_dir, tmp_path / "run"), preexec_fn=_limited(0))
    assert res.returncode == 2 and ".lock: File too large" in one_line(res.stderr)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        res = subprocess.run(helpers_cmd(*train_args(data_dir, finished_run, "--epochs", "1",
                                                     "--resume")),
                             env=env(), stdout=full, stderr=subprocess.PIPE, text=True)
    assert res.returncode == 74 and "cannot write its output: No space left on device" in \
        one_line(res.stderr) and f"the run in {finished_run} is finished" in res.stderr


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_set_aside_that_fails_is_one_line_and_loses_nothing(fail_at, finished_run, data_dir,
                                                              capsys, monkeypatch):
    """--overwrite cannot move the old run aside (a permission refused after 0 or 2 files):
    the command ends in one line, status 74, and every file of the old run is back."""
    before, real, moved = snapshot(finished_run), os.replace, []

    def refuse(a, b):
        if ".replaced" in str(b):
            moved.append(b)
            if len(moved) == fail_at:
                raise PermissionError(13, "Permission denied")
        return real(a, b)

    monkeypatch.setattr(os, "replace", refuse)
    code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--epochs", "2",
                                           "--overwrite"))
    monkeypatch.undo()
    assert code == 74 and "cannot set the old run aside" in one_line(err)
    assert "Permission denied" in err and snapshot(finished_run) == before
    assert not (finished_run / ".replaced").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_overwrite_target_is_one_line(finished_run, data_dir, capsys):
    finished_run.chmod(0o500)
    try:
        code, _, err = cli(capsys, *train_args(data_dir, finished_run, "--overwrite"))
    finally:
        finished_run.chmod(0o755)
    assert code == 2 and "cannot write" in one_line(err)


def test_names_too_long_are_one_line(data_dir, tmp_path, capsys):
    long = tmp_path / ("a" * 300)
    code, _, err = cli(capsys, *train_args(data_dir, long))
    assert code == 2 and "too long" in one_line(err)
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "new" / long.name))
    assert code == 2 and "too long" in one_line(err) and not (tmp_path / "new").exists()
    code, _, err = cli(capsys, *train_args(long, tmp_path / "run"))  # was 74, "not written"
    assert code == 2 and "too long" in one_line(err)
    code, _, err = cli(capsys, "evaluate", "--weights", long, "--data-dir", data_dir)
    assert code == 2 and "too long" in one_line(err)


def test_control_characters_in_names_are_escaped(tmp_path, capsys):
    code, _, err = cli(capsys, *train_args(tmp_path / "bad\x1b[31mname", tmp_path / "run"))
    assert code == 2 and "\x1b" not in err and "\\x1b[31mname" in one_line(err)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="file names there are not bytes")
def test_a_run_folder_named_in_no_encoding_is_printed_escaped(finished_run, data_dir):
    odd = os.fsencode(finished_run) + b"\xff"  # a byte that no UTF-8 text holds
    os.rename(finished_run, odd)
    for extra in (["--resume"], ["--overwrite"]):
        argv = helpers_cmd(*train_args(data_dir, "ODD", "--epochs", "1", *extra))
        done = subprocess.run([odd if a == "ODD" else os.fsencode(a) for a in argv],
                              env=env(PYTHONIOENCODING="utf-8:strict"), capture_output=True)
        assert done.returncode == 0 and b"run\\udcff" in done.stdout, done.stderr[-300:]


# --------------------------------------------------------------------------- checkpoints
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_and_never_run(partial_run, data_dir, tmp_path, capsys):
    """A crafted model.pt ran a shell command on load."""
    marker, path = tmp_path / "ran", tmp_path / "model.pt"
    torch.save({"model": _RunsCode(marker), "epoch": 1}, path)
    with pytest.raises(helpers.CheckpointError, match="posix.system: refused.*could run code"):
        helpers.load_model(path)
    shutil.copy(path, partial_run / "model.pt")  # the same file met by --resume
    code, _, err = cli(capsys, *train_args(data_dir, partial_run, "--resume"))
    assert code == 2 and "could run code" in one_line(err)
    assert not marker.exists()


def test_stale_temp_file_is_ignored_and_cleaned(tmp_path):
    path, model = tmp_path / "model.pt", helpers.Net(TINY)
    helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=1))
    (tmp_path / "model.pt.12345.tmp").write_bytes(b"half a checkpoint")
    assert torch.load(path, weights_only=True)["epoch"] == 1
    helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_save_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or
                        real_replace(a, b))
    helpers.save_checkpoint(tmp_path / "m.pt", dict(model=helpers.Net(TINY).state_dict()))
    assert events[:2] == ["fsync", "replace"]


def test_non_finite_weights_are_never_saved(tmp_path):
    path, model = tmp_path / "m.pt", helpers.Net(TINY)
    helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=1))
    with torch.no_grad():
        model.c2[0][1].running_var[0] = float("inf")
    with pytest.raises(FloatingPointError, match="c2.0.1.running_var"):
        helpers.save_checkpoint(path, dict(model=model.state_dict(), epoch=2))
    assert torch.load(path, weights_only=True)["epoch"] == 1


class _GoodThenNaN:
    """Evaluation batches of real images; from the second pass on, ``model`` scores them inf."""

    def __init__(self, model, x, y):
        self.x, self.y, self.passes = torch.as_tensor(x), torch.as_tensor(y), 0
        model.register_forward_hook(lambda m, i, out: torch.full_like(out, float("inf"))
                                    if self.passes >= 2 and not m.training else None)

    def __iter__(self):
        self.passes += 1
        yield self.x, self.y


def test_fit_stops_on_a_nan_evaluation_and_keeps_the_last_good_checkpoint(tmp_path, cpu):
    model, recipe, train, _ = _fit_setup()
    path, logged = tmp_path / "m.pt", []
    with pytest.raises(FloatingPointError,
                       match=r"Epoch 2: the evaluation loss is nan.*keeps epoch 1"):
        helpers.fit(model, recipe, train, _GoodThenNaN(model, *make_arrays(2, 2)), path,
                    progress=False, log=lambda h: logged.append(h[-1]["epoch"]))
    assert logged == [1] and torch.load(path, weights_only=True)["epoch"] == 1


def test_fit_stops_on_non_finite_batchnorm_statistics(tmp_path, cpu):
    """Finite evaluation, but a BatchNorm buffer went inf: nothing is saved."""
    model, recipe, train, test = _fit_setup()
    calls = []

    def poison(module, inputs):
        calls.append(module.training)
        if sum(calls) == 4 and module.training:  # the first training step of epoch 2
            module.running_var[0] = float("inf")

    model.c3[0][2].register_forward_pre_hook(poison)
    with pytest.raises(FloatingPointError, match=r"Epoch 2: c3.0.2.running_var holds nan"):
        helpers.fit(model, recipe, train, test, tmp_path / "m.pt", progress=False,
                    log=lambda h: None)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["epoch"] == 1


def test_cli_high_lr_stops_with_one_line_and_saves_nothing_bad(data_dir, tmp_path, capsys):
    """A learning rate far too high (1000) makes the loss nan; the run stops."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_args(data_dir, out, "--lr", "1000"))
    line = one_line(err)
    assert code == 1 and "stopped" in line and "nan" in line and "learning rate" in line
    assert not (out / "summary.json").exists()
    if (out / "model.pt").exists():
        state = torch.load(out / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.dtype.is_floating_point)


# --------------------------------------------------------------------------- bad options
# Each Recipe field's option, with bad values: the error must name the option and the range
# the field declares (some spelled out below, as a user reads them).
RECIPE_BAD = {"epochs": ["0", "1.5"], "lr": ["0", "nan", "inf", "1e39"],
              "batch_size": ["0", "100000000"], "weight_decay": ["-0.001"],
              "label_smoothing": ["1"], "pct_start": ["0", "0.9"],
              "p_flip": ["2"], "p_affine": ["1.5"], "p_dropout": ["-0.1"], "act": ["tanh"],
              "widths": ["0 0 0 0", "8 100000 16 16"],
              "depths": ["-1 1 1 1", "1 0 1 1", "0 65 1 1"],
              "dilated_downs": ["3", "1.5"], "muon_lr": ["-0.01", "inf"]}
WORDS = {f.name: f.metadata["words"] for f in fields(helpers.Recipe)}
assert set(RECIPE_BAD) == set(WORDS)  # every field's option is tried
BAD_OPTIONS = [(["--" + name.replace("_", "-"), *value.split()],
                f"--{name.replace('_', '-')}: expected {WORDS[name]}, got")
               for name, values in RECIPE_BAD.items() for value in values] + [
    (["--lr", "0"], "--lr: expected a number in (0, 3.4e38]"),
    (["--depths", "1", "0", "1", "1"], "--depths: expected four integers in [0, 64] with D2 >= 1"),
    (["--widths", "8", "16", "16"], "--widths: expected 4 arguments"),
    (["--val-fraction", "-0.2"], "--val-fraction: expected a number in (0, 1)"),
    (["--val-fraction", "1"], "--val-fraction: expected a number in (0, 1)"),
    (["--train-subset", "-10"], "--train-subset: expected an integer >= 1"),
    (["--test-subset", "0"], "--test-subset: expected an integer >= 1"),
    (["--threads", "0"], "--threads: expected an integer in [1, 1024]"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
    (["--workers", "10000"], "--workers: expected an integer in [0, 64]")] + [
    (["--out", ""], "--out: expected a folder name"),
    (["--recipe", "huge"], "--recipe: invalid choice"),
    (["--val-fraction", "0.2", "--test-subset", "5"], "--test-subset: not allowed with"),
    (["--resume", "--overwrite"], "--overwrite: not allowed with argument --resume"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epoch", "1"], "unrecognized arguments: --epoch 1")]  # no abbreviation of --epochs


@pytest.mark.parametrize("options, says", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_data_is_read(options, says, tmp_path, capsys):
    """The data folder does not exist, so reaching the data would say so."""
    code, _, err = cli(capsys, "train", "--data-dir", tmp_path / "absent",
                       "--out", tmp_path / "run", *options)
    line = one_line(err)
    assert code == 2 and says in line and "CIFAR-10" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_options_in_a_real_process(tmp_path):
    for options in (["--p-affine", "1.5"], ["--epochs", "0"]):
        res = _run("train", "--data-dir", tmp_path, *options, cwd=tmp_path)
        assert res.returncode == 2 and options[0] in one_line(res.stderr)


@pytest.mark.parametrize("options, says", [
    (["--train-subset", "1000"], "--train-subset: 1000 is more than the 30 train images"),
    (["--test-subset", "21"], "--test-subset: 21 is more than the 20 test images"),
    (["--val-fraction", "0.01"], "--val-fraction: val_fraction 0.01 of 30 images leaves an "
                                 "empty validation split"),
])
def test_options_that_do_not_fit_the_data(options, says, data_dir, tmp_path, capsys):
    """Refused once the data is read: the folders --out made for the run are gone again."""
    (tmp_path / "mine").mkdir()
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "new" / "run", *options))
    assert code == 2 and says in one_line(err) and not (tmp_path / "new").exists()
    code, _, err = cli(capsys, *train_args(data_dir, tmp_path / "mine" / "run", *options))
    assert code == 2 and [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert not any((tmp_path / "mine").iterdir())


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
    code, _, err = cli(capsys, *train_args(png_root, out, "--epochs", "1"))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["classes"][-1] == "zebra"
    model, _ = helpers.load_model(out / "weights.pt")
    assert model.out[-1].out_features == 11
