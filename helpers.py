"""Helpers for the EVA8 session-6 exercise: a compact CIFAR-10 CNN under the exercise's rules.

Everything the notebook does and the tests check lives here: seeding and device choice, data
loading (torchvision download, the official batches folder, or an image-folder tree), statistics,
the albumentations pipelines, the model, the receptive-field table and rule checklist, training
with OneCycle, reports and plots, a speed benchmark, and a command-line entry point
(``python helpers.py train`` or ``bench``).

Importing this module does nothing but define names: no download, no seeding, no plotting.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import pickle
import random
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "RECIPES", "Recipe", "build_model",
    "get_device", "set_seed", "CifarData", "load_cifar10", "subset", "split_train_val",
    "compute_mean_std", "exercise_augmentations", "AUGMENTATION_MAPPING", "EpochAugment",
    "EpochSampler", "CifarDataset", "TensorBatches", "to_input", "make_loaders",
    "ACTIVATIONS", "InputNorm", "ConvBNAct", "DepthwiseSeparable", "Residual", "Net",
    "count_parameters", "count_macs",
    "receptive_field_table", "empirical_receptive_field", "check_rules",
    "check_recipe", "make_optimizer", "make_scheduler", "train_one_epoch",
    "fold_batchnorm", "predict_logits", "evaluate", "fit", "CheckpointError", "save_checkpoint",
    "load_checkpoint", "UsageError", "run_training",
    "predict", "misclassified_indices", "confusion_matrix", "classification_report_df",
    "per_class_accuracy", "grad_cam",
    "plot_image_grid", "plot_augmentations", "plot_augmentation_rows", "plot_history",
    "plot_misclassified", "plot_confusion_matrix", "plot_gradcam", "plot_receptive_field",
    "figures_folder", "save_figure", "EPOCH_IMAGES", "EVAL_IMAGES", "bench", "bench_table",
    "main",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# The commonly quoted statistics of the official training split (0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- device and seeds
def get_device(verbose: bool = True) -> torch.device:
    """Pick CUDA, then Apple MPS, then CPU, and say which (CPU comes with a plain warning)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        msg = f"Using GPU: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = torch.device("mps")
        msg = "Using Apple GPU (MPS)"
    else:
        device = torch.device("cpu")
        msg = ("No GPU found: training on the CPU will be slow (about a minute or more per "
               "epoch). In Colab choose Runtime > Change runtime type > GPU.")
    if verbose:
        print(msg)
    return device


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (optionally make cuDNN deterministic)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- data
@dataclass
class CifarData:
    """CIFAR-10 as uint8 arrays (N, 32, 32, 3), integer labels and class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str = ""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays only: no other code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"holds a {module}.{name} object, not plain arrays")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    """Read one CIFAR-10 batch file (arrays and lists only), naming the file on any error."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except EOFError:
        raise ValueError(f"Cannot read {path}: the file is empty or truncated") from None
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, MemoryError) as e:
        raise ValueError(f"Cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"Cannot read {path}: it holds a {type(d).__name__}, not a batch dict")
    return d


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels of one batch file, checked against each other."""
    d = _read_pickle(path)
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64).reshape(-1)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 batch (data and labels): {e}") from None
    if len(x) != len(y):
        raise ValueError(f"{path} holds {len(x)} images but {len(y)} labels")
    return x, y


def _load_batches(folder: Path) -> CifarData:
    """Read the official ``cifar-10-batches-py`` folder."""
    def read(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_batch(folder / name) for name in names]
        x = np.concatenate([p[0] for p in parts]).transpose(0, 2, 3, 1).copy()
        return x, np.concatenate([p[1] for p in parts])

    x_tr, y_tr = read([f"data_batch_{i}" for i in range(1, 6)])
    x_te, y_te = read(["test_batch"])
    meta = folder / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta.exists():
        try:
            classes = tuple(n.decode() for n in _read_pickle(meta)[b"label_names"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{meta} has no list of label names: {e}") from None
    for name, y in (("training", y_tr), ("test", y_te)):
        if len(y) and not 0 <= y.min() <= y.max() < len(classes):
            raise ValueError(f"{folder}: {name} labels run from {y.min()} to {y.max()}, "
                             f"but there are {len(classes)} classes")
    return CifarData(x_tr, y_tr, x_te, y_te, classes, f"batches folder {folder.name}")


def _read_image(path: Path) -> np.ndarray:
    """Decode one 32x32 RGB image, naming the file if it is corrupt or wrongly sized."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"Cannot read image {path}: {e}") from e
    if arr.shape != (32, 32, 3):
        raise ValueError(f"Image {path} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` whose names do not start with "." (.ipynb_checkpoints, ._x.jpg)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(split_dir: Path) -> list[str]:
    return [p.name for p in _visible(split_dir) if p.is_dir()]


def _load_split_folder(split_dir: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for idx, name in enumerate(classes):
        files = [p for p in _visible(split_dir / name)
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        images += [_read_image(p) for p in files]
        labels += [idx] * len(files)
    if not images:
        raise ValueError(f"No PNG or JPEG images found under {split_dir}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _load_image_folder(root: Path) -> CifarData:
    """Read an image-folder tree ``train/<class>/*`` and ``test/<class>/*``."""
    classes, test_classes = _class_folders(root / "train"), _class_folders(root / "test")
    if test_classes != classes:
        only_tr = sorted(set(classes) - set(test_classes)) or "none"
        only_te = sorted(set(test_classes) - set(classes)) or "none"
        raise ValueError(f"{root}/train and {root}/test hold different class folders: "
                         f"only in train: {only_tr}; only in test: {only_te}")
    x_tr, y_tr = _load_split_folder(root / "train", classes)
    x_te, y_te = _load_split_folder(root / "test", classes)
    return CifarData(x_tr, y_tr, x_te, y_te, tuple(classes), f"image folder {root.name}")


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """Return which supported layout ``root`` holds, or None."""
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return "batches", cand
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder", root
    return None


def _timed_out(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def _download(root: Path, timeout: float = 60.0) -> None:
    """Download CIFAR-10 with torchvision into ``root``; a silent server fails after timeout s."""
    from torchvision.datasets import CIFAR10
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen calls take no timeout of their own
    try:
        CIFAR10(str(root), train=True, download=True)
        CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        why = f"the server sent nothing for {timeout:g} s" if _timed_out(e) else str(e)
        raise RuntimeError(f"Downloading CIFAR-10 into {root} failed: {why}. "
                           + _HOW_TO_GET_DATA) from e
    finally:
        socket.setdefaulttimeout(old)


_HOW_TO_GET_DATA = (
    "Accepted layouts: (a) torchvision's download (pass download=True), (b) an official "
    "'cifar-10-batches-py' folder (data_batch_1..5, test_batch) inside the folder or as the "
    "folder itself, (c) an image-folder tree train/<class>/*.png|jpg and test/<class>/*. "
    "Get the data from https://www.cs.toronto.edu/~kriz/cifar.html or unpack "
    "cifar10-jpeg.tar.gz into the folder.")


def load_cifar10(data_dir: str | os.PathLike, download: bool = False,
                 timeout: float = 60.0) -> CifarData:
    """Load CIFAR-10 from ``data_dir`` in any supported layout, downloading only if asked.

    Names starting with "." are skipped; ``timeout`` (seconds) bounds each network wait.
    """
    root = Path(data_dir).expanduser()
    found = _find_layout(root) if root.is_dir() else None
    if found is None and download:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"Cannot create {root} to download CIFAR-10 into: {e}") from None
        _download(root, timeout)
        found = _find_layout(root)
    if found is None:
        raise FileNotFoundError(f"No CIFAR-10 data found in {root.resolve()}. " + _HOW_TO_GET_DATA)
    kind, path = found
    return _load_batches(path) if kind == "batches" else _load_image_folder(path)


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of ``n`` >= 1 examples (all of them when n is None or too large)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"subset size must be an integer >= 1 or None, not {n!r}")
    if n is None or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carve a validation split from the training set (never use the test set to choose)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction!r}")
    idx = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    if not 0 < n_val < len(x):
        raise ValueError(f"val_fraction {val_fraction:g} of {len(x)} images leaves an empty "
                         f"{'validation' if n_val == 0 else 'training'} split")
    val, tr = idx[:n_val], idx[n_val:]
    return x[tr], y[tr], x[val], y[val]


def compute_mean_std(images: np.ndarray, chunk: int = 10_000
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale of uint8 images (N, H, W, C)."""
    c = images.shape[-1]
    s, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        block = images[i:i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += block.sum(0)
        s2 += (block ** 2).sum(0)
        n += len(block)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------- augmentation
# How the exercise's wording (albumentations 1.x names) maps onto the 2.x API used here.
# Version history: 1.4.5 added CoarseDropout's *_range arguments, 1.4.21 Compose(seed=...),
# 1.4.22 CoarseDropout's fill/fill_mask; each kept the old names as deprecated until 2.0.0
# removed them. Since 2.0 an old name is ignored with only a warning ("not valid for transform").
AUGMENTATION_MAPPING = [
    ("HorizontalFlip(p)", "HorizontalFlip(p)", "unchanged"),
    ("ShiftScaleRotate(shift_limit=0.0625, scale_limit=0.1, rotate_limit=15)",
     "Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), "
     "keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101)",
     "1.x ShiftScaleRotate draws one scale factor for both axes; Affine draws one per axis "
     "unless keep_ratio=True. Since 2.0 ShiftScaleRotate is a special case of Affine (with "
     "keep_ratio=False) that warns to use Affine. ShiftScaleRotate's default border was "
     "reflect-101; Affine's (and since 2.0 ShiftScaleRotate's) is constant (black), so the "
     "border is set explicitly"),
    ("CoarseDropout(max_holes=1, max_height=16, max_width=16, min_holes=1, "
     "min_height=16, min_width=16, fill_value=mean, mask_fill_value=None)",
     "CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), "
     "hole_width_range=(16, 16), fill=mean * 255, fill_mask=None)",
     "renamed: the *_range arguments came in 1.4.5, fill and fill_mask in 1.4.22, and 2.0 "
     "removed the old names: they are ignored with only a warning and the defaults apply "
     "(1-2 holes of 10-20% of the side, filled black). The fill is in pixel units because "
     "the hole is cut before normalisation"),
]


def exercise_augmentations(mean: Sequence[float], p_flip: float = 0.5, p_affine: float = 0.5,
                           p_dropout: float = 0.5, seed: int | None = None) -> Any:
    """The exercise's three augmentations on uint8 images (no normalisation)."""
    import albumentations as A
    import cv2
    fill = tuple(float(m) * 255.0 for m in mean)  # the dataset mean in pixel units
    return A.Compose([
        A.HorizontalFlip(p=p_flip),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101, p=p_affine),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16),
                        hole_width_range=(16, 16), fill=fill, fill_mask=None, p=p_dropout),
    ], seed=seed)


def _derive_seed(*values: int) -> int:
    """A 32-bit seed that is a pure function of ``values`` (e.g. a base seed and an epoch)."""
    return int(np.random.SeedSequence([int(v) % 2 ** 64 for v in values]).generate_state(1)[0])


class EpochAugment:
    """``augment`` whose random stream restarts at every epoch from (seed, epoch).

    The epoch number sits in shared memory, so persistent loader workers (which hold copies of
    this object) see each ``set_epoch`` made in the main process before the epoch starts; each
    worker gets its own seed through ``set_random_seed``. A run resumed at any epoch therefore
    draws the same augmentations as one never interrupted.
    """

    def __init__(self, augment: Any, seed: int | None = None) -> None:
        self.augment, self.seed = augment, seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._applied = -1

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` (0-based) from now on."""
        self._epoch[0] = epoch

    def set_random_seed(self, seed: int) -> None:
        """Base seed of the per-epoch streams (a loader worker calls this once it starts)."""
        self.seed, self._applied = seed, -1
        self.augment.set_random_seed(seed)

    def __call__(self, **data: Any) -> dict:
        epoch = int(self._epoch[0])
        if epoch != self._applied:
            if self.seed is not None:
                self.augment.set_random_seed(_derive_seed(self.seed, epoch))
            self._applied = epoch
        return self.augment(**data)


class EpochSampler(Sampler):
    """A random order of ``n`` indices that is a pure function of (seed, epoch).

    Each pass uses the epoch given to ``set_epoch`` (then counts on by one), so a run resumed
    at epoch k sees the same orders from k on as one that never stopped.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (0-based) for the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch))
        yield from torch.randperm(self.n, generator=g).tolist()


class CifarDataset(Dataset):
    """uint8 images (N, 32, 32, 3) and labels; items are uint8 HWC tensors after ``transform``.

    The loader workers only run the albumentations pipeline; conversion to float,
    normalisation and the channels-last layout happen on the device (``to_input`` and the
    model's ``InputNorm``), in whole batches.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[i])


class TensorBatches:
    """Fixed images held as one uint8 tensor (on the device where given), served in batches."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 batch_size: int = 1000, device: torch.device | str = "cpu") -> None:
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """A uint8 NHWC batch to a float NCHW batch on ``device`` (channels-last memory if asked)."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x if channels_last else x.contiguous()


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from torch's seed."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def _default_workers(device: torch.device) -> int:
    """Loader workers when none are given: up to 8 on CUDA, none on the CPU.

    On the CPU the training threads already use every core: a worker process only competes
    with them (end-to-end 77-85% of the model alone on 2 cores, against 86-95% with the
    augmentation done in the main process between steps).
    """
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def make_loaders(train_ds: CifarDataset, test_ds: CifarDataset, batch_size: int = 128,
                 device: torch.device | str = "cpu", num_workers: int | None = None,
                 seed: int | None = None) -> tuple[DataLoader, TensorBatches]:
    """Training loader (shuffled, drops the last partial batch) and the test set as a tensor.

    The order of each epoch and the workers' seeds derive from ``seed`` alone (None: a seed
    drawn from torch's generator), never from the state of the global generators.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = _default_workers(device)
    if seed is None:
        seed = int(torch.randint(2 ** 31, ()).item())
    train = DataLoader(train_ds, batch_size=batch_size, sampler=EpochSampler(len(train_ds), seed),
                       drop_last=len(train_ds) > batch_size, num_workers=num_workers,
                       pin_memory=cuda, persistent_workers=num_workers > 0,
                       worker_init_fn=_seed_worker,
                       generator=torch.Generator().manual_seed(_derive_seed(seed, -1)),
                       prefetch_factor=4 if num_workers > 0 else None)
    # Large test batches feed a GPU; on a CPU 128 images keep the activations in cache
    # (on a 2-core CPU batches of 256 scored about 1.4x slower, of 1000 about 2x).
    test = TensorBatches(test_ds.images, test_ds.labels,
                         128 if device.type == "cpu" else 1000, device)
    return train, test


# --------------------------------------------------------------------------- model
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class InputNorm(nn.Module):
    """Raw pixel values (0..255, uint8 or float) to ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s))
        self.register_buffer("shift", -m / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


class ConvBNAct(nn.Sequential):
    """kxk convolution, BatchNorm, activation; padding keeps the size at stride 1."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1,
                 act: str = "relu") -> None:
        pad = dilation * (k - 1) // 2
        super().__init__(nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False),
                         nn.BatchNorm2d(cout), ACTIVATIONS[act]())


class DepthwiseSeparable(nn.Sequential):
    """Depthwise kxk conv (one filter per channel), pointwise 1x1 conv, BatchNorm, activation.

    Nothing sits between the two convs (the factorised conv of Xception): together they are
    one kxk conv with far fewer parameters and multiply-adds.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1,
                 act: str = "relu") -> None:
        super().__init__(nn.Conv2d(cin, cin, k, stride, (k - 1) // 2, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         ACTIVATIONS[act]())


class Residual(nn.Module):
    """``x + body(x)``: an identity skip around a same-size block."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Net(nn.Module):
    """C1 C2 C3 C4, then global average pooling and a linear layer; no MaxPool.

    C1 (32x32): a 3x3 conv from RGB, then ``depths[0]`` residual blocks of two 3x3 convs.
    C2 (16x16): a 3x3 stride-2 conv, then ``depths[1]`` residual blocks of two 3x3 convs;
    the first conv of the first block is dilated (d=2).
    C3 (8x8) and C4 (4x4): a depthwise separable 3x3 stride-2 conv, then ``depths[2]`` and
    ``depths[3]`` residual blocks of two depthwise separable 3x3 convs.
    The input is raw pixels (0..255); ``InputNorm`` normalises them with ``mean`` and ``std``.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 96, 128),
                 depths: Sequence[int] = (1, 1, 1, 1), num_classes: int = 10,
                 act: str = "gelu",
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
                 ) -> None:
        super().__init__()
        (c1, c2, c3, c4), (d1, d2, d3, d4) = widths, depths
        if d2 < 1:
            raise ValueError("C2 needs at least one block: it holds the dilated conv")

        def conv_block(c: int, dilation: int = 1) -> nn.Module:
            return Residual(ConvBNAct(c, c, dilation=dilation, act=act), ConvBNAct(c, c, act=act))

        def dws_block(c: int) -> nn.Module:
            return Residual(DepthwiseSeparable(c, c, act=act), DepthwiseSeparable(c, c, act=act))

        self.norm = InputNorm(mean, std)
        self.c1 = nn.Sequential(ConvBNAct(3, c1, act=act), *[conv_block(c1) for _ in range(d1)])
        self.c2 = nn.Sequential(ConvBNAct(c1, c2, stride=2, act=act), conv_block(c2, 2),
                                *[conv_block(c2) for _ in range(d2 - 1)])
        self.c3 = nn.Sequential(DepthwiseSeparable(c2, c3, 3, 2, act),
                                *[dws_block(c3) for _ in range(d3)])
        self.c4 = nn.Sequential(DepthwiseSeparable(c3, c4, 3, 2, act),
                                *[dws_block(c4) for _ in range(d4)])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(c4, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before global average pooling."""
        return self.c4(self.c3(self.c2(self.c1(self.norm(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gap(self.features(x)))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen ones included)."""
    return sum(p.numel() for p in model.parameters())


def _trace_layers(model: nn.Module, input_size: int = 32) -> list[dict]:
    """Run one forward pass and record each conv, pool and linear layer in execution order."""
    records: list[dict] = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear)

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        records.append(dict(module=mod, name=names[mod], in_shape=tuple(inp[0].shape),
                            out_shape=tuple(out.shape)))

    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size,
                              device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def _pair(v: Any) -> int:
    return v[0] if isinstance(v, tuple) else v


def count_macs(model: nn.Module, input_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass per image (convolutions and linear layers)."""
    total = 0
    for r in _trace_layers(model, input_size):
        m = r["module"]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            out_elems = int(np.prod(r["out_shape"][1:]))
            total += out_elems * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def _layer_label(model: nn.Module, name: str) -> str:
    """A readable name for the layer at ``name`` in a ``Net`` ("residual 1, conv 2").

    Stems, downsamplers, residual blocks and the two halves of a depthwise separable conv
    are named by what they are; layers of other models keep their module path.
    """
    parts = name.split(".")
    if len(parts) < 2 or parts[0] not in ("c1", "c2", "c3", "c4"):
        return name
    words: list[str] = []
    parent, prev = getattr(model, parts[0]), ""
    for key in parts[1:]:
        child = parent._modules[key]
        if isinstance(child, Residual):
            siblings = [m for m in parent.children() if isinstance(m, Residual)]
            words.append(f"residual {siblings.index(child) + 1}")
        elif isinstance(child, (ConvBNAct, DepthwiseSeparable)):
            sep = isinstance(child, DepthwiseSeparable)
            if prev == "body":  # one of the two convs of a residual block
                words.append(f"{'separable' if sep else 'conv'} {int(key) + 1}")
            elif _pair(child[0].stride) > 1:
                words.append("downsample")
            else:
                words.append("stem" if parts[0] == "c1" and key == "0"
                             else "separable" if sep else "conv")
        elif isinstance(child, nn.Conv2d) and isinstance(parent, DepthwiseSeparable):
            words.append("depthwise" if child.groups > 1 else "pointwise")
        parent, prev = child, key
    return ", ".join(words) or name


def _block_of(name: str) -> str:
    head = name.split(".")[0]
    return head.upper() if head in ("c1", "c2", "c3", "c4") else "-"


def receptive_field_table(model: nn.Module, input_size: int = 32) -> Any:
    """RF table from the model's real conv/pool layers in the order they run.

    For each layer with kernel k, dilation d, stride s and padding p (effective kernel
    k_eff = d(k-1)+1): n_out = floor((n_in + 2p - k_eff)/s) + 1, rf_out = rf_in + (k_eff-1)*j_in,
    j_out = j_in*s. With identity skips only, the longest path is the chain of convs.
    Columns: block (C1..C4), layer (a readable name), kind, kernel, stride, dilation, padding,
    n_in/n_out (feature-map size), jump_in/jump_out, rf_in/rf_out, module (the module path).
    """
    import pandas as pd
    rows, n, j, r = [], input_size, 1, 1
    for rec in _trace_layers(model, input_size):
        m = rec["module"]
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1))
        k_eff = d * (k - 1) + 1
        n_in, j_in, r_in = n, j, r
        n = (n + 2 * p - k_eff) // s + 1
        r, j = r + (k_eff - 1) * j_in, j_in * s
        groups = getattr(m, "groups", 1)
        kind = ("depthwise" if groups > 1 else "pointwise" if k == 1 else "conv") \
            if isinstance(m, nn.Conv2d) else type(m).__name__
        rows.append(dict(block=_block_of(rec["name"]), layer=_layer_label(model, rec["name"]),
                         kind=kind, kernel=k, stride=s, dilation=d, padding=p, n_in=n_in,
                         n_out=n, jump_in=j_in, jump_out=j, rf_in=r_in, rf_out=r,
                         module=rec["name"]))
        assert n == rec["out_shape"][-1], f"size mismatch at {rec['name']}"
    return pd.DataFrame(rows)


def empirical_receptive_field(model: nn.Module, input_size: int = 128) -> int:
    """RF measured as the extent of input pixels with non-zero gradient for one centre unit."""
    model = copy.deepcopy(model).double().eval()
    feats = getattr(model, "features", model)
    x = torch.randn(1, 3, input_size, input_size, dtype=torch.float64, requires_grad=True)
    out = feats(x)
    h, w = out.shape[-2:]
    out[0, :, h // 2, w // 2].sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1)).flatten()
    return int(rows.max() - rows.min() + 1)


def _downsamplers(model: nn.Module, records: list[dict]) -> list[tuple[str, str, bool]]:
    """Each layer that shrinks the feature map: (where, what, whether the rules allow it)."""
    found = []
    for rec in records:
        m, n_in, n_out = rec["module"], rec["in_shape"][-1], rec["out_shape"][-1]
        if len(rec["out_shape"]) != 4 or not 1 < n_out < n_in:
            continue
        k, s = _pair(getattr(m, "kernel_size", 0)), _pair(getattr(m, "stride", 1))
        d = _pair(getattr(m, "dilation", 1))
        block, label = _block_of(rec["name"]), _layer_label(model, rec["name"])
        where = f"{block} {label}" if block != "-" else label
        kind = ("depthwise conv" if m.groups > 1 else "conv") if isinstance(m, nn.Conv2d) \
            else type(m).__name__
        what = (f"{kind} {k}x{k}, stride {s}, dilation {d}: "
                f"{n_in}x{n_in} -> {n_out}x{n_out} ({rec['name']})")
        found.append((where, what, isinstance(m, nn.Conv2d) and ((k == 3 and s == 2) or d > 1)))
    return found


def check_rules(model: nn.Module, input_size: int = 32) -> Any:
    """The exercise's rules, each with the measured value and pass or fail, as a DataFrame.

    Every layer that shrinks the feature map gets its own row ("downsampling: C2
    downsample"), after a row that counts them ("downsampling layers": exactly three).
    """
    import pandas as pd
    recs = _trace_layers(model, input_size)
    convs = [r["module"] for r in recs if isinstance(r["module"], nn.Conv2d)]
    dw_sep = sum(1 for a, b in zip(convs, convs[1:])
                 if a.groups > 1 and a.groups == a.in_channels and b.kernel_size == (1, 1)
                 and b.groups == 1 and b.in_channels == a.out_channels)
    dilated = sum(1 for c in convs if max(c.dilation) > 1)
    gap = [r for r in recs if isinstance(r["module"], nn.AdaptiveAvgPool2d)
           and r["out_shape"][-2:] == (1, 1)]
    blocks = [n for n in ("c1", "c2", "c3", "c4") if hasattr(model, n)]
    rf = int(receptive_field_table(model, input_size)["rf_out"].iloc[-1])
    downs = _downsamplers(model, recs)
    n_params = count_parameters(model)
    n_maxpool = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
    rules = [
        ("C1 C2 C3 C4 then output", "blocks c1..c4", ", ".join(blocks), len(blocks) == 4),
        ("parameters", "< 200,000", f"{n_params:,}", n_params < 200_000),
        ("no MaxPooling", "0 MaxPool layers", str(n_maxpool), n_maxpool == 0),
        ("depthwise separable conv", ">= 1", str(dw_sep), dw_sep >= 1),
        ("dilated conv", ">= 1", str(dilated), dilated >= 1),
        ("global average pooling", "present", str(len(gap)), len(gap) >= 1),
        ("receptive field", "> 44", str(rf), rf > 44),
        ("downsampling layers", "3, each a 3x3 conv of stride 2 (or dilated)", str(len(downs)),
         len(downs) == 3 and all(ok for *_, ok in downs)),
    ]
    rules += [(f"downsampling: {where}", "3x3 conv, stride 2 (or dilated)", what, ok)
              for where, what, ok in downs]
    df = pd.DataFrame(rules, columns=["rule", "required", "measured", "passed"])
    df["passed"] = df["passed"].astype(bool)
    return df


# --------------------------------------------------------------------------- training
@dataclass
class Recipe:
    """Hyper-parameters of one training recipe (units in the comments)."""

    epochs: int = 15                 # passes over the training set
    batch_size: int = 128            # images per step
    lr: float = 0.2                  # OneCycle peak learning rate (SGD, Nesterov momentum 0.9)
    weight_decay: float = 5e-4       # L2 on conv/linear weights
    label_smoothing: float = 0.1     # 0 disables
    pct_start: float = 0.25          # fraction of steps spent warming up
    widths: tuple[int, ...] = (32, 64, 96, 128)   # channels of C1..C4
    depths: tuple[int, ...] = (1, 1, 1, 1)        # residual blocks in C1..C4
    act: str = "gelu"                # activation: "relu" or "gelu"
    p_flip: float = 0.5              # probability of HorizontalFlip
    p_affine: float = 0.25           # probability of the shift-scale-rotate Affine
    p_dropout: float = 0.25          # probability of the 16x16 CoarseDropout hole


def build_model(recipe: Recipe, num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                std: Sequence[float] = CIFAR10_STD) -> Net:
    """The recipe's ``Net`` (widths, depths, activation)."""
    return Net(recipe.widths, recipe.depths, num_classes, recipe.act, mean, std)


# "standard": the notebook's default; "accurate": the same net trained 50 epochs; "fast": 10
# epochs of a net with no block at 32x32 (about half the multiply-adds); "small": under 50,000
# parameters (two blocks at 32x32), trained longer. Results: README.md.
RECIPES: dict[str, Recipe] = {
    "standard": Recipe(),
    "accurate": Recipe(epochs=50),
    "fast": Recipe(epochs=10, widths=(24, 64, 96, 160), depths=(0, 1, 1, 1)),
    "small": Recipe(epochs=60, batch_size=256, widths=(16, 28, 48, 64), depths=(2, 1, 1, 1)),
}


_PROBABILITY = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
# What each option accepts: (test, words). The CLI checks its options with these before any
# data is read; check_recipe checks a Recipe's fields with the same ones.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: 0 < v < math.inf, "a number > 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "pct_start": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "widths": (lambda v: v >= 1, "integers >= 1"),
    "depths": (lambda v: v >= 0, "integers >= 0, D2 >= 1"),
    "p_flip": _PROBABILITY, "p_affine": _PROBABILITY, "p_dropout": _PROBABILITY,
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 4294967295]"),
    "train_subset": (lambda v: v >= 1, "an integer >= 1"),
    "test_subset": (lambda v: v >= 1, "an integer >= 1"),
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "threads": (lambda v: 1 <= v <= 1024, "an integer in [1, 1024]"),
    "workers": (lambda v: 0 <= v <= 64, "an integer in [0, 64]"),
    "download_timeout": (lambda v: 0 < v <= 86400, "a number of seconds in (0, 86400]"),
    "seconds": (lambda v: 0 < v <= 3600, "a number of seconds in (0, 3600]"),
}


def _recipe_problem(recipe: Recipe) -> tuple[str, str] | None:
    """The first field of ``recipe`` outside its range, as (field, what is wrong), or None."""
    for f in fields(Recipe):
        value, default = getattr(recipe, f.name), f.default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                return f.name, f"must be True or False, not {value!r}"
            continue
        if isinstance(default, str):
            allowed = sorted(ACTIVATIONS)
            if value not in allowed:
                return f.name, f"must be one of {', '.join(allowed)}, not {value!r}"
            continue
        kind = int if isinstance(default, (int, tuple)) else (int, float)
        items = value if isinstance(default, tuple) else (value,)
        ok, words = _RANGES[f.name]
        if isinstance(default, tuple) and (not isinstance(value, (tuple, list))
                                           or len(value) != 4):
            return f.name, f"must be four {words}, not {value!r}"
        if not all(isinstance(v, kind) and not isinstance(v, bool) and ok(v) for v in items):
            return f.name, f"must be {'four ' if isinstance(default, tuple) else ''}{words}, " \
                f"not {value!r}"
    if recipe.depths[1] < 1:
        return "depths", f"D2 must be >= 1 (C2 holds the dilated conv), not {recipe.depths[1]}"
    return None


def check_recipe(recipe: Recipe) -> None:
    """Raise ValueError naming the first field of ``recipe`` outside its accepted range."""
    problem = _recipe_problem(recipe)
    if problem is not None:
        raise ValueError(f"Recipe.{problem[0]} {problem[1]}")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only, not on BatchNorm or biases; frozen left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9, weight decay kept off BatchNorm and biases."""
    return torch.optim.SGD(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                           momentum=0.9, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
                   ) -> Any:
    """OneCycle over all steps, stepped per batch (None, a constant lr, for under 4 steps)."""
    total = recipe.epochs * steps_per_epoch
    if total < 4:
        return None
    # OneCycle needs at least two warm-up steps; tiny smoke runs stretch the warm-up.
    pct_start = min(max(recipe.pct_start, 2.0 / total), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=total, pct_start=pct_start,
        div_factor=10.0, final_div_factor=100.0)


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0)


def _autocast(device: torch.device) -> Any:
    """float16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: Any, criterion: nn.Module, device: torch.device,
                    scaler: Any = None, channels_last: bool = True, progress: bool = True,
                    desc: str = "train") -> tuple[float, float]:
    """One pass over ``loader``, stepping the scheduler per batch: (mean loss, accuracy)."""
    model.train()
    use_amp = scaler is not None and scaler.is_enabled()
    # Sums stay on the device: reading a GPU number each step would stall the pipeline.
    total_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64,
                             device=device)
    correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
    for step, (x, y) in enumerate(_progress(loader, desc, progress)):
        x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
            loss = criterion(logits, y)
        if (device.type != "cuda" or step % 50 == 0) and not torch.isfinite(loss):
            raise FloatingPointError(f"Loss became {loss.item()} at batch {step}: lower the "
                                     "learning rate or check the data normalisation.")
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    if not torch.isfinite(total_loss):
        raise FloatingPointError("Loss became nan or inf during the epoch: lower the "
                                 "learning rate or check the data normalisation.")
    return total_loss.item() / seen, correct.item() / seen


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An evaluation copy of ``model`` with each BatchNorm folded into the conv just before it.

    In eval mode BatchNorm is a fixed per-channel scale and shift, so the conv can absorb it:
    the copy computes the same function (to rounding) without the BatchNorm layers.
    """
    folded = copy.deepcopy(model).eval()
    for seq in list(folded.modules()):
        if isinstance(seq, nn.Sequential):
            names = list(seq._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = seq._modules[a], seq._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return folded


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, device: torch.device,
                   channels_last: bool = True, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and labels over uint8 NHWC batches (tta: average with the mirror image).

    ``model`` is put in eval mode and scored through ``fold_batchnorm``'s copy (faster).
    """
    model.eval()
    model = fold_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    logits, labels = [], []
    for x, y in batches:
        x = to_input(x, device, channels_last)
        with _autocast(device):
            out = model(x).float()
            if tta:
                out = (out + model(torch.flip(x, dims=[3])).float()) / 2
        logits.append(out)
        labels.append(y.to(device))
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             criterion: nn.Module | None = None, channels_last: bool = True,
             tta: bool = False) -> tuple[float, float]:
    """Mean loss and accuracy over ``batches`` (tta averages the logits of x and its mirror)."""
    logits, labels = predict_logits(model, batches, device, channels_last, tta)
    loss = (criterion or nn.CrossEntropyLoss())(logits, labels)
    return loss.item(), (logits.argmax(1) == labels).float().mean().item()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is refused, or does not fit what it is loaded into."""


def _first_non_finite(*modules: nn.Module | None) -> str | None:
    """The name of the first weight or buffer holding nan or inf, or None if all are finite."""
    tensors = {n: t for m in modules if m is not None for n, t in m.state_dict().items()
               if t.dtype.is_floating_point}
    if not tensors or torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all():
        return None
    return next(n for n, t in tensors.items() if not torch.isfinite(t).all())


def _rng_state() -> dict:
    """Python, NumPy and torch (CPU, CUDA) generator states as tensors and plain values."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return dict(python=random.getstate(), torch=torch.get_rng_state(), cuda=cuda,
                numpy=dict(key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)))


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _data_seeds(loader: Any) -> dict:
    """What the loader's order and its workers' augmentation streams derive from."""
    gen = getattr(loader, "generator", None)
    return dict(loader=gen.initial_seed() if gen is not None else None,
                sampler=getattr(getattr(loader, "sampler", None), "seed", None),
                augment=getattr(getattr(getattr(loader, "dataset", None), "transform", None),
                                "seed", None))


def _set_data_seeds(loader: Any, seeds: dict) -> None:
    if seeds["loader"] is not None and getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seeds["loader"])
    if seeds["sampler"] is not None and isinstance(loader.sampler, EpochSampler):
        loader.sampler.seed = seeds["sampler"]
    transform = getattr(loader.dataset, "transform", None)
    if seeds["augment"] is not None and isinstance(transform, EpochAugment):
        transform.seed, transform._applied = seeds["augment"], -1


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists)."""
    return json.loads(json.dumps(value))


_RESUME_KEYS = ("recipe", "steps_per_epoch", "scheduler", "scaler", "rng", "data_seeds")


def _resume(path: Path, recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: Any, loader: Any) -> list[dict]:
    """Load all a checkpoint holds into the training objects; return its history."""
    state = _read_checkpoint(path)
    missing = [k for k in _RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"Checkpoint {path} cannot be resumed: it lacks {missing} "
                              "(written by an older version); start the run again")
    saved, now = _plain(state["recipe"]), _plain(asdict(recipe))
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff or state["steps_per_epoch"] != len(loader):
        diff = diff or [f"steps per epoch {state['steps_per_epoch']} -> {len(loader)}"]
        raise CheckpointError(f"Checkpoint {path} was made by a different run "
                              f"({'; '.join(diff)}): resume with the same settings")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Checkpoint {path} does not fit this model: {e}") from None
    _set_rng_state(state["rng"])
    _set_data_seeds(loader, state["data_seeds"])
    return list(state["history"])


def _resume_state(recipe: Recipe, loader: Any, scheduler: Any, scaler: Any) -> dict:
    """What a checkpoint holds beside the weights and the optimizer, for ``_resume``."""
    return dict(format=3, recipe=asdict(recipe), steps_per_epoch=len(loader),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict(), rng=_rng_state(), data_seeds=_data_seeds(loader))


def _kept_checkpoint(checkpoint: Any, epoch: int) -> str:
    """What a run stopped during ``epoch`` leaves behind."""
    if checkpoint is None:
        return "nothing was saved"
    return f"{checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"


def _stop_if_not_finite(epoch: int, row: dict, model: nn.Module, checkpoint: Any) -> None:
    """Raise FloatingPointError, before anything is saved, if the epoch diverged."""
    bad = _first_non_finite(model)
    bad = f"{bad} holds nan or inf" if bad else None
    if not math.isfinite(row["eval_loss"]):
        loss = f"the {row['eval_split']} loss is {row['eval_loss']}"
        bad = loss + (f" and {bad}" if bad else "")
    if bad is not None:
        raise FloatingPointError(
            f"Epoch {epoch}: {bad} (training loss {row['train_loss']:.4g}); stopped before "
            f"saving ({_kept_checkpoint(checkpoint, epoch)}). Lower the learning rate.")


def _training_parts(model: nn.Module, recipe: Recipe, device: torch.device,
                    steps_per_epoch: int, channels_last: bool) -> tuple:
    """Move ``model`` to ``device``; return its optimizer, scheduler, criterion and scaler."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return optimizer, scheduler, criterion, scaler


def fit(model: nn.Module, train_loader: DataLoader, eval_batches: Iterable,
        recipe: Recipe, device: torch.device, channels_last: bool | None = None,
        progress: bool = True, log: Callable[[dict], None] | None = print,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        eval_split: str = "test") -> list[dict]:
    """Train with OneCycle (per batch); return one history row per epoch.

    ``eval_batches`` (the ``eval_split``: "test" or "val") is evaluated after each epoch for
    the log only: the model returned is the final one, never an epoch picked by its score.
    ``checkpoint`` is saved after every epoch with all that
    training needs to go on; ``resume=True`` continues from it (from the start if it does not
    exist yet), and ``log`` sees only the new rows. A loader from ``make_loaders(seed=...)``
    with an ``EpochAugment(seed=...)`` makes a resumed run equal to an uninterrupted one.
    An epoch ending with nan or inf weights or evaluation loss raises FloatingPointError
    before it is saved.
    """
    check_recipe(recipe)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    if channels_last is None:
        channels_last = device.type in ("cpu", "cuda")
    optimizer, scheduler, criterion, scaler = _training_parts(
        model, recipe, device, len(train_loader), channels_last)
    history: list[dict] = []
    if resume and Path(checkpoint).is_file():
        history = _resume(Path(checkpoint), recipe, model, optimizer, scheduler, scaler,
                          train_loader)
    transform = getattr(train_loader.dataset, "transform", None)
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        for part in (transform, getattr(train_loader, "sampler", None)):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch - 1)
        try:
            tr_loss, tr_acc = train_one_epoch(
                model, train_loader, optimizer, scheduler, criterion, device, scaler,
                channels_last, progress, desc=f"epoch {epoch}/{recipe.epochs}")
        except FloatingPointError as e:
            raise FloatingPointError(f"Epoch {epoch}: {e} Stopped before saving "
                                     f"({_kept_checkpoint(checkpoint, epoch)}).") from None
        train_seconds = time.perf_counter() - start
        ev_loss, ev_acc = evaluate(model, eval_batches, device, None, channels_last)
        row = dict(epoch=epoch, lr=lr, train_loss=tr_loss, train_acc=tr_acc,
                   eval_split=eval_split, eval_loss=ev_loss, eval_acc=ev_acc,
                   train_seconds=train_seconds, seconds=time.perf_counter() - start,
                   images_per_s=len(train_loader) * train_loader.batch_size / train_seconds)
        _stop_if_not_finite(epoch, row, model, checkpoint)
        history.append(row)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, epoch, history,
                            **_resume_state(recipe, train_loader, scheduler, scaler))
        if log is not None:
            log(row if log is not print else _format_row(row, recipe.epochs))
    return history


def _format_row(row: dict, epochs: int) -> str:
    split = row.get("eval_split", "test")
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4f}  "
            f"train loss {row['train_loss']:.3f} acc {100 * row['train_acc']:.2f}%  "
            f"{split} loss {_eval(row, 'loss'):.3f} acc {100 * _eval(row, 'acc'):.2f}%  "
            f"{row['seconds']:.0f}s ({row['images_per_s']:.0f} img/s)")


def _eval(row: dict, what: str) -> float:
    """A row's evaluation loss or accuracy (rows written before eval_* were named test_*)."""
    return row[f"eval_{what}"] if f"eval_{what}" in row else row[f"test_{what}"]


def _stale_temps(path: Path) -> list[Path]:
    """Temp files a killed ``save_checkpoint`` of ``path`` left behind."""
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if p.name != path.name
            and p.name.startswith(path.name) and p.name.endswith(".tmp")]


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                    history: list[dict] | None = None, **extra: Any) -> None:
    """Save model (and optimizer) state and ``extra`` entries atomically and durably.

    The state goes to a temp file that is flushed and fsynced, then renamed over ``path``;
    temp files left by a killed save are removed. Non-finite weights are never saved.
    """
    path = Path(path)
    bad = _first_non_finite(model)
    if bad is not None:
        raise FloatingPointError(f"Not saving {path}: {bad} holds nan or inf")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temps(path):
        stale.unlink(missing_ok=True)
    state = dict(model=model.state_dict(), epoch=epoch, history=history or [],
                 optimizer=optimizer.state_dict() if optimizer is not None else None, **extra)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's entries, loaded as tensors and plain values only (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: not our news
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files fail in many ways
        text = " ".join(str(e).split())
        if "GLOBAL" in text:
            why = text[text.index("GLOBAL"):].split(" whose")[0].split(". ")[0]
            raise CheckpointError(f"Checkpoint {path} holds more than tensors and plain numbers "
                                  f"({why}): refused, since loading it could run code") from None
        why = (text.split("WeightsUnpickler error:")[-1].split(" Check the doc")[0].strip()
               if "WeightsUnpickler error:" in text else f"{type(e).__name__}: {text[:200]}")
        raise CheckpointError(f"Checkpoint {path} is corrupt or not a checkpoint ({why})"
                              ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"Checkpoint {path} is not a checkpoint of this project")
    return state


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint into ``model`` (and optimizer); clear errors if missing or corrupt.

    Only tensors and plain values are unpickled (``weights_only=True``): a file holding
    anything else is refused.
    """
    state = _read_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Checkpoint {path} does not fit this model: {e}") from None
    return state


# --------------------------------------------------------------------------- reports
def predict(model: nn.Module, batches: Iterable, device: torch.device
            ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over uint8 NHWC batches, in order."""
    logits, labels = predict_logits(model, batches, device)
    return logits.argmax(1).cpu().numpy(), labels.cpu().numpy()


def misclassified_indices(labels: np.ndarray, preds: np.ndarray, n: int | None = None,
                          seed: int | None = None) -> np.ndarray:
    """Indices of ``n`` wrong predictions: the first ones, or a sorted random sample if seeded."""
    idx = np.flatnonzero(np.asarray(labels) != np.asarray(preds))
    if n is None or n >= len(idx):
        return idx
    if seed is None:
        return idx[:n]
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true labels as rows and predictions as columns."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def classification_report_df(labels: np.ndarray, preds: np.ndarray,
                             classes: Sequence[str]) -> Any:
    """scikit-learn's classification report as a DataFrame."""
    import pandas as pd
    from sklearn.metrics import classification_report
    rep = classification_report(labels, preds, labels=list(range(len(classes))),
                                target_names=list(classes), output_dict=True, zero_division=0)
    return pd.DataFrame(rep).T


def per_class_accuracy(labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]) -> Any:
    """Accuracy of each class (recall), with its count, as a DataFrame."""
    import pandas as pd
    cm = confusion_matrix(labels, preds, len(classes))
    total = cm.sum(1)
    acc = np.divide(np.diag(cm), total, out=np.zeros(len(classes)), where=total > 0)
    return pd.DataFrame(dict(cls=list(classes), images=total, correct=np.diag(cm),
                             accuracy=acc)).set_index("cls")


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module,
             class_idx: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in 0..1 for ``class_idx`` (default: the prediction)."""
    store: dict[str, torch.Tensor] = {}
    h = layer.register_forward_hook(lambda m, i, o: store.update(act=o))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            act = store["act"]
            target = logits.argmax(1) if class_idx is None else torch.as_tensor(class_idx)
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            grads = torch.autograd.grad(score, act)[0]
    finally:
        h.remove()
        model.train(was_training)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin((1, 2), keepdim=True)
    return (cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-8)).detach().cpu().numpy()


# --------------------------------------------------------------------------- plots
def _grid(n: int, cols: int, size: float = 1.6) -> tuple[Any, np.ndarray]:
    import matplotlib.pyplot as plt
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.15),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flatten()


def plot_image_grid(images: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                    n: int = 32, cols: int = 8) -> Any:
    """A labelled grid of the first ``n`` uint8 images."""
    n = min(n, len(images))
    fig, axes = _grid(n, cols)
    for ax, img, lab in zip(axes, images[:n], labels[:n]):
        ax.imshow(img)
        ax.set_title(classes[int(lab)], fontsize=8)
    fig.tight_layout()
    return fig


def plot_augmentations(images: np.ndarray, augment: Callable, n_images: int = 4,
                       n_aug: int = 5) -> Any:
    """Each original (first column) beside ``n_aug`` augmented copies (uint8 pipeline)."""
    fig, axes = _grid(n_images * (n_aug + 1), n_aug + 1)
    for r, img in enumerate(images[:n_images]):
        row = [img] + [augment(image=img)["image"] for _ in range(n_aug)]
        for c, shown in enumerate(row):
            ax = axes[r * (n_aug + 1) + c]
            ax.imshow(shown)
            ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(history: Sequence[dict]) -> Any:
    """Loss, accuracy and learning rate per epoch; the evaluated split is named in the legend."""
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    split = history[0].get("eval_split", "test") if history else "test"
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, what, scale in ((axes[0], "loss", 1), (axes[1], "acc", 100)):
        ax.plot(ep, [scale * h[f"train_{what}"] for h in history], marker="o", label="train")
        ax.plot(ep, [scale * _eval(h, what) for h in history], marker="o", label=split)
    axes[1].axhline(85, color="grey", ls="--", lw=1, label="85% target")
    axes[2].plot(ep, [h["lr"] for h in history], marker="o")
    for ax, title in zip(axes, ("loss", "accuracy (%)", "learning rate at epoch start")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    return fig


def plot_misclassified(images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                       classes: Sequence[str], n: int = 20, cols: int = 5,
                       seed: int | None = 0) -> Any:
    """``n`` misclassified uint8 images (a random sample; seed None: the first), true -> pred."""
    idx = misclassified_indices(labels, preds, n, seed)
    fig, axes = _grid(len(idx), cols, size=2.0)
    for ax, i in zip(axes, idx):
        ax.imshow(images[i])
        ax.set_title(f"{classes[labels[i]]} -> {classes[preds[i]]}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str]) -> Any:
    """A seaborn heatmap of the confusion matrix (rows true, columns predicted)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(8, 6.5))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def plot_gradcam(model: nn.Module, images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
                 classes: Sequence[str], layer: nn.Module,
                 device: torch.device | str = "cpu", n: int = 10, cols: int = 5,
                 seed: int | None = 0) -> Any:
    """Misclassified images (sampled as in plot_misclassified) over their Grad-CAM maps."""
    idx = misclassified_indices(labels, preds, n, seed)
    fig, axes = _grid(2 * cols * math.ceil(len(idx) / cols), cols, size=2.0)
    if len(idx) == 0:
        return fig
    x = to_input(torch.as_tensor(images[idx]), torch.device(device))
    cams = grad_cam(model, x, layer, [int(preds[i]) for i in idx])
    for k, (i, cam) in enumerate(zip(idx, cams)):
        first = (k // cols) * 2 * cols + k % cols  # image row, then its heat-map row
        top, bottom = axes[first], axes[first + cols]
        top.imshow(images[i])
        top.set_title(f"{classes[labels[i]]} -> {classes[preds[i]]}", fontsize=8)
        bottom.imshow(images[i])
        bottom.imshow(cam, cmap="jet", alpha=0.45)
        bottom.set_title("Grad-CAM", fontsize=8)
    fig.tight_layout()
    return fig


def plot_receptive_field(table: Any) -> Any:
    """Receptive field after each layer of a ``receptive_field_table``, with the 44 bar."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colors = {"conv": "tab:blue", "depthwise": "tab:orange", "pointwise": "tab:grey"}
    labels = [f"{row.block} {row.layer} ({row.n_out}x{row.n_out})" if row.block != "-"
              else f"{row.layer} ({row.n_out}x{row.n_out})" for row in table.itertuples()]
    ax.bar(range(len(table)), table["rf_out"], color=[colors.get(k, "tab:green")
                                                       for k in table["kind"]])
    for i, row in enumerate(table.itertuples()):
        note = f"s{row.stride}" if row.stride > 1 else f"d{row.dilation}" if row.dilation > 1 \
            else ""
        ax.text(i, row.rf_out + 1, f"{row.rf_out}{' ' + note if note else ''}", ha="center",
                fontsize=7)
    ax.axhline(44, color="red", ls="--", lw=1, label="rule: RF > 44")
    ax.set_xticks(range(len(table)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("receptive field (pixels)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles + ax.get_legend_handles_labels()[0], [*colors, "rule: RF > 44"],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_augmentation_rows(image: np.ndarray, augments: dict[str, Callable],
                           n_aug: int = 5) -> Any:
    """One row per named augmentation: ``image`` (first column), then ``n_aug`` outputs."""
    fig, axes = _grid(len(augments) * (n_aug + 1), n_aug + 1)
    for r, (name, augment) in enumerate(augments.items()):
        row = [image] + [augment(image=image)["image"] for _ in range(n_aug)]
        for c, shown in enumerate(row):
            ax = axes[r * (n_aug + 1) + c]
            ax.imshow(shown)
            ax.set_title("original" if c == 0 else name, fontsize=8)
    fig.tight_layout()
    return fig


def figures_folder(requested: str | os.PathLike | None, smoke: bool,
                   default: str = "images") -> str | None:
    """Where a notebook run saves its figures: ``requested`` when given ("" saves nothing);
    else ``default`` in a full run and nowhere in a smoke run, so that a smoke run never
    replaces the figures of a full run."""
    if requested is not None:
        return str(requested) or None
    return None if smoke else default


def save_figure(fig: Any, folder: str | os.PathLike | None, name: str) -> None:
    """Save ``fig`` as ``folder/name`` (PNG, 100 dpi); do nothing when folder is empty/None."""
    if not folder:
        return
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


# --------------------------------------------------------------------------- benchmark
EPOCH_IMAGES, EVAL_IMAGES = 50_000, 10_000  # a CIFAR-10 training epoch and its test set


def _recipe_pipeline(recipe: Recipe, arrays: Sequence[np.ndarray], mean: Sequence[float],
                     std: Sequence[float], device: torch.device, workers: int | None,
                     seed: int = 0, num_classes: int = 10
                     ) -> tuple[DataLoader, TensorBatches, Net]:
    """The recipe's augmented training loader, test batches and model, seeded by ``seed``."""
    x_tr, y_tr, x_te, y_te = arrays
    augment = EpochAugment(exercise_augmentations(mean, recipe.p_flip, recipe.p_affine,
                                                  recipe.p_dropout, seed=seed), seed)
    train_loader, test_batches = make_loaders(
        CifarDataset(x_tr, y_tr, augment), CifarDataset(x_te, y_te), recipe.batch_size, device,
        workers, seed=seed)
    return train_loader, test_batches, build_model(recipe, num_classes, mean, std)


def _cycle(batches: Iterable) -> Iterator:
    """``batches`` without end: a new pass (as in a new epoch) whenever one ends."""
    while True:
        yield from batches


def _consume(batches: Iterable) -> None:
    for _ in batches:
        pass


def _timed(run: Callable[[Iterable], Any], batches: Iterator, seconds: float,
           warmup: int) -> tuple[int, float]:
    """(images, seconds) of ``run`` fed from ``batches``: ``warmup`` untimed, then ``seconds``."""
    if warmup:
        run(itertools.islice(batches, warmup))
    seen, start = [0], time.perf_counter()

    def timed() -> Iterator:
        for batch in batches:
            yield batch
            seen[0] += len(batch[1])  # ``run`` is done with it once it asks for the next
            if time.perf_counter() - start >= seconds:
                return

    run(timed())
    return seen[0], time.perf_counter() - start


def _timed_eval(model: nn.Module, test: TensorBatches, device: torch.device,
                channels_last: bool, seconds: float) -> tuple[int, float]:
    """(images, seconds) of ``evaluate`` in whole passes of ``test`` (at least one)."""
    evaluate(model, itertools.islice(test, 1), device, channels_last=channels_last)  # warm-up
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < seconds:
        evaluate(model, test, device, channels_last=channels_last)
        passes += 1
    return passes * len(test.images), time.perf_counter() - start


BENCH_ROUNDS = 4  # alternations of model-only and end-to-end timing in ``bench``


def _random_batches(n: int, batch_size: int, shape: Sequence[int], num_classes: int,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of random uint8 NHWC images and labels, already on ``device``."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch_size, *shape), generator=g, dtype=torch.uint8)
             .to(device), torch.randint(0, num_classes, (batch_size,), generator=g).to(device))
            for _ in range(n)]


def bench(data: CifarData | Sequence[np.ndarray], recipe: Recipe | str = "standard",
          device: torch.device | str | None = None, workers: int | None = None,
          batch_size: int | None = None, seconds: float = 8.0) -> dict:
    """Images/s of the training loader, the model's training step, both together, evaluation.

    ``data`` is a CifarData or (x_train, y_train, x_test, y_test). The recipe's model and
    augmentation run as in ``fit``; each figure is timed for ``seconds`` after a warm-up
    (model only and end-to-end alternate in ``BENCH_ROUNDS`` rounds, so that a machine whose
    speed drifts, such as a shared virtual machine, slows both alike).
    """
    name = recipe if isinstance(recipe, str) else "custom"
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    recipe = replace(recipe, batch_size=batch_size or recipe.batch_size)
    arrays = ((data.x_train, data.y_train, data.x_test, data.y_test)
              if isinstance(data, CifarData) else tuple(data))
    n_cls = len(data.classes) if isinstance(data, CifarData) else 10
    device = torch.device(device) if device is not None else get_device(verbose=False)
    mean, std = compute_mean_std(arrays[0])
    loader, test, model = _recipe_pipeline(recipe, arrays, mean, std, device, workers,
                                           num_classes=n_cls)
    macs, channels_last = count_macs(model), device.type in ("cpu", "cuda")
    optimizer, scheduler, criterion, scaler = _training_parts(
        model, recipe, device, 10 ** 7, channels_last)  # a schedule that never runs out

    def train(batches: Iterable) -> None:
        train_one_epoch(model, batches, optimizer, scheduler, criterion, device, scaler,
                        channels_last, False)

    fake = _cycle(_random_batches(4, recipe.batch_size, arrays[0].shape[1:], n_cls, device))
    real, warm = _cycle(loader), 2 + loader.num_workers * (loader.prefetch_factor or 0)
    t = dict(loader=_timed(_consume, real, seconds, warm))
    train(itertools.islice(fake, 3))  # warm-up
    rounds: dict[str, list[tuple[int, float]]] = {"model": [], "end_to_end": []}
    for _ in range(BENCH_ROUNDS):
        rounds["model"].append(_timed(train, fake, seconds / BENCH_ROUNDS, 0))
        # ``warm`` untimed steps first: the batches the workers queued meanwhile
        rounds["end_to_end"].append(_timed(train, real, seconds / BENCH_ROUNDS, warm))
    t.update({k: (sum(n for n, _ in v), sum(sec for _, sec in v)) for k, v in rounds.items()})
    t["eval"] = _timed_eval(model, test, device, channels_last, seconds)
    real.close()  # lets the persistent workers go
    return _bench_result(t, dict(
        recipe=name, device=str(device), torch=torch.__version__, cpus=os.cpu_count(),
        threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
        workers=loader.num_workers, batch_size=recipe.batch_size, seconds=seconds,
        params=count_parameters(model), macs=macs, eval_set_images=len(test.images)))


def _bench_result(timed: dict[str, tuple[int, float]], meta: dict) -> dict:
    """``meta`` with the rates from ``timed`` (images, seconds) and the figures derived."""
    r = {k: n / sec for k, (n, sec) in timed.items()}
    epoch_s, eval_s = EPOCH_IMAGES / r["end_to_end"], EVAL_IMAGES / r["eval"]
    return dict(
        meta, loader_images_per_s=r["loader"],
        loader_images_per_s_per_worker=r["loader"] / max(1, meta["workers"]),
        model_images_per_s=r["model"], end_to_end_images_per_s=r["end_to_end"],
        eval_images_per_s=r["eval"], end_to_end_pct_of_model=100 * r["end_to_end"] / r["model"],
        epoch_images=EPOCH_IMAGES, epoch_seconds=epoch_s, eval_images=EVAL_IMAGES,
        eval_seconds=eval_s, eval_pct_of_epoch=100 * eval_s / epoch_s,
        timed_images={k: v[0] for k, v in timed.items()},
        timed_seconds={k: v[1] for k, v in timed.items()})


def bench_table(result: dict) -> str:
    """A ``bench`` result as a small readable table."""
    r, w = result, result["workers"]
    rows = [
        ("loader only, total", r["loader_images_per_s"],
         f"{w} worker{'' if w == 1 else 's'}" + (" (0: in the main process)" if w == 0 else "")),
        ("loader only, per worker", r["loader_images_per_s_per_worker"],
         "albumentations and collation"),
        ("model only", r["model_images_per_s"], "training steps on random uint8 batches"),
        ("end-to-end training", r["end_to_end_images_per_s"],
         f"{r['end_to_end_pct_of_model']:.1f}% of model only; "
         f"{r['epoch_images']:,} images in {r['epoch_seconds']:.1f} s"),
        ("evaluation", r["eval_images_per_s"],
         f"{r['eval_images']:,} images in {r['eval_seconds']:.2f} s = "
         f"{r['eval_pct_of_epoch']:.1f}% of an epoch"),
    ]
    head = (f"recipe {r['recipe']} ({r['macs'] / 1e6:.1f}M multiply-adds/image), batch "
            f"{r['batch_size']}, {r['device']}, torch {r['torch']}, {r['threads']} threads, "
            f"{w} worker(s), {r['seconds']:g} s per figure")
    lines = [f"{'':<25}{'images/s':>10}  note"]
    lines += [f"{label:<25}{rate:>10,.0f}  {note}" for label, rate, note in rows]
    return "\n".join([head, *lines])


# --------------------------------------------------------------------------- command line
class UsageError(ValueError):
    """Bad command-line input found after parsing: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` inside ``_RANGES[name]``, else a one-line error."""
    ok, words = _RANGES[name]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value
    return parse


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="helpers.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one recipe and log every epoch",
                       description="Train one recipe, logging every epoch and checkpointing "
                       "to --out. Every option is checked before any data is read.")
    t.add_argument("--data-dir", required=True, metavar="DIR",
                   help="folder with CIFAR-10 in a known layout")
    t.add_argument("--download", action="store_true",
                   help="download with torchvision if the data is not in --data-dir")
    t.add_argument("--download-timeout", type=_checked(float, "download_timeout"), default=60.0,
                   metavar="S", help="give up a download when the server sends nothing for "
                   "S seconds (a number in (0, 86400]; default 60)")
    t.add_argument("--recipe", default="standard", choices=sorted(RECIPES),
                   help="the recipe that the options below override (default standard)")

    def override(name: str, kind: type, what: str, **kw: Any) -> None:
        words = _RANGES[name][1]
        t.add_argument("--" + name.replace("_", "-"), type=_checked(kind, name),
                       help=f"override the recipe's {what} ({words})", **kw)

    override("epochs", int, "epochs", metavar="N")
    override("lr", float, "OneCycle peak learning rate", metavar="LR")
    override("batch_size", int, "batch size", metavar="N")
    override("widths", int, "channel widths of C1..C4", nargs=4, metavar=("C1", "C2", "C3", "C4"))
    override("depths", int, "residual blocks in C1..C4", nargs=4,
             metavar=("D1", "D2", "D3", "D4"))
    t.add_argument("--act", choices=sorted(ACTIVATIONS), help="override the activation")
    override("weight_decay", float, "weight decay", metavar="WD")
    override("label_smoothing", float, "label smoothing", metavar="S")
    override("p_affine", float, "Affine probability", metavar="P")
    override("p_dropout", float, "CoarseDropout probability", metavar="P")
    t.add_argument("--seed", type=_checked(int, "seed"), default=0, metavar="N",
                   help="seed of every random choice: weights, data order, augmentation, "
                   "subsets (default 0)")
    t.add_argument("--train-subset", type=_checked(int, "train_subset"), metavar="N",
                   help="train on N random training images only (an integer >= 1)")
    t.add_argument("--test-subset", type=_checked(int, "test_subset"), metavar="N",
                   help="test on N random test images only (an integer >= 1)")
    t.add_argument("--val-fraction", type=_checked(float, "val_fraction"), metavar="F",
                   help="hold out this part of the training set and evaluate on it instead "
                   "of the test set, for tuning (a number in (0, 1))")
    t.add_argument("--threads", type=_checked(int, "threads"), metavar="N",
                   help="torch CPU threads (an integer in [1, 1024]; default: all cores, or "
                   "the run's own count with --resume)")
    t.add_argument("--workers", type=_checked(int, "workers"), metavar="N",
                   help="data-loader worker processes (an integer in [0, 64]; default: auto, "
                   "or the run's own count with --resume)")
    t.add_argument("--out", default="runs/latest", metavar="DIR",
                   help="folder for config.json, log.jsonl, model.pt and summary.json "
                   "(default runs/latest)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from "
                       "its last checkpoint (or start it if --out holds none)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out instead of refusing to")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b = sub.add_parser("bench", help="images/s of the loader, the model, training, evaluation")
    b.add_argument("--data-dir", required=True, help="folder with CIFAR-10 in a known layout")
    b.add_argument("--download", action="store_true", help="download with torchvision")
    b.add_argument("--recipe", default="standard", choices=sorted(RECIPES),
                   help="the recipe whose model and batch size are timed (default standard)")
    b.add_argument("--workers", type=_checked(int, "workers"), metavar="N",
                   help="data-loader worker processes (default: 0 on a CPU, up to 8 on a GPU)")
    b.add_argument("--batch-size", type=_checked(int, "batch_size"), metavar="N",
                   help="override the recipe's batch size (an integer >= 1)")
    b.add_argument("--seconds", type=_checked(float, "seconds"), default=8.0, metavar="S",
                   help="timed seconds per figure (a number in (0, 3600]; default 8)")
    b.add_argument("--threads", type=_checked(int, "threads"), metavar="N",
                   help="torch CPU threads (an integer in [1, 1024]; default: all cores)")
    b.add_argument("--device", choices=("cpu", "cuda", "mps"),
                   help="the device to time (default: the best available)")
    return p


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    names = {f.name for f in fields(Recipe)}  # options named like Recipe fields override them
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("widths", "depths"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return Recipe(**{**asdict(RECIPES[args.recipe]), **overrides})


_RUN_FILES = ("config.json", "log.jsonl", "model.pt", "summary.json")
# config.json entries that --resume requires to be unchanged (threads and device: a note).
_SAME_OPTIONS = ("recipe", "seed", "train_subset", "test_subset", "val_fraction", "workers")
_SAME_DATA = ("data", "classes", "train_images", "eval_split", "eval_images")


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a temp file renamed over it)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _checkpoint_epoch(path: Path) -> int | None:
    try:
        return int(_read_checkpoint(path)["epoch"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return None


def _kept(out: Path) -> str:
    epoch = _checkpoint_epoch(out / "model.pt")
    return (f"{out} keeps no checkpoint yet" if epoch is None
            else f"{out}/model.pt keeps epoch {epoch}")


def _differences(old: dict, new: dict, keys: Sequence[str]) -> list[str]:
    """``key old -> new`` for each of ``keys`` that differs (recipe fields one by one)."""
    diffs = []
    for key in keys:
        a, b = _plain(old.get(key)), _plain(new[key])
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k} {a.get(k)!r} -> {v!r}" for k, v in b.items() if a.get(k) != v]
        elif a != b:
            diffs.append(f"{key} {a!r} -> {b!r}")
    return diffs


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> dict | None:
    """Check ``--out`` against the flags; return the earlier run's config to resume, or None."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file, not a folder")
    present = [n for n in _RUN_FILES if (out / n).exists()]
    if not present:
        if resume:
            print(f"--resume: {out} holds no run yet: starting one")
        return None
    finished = "summary.json" in present
    what = "a finished run" if finished else f"a partial run ({_kept(out)})"
    if overwrite:
        for path in [out / n for n in present] + _stale_temps(out / "model.pt"):
            path.unlink(missing_ok=True)
        print(f"--overwrite: replaced {what} in {out}")
        return None
    if not resume:
        hint = "" if finished else "pass --resume to continue it or "
        raise UsageError(f"argument --out: {out} already holds {what}: {hint}pass "
                         "--overwrite to replace it, or choose another --out")
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"argument --resume: {out}/config.json is missing or unreadable, so "
                         "the run cannot be checked: pass --overwrite to start again") from None


def _refuse_changes(out: Path, old: dict, new: dict, keys: Sequence[str]) -> None:
    diffs = _differences(old, new, keys)
    if diffs:
        raise UsageError(f"argument --resume: the run in {out} was made with other settings "
                         f"({'; '.join(diffs)}): give its options, or --overwrite to start again")


def _load_data(args: argparse.Namespace) -> tuple[CifarData, tuple, tuple, str]:
    """The data, the train and evaluation arrays and the evaluated split; UsageError if bad."""
    try:
        data = load_cifar10(args.data_dir, args.download, args.download_timeout)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    for name, n, have in (("train", args.train_subset, len(data.x_train)),
                          ("test", args.test_subset, len(data.x_test))):
        if n is not None and n > have:
            raise UsageError(f"argument --{name}-subset: {n} is more than the {have} "
                             f"{name} images in {data.source}")
    x_tr, y_tr = subset(data.x_train, data.y_train, args.train_subset, args.seed)
    x_te, y_te = subset(data.x_test, data.y_test, args.test_subset, args.seed)
    if not args.val_fraction:
        return data, (x_tr, y_tr), (x_te, y_te), "test"
    try:  # tuning: the test set is not touched
        x_tr, y_tr, x_va, y_va = split_train_val(x_tr, y_tr, args.val_fraction, seed=0)
    except ValueError as e:
        raise UsageError(f"argument --val-fraction: {e}") from None
    return data, (x_tr, y_tr), (x_va, y_va), "val"


def _check_args(args: argparse.Namespace) -> Recipe:
    """The recipe the options give, after the checks that involve several options."""
    recipe = _recipe_from_args(args)
    problem = _recipe_problem(recipe)
    if problem is not None:
        name, why = problem
        given = getattr(args, name, None) is not None
        raise UsageError(f"argument --{name.replace('_', '-')}: {why}"
                         + ("" if given else f" (the {args.recipe} recipe's value)"))
    if not str(args.out).strip():
        raise UsageError("argument --out: expected a folder name, got ''")
    if args.val_fraction and args.test_subset is not None:
        raise UsageError("argument --test-subset: not allowed with --val-fraction (the test "
                         "set is not used when tuning)")
    return recipe


def _settings(args: argparse.Namespace) -> tuple[Recipe, Path, dict | None, torch.device, dict]:
    """Everything decided before the data is read: recipe, run folder, device, options."""
    recipe, out = _check_args(args), Path(args.out)
    prev = _prepare_out(out, args.resume, args.overwrite)
    threads = args.threads or (prev or {}).get("threads")
    if threads:
        torch.set_num_threads(threads)
    device = get_device()
    workers = args.workers if args.workers is not None else (prev or {}).get(
        "workers", _default_workers(device))
    options = dict(recipe=asdict(recipe), seed=args.seed, train_subset=args.train_subset,
                   test_subset=args.test_subset, val_fraction=args.val_fraction,
                   workers=workers)
    if prev is not None:
        _refuse_changes(out, prev, options, _SAME_OPTIONS)
    return recipe, out, prev, device, options


def _open_run(out: Path, prev: dict | None, meta: dict, epochs: int) -> list[dict]:
    """Write config.json for a new run, or check a resumed one; (re)write log.jsonl."""
    history: list[dict] = []
    if prev is not None:
        _refuse_changes(out, prev, meta, _SAME_DATA)
        notes = _differences(prev, meta, ("device", "threads", "versions"))
        if notes:
            print(f"note: resuming with {'; '.join(notes)}: results may differ from a run "
                  "that was never interrupted")
        if (out / "model.pt").is_file():
            history = list(_read_checkpoint(out / "model.pt")["history"])
            print(f"--resume: continuing {out} after epoch {len(history)} of {epochs}")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomic(out / "config.json", json.dumps(meta, indent=2))
        except OSError as e:
            raise UsageError(f"argument --out: cannot write to {out}: {e}") from None
    _write_atomic(out / "log.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    return history


def run_training(args: argparse.Namespace) -> list[dict]:
    """The headless recipe: load, seed, build, train, log one row per epoch to ``--out``.

    Bad input raises UsageError, before any data is read where it can be found then. A run
    already in ``--out`` is refused unless ``args.resume`` (continue it) or ``args.overwrite``.
    """
    recipe, out, prev, device, options = _settings(args)
    if prev is not None and (out / "summary.json").exists():
        print(f"--resume: the run in {out} is finished ({_kept(out)}): nothing to do")
        ckpt = out / "model.pt"
        return list(_read_checkpoint(ckpt)["history"]) if ckpt.is_file() else []
    data, (x_tr, y_tr), (x_te, y_te), split = _load_data(args)
    mean, std = compute_mean_std(x_tr)
    set_seed(args.seed)
    train_loader, test_batches, model = _recipe_pipeline(
        recipe, (x_tr, y_tr, x_te, y_te), mean, std, device, options["workers"], args.seed,
        len(data.classes))
    meta = dict(**options, data=data.source, classes=list(data.classes),
                train_images=len(x_tr), eval_split=split, eval_images=len(x_te),
                device=str(device), threads=torch.get_num_threads(),
                params=count_parameters(model), macs=count_macs(model),
                versions=dict(torch=torch.__version__, numpy=np.__version__))
    _open_run(out, prev, meta, recipe.epochs)
    print(json.dumps(meta))

    def log(row: dict) -> None:
        print(_format_row(row, recipe.epochs), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    history = fit(model, train_loader, test_batches, recipe, device,
                  progress=not args.no_progress, log=log, checkpoint=out / "model.pt",
                  resume=prev is not None, eval_split=split)
    _, tta_acc = evaluate(model, test_batches, device, tta=True)
    summary = {f"final_{split}_acc": history[-1]["eval_acc"],
               f"final_{split}_acc_flip_tta": tta_acc,
               "median_epoch_seconds": float(np.median([h["seconds"] for h in history])),
               "median_images_per_s": float(np.median([h["images_per_s"] for h in history]))}
    _write_atomic(out / "summary.json", json.dumps({**meta, **summary}, indent=2))
    print(json.dumps(summary))
    return history


def _run_bench(args: argparse.Namespace) -> dict:
    """``bench`` on the data in ``--data-dir``: one JSON line, then the table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, download=args.download)
    result = bench(data, args.recipe, args.device, args.workers, args.batch_size, args.seconds)
    print(json.dumps(result))
    print(bench_table(result), flush=True)
    return result


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python helpers.py train|bench --data-dir DIR ...``.

    Exit status: 0 done, 1 training diverged, 2 bad input (one line on stderr), 130 or 143
    interrupted by SIGINT or SIGTERM (the last checkpoint is kept: continue with --resume).
    """
    args = _build_parser().parse_args(argv)
    if args.command == "bench":
        _run_bench(args)
        return 0
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up as on Ctrl-C
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        run_training(args)
    except UsageError as e:
        return _fail(f"error: {e}", 2)
    except CheckpointError as e:
        return _fail(f"error: {e} (--overwrite starts the run again)", 2)
    except FloatingPointError as e:
        return _fail(f"stopped: {e}", 1)
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        return _fail(f"interrupted by {name}: {_kept(Path(args.out))}; continue with --resume",
                     143 if name == "SIGTERM" else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _fail(message: str, status: int) -> int:
    print("helpers.py train: " + " ".join(message.split()), file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
