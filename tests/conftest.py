"""Shared fixtures and helpers: tiny synthetic CIFAR-like data in every layout that
``load_cifar10`` accepts, and ways to drive the command line as a user would."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations: no network check
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pickle  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import helpers  # noqa: E402

CLASSES = helpers.CIFAR10_CLASSES
TINY = (8, 16, 16, 16)  # widths of a net that trains in a fraction of a second
# A tiny run: 30 training images in batches of 8 (3 steps an epoch), one thread.
TINY_RUN = ("--widths", *map(str, TINY), "--batch-size", "8", "--no-progress", "--threads", "1")
TIMING = {"seconds", "train_seconds", "images_per_s"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: trains in subprocesses or runs the notebook "
                            "(-m 'not slow' leaves these out)")
    config.addinivalue_line("markers", "realdata: needs the real CIFAR-10 images")
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- synthetic data
def make_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (N, 32, 32, 3) grouped by class: labels 0,0,0,1,1,1,..."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), per_class).astype(np.int64)
    x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
    return x, y


def _write_batch(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Pickle one batch exactly like the official files (CHW-flattened rows)."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy()
    d = {b"batch_label": b"synthetic", b"labels": [int(v) for v in y], b"data": data,
         b"filenames": [f"{i}.png".encode() for i in range(len(y))]}
    with open(path, "wb") as f:
        pickle.dump(d, f)


def write_batches(folder: Path, x_tr, y_tr, x_te, y_te) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(x_tr)), 5), start=1):
        _write_batch(folder / f"data_batch_{i}", x_tr[idx], y_tr[idx])
    _write_batch(folder / "test_batch", x_te, y_te)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000,
            b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return folder


def write_image_folder(root: Path, x_tr, y_tr, x_te, y_te, ext: str = ".png") -> Path:
    """Write train/<class>/NNNN<ext> and test/<class>/NNNN<ext> (sorted names keep order)."""
    from PIL import Image
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(x, y)):
            kw = dict(quality=95) if ext in (".jpg", ".jpeg") else {}
            Image.fromarray(img).save(root / split / CLASSES[lab] / f"{i:04d}{ext}", **kw)
    return root


@pytest.fixture(scope="session")
def arrays():
    """(x_train, y_train, x_test, y_test): 3 train and 2 test images per class."""
    x_tr, y_tr = make_arrays(3, seed=1)
    x_te, y_te = make_arrays(2, seed=2)
    # a known marker pixel: train image 0, row 5, column 7, channel 2 (blue)
    x_tr[0, 5, 7, :] = (0, 0, 0)
    x_tr[0, 5, 7, 2] = 255
    return x_tr, y_tr, x_te, y_te


@pytest.fixture
def batches_root(tmp_path, arrays):
    """A root folder holding an official-style ``cifar-10-batches-py`` folder."""
    write_batches(tmp_path / "cifar-10-batches-py", *arrays)
    return tmp_path


@pytest.fixture
def png_root(tmp_path, arrays):
    return write_image_folder(tmp_path / "png", *arrays, ext=".png")


@pytest.fixture
def jpeg_root(tmp_path, arrays):
    return write_image_folder(tmp_path / "jpeg", *arrays, ext=".jpg")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A batches folder of 30 training and 20 test images, for command-line runs."""
    root = tmp_path_factory.mktemp("data")
    write_batches(root / "cifar-10-batches-py", *make_arrays(3, 1), *make_arrays(2, 2))
    return root


@pytest.fixture
def cpu():
    return torch.device("cpu")


# --------------------------------------------------------------------------- the command line
def env(**extra: str) -> dict:
    """The environment of a subprocess that imports the checkout's helpers.py."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                NO_ALBUMENTATIONS_UPDATE="1", MPLBACKEND="Agg", **extra)


def helpers_cmd(*argv: str) -> list[str]:
    """``python helpers.py ARGV`` as a subprocess command."""
    return [sys.executable, str(REPO / "helpers.py"), *map(str, argv)]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of a tiny ``train`` run from ``data`` into ``out`` (3 epochs)."""
    return ["train", "--data-dir", str(data), "--out", str(out), "--epochs", "3", *TINY_RUN,
            *extra]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``helpers.main(argv)`` in this process: (exit status, stdout, stderr)."""
    try:
        code = helpers.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """``err`` as the single line it must be, with no traceback."""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


def rows(out: Path) -> list[dict]:
    """A run folder's log rows without the timing fields."""
    import json
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "log.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (names and bytes), to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def tiny_loaders(x, y, test=None, batch_size: int = 8, seed: int = 0):
    """The loaders ``fit`` takes, built as the command line builds them (no workers)."""
    mean, _ = helpers.compute_mean_std(x)
    augment = helpers.EpochAugment(helpers.exercise_augmentations(mean, seed=seed), seed)
    tx, ty = test if test is not None else (x, y)
    return helpers.make_loaders(helpers.CifarDataset(x, y, augment),
                                helpers.CifarDataset(tx, ty), batch_size, "cpu", seed, 0)
