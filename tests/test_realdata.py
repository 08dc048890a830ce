"""Real CIFAR-10 checks (a few minutes; deselect with ``pytest -m "not realdata"``).

The data comes from the folder named by $CIFAR10_DIR, else from
``<repo>/../shared/data/cifar10-jpeg.tar.gz`` unpacked into a temporary folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

import helpers
from conftest import REPO, cli

pytestmark = pytest.mark.realdata

TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    env = os.environ.get("CIFAR10_DIR")
    if env:
        if not Path(env).is_dir():
            pytest.skip(f"CIFAR10_DIR={env} is not a folder")
        yield Path(env)
        return
    if TARBALL.is_file():
        dest = tmp_path_factory.mktemp("cifar10")
        with tarfile.open(TARBALL) as tar:
            tar.extractall(dest, filter="data")
        kids = [p for p in dest.iterdir() if p.is_dir()]
        if not (dest / "train").is_dir() and len(kids) == 1:  # tarball with a top folder
            yield kids[0]
        else:
            yield dest
        shutil.rmtree(dest, ignore_errors=True)  # 60,000 files: do not leave them behind
        return
    pytest.skip(f"no real CIFAR-10: set CIFAR10_DIR to a data folder or provide {TARBALL}")


@pytest.fixture(scope="session")
def real_data(real_data_dir):
    return helpers.load_cifar10(real_data_dir)


def test_real_data_shapes_classes_and_stats(real_data):
    d = real_data
    assert d.x_train.shape == (50_000, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (10_000, 32, 32, 3)
    assert len(d.y_train) == 50_000 and len(d.y_test) == 10_000
    assert tuple(d.classes) == helpers.CIFAR10_CLASSES
    np.testing.assert_array_equal(np.bincount(d.y_train, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(d.y_test, minlength=10), [1000] * 10)
    mean, std = helpers.compute_mean_std(d.x_train)
    np.testing.assert_allclose(mean, helpers.CIFAR10_MEAN, atol=0.005)
    np.testing.assert_allclose(std, helpers.CIFAR10_STD, atol=0.005)


@pytest.mark.slow
def test_one_epoch_of_the_fast_recipe_beats_chance(real_data_dir, tmp_path, capsys):
    """The train command on 10,000 real images, one epoch; then evaluate scores the same."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data-dir", real_data_dir, "--recipe", "fast",
                       "--epochs", "1", "--train-subset", "10000", "--out", out,
                       "--threads", "2", "--no-progress")
    assert code == 0, err
    acc = json.loads((out / "summary.json").read_text())["final_test_acc"]
    # One epoch of 10,000 images is 78 steps of batch 128. Chance is 0.10, with a standard
    # error of sqrt(0.1 * 0.9 / 10000) = 0.003 on the 10,000 test images.
    assert acc > 0.25, f"test accuracy {acc:.3f} after one epoch (chance 0.10)"


@pytest.mark.slow
def test_committed_weights_score_what_readme_says(real_data_dir, capsys):
    """Every file in weights/ scores, to 0.01 points, the figures README gives for it, and is
    the recipe (every setting) and seed README names."""
    rows = re.findall(r"^\| `(weights/[\w.-]+\.pt)` \| `(\w+)` \| (\d+) \| ([\d.]+) \| ([\d.]+) \|",
                      (REPO / "README.md").read_text(), flags=re.M)
    assert {r[0] for r in rows} == {f"weights/{p.name}" for p in (REPO / "weights").glob("*.pt")}
    for path, recipe, seed, acc, tta in rows:
        code, out, err = cli(capsys, "evaluate", "--weights", REPO / path, "--data-dir",
                             real_data_dir, "--threads", "2")
        assert code == 0, err
        scored = json.loads(out.splitlines()[0])
        assert (f"{100 * scored['test_acc']:.2f}", f"{100 * scored['test_acc_flip_tta']:.2f}") \
            == (acc, tta), path
        assert out.splitlines()[1].endswith(f"; recipe {recipe}, seed {seed}"), path
