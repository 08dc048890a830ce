"""The speed benchmark: its timer, the figures it reports and the ``bench`` command."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers

TINY = (8, 16, 16, 16)
REPO = Path(__file__).resolve().parents[1]
RATES = {"loader": "loader_images_per_s", "model": "model_images_per_s",
         "end_to_end": "end_to_end_images_per_s", "eval": "eval_images_per_s"}
KEYS = {"recipe", "device", "torch", "cpus", "threads", "interop_threads", "workers",
        "batch_size", "seconds", "params", "macs", "loader_images_per_s_per_worker",
        "end_to_end_pct_of_model", "epoch_images", "epoch_seconds", "eval_images",
        "eval_seconds", "eval_pct_of_epoch", "eval_set_images", "timed_images",
        "timed_seconds", *RATES.values()}


def _check_consistent(r: dict) -> None:
    """Every derived figure recomputed from the reported rates; each rate fits its count."""
    assert KEYS <= set(r)
    assert set(r["timed_images"]) == set(r["timed_seconds"]) == set(RATES)
    for name, key in RATES.items():
        images, seconds = r["timed_images"][name], r["timed_seconds"][name]
        assert r[key] > 0 and images > 0 and seconds >= r["seconds"], key
        assert math.isclose(r[key], images / seconds, rel_tol=1e-9), key
    close = dict(rel_tol=1e-9)
    assert math.isclose(r["loader_images_per_s_per_worker"],
                        r["loader_images_per_s"] / max(1, r["workers"]), **close)
    assert math.isclose(r["end_to_end_pct_of_model"],
                        100 * r["end_to_end_images_per_s"] / r["model_images_per_s"], **close)
    assert (r["epoch_images"], r["eval_images"]) == (50_000, 10_000)
    epoch_s = 50_000 / r["end_to_end_images_per_s"]
    eval_s = 10_000 / r["eval_images_per_s"]
    assert math.isclose(r["epoch_seconds"], epoch_s, **close)
    assert math.isclose(r["eval_seconds"], eval_s, **close)
    assert math.isclose(r["eval_pct_of_epoch"], 100 * eval_s / epoch_s, **close)
    assert r["timed_images"]["eval"] % r["eval_set_images"] == 0  # whole passes only
    assert r["timed_images"]["model"] % r["batch_size"] == 0
    assert r["macs"] > 0 and r["params"] > 0 and r["threads"] >= 1


def _check_table(r: dict, table: str) -> None:
    """The table shows the same numbers as the result."""
    for key in RATES.values():
        assert f"{r[key]:,.0f}" in table, key
    assert f"{r['end_to_end_pct_of_model']:.1f}% of model only" in table
    assert f"{r['eval_pct_of_epoch']:.1f}% of an epoch" in table
    assert f"batch {r['batch_size']}" in table and f"{r['workers']} worker" in table


def test_timer_skips_warmup_and_counts_whole_batches():
    consumed = []

    def batches():
        while True:
            consumed.append(4)
            yield None, [0] * 4

    def run(it):
        for _ in it:
            time.sleep(0.01)

    seen, seconds = helpers._timed(run, batches(), seconds=0.1, warmup=3)
    assert seen == 4 * (len(consumed) - 3)  # the 3 warm-up batches are not counted
    assert seen >= 4 * 2 and seconds >= 0.1
    assert seen / seconds <= 4 / 0.01  # each batch took at least 10 ms


def test_bench_function_reports_consistent_figures(arrays, cpu):
    recipe = helpers.Recipe(widths=TINY)
    r = helpers.bench(arrays, recipe, cpu, workers=0, batch_size=8, seconds=0.05)
    _check_consistent(r)
    assert (r["recipe"], r["device"], r["workers"], r["batch_size"]) == ("custom", "cpu", 0, 8)
    assert r["macs"] == helpers.count_macs(helpers.Net(TINY))
    assert r["params"] == helpers.count_parameters(helpers.Net(TINY))
    assert r["eval_set_images"] == len(arrays[2])
    assert r["threads"] == helpers.torch.get_num_threads()
    assert json.loads(json.dumps(r)) == r
    _check_table(r, helpers.bench_table(r))


def test_bench_alternates_model_only_and_end_to_end(arrays, cpu, monkeypatch):
    """A machine whose speed drifts must slow both figures alike: they are timed in turns."""
    sources, timed = [], helpers._timed

    def spy(run, batches, seconds, warmup):
        sources.append(batches)  # the loader's stream, or the random batches
        return timed(run, batches, seconds, warmup)

    monkeypatch.setattr(helpers, "_timed", spy)
    r = helpers.bench(arrays, helpers.Recipe(widths=TINY), cpu, workers=0, batch_size=8,
                      seconds=0.04)
    _check_consistent(r)
    real = sources[0]  # the loader alone is timed first
    turns = ["end_to_end" if s is real else "model" for s in sources[1:]]
    assert turns == ["model", "end_to_end"] * helpers.BENCH_ROUNDS


def test_bench_refuses_unknown_recipe(arrays, cpu):
    with pytest.raises(KeyError):
        helpers.bench(arrays, "no-such-recipe", cpu, workers=0, seconds=0.01)


def test_cli_bench_prints_json_line_and_table(tmp_path, png_root):
    cmd = [sys.executable, str(REPO / "helpers.py"), "bench", "--data-dir", str(png_root),
           "--recipe", "small", "--workers", "1", "--batch-size", "8", "--seconds", "0.05",
           "--threads", "1", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               NO_ALBUMENTATIONS_UPDATE="1", MPLBACKEND="Agg")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    first, *table = res.stdout.splitlines()
    r = json.loads(first)
    _check_consistent(r)
    assert (r["recipe"], r["workers"], r["batch_size"], r["threads"]) == ("small", 1, 8, 1)
    assert r["macs"] == helpers.count_macs(helpers.build_model(helpers.RECIPES["small"]))
    assert r["eval_set_images"] == 20
    _check_table(r, "\n".join(table))
    assert len(table) == 7  # heading, column names, five figures
    assert {p.name for p in tmp_path.iterdir()} == {"png"}  # nothing written
