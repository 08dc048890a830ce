"""The speed benchmark: the figures ``bench`` reports, how it times them, its table, and the
``bench`` command (output and refusals)."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch

import helpers
from conftest import CLASSES, TINY, cli, env, helpers_cmd, one_line

RATES = {"loader": "loader_images_per_s", "model": "model_images_per_s",
         "end_to_end": "end_to_end_images_per_s", "eval": "eval_images_per_s"}
KEYS = {"recipe", "device", "torch", "cpus", "threads", "workers", "batch_size", "seconds",
        "params", "macs", "end_to_end_pct_of_model", "epoch_seconds", "eval_seconds",
        "eval_pct_of_epoch", "timed_images", "timed_seconds", *RATES.values()}
SECONDS = 0.2


def tiny_recipe(**kw) -> helpers.Recipe:
    return helpers.Recipe(widths=TINY, batch_size=8, **kw)


@pytest.fixture
def data(arrays):
    """30 training and 20 test images as ``CifarData``."""
    return helpers.CifarData(*arrays, helpers.CIFAR10_CLASSES, "synthetic")


def check_consistent(r: dict, eval_set: int) -> None:
    """Every derived figure recomputed from the timed counts; each rate fits its count."""
    assert set(r) == KEYS
    assert set(r["timed_images"]) == set(r["timed_seconds"]) == set(RATES)
    for name, key in RATES.items():
        images, seconds = r["timed_images"][name], r["timed_seconds"][name]
        assert r[key] > 0 and images > 0, key
        assert seconds >= r["seconds"] * (1 - 1e-9), key  # each figure timed for --seconds
        assert math.isclose(r[key], images / seconds, rel_tol=1e-9), key
    close = dict(rel_tol=1e-9)
    assert math.isclose(r["end_to_end_pct_of_model"],
                        100 * r["end_to_end_images_per_s"] / r["model_images_per_s"], **close)
    epoch_s = 50_000 / r["end_to_end_images_per_s"]
    eval_s = 10_000 / r["eval_images_per_s"]
    assert math.isclose(r["epoch_seconds"], epoch_s, **close)
    assert math.isclose(r["eval_seconds"], eval_s, **close)
    assert math.isclose(r["eval_pct_of_epoch"], 100 * eval_s / epoch_s, **close)
    assert r["timed_images"]["eval"] % eval_set == 0  # whole passes of the test set only
    for name in ("loader", "model", "end_to_end"):  # whole batches only
        assert r["timed_images"][name] % r["batch_size"] == 0, name
    assert r["macs"] > 0 and r["params"] > 0 and r["threads"] >= 1
    assert json.loads(json.dumps(r)) == r


def check_table(r: dict, table: str) -> None:
    """The table shows the same numbers as the result."""
    lines = table.splitlines()
    assert len(lines) == 6  # heading, column names, four figures
    assert lines[0].startswith(f"recipe {r['recipe']} (")
    assert f"batch {r['batch_size']}, {r['device']}, torch {r['torch']}" in lines[0]
    assert f"{r['threads']} threads, {r['seconds']:g} s per figure" in lines[0]
    assert f"{r['macs'] / 1e6:.1f}M multiply-adds/image" in lines[0]
    labels = ("loader only", "model only", "end-to-end training", "evaluation")
    for line, label, key in zip(lines[2:], labels, RATES.values()):
        assert line.startswith(label) and f"{r[key]:,.0f}" in line, (label, line)
    assert f"{r['workers']} worker" in lines[2]
    assert f"{r['end_to_end_pct_of_model']:.1f}% of model only" in lines[4]
    assert f"50,000 images in {r['epoch_seconds']:.1f} s" in lines[4]
    assert f"10,000 images in {r['eval_seconds']:.2f} s" in lines[5]
    assert f"{r['eval_pct_of_epoch']:.1f}% of an epoch" in lines[5]


# --------------------------------------------------------------------------- bench()
def test_bench_reports_consistent_figures(data, cpu):
    r = helpers.bench(data, tiny_recipe(), cpu, workers=0, seconds=SECONDS)
    check_consistent(r, eval_set=len(data.y_test))
    assert (r["recipe"], r["device"], r["workers"], r["batch_size"], r["seconds"]) == (
        "custom", "cpu", 0, 8, SECONDS)
    assert r["macs"] == helpers.count_macs(helpers.Net(TINY))
    assert r["params"] == helpers.count_parameters(helpers.Net(TINY))
    assert r["threads"] == torch.get_num_threads()
    assert r["torch"] == torch.__version__
    check_table(r, helpers.bench_table(r))


def test_bench_times_model_and_end_to_end_in_turns(arrays, cpu, monkeypatch):
    """A machine whose speed drifts must slow both figures alike: they are timed in turns;
    and the warm-up steps are not counted."""
    x_tr, _, x_te, y_te = arrays
    y_tr = np.zeros(len(x_tr), dtype=np.int64)  # real batches: every label 0
    data = helpers.CifarData(x_tr, y_tr, x_te, y_te, CLASSES, "synthetic")
    steps, train_step = [], helpers.train_step

    def spy(t, x, y, check=True):
        steps.append("end_to_end" if (y == 0).all() else "model")  # else the random batches
        return train_step(t, x, y, check)

    monkeypatch.setattr(helpers, "train_step", spy)
    r = helpers.bench(data, tiny_recipe(), cpu, workers=0, seconds=SECONDS)
    check_consistent(r, eval_set=len(y_te))
    turns = [s for k, s in enumerate(steps) if k == 0 or s != steps[k - 1]]
    assert len(turns) >= 4 and turns == ["model", "end_to_end"] * (len(turns) // 2)
    for name in ("model", "end_to_end"):  # every timed batch is a step; warm-ups are extra
        assert steps.count(name) * 8 > r["timed_images"][name]


def test_bench_runs_on_data_with_fewer_than_ten_classes(arrays, cpu):
    x_train, y_train, x_test, y_test = arrays
    data = helpers.CifarData(x_train, y_train % 3, x_test, y_test % 3, CLASSES[:3], "three")
    check_consistent(helpers.bench(data, tiny_recipe(), seconds=SECONDS), len(x_test))


def test_bench_refuses_unknown_recipe(data, cpu):
    with pytest.raises(ValueError, match="no recipe 'no-such-recipe': choose one of standard"):
        helpers.bench(data, "no-such-recipe", cpu, workers=0, seconds=SECONDS)


# --------------------------------------------------------------------------- the command
BENCH_ARGS = ("--recipe", "standard", "--widths", *map(str, TINY), "--batch-size", "8",
              "--seconds", str(SECONDS), "--threads", "1")


def check_output(out: str) -> dict:
    """One JSON line, then the table, and nothing else."""
    first, *table = out.splitlines()
    r = json.loads(first)
    check_consistent(r, eval_set=20)
    assert (r["recipe"], r["batch_size"], r["threads"], r["seconds"]) == (
        "custom", 8, 1, SECONDS)  # the standard recipe with options given
    recipe = helpers.Recipe(widths=TINY, batch_size=8)
    assert r["macs"] == helpers.count_macs(helpers.build_model(recipe))
    check_table(r, "\n".join(table))
    return r


def test_cli_bench_in_process(capsys, data_dir):
    code, out, err = cli(capsys, "bench", "--data-dir", data_dir, *BENCH_ARGS, "--device", "cpu")
    assert code == 0, err
    r = check_output(out)
    assert (r["device"], r["workers"]) == ("cpu", 0)


@pytest.mark.slow
def test_cli_bench_prints_json_line_and_table(tmp_path, data_dir):
    """As a user runs it, with the default device: stdout is one JSON line, then the table."""
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run(helpers_cmd("bench", "--data-dir", data_dir, *BENCH_ARGS), cwd=work,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r = check_output(res.stdout)
    assert r["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not list(work.iterdir())  # nothing written


def test_cli_bench_missing_data_dir(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, out, err = cli(capsys, "bench", "--data-dir", missing, *BENCH_ARGS, "--device", "cpu")
    line = one_line(err)
    assert code == 2 and line.startswith("helpers.py bench: error:")
    assert "No CIFAR-10 data found" in line and str(missing) in line


def test_cli_bench_corrupt_image(capsys, png_root):
    bad = png_root / "test" / "cat" / sorted(p.name for p in (png_root / "test" / "cat")
                                             .iterdir())[0]
    bad.write_bytes(b"this is not a PNG" * 20)
    code, out, err = cli(capsys, "bench", "--data-dir", png_root, *BENCH_ARGS, "--device", "cpu")
    line = one_line(err)
    assert code == 2 and line.startswith("helpers.py bench: error:")
    assert str(bad) in line and "Cannot read image" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_bench_cuda_without_gpu(capsys, data_dir):
    code, out, err = cli(capsys, "bench", "--data-dir", data_dir, *BENCH_ARGS, "--device", "cuda")
    line = one_line(err)
    assert code == 2 and "--device" in line and "no cuda device" in line


@pytest.mark.parametrize("option, values", [
    ("--seconds", ["0"]), ("--seconds", ["-1"]), ("--widths", ["0", "0", "0", "0"]),
    ("--batch-size", ["0"]),
])
def test_cli_bench_refuses_bad_values(capsys, data_dir, option, values):
    code, out, err = cli(capsys, "bench", "--data-dir", data_dir, *BENCH_ARGS, "--device", "cpu",
                         option, *values)
    line = one_line(err)
    assert code == 2 and f"argument {option}:" in line, line
    assert out == ""  # refused before any timing
