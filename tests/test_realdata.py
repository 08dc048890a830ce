"""Real CIFAR-10 checks (about 2 minutes; deselect with ``pytest -m "not realdata"``).

The data comes from the folder named by $CIFAR10_DIR, else from
``<repo>/../shared/data/cifar10-jpeg.tar.gz`` unpacked into a temporary folder.
"""
from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[1]
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


def test_one_epoch_default_net_beats_chance(real_data):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d = real_data
        x_tr, y_tr = helpers.subset(d.x_train, d.y_train, 10_000, seed=0)
        # an image-folder test split is sorted by class: take a random 2000, not the first
        x_te, y_te = helpers.subset(d.x_test, d.y_test, 2000, seed=0)
        assert len(np.unique(y_tr)) == 10 and len(np.unique(y_te)) == 10
        recipe = replace(helpers.RECIPES["fast"], epochs=1)
        mean, std = helpers.compute_mean_std(x_tr)
        helpers.set_seed(0)
        augment = helpers.EpochAugment(helpers.exercise_augmentations(
            mean, recipe.p_flip, recipe.p_affine, recipe.p_dropout), seed=0)
        train, test = helpers.make_loaders(
            helpers.CifarDataset(x_tr, y_tr, augment), helpers.CifarDataset(x_te, y_te),
            recipe.batch_size, "cpu", num_workers=0, seed=0)
        model = helpers.build_model(recipe, mean=mean, std=std)
        history = helpers.fit(model, train, test, recipe, torch.device("cpu"),
                              progress=False, log=None)
        acc = history[-1]["eval_acc"]
        # One epoch of 10,000 images is 78 steps of batch 128. Chance is 0.10, with a
        # standard error of sqrt(0.1 * 0.9 / 2000) = 0.0067 on 2000 test images.
        assert acc > 0.25, f"test accuracy {acc:.3f} after one epoch (chance 0.10)"
    finally:
        torch.set_num_threads(threads)
