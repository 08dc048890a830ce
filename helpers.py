"""Helpers for the EVA8 session-6 exercise: a compact CIFAR-10 CNN under the exercise's rules.

Sections, in the order the notebook teaches them: the recipe, setup, data, augmentation,
loaders, model, rules and receptive field, training, checkpoints, reports and plots, benchmark
and the command line (``python helpers.py train|evaluate|bench``). Importing it only defines
names: no download, no seeding, no plotting.
"""
from __future__ import annotations

import os
import signal
import sys

def _interrupted_early(signum: int, frame: Any) -> NoReturn:
    print(f"helpers.py: interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # 130 or 143 now: nothing is written yet, and an exception raised
    # here could reach a C extension's import, which turns it into an ImportError

if __name__ == "__main__":  # a signal while the modules load: one line, no traceback
    signal.signal(signal.SIGINT, _interrupted_early)
    signal.signal(signal.SIGTERM, _interrupted_early)

import argparse
import copy
import errno
import glob
import io
import itertools
import json
import math
import pickle
import random
import shutil
import socket
import stat
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "Recipe", "RECIPES", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "get_device",
    "set_seed", "CifarData", "load_cifar10", "subset", "split_train_val", "compute_mean_std",
    "AUGMENTATION_MAPPING", "exercise_augmentations", "EpochAugment", "EpochSampler",
    "CifarDataset", "TensorBatches", "to_input", "make_loaders", "ACTIVATIONS", "InputNorm",
    "ConvBNAct", "DepthwiseSeparable", "Residual", "Net", "build_model", "count_parameters",
    "count_macs", "receptive_field_table", "empirical_receptive_field", "check_rules",
    "Training", "orthogonalise", "MuonSGD", "start_training", "train_step", "train_one_epoch",
    "fit", "format_row", "predict_logits", "evaluate", "CheckpointError", "WriteError",
    "save_checkpoint", "save_weights", "load_model", "predict", "hardest_mistakes",
    "confusion_matrix", "confused_pairs", "class_report", "grad_cam", "plot_samples",
    "plot_pipeline", "plot_history", "plot_mistakes", "plot_confusion_matrix",
    "plot_receptive_field", "figures_folder", "save_figure", "bench", "bench_table", "main"]


# =========================================================================== the recipe
def _setting(default: Any, help: str, words: str, ok: Callable[[Any], bool],
             metavar: Any = None) -> Any:
    """A Recipe field: its default, what it means (with its unit) and the values it accepts."""
    return field(default=default, metadata=dict(help=help, words=words, ok=ok, metavar=metavar))

_PROBABILITY = ("a probability in [0, 1]", lambda v: 0 <= v <= 1)

def _finite(v: float) -> bool:
    """Whether ``v`` is a finite float32 (training's precision: 1e39 is not, nor an integer too
    large for a float)."""
    try:
        return math.isfinite(v) and abs(v) <= 3.4028234663852886e38
    except OverflowError:
        return False

def _plain_number(v: Any) -> Any:
    """A NumPy integer or float as Python's; anything else as it is."""
    return int(v) if isinstance(v, np.integer) else float(v) if isinstance(v, np.floating) else v

def _as_setting(value: Any, default: Any) -> Any:
    """A setting as JSON keeps it: a list (as JSON gives it) as a tuple where the default is
    one, NumPy numbers as Python's."""
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    return tuple(map(_plain_number, value)) if isinstance(value, tuple) else _plain_number(value)

@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters a training recipe sets; a bad value cannot be built."""

    epochs: int = _setting(10, "passes over the training set", "an integer in [1, 10000]",
                           lambda v: 1 <= v <= 10_000, "N")
    batch_size: int = _setting(128, "images per optimisation step", "an integer in [1, 65536]",
                               lambda v: 1 <= v <= 65_536, "N")
    lr: float = _setting(0.2, "peak learning rate of the OneCycle schedule, from lr/10 to "
                         "lr/1000 (SGD, Nesterov momentum cycled 0.95-0.85-0.95), per step",
                         "a number in (0, 3.4e38]",
                         lambda v: 0 < v and _finite(v), "LR")
    muon_lr: float = _setting(0.02, "peak learning rate of Muon for the dense conv weights (their "
                              "momentum, orthogonalised, is the step); 0: they keep SGD",
                              "a number in [0, 3.4e38]", lambda v: 0 <= v and _finite(v), "LR")
    weight_decay: float = _setting(5e-4, "L2 penalty on conv and linear weights (not on "
                                   "BatchNorm, biases or Muon's weights)",
                                   "a number in [0, 3.4e38]", lambda v: 0 <= v and _finite(v),
                                   "WD")
    label_smoothing: float = _setting(0.1, "share of each target spread over all classes",
                                      "a number in [0, 1)", lambda v: 0 <= v < 1, "S")
    pct_start: float = _setting(0.25, "share of all steps spent warming up", "a number in "
                                "(0, 0.5]", lambda v: 0 < v <= 0.5, "F")
    widths: tuple = _setting((32, 64, 96, 128), "channels of C1..C4",
                             "four integers in [1, 4096]", lambda v: all(1 <= c <= 4096 for c in v),
                             ("C1", "C2", "C3", "C4"))
    depths: tuple = _setting((1, 1, 1, 1), "residual blocks in C1..C4 (C2's first holds the "
                             "dilated conv)", "four integers in [0, 64] with D2 >= 1",
                             lambda v: 0 <= min(v) and max(v) <= 64 and v[1] >= 1,
                             ("D1", "D2", "D3", "D4"))
    dilated_downs: int = _setting(0, "downsamplers that shrink the map with a dilated 3x3 "
                                  "kernel (dilation 2, no padding) instead of a stride: 1 for "
                                  "C4's, 2 for C3's and C4's (the exercise's extra credit)",
                                  "0, 1 or 2", lambda v: v in (0, 1, 2), "N")
    act: str = _setting("gelu", "activation after every BatchNorm", "relu or gelu",
                        lambda v: v in ("relu", "gelu"), "NAME")
    p_flip: float = _setting(0.5, "probability of HorizontalFlip per image", *_PROBABILITY, "P")
    p_affine: float = _setting(0.25, "probability of the shift-scale-rotate Affine per image",
                               *_PROBABILITY, "P")
    p_dropout: float = _setting(0.25, "probability of the 16x16 CoarseDropout hole per image",
                                *_PROBABILITY, "P")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _as_setting(getattr(self, f.name), f.default)
            object.__setattr__(self, f.name, value)
            # the kind of value each item must be: a float setting also takes an int
            kind = {str: str, int: int, tuple: int}.get(type(f.default), (int, float))
            if isinstance(f.default, tuple):
                shape_fits = isinstance(value, tuple) and len(value) == len(f.default)
            else:
                shape_fits = not isinstance(value, tuple)
            items = value if isinstance(value, tuple) else (value,)
            kinds_fit = all(isinstance(v, kind) and not isinstance(v, bool) for v in items)
            if not (shape_fits and kinds_fit and f.metadata["ok"](value)):
                raise ValueError(f"Recipe.{f.name}: expected {f.metadata['words']}, "
                                 f"got {value!r}")

# The notebook's default; its net for 100 epochs with C4's downsampler dilated (the extra
# credit), more augmentation and Muon at a lower rate; a quick look (no residual block at
# 32x32, about half the multiply-adds, SGD alone: muon_lr=0; under 85%); a net under 50k
# parameters.
RECIPES: dict[str, Recipe] = {
    "standard": Recipe(),
    "accurate": Recipe(epochs=100, dilated_downs=1, p_affine=0.5, p_dropout=0.5, muon_lr=0.01),
    "fast": Recipe(epochs=10, muon_lr=0.0, widths=(24, 64, 96, 160), depths=(0, 1, 1, 1)),
    "small": Recipe(epochs=60, batch_size=256, widths=(16, 28, 48, 64), depths=(2, 1, 1, 1))}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # as usually quoted for the official training split,
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # on the 0..1 scale


# =========================================================================== setup
def get_device(verbose: bool = True) -> torch.device:
    """Pick CUDA, then Apple MPS, then CPU, and say which."""
    if torch.cuda.is_available():
        device, msg = torch.device("cuda"), f"Using GPU: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, msg = torch.device("mps"), "Using Apple GPU (MPS)"
    else:
        device, msg = torch.device("cpu"), (
            "No GPU found: training on the CPU is slow (an epoch of the default recipe takes 1-2 "
            "minutes on 2 cores). In Colab choose Runtime > Change runtime type > GPU.")
    if verbose:
        print(msg)
    return device

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)

def _derive_seed(*values: int) -> int:
    """A 32-bit seed that is a pure function of ``values`` (e.g. a base seed and an epoch)."""
    return int(np.random.SeedSequence([int(v) % 2 ** 64 for v in values]).generate_state(1)[0])


# =========================================================================== data
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

def _read_pickle(path: Path, read: Callable[[dict], Any]) -> Any:
    """``read`` applied to one batch file's dict (arrays and lists only), naming the file."""
    try:
        with open(path, "rb") as f:
            return read(_ArrayUnpickler(f, encoding="bytes").load())
    except EOFError:
        raise ValueError(f"Cannot read {path}: the file is empty or truncated") from None
    except (OSError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, OverflowError) as e:
        raise ValueError(f"Cannot read {path} as a CIFAR-10 batch ({type(e).__name__}: {e})"
                         ) from None

def _batch(d: dict) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if x.ndim != 2 or x.shape[1] != 3072:  # another layout would be read scrambled
        raise ValueError(f"its data is {x.shape}, not rows of 3072 values (1024 red, green, "
                         "blue)")
    if x.dtype.kind not in "iu" or (x.size and not 0 <= x.min() <= x.max() <= 255):
        raise ValueError(f"its pixel values are not integers in 0..255 ({x.dtype})")
    if y.dtype.kind not in "iu" or (y.size and not 0 <= y.min() <= y.max() < 2 ** 31):
        raise ValueError(f"its labels are not integers >= 0 ({y.dtype})")
    x, y = x.astype(np.uint8).reshape(-1, 3, 32, 32), y.astype(np.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"it holds {len(x)} images but {len(y)} labels")
    return x, y

_NO_IMAGES = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))  # not read, or empty

def _load_batches(folder: Path, splits: Sequence[str]) -> CifarData:
    """Read the official ``cifar-10-batches-py`` folder (of its two splits, ``splits``)."""
    train, test = [folder / f"data_batch_{i}" for i in range(1, 6)], [folder / "test_batch"]
    for p in train + test:
        if not p.is_file():  # a named pipe would be waited on forever
            raise ValueError(f"{p} is {'not a file' if p.exists() else 'missing'}")
    _refuse_one_file_twice(train + test, lambda p: p.name)
    arrays = []
    for split, paths in (("train", train), ("test", test)):
        if split not in splits:
            arrays += _NO_IMAGES
            continue
        x, y = zip(*(_read_pickle(p, _batch) for p in paths))
        arrays += [np.concatenate(x).transpose(0, 2, 3, 1).copy(), np.concatenate(y)]
    meta, classes = folder / "batches.meta", CIFAR10_CLASSES
    if meta.exists() and not meta.is_file():
        raise ValueError(f"{meta} is not a file")
    if meta.exists():
        classes = _read_pickle(meta, lambda d: tuple(n.decode() for n in d[b"label_names"]))
    return CifarData(*arrays, classes, f"batches folder {folder.name}")

def _refuse_one_file_twice(paths: Sequence[Path], part: Callable[[Path], Any]) -> None:
    """Refuse two of ``paths`` in different parts (``part``: a split, or a split and class)
    that are one file (a link, symbolic or hard): labels or splits would mix."""
    seen: dict[tuple[int, int], Path] = {}
    for p in paths:
        st = p.stat()
        if st.st_ino == 0:  # a file system that numbers no file (some network shares)
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), p)
        if part(first) != part(p):
            raise ValueError(f"{p} and {first} are one file (a link): labels or splits would "
                             "mix")

def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` whose names do not start with "." (.ipynb_checkpoints, ._x.jpg)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))

def _read_image(path: Path) -> np.ndarray:
    """Decode one 32x32 RGB image, naming the file if it is corrupt or wrongly sized."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # raised, not printed
            with Image.open(path) as im:  # the decoder's raw mode says 16 bits: "RGB;16B", ...
                wide = ";16" in str(im.tile[0][3] if im.tile else "")
                mode, arr = im.mode, np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"Cannot read image {path}: {e}") from e
    if wide or mode in ("I", "F") or mode.startswith("I;"):  # 16-bit or float: convert()
        # clips grey at 255, and keeps only the high byte of 16-bit colour
        raise ValueError(f"Image {path} has {'16-bit ' * wide}{mode} pixels: save it with 8 "
                         "bits per channel")
    if arr.shape != (32, 32, 3):
        raise ValueError(f"Image {path} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
    return arr

def _load_image_folder(root: Path, splits: Sequence[str]) -> CifarData:
    """Read ``train/<class>/*`` and ``test/<class>/*`` (the images of ``splits``); anything that
    would not be read (a stray file, a sub-folder, another format) is refused, since skipping
    it changes the task."""
    found = {split: _visible(root / split) for split in ("train", "test")}
    for p in (p for entries in found.values() for p in entries if not p.is_dir()):
        raise ValueError(f"{p} is a file where only class folders belong")
    folders = [p for entries in found.values() for p in entries]
    resolved = [p.resolve() for p in folders]
    for p in (p for p, r in zip(folders, resolved) if resolved.count(r) > 1):
        raise ValueError(f"{p} is another class folder too (a link): labels or splits would mix")
    classes = [p.name for p in found["train"]]
    if not classes:
        raise ValueError(f"{root}/train holds no class folders. " + _HOW_TO_GET_DATA)
    if [p.name for p in found["test"]] != classes:
        only_tr = sorted(set(classes) - {p.name for p in found["test"]}) or "none"
        only_te = sorted({p.name for p in found["test"]} - set(classes)) or "none"
        raise ValueError(f"{root}/train and {root}/test hold different class folders: "
                         f"only in train: {only_tr}; only in test: {only_te}")
    files = {split: [(p, label) for label, name in enumerate(classes)
                     for p in _visible(root / split / name)] for split in found}
    for p, _ in files["train"] + files["test"]:
        if not p.is_file() or p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            what = ("a folder inside a class folder" if p.is_dir() else "not a file" if not
                    p.is_file() else "not a PNG or JPEG file")  # not a file: a pipe would hang
            raise ValueError(f"{p} is {what}, so it would not be read: move, convert or remove it")
    _refuse_one_file_twice([p for split in files.values() for p, _ in split],
                           lambda p: p.parent.parent.name + "/" + p.parent.name)
    arrays = []
    for split in ("train", "test"):
        chosen = files[split] if split in splits else []
        arrays += ([np.stack([_read_image(p) for p, _ in chosen]),
                    np.asarray([label for _, label in chosen], np.int64)] if chosen else _NO_IMAGES)
    return CifarData(*arrays, tuple(classes), f"image folder {root.name}")

_HOW_TO_GET_DATA = (
    "Accepted layouts: (a) torchvision's download, (b) an official "
    "'cifar-10-batches-py' folder (data_batch_1..5, test_batch) in the folder or as it, (c) an "
    "image-folder tree train/<class>/*.png|jpg and test/<class>/*. Get the data from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, or let torchvision download it "
    "(download=True; on the command line --download).")

def _find_layout(root: Path) -> tuple[Callable[[Path], CifarData], Path] | None:
    """The reader of the layout ``root`` holds, and where; or None."""
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return _load_batches, cand
    return (_load_image_folder, root) if (root / "train").is_dir() and \
        (root / "test").is_dir() else None

def _download(root: Path, timeout: float) -> None:
    """Download CIFAR-10 with torchvision into ``root``; a silent server fails after timeout s."""
    from torchvision.datasets import CIFAR10
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen calls take no timeout of their own
    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except Exception as e:  # network and disk errors come in many types
        timed_out = TimeoutError in (type(e), type(getattr(e, "reason", None)))
        why = f"the server sent nothing for {timeout:g} s" if timed_out else str(e).rstrip(".")
        raise RuntimeError(f"Downloading CIFAR-10 into {root} failed: {why}. "
                           + _HOW_TO_GET_DATA) from e
    finally:
        socket.setdefaulttimeout(old)

def load_cifar10(data_dir: str | os.PathLike, download: bool = False, timeout: float = 60.0,
                 splits: Sequence[str] = ("train", "test")) -> CifarData:
    """Load CIFAR-10 from ``data_dir`` in any supported layout, downloading only if asked
    (``timeout``: seconds of silence before a download gives up). Hidden names are skipped;
    a class without images in a split is refused. A split left out of ``splits`` is not read
    (its arrays are empty)."""
    if not splits or not set(splits) <= {"train", "test"}:  # a typo would read nothing
        raise ValueError(f"splits: expected 'train' and/or 'test', got {splits!r}")
    root = Path(data_dir).expanduser()
    found = _find_layout(root) if root.is_dir() else None
    if found is None and download:
        _download(root, timeout)
        found = _find_layout(root)
    if found is None:
        raise FileNotFoundError(f"No CIFAR-10 data found in {root.resolve()}. " + _HOW_TO_GET_DATA)
    data = found[0](found[1], splits)
    for split, y in (("train", data.y_train), ("test", data.y_test)):
        if split not in splits:
            continue
        if len(y) and not 0 <= y.min() <= y.max() < len(data.classes):
            raise ValueError(f"{found[1]}: {split} labels run from {y.min()} to {y.max()}, but "
                             f"there are {len(data.classes)} classes")
        empty = [c for c, n in zip(data.classes, np.bincount(y, minlength=len(data.classes)))
                 if n == 0]  # a class missing from a split changes the task
        if empty:
            raise ValueError(f"{found[1]}: the {split} split has no images of class "
                             f"{', '.join(map(repr, empty))}; every class needs images in "
                             "both splits")
    return data

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
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and len(images) and images.shape[-1] <= 4):  # else the figures come out as nonsense
        raise ValueError("expected a non-empty uint8 array of images (N, H, W, C), as "
                         f"load_cifar10 gives, got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ValueError(f"chunk: expected an integer >= 1, got {chunk!r}")
    c = images.shape[-1]
    s, s2, n, varies = np.zeros(c), np.zeros(c), 0, np.zeros(c, bool)
    for i in range(0, len(images), chunk):
        block = images[i:i + chunk].reshape(-1, c)
        varies |= (block != images[0, 0, 0]).any(0)
        block = block.astype(np.float64) / 255.0
        s += block.sum(0)
        s2 += (block ** 2).sum(0)
        n += len(block)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    std[~varies] = 0.0  # exactly, not the 1e-8 that rounding leaves (a channel to refuse)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# =========================================================================== augmentation
# The exercise's wording (albumentations 1.x) against the 2.x API used here, and why.
AUGMENTATION_MAPPING = [
    ("HorizontalFlip(p)", "HorizontalFlip(p)", "unchanged"),
    ("ShiftScaleRotate(shift_limit=0.0625, scale_limit=0.1, rotate_limit=15)",
     "Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), "
     "keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101)",
     "ShiftScaleRotate drew one scale factor for both axes (Affine: keep_ratio=True) and "
     "reflected the border (Affine: black unless set); since 2.0 it is an Affine that warns"),
    ("CoarseDropout(max_holes=1, max_height=16, max_width=16, min_holes=1, "
     "min_height=16, min_width=16, fill_value=mean, mask_fill_value=None)",
     "CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), "
     "hole_width_range=(16, 16), fill=mean * 255, fill_mask=None)",
     "renamed: the *_range arguments came in 1.4.5, fill and fill_mask in 1.4.22, and 2.0 "
     "removed the old names: an old name is ignored with only a warning and the defaults "
     "apply (1-2 holes of 10-20% of the side, filled black). The fill is in pixel units "
     "because the hole is cut before normalisation")]

def exercise_augmentations(mean: Sequence[float], p_flip: float = Recipe.p_flip,
                           p_affine: float = Recipe.p_affine, p_dropout: float = Recipe.p_dropout,
                           seed: int | None = None, record: bool = False) -> Any:
    """The exercise's three augmentations on uint8 images (``record``: name what fired)."""
    import albumentations as A
    import cv2
    fill = tuple(float(m) * 255.0 for m in mean)  # the dataset mean in pixel units
    return A.Compose([
        A.HorizontalFlip(p=p_flip),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101, p=p_affine),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16),
                        hole_width_range=(16, 16), fill=fill, fill_mask=None, p=p_dropout),
    ], seed=seed, save_applied_params=record)

class EpochAugment:
    """``augment`` whose random stream restarts from (seed, epoch) at every ``set_epoch``, so
    that a resumed run draws what an uninterrupted one would (also an epoch begun again after
    a stop); the epoch and a count of the calls sit in shared memory, where persistent loader
    workers (each seeded by ``set_random_seed``) see them."""

    def __init__(self, augment: Any, seed: int) -> None:
        self.augment = augment
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, calls
        self.set_random_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` (0-based) from its start, from now on."""
        self._epoch[0] = epoch
        self._epoch[1] += 1

    def set_random_seed(self, seed: int) -> None:
        """Base seed of the per-epoch streams (a loader worker calls this once it starts)."""
        self.seed, self._applied = seed, None

    def __call__(self, **data: Any) -> dict:
        epoch, calls = self._epoch.tolist()
        if (epoch, calls) != self._applied:
            self.augment.set_random_seed(_derive_seed(self.seed, epoch))
            self._applied = epoch, calls
        return self.augment(**data)


# =========================================================================== loaders
class EpochSampler(Sampler):
    """A random order of ``n`` indices that is a pure function of (seed, epoch): a run resumed
    at epoch k sees the orders an uninterrupted one would (each pass counts the epoch on)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (0-based) for the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch))
        yield from torch.randperm(self.n, generator=g).tolist()

class CifarDataset(Dataset):
    """uint8 images (N, 32, 32, 3) and labels; items are uint8 HWC tensors after ``transform``
    (float conversion and normalisation happen later, on the device, in whole batches)."""

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
    """Fixed images as one uint8 tensor on ``device``, in batches (128 on a CPU, else 1,000)."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 device: torch.device | str = "cpu", batch_size: int | None = None) -> None:
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size = batch_size or (128 if torch.device(device).type == "cpu" else 1000)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]

def _channels_last(device: torch.device) -> bool:
    """Whether to use the channels-last memory layout: faster on CPUs and CUDA GPUs."""
    return device.type in ("cpu", "cuda")

def to_input(x: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 NHWC batch (tensor or array) to a float NCHW batch on ``device`` (channels-last
    where faster)."""
    given = x
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:  # as load_cifar10 gives them
        x = torch.from_numpy(x.copy())  # (any strides: a view such as x[:, :, ::-1] too)
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 4
            and x.shape[-1] == 3):  # floats in 0..1 or NCHW would score near chance, silently
        raise ValueError(f"expected a uint8 tensor of images (N, H, W, 3) or such a NumPy "
                         f"array, raw pixels 0..255; got {type(given).__name__} "
                         f"{getattr(given, 'dtype', '')} {tuple(getattr(given, 'shape', ()))}")
    device = torch.device(device)
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x if _channels_last(device) else x.contiguous()

def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from torch's seed."""
    info = torch.utils.data.get_worker_info()
    if hasattr(info.dataset.transform, "set_random_seed"):
        info.dataset.transform.set_random_seed(info.seed % 2 ** 32)

def make_loaders(train_ds: CifarDataset, test_ds: CifarDataset, batch_size: int,
                 device: torch.device | str, seed: int, num_workers: int | None = None
                 ) -> tuple[DataLoader, TensorBatches]:
    """Training loader (shuffled by ``seed`` and the epoch alone, drops a last partial batch)
    and the test set as a tensor. Workers: up to 8 on CUDA, none on a CPU or an Apple GPU
    (a CPU's training threads already use every core)."""
    if test_ds.transform is not None:
        raise ValueError("make_loaders: the test images are scored as they are: build their "
                         "CifarDataset without a transform")
    device = torch.device(device)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    train = DataLoader(train_ds, batch_size=batch_size, sampler=EpochSampler(len(train_ds), seed),
                       drop_last=len(train_ds) > batch_size, num_workers=num_workers,
                       pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                       worker_init_fn=_seed_worker,
                       generator=torch.Generator().manual_seed(_derive_seed(seed, -1)),
                       prefetch_factor=4 if num_workers > 0 else None)
    return train, TensorBatches(test_ds.images, test_ds.labels, device)


# =========================================================================== model
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}  # Recipe.act

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
    """3x3 convolution, BatchNorm, activation; padding keeps the size at stride 1."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 act: str = Recipe.act) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), ACTIVATIONS[act]())

class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 conv (one filter per channel), pointwise 1x1 conv, BatchNorm, activation:
    one factorised 3x3 conv (as in Xception), with far fewer parameters and multiply-adds.
    ``padding`` None keeps the size at stride 1; 0 lets a dilated kernel shrink the map."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 act: str = Recipe.act, padding: int | None = None) -> None:
        pad = dilation if padding is None else padding
        super().__init__(nn.Conv2d(cin, cin, 3, stride, padding=pad, dilation=dilation,
                                   groups=cin, bias=False),
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
    ``dilated_downs`` (the extra credit): C4's downsampler (1), or C3's and C4's (2), shrinks
    the map with an unpadded 3x3 kernel of dilation 2 instead of a stride: C4 8x8 -> 4x4, or
    C3 16x16 -> 12x12 and C4 12x12 -> 8x8 (2: larger maps, more multiply-adds, same
    parameters).
    The input is raw pixels (0..255); ``InputNorm`` normalises them with ``mean`` and ``std``.
    """

    def __init__(self, widths: Sequence[int] = Recipe.widths,
                 depths: Sequence[int] = Recipe.depths, num_classes: int = 10,
                 act: str = Recipe.act, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD,
                 dilated_downs: int = Recipe.dilated_downs) -> None:
        super().__init__()
        (c1, c2, c3, c4), (d1, d2, d3, d4) = widths, depths

        def down(cin: int, cout: int, dilated: bool) -> nn.Module:
            if dilated:  # 3x3 taps 2 apart span 5x5: unpadded, n x n shrinks to n-4 x n-4
                return DepthwiseSeparable(cin, cout, act=act, dilation=2, padding=0)
            return DepthwiseSeparable(cin, cout, stride=2, act=act)

        def conv_block(c: int, dilation: int = 1) -> nn.Module:
            return Residual(ConvBNAct(c, c, dilation=dilation, act=act), ConvBNAct(c, c, act=act))

        def dws_block(c: int) -> nn.Module:
            return Residual(DepthwiseSeparable(c, c, act=act), DepthwiseSeparable(c, c, act=act))

        self.norm = InputNorm(mean, std)
        self.c1 = nn.Sequential(ConvBNAct(3, c1, act=act), *[conv_block(c1) for _ in range(d1)])
        self.c2 = nn.Sequential(ConvBNAct(c1, c2, stride=2, act=act),
                                *[conv_block(c2, 2 if i == 0 else 1) for i in range(d2)])
        self.c3 = nn.Sequential(down(c2, c3, dilated_downs >= 2),
                                *[dws_block(c3) for _ in range(d3)])
        self.c4 = nn.Sequential(down(c3, c4, dilated_downs >= 1),
                                *[dws_block(c4) for _ in range(d4)])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(c4, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before global average pooling."""
        return self.c4(self.c3(self.c2(self.c1(self.norm(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gap(self.features(x)))

def build_model(recipe: Recipe, num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                std: Sequence[float] = CIFAR10_STD) -> Net:
    """The recipe's ``Net`` (widths, depths, activation, dilated downsamplers)."""
    return Net(recipe.widths, recipe.depths, num_classes, recipe.act, mean, std,
               recipe.dilated_downs)

def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen ones included)."""
    return sum(p.numel() for p in model.parameters())

def _trace_layers(model: nn.Module, input_size: int = 32) -> list[dict]:
    """Run one forward pass and record each conv, pool and linear layer in execution order."""
    records: list[dict] = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear)
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        records.append(dict(module=mod, name=names[mod], in_shape=tuple(inp[0].shape),
                            out_shape=tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records

def count_macs(model: nn.Module, input_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass per image (convolutions and linear layers)."""
    total = 0
    for r in _trace_layers(model, input_size):
        m = r["module"]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += int(np.prod(r["out_shape"][1:])) * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


# =========================================================================== rules and RF
def _pair(v: Any) -> int:
    return v[0] if isinstance(v, tuple) else v

def _block_of(name: str) -> str:
    head = name.split(".")[0]
    return head.upper() if head in ("c1", "c2", "c3", "c4") else "-"

def _layer_label(model: nn.Module, name: str) -> str:
    """A readable name for layer ``name`` of a ``Net`` ("residual 1, conv 2"), else its path."""
    parts = name.split(".")
    if len(parts) < 2 or _block_of(name) == "-":
        return name
    words: list[str] = []
    parent, prev = getattr(model, parts[0]), ""
    for key in parts[1:]:
        child = parent._modules[key]
        if isinstance(child, Residual):
            siblings = [m for m in parent.children() if isinstance(m, Residual)]
            words.append(f"residual {siblings.index(child) + 1}")
        elif isinstance(child, (ConvBNAct, DepthwiseSeparable)):
            sep, first = isinstance(child, DepthwiseSeparable), child[0]
            if prev == "body":  # one of the two convs of a residual block
                words.append(f"{'separable' if sep else 'conv'} {int(key) + 1}")
            elif _pair(first.stride) > 1 or _pair(first.padding) < _pair(first.dilation) * (
                    _pair(first.kernel_size) - 1) // 2:  # strided, or padded too little to
                words.append("downsample")  # keep the size
            else:
                words.append("stem" if parts[0] == "c1" and key == "0" and not prev
                             else "separable" if sep else "conv")
        elif isinstance(child, nn.Conv2d) and isinstance(parent, DepthwiseSeparable):
            words.append("depthwise" if child.groups > 1 else "pointwise")
        parent, prev = child, key
    return ", ".join(words) or name

def receptive_field_table(model: nn.Module, input_size: int = 32) -> Any:
    """RF table from the model's conv and pool layers in the order they run: for kernel k,
    dilation d, stride s, padding p, k_eff = d(k-1)+1, n_out = floor((n_in + 2p - k_eff)/s) + 1,
    rf_out = rf_in + (k_eff-1)*j_in, j_out = j_in*s (identity skips: the chain of convs)."""
    import pandas as pd
    rows, n, j, r = [], input_size, 1, 1
    for rec in _trace_layers(model, input_size):
        m = rec["module"]
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1))
        n_in, j_in, r_in = n, j, r
        n = (n + 2 * p - d * (k - 1) - 1) // s + 1
        r, j = r + d * (k - 1) * j_in, j_in * s
        kind = ("depthwise" if m.groups > 1 else "pointwise" if k == 1 else "conv") \
            if isinstance(m, nn.Conv2d) else type(m).__name__
        rows.append(dict(block=_block_of(rec["name"]), layer=_layer_label(model, rec["name"]),
                         kind=kind, kernel=k, stride=s, dilation=d, padding=p, n_in=n_in,
                         n_out=n, jump_in=j_in, jump_out=j, rf_in=r_in, rf_out=r,
                         module=rec["name"]))
        assert n == rec["out_shape"][-1], f"size mismatch at {rec['name']}"
    return pd.DataFrame(rows)

def empirical_receptive_field(model: nn.Module, input_size: int = 128) -> int:
    """RF measured as the extent of input rows with non-zero gradient for one centre unit
    (square kernels: the columns' extent is the same; where it reaches the input's border,
    measured again on one twice as large, up to 1024)."""
    model = copy.deepcopy(model).cpu().double().eval()  # on the CPU: MPS has no float64
    feats = getattr(model, "features", model)
    x = torch.randn(1, 3, input_size, input_size, dtype=torch.float64, requires_grad=True)
    out = feats(x)
    out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()  # the centre unit
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1)).flatten()
    if len(rows) == 0:
        raise ValueError("empirical_receptive_field: the centre unit's gradient is zero everywhere")
    if (rows.min() == 0 or rows.max() == input_size - 1) and input_size < 1024:  # cut off
        return empirical_receptive_field(model, 2 * input_size)  # by the input's border
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
        kind = ("depthwise conv" if m.groups > 1 else "conv") if isinstance(m, nn.Conv2d) \
            else type(m).__name__
        what = (f"{kind} {k}x{k}, stride {s}, dilation {d}: "
                f"{n_in}x{n_in} -> {n_out}x{n_out} ({rec['name']})")
        found.append((f"{block} {label}" if block != "-" else label, what,
                      isinstance(m, nn.Conv2d) and k == 3 and (s == 2 or d > 1)))
    return found

def check_rules(model: nn.Module, input_size: int = 32) -> Any:
    """The exercise's rules, each measured and passed or failed, as a DataFrame; each layer
    that shrinks the feature map gets a row of its own after the row that counts them."""
    import pandas as pd
    recs = _trace_layers(model, input_size)
    convs = [r["module"] for r in recs if isinstance(r["module"], nn.Conv2d)]
    dw_sep = sum(1 for a, b in zip(convs, convs[1:])
                 if a.groups > 1 and a.groups == a.in_channels and b.kernel_size == (1, 1)
                 and b.groups == 1 and b.in_channels == a.out_channels)
    dilated = sum(1 for c in convs if max(c.dilation) > 1)
    gap = [r for r in recs if r["out_shape"][-2:] == (1, 1) and (  # AvgPool2d(4) on 4x4 counts
        isinstance(r["module"], nn.AdaptiveAvgPool2d) or isinstance(r["module"], nn.AvgPool2d)
        and _pair(r["module"].kernel_size) >= r["in_shape"][-1])]
    blocks = [n for n in ("c1", "c2", "c3", "c4") if hasattr(model, n)]
    rf = int(receptive_field_table(model, input_size)["rf_out"].iloc[-1])
    downs, n_params = _downsamplers(model, recs), count_parameters(model)
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
         len(downs) == 3 and all(ok for *_, ok in downs))]
    rules += [(f"downsampling: {where}", "3x3 conv, stride 2 (or dilated)", what, ok)
              for where, what, ok in downs]
    return pd.DataFrame(rules, columns=["rule", "required", "measured", "passed"])


# =========================================================================== training
@dataclass
class Training:
    """The moving parts of one training run: the model and what updates it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer   # SGD, Nesterov momentum (MuonSGD with Recipe.muon_lr)
    scheduler: Any                     # OneCycle, stepped every batch (None: a constant lr)
    criterion: nn.Module               # cross-entropy with the recipe's label smoothing
    scaler: torch.amp.GradScaler       # float16 loss scaling on CUDA, a no-op elsewhere
    device: torch.device

def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: ``g`` (a row per output channel) moved towards
    the nearest semi-orthogonal matrix (singular values near 1, not exactly 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.reshape(len(g), -1)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # rows <= columns: the Gram matrix below is the smaller one
    x = x / (x.norm() + 1e-7)  # every singular value now <= 1
    for _ in range(steps):  # s -> a*s + b*s^3 + c*s^5: small ones grow 3.4x a step, most
        # end near 0.7-1.2 (the tiniest stay smaller)
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).reshape(g.shape)

class MuonSGD(torch.optim.Optimizer):
    """Muon for the param groups marked ``muon``, SGD (Nesterov, L2 weight decay) for the rest."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.9) -> None:
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """One step with Nesterov momentum, as ``torch.optim.SGD`` takes it; a Muon weight is
        first rescaled to norm sqrt(output channels) (BatchNorm follows it, so the output does
        not change, and each step changes the weight by about ``lr`` of its size), and its step
        is the momentum orthogonalised."""
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in (p for p in group["params"] if p.grad is not None):
                # a Muon weight's norm is fixed by the rescaling: weight decay would do nothing
                g = p.grad if group["muon"] else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(g)
                g = g.add(state["momentum_buffer"], alpha=mu)
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    g = orthogonalise(g)
                p.add_(g, alpha=-lr)

def start_training(model: nn.Module, recipe: Recipe, steps_per_epoch: int) -> Training:
    """The optimizer, schedule, loss and scaler for ``model`` (already on its device, whose
    memory layout is switched to channels-last in place on a CPU or a CUDA GPU)."""
    device = next(model.parameters()).device
    if _channels_last(device):
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    dense = {id(m.weight) for m in model.modules()  # Muon's: the dense conv weights
             if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.requires_grad}
    dense = dense if recipe.muon_lr > 0 else set()
    # weight decay on conv and linear weights only, not on BatchNorm, biases or Muon's weights
    groups = [dict(params=[p for p in params if p.ndim > 1 and id(p) not in dense],
                   weight_decay=recipe.weight_decay),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0)]
    if dense:  # the dense conv weights: Muon, at their own peak learning rate
        groups.append(dict(params=[p for p in params if id(p) in dense], lr=recipe.muon_lr,
                           muon=True))
        optimizer = MuonSGD(groups, lr=recipe.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    total, scheduler = recipe.epochs * steps_per_epoch, None
    if total >= 4:  # OneCycle needs two warm-up steps: tiny runs stretch the warm-up
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g.get("lr", recipe.lr) for g in groups], total_steps=total,
            div_factor=10.0, pct_start=min(max(recipe.pct_start, 2.0 / total), 0.5),
            final_div_factor=100.0)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return Training(model, optimizer, scheduler, criterion, scaler, device)

def train_step(t: Training, x: torch.Tensor, y: torch.Tensor, check: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch: (loss, correct predictions), on the device.
    ``check`` tests the loss before the update (it waits for a GPU, so fit does it now and then:
    on CUDA the loss scaler skips a step whose gradients are not finite)."""
    x, y = to_input(x, t.device), y.to(t.device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=t.device.type == "cuda"):
        logits = t.model(x)
        loss = t.criterion(logits, y)
    if check and not torch.isfinite(loss):  # before the update: the weights stay finite
        raise FloatingPointError(f"the training loss became {loss.item()}")
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if t.scheduler is not None and t.scheduler.last_epoch == 0:
        with warnings.catch_warnings():  # the scaler may have skipped this first step (float16
            # overflowed): the schedule counts batches all the same, so torch's warning is moot
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            t.scheduler.step()
    elif t.scheduler is not None:
        t.scheduler.step()
    return loss.detach(), (logits.argmax(1) == y).sum()

def _progress(iterable: Iterable, desc: str, enabled: bool) -> Iterator:
    """``iterable`` with a progress bar; in a notebook the bar leaves a line of text when done
    (a saved notebook has no widget left to show)."""
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm as notebook_tqdm
    if not enabled or not issubclass(tqdm, notebook_tqdm):
        yield from tqdm(iterable, desc=desc, leave=False, mininterval=1.0, disable=not enabled)
        return
    from IPython.display import display
    bar = tqdm(iterable, desc=desc, leave=False, mininterval=1.0, display=False)
    shown = display(bar.container, display_id=True)
    try:
        yield from bar
    finally:
        bar.close()
        shown.update({"text/plain": f"{desc}: {bar.n}/{bar.total or bar.n} batches in "
                                    f"{bar.format_dict['elapsed']:.0f} s"}, raw=True)

def train_one_epoch(t: Training, loader: Iterable, progress: bool = True, desc: str = "train"
                    ) -> tuple[float, float, int]:
    """One pass over ``loader``: (mean loss, accuracy, images seen)."""
    t.model.train()
    # Sums stay on the device: reading a GPU number every step would stall the pipeline.
    total_loss = torch.zeros((), dtype=torch.float32 if t.device.type == "mps" else
                             torch.float64, device=t.device)
    correct, seen = torch.zeros((), dtype=torch.long, device=t.device), 0
    for step, (x, y) in enumerate(_progress(loader, desc, progress)):
        loss, right = train_step(t, x, y, check=t.device.type != "cuda" or step % 50 == 0)
        total_loss += loss * len(y)
        correct += right
        seen += len(y)
    if not torch.isfinite(total_loss):
        raise FloatingPointError("the training loss became nan or inf during the epoch")
    return total_loss.item() / seen, correct.item() / seen, seen

def fit(model: nn.Module, recipe: Recipe, train_loader: DataLoader, eval_batches: Iterable,
        checkpoint: str | os.PathLike | None = None, resume: bool = False,
        progress: bool = True, log: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Train ``model`` (on its device) by ``recipe``; return one history row per epoch.

    ``eval_batches`` are scored after each epoch for the log only: no epoch is picked by its
    score, and ``model`` keeps the last epoch's weights. ``checkpoint`` is saved after every
    epoch; ``resume`` continues from it (or starts). ``log`` gets the history after each
    epoch (default: print the new row, its scores labelled "test"). A run that diverges stops
    with FloatingPointError before it is saved.
    """
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    if checkpoint is not None and Path(checkpoint).is_dir():  # else it fails after an epoch
        raise ValueError(f"checkpoint {checkpoint} is a folder: give a file path in it")
    t = start_training(model, recipe, len(train_loader))
    transform = getattr(train_loader.dataset, "transform", None)
    run = dict(recipe=asdict(recipe), seed=getattr(train_loader.sampler, "seed", None),
               augment_seed=getattr(transform, "seed", None), steps_per_epoch=len(train_loader),
               train_images=len(train_loader.dataset))  # what its checkpoints must match
    history = _resume(Path(checkpoint), t, run) if resume and Path(checkpoint).is_file() else []
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        start, lr = time.perf_counter(), t.optimizer.param_groups[0]["lr"]
        for part in (transform, train_loader.sampler):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch - 1)
        try:
            loss, acc, seen = train_one_epoch(t, train_loader, progress,
                                              f"epoch {epoch}/{recipe.epochs}")
        except FloatingPointError as e:
            raise FloatingPointError(f"Epoch {epoch}: {e}; stopped before saving "
                                     f"({_saved(checkpoint, epoch)})") from None
        train_seconds = time.perf_counter() - start
        eval_loss, eval_acc = evaluate(model, eval_batches)
        row = dict(epoch=epoch, lr=lr, train_loss=loss, train_acc=acc, eval_loss=eval_loss,
                   eval_acc=eval_acc, train_seconds=train_seconds,
                   seconds=time.perf_counter() - start, images_per_s=seen / train_seconds)
        _stop_if_not_finite(row, model, checkpoint)
        history.append(row)
        if checkpoint is not None:
            save_checkpoint(checkpoint, dict(
                model=model.state_dict(), optimizer=t.optimizer.state_dict(),
                scheduler=t.scheduler.state_dict() if t.scheduler is not None else None,
                scaler=t.scaler.state_dict(), epoch=epoch, history=history, run=run))
        if log is None:
            print(format_row(history[-1], epochs=recipe.epochs))
        else:
            log(history)
    return history

def format_row(row: dict, split: str = "test", epochs: int | None = None) -> str:
    """One history row as a line of text (``split``: what the evaluation scored)."""
    return (f"epoch {row['epoch']:>3}{f'/{epochs}' if epochs else ''}  lr {row['lr']:.4f}  "
            f"train loss {row['train_loss']:.3f} acc {100 * row['train_acc']:.2f}%  "
            f"{split} loss {row['eval_loss']:.3f} acc {100 * row['eval_acc']:.2f}%  "
            f"{row['seconds']:.0f}s ({row['images_per_s']:.0f} img/s)")

def _saved(checkpoint: Any, epoch: int) -> str:
    """What a run stopped during ``epoch`` leaves behind."""
    if checkpoint is None:
        return "nothing was saved"
    return f"{checkpoint} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"

def _first_non_finite(state: dict) -> str | None:
    """The name of the first float tensor in ``state`` holding nan or inf, or None."""
    return next((n for n, t in state.items() if torch.is_tensor(t)
                 and t.dtype.is_floating_point and not torch.isfinite(t).all()), None)

def _stop_if_not_finite(row: dict, model: nn.Module, checkpoint: Any) -> None:
    """Raise FloatingPointError, before anything is saved, if the epoch diverged."""
    bad = [f"{name} holds nan or inf" for name in [_first_non_finite(model.state_dict())] if name]
    if not math.isfinite(row["eval_loss"]):
        bad.insert(0, f"the evaluation loss is {row['eval_loss']}")
    if bad:
        raise FloatingPointError(
            f"Epoch {row['epoch']}: {' and '.join(bad)} (training loss {row['train_loss']:.4g}); "
            f"stopped before saving ({_saved(checkpoint, row['epoch'])})")

@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and labels over uint8 NHWC batches (tta: average with the mirror image);
    ``model`` is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in batches:
        x = to_input(x, device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(x).float()
            if tta:
                out = (out + model(torch.flip(x, dims=[3])).float()) / 2
        logits.append(out)
        labels.append(y.to(device))
    return torch.cat(logits), torch.cat(labels)

def evaluate(model: nn.Module, batches: Iterable, tta: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``batches`` (tta: with the mirror images)."""
    logits, labels = predict_logits(model, batches, tta)
    return (F.cross_entropy(logits, labels).item(),  # accuracy: a count over a count, exactly
            (logits.argmax(1) == labels).sum().item() / len(labels))


# =========================================================================== checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is refused, or does not fit what it is loaded into."""

class WriteError(RuntimeError):
    """A file that could not be written (disk full, file-size limit, permissions)."""

def _remove_temps(path: Path) -> None:
    """Remove the temp files (``NAME.PID.tmp``) that killed writers of ``path`` left beside it;
    a folder or another name is not ours to remove."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        if stale.name[len(path.name) + 1:-4].isdigit() and not stale.is_dir():
            stale.unlink(missing_ok=True)

def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (a temp file, flushed to disk, renamed over
    it; killed writers' temp files removed first); a failure raises WriteError, path intact."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_temps(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)  # after a failure (a rename leaves nothing to remove)

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save ``state`` (a plain dict, the weights under "model") atomically; weights holding
    nan or inf raise FloatingPointError instead."""
    bad = _first_non_finite(state["model"])
    if bad is not None:
        raise FloatingPointError(f"Not saving {path}: {bad} holds nan or inf")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomic(Path(path), buffer.getvalue())

# Recipe fields that runs made before them lack, with the value those runs trained with
_LATER_SETTINGS = {"dilated_downs": 0, "muon_lr": 0.0}

def _with_defaults(run: Any) -> Any:
    """``run`` with the later recipe settings it lacks at the values it trained with."""
    if isinstance(run, dict) and isinstance(run.get("recipe"), dict):
        return dict(run, recipe={**_LATER_SETTINGS, **run["recipe"]})
    return run

def _read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's entries, loaded as tensors and plain values only: no code runs (the
    recipe of its run is read with the later settings it lacks at the values it trained with)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            raise CheckpointError(f"{path} is {'empty' if path.is_file() else 'not a file'}")
    except OSError as e:  # a name too long, a loop of links
        raise CheckpointError(f"{path}: {e.strerror}") from None
    try:  # torch.load does not check the zip file's checksums
        with zipfile.ZipFile(path) as z:  # (all CRCs 0: saved without them)
            bad = z.testzip() if any(i.CRC for i in z.infolist()) else None
    except Exception:  # not a zip file, or one too damaged to list: torch.load says which
        bad = None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: {bad} fails its checksum")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: not our news
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what torch raises for anything it will not unpickle
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a torch zip file: nothing more to say about it
            names = []
        raise CheckpointError(
            f"{path} holds {', '.join(names)}: refused, since loading it could run code" if names
            else f"{path} is damaged or not a checkpoint (refused: only tensors and plain "
            "values are loaded)") from None
    except Exception as e:  # a damaged file fails in many ways
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({type(e).__name__})"
                              ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    try:  # the epoch, the history's rows and the run's settings are plain values
        json.dumps([state.get(k) for k in ("epoch", "history", "run")])
        plain = type(state.get("epoch", 0)) is int and all(
            type(row) is dict and all(type(v) in (int, float) for v in row.values())
            for row in state.get("history", [])) and _nesting(state.get("run")) <= _MAX_NESTING
    except (TypeError, ValueError, RecursionError):  # a tensor or an object among them
        plain = False
    if not plain:
        raise CheckpointError(f"{path} is damaged: its epoch, history or run settings are not "
                              "plain values")
    bad = [k for k, v in state["model"].items() if torch.is_tensor(v) and v.is_complex()]
    if bad:  # loaded, the imaginary part would be dropped with a warning
        raise CheckpointError(f"{path} is damaged: {bad[0]} holds complex numbers")
    if "run" in state:
        state["run"] = _with_defaults(state["run"])
    return state

def _nesting(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a plain value is 1), without recursion."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level if isinstance(x, (list, dict))
                 for v in (x.values() if isinstance(x, dict) else x)]
    return depth

_MAX_NESTING = 16  # a run's settings nest 4 deep; far deeper fails later, with a traceback
_ROW_KEYS = ("epoch", "lr", "train_loss", "train_acc", "eval_loss", "eval_acc", "seconds",
             "images_per_s")  # what a run's history rows hold: format_row and summaries read them

def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))

def _differences(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each key of ``new`` that differs in ``old`` (``seed 0 -> 1``)."""
    diffs, old = [], _plain(old)
    for key, b in _plain(new).items():
        a = old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            diffs.append(f"{key} {a!r} -> {b!r}")
    return diffs

def _settings(t: Training) -> list:
    """The optimizer's groups (hyper-parameters) and the schedule's state, but its call count."""
    sched = dict(t.scheduler.state_dict(), _step_count=None) if t.scheduler else None
    return [[{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups],
            sched]

def _settings_after(t: Training, steps: int) -> list:
    """``_settings`` of a fresh ``t`` after ``steps`` steps: what a checkpoint must hold."""
    if t.scheduler is not None:
        with warnings.catch_warnings():  # "a schedule step before an optimizer step": meant
            warnings.simplefilter("ignore")
            t.scheduler.last_epoch = steps - 1
            t.scheduler.step()  # computes the rate and momentum of step ``steps``
    return _settings(t)

def _close(a: Any, b: Any) -> bool:
    """``a == b``, but numbers to 1e-9 (a rate computed by another maths library may differ in
    its last bits), lists and dicts item by item."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and bool not in (type(a),
                                                                                   type(b)):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, dict)) and type(a) is type(b) and len(a) == len(b):
        pairs = zip(a, b) if isinstance(a, list) else ((a[k], b.get(k, ...)) for k in a)
        return all(_close(x, y) for x, y in pairs)
    return a == b

def _same_settings(got: list, expected: list) -> bool:
    """Whether ``got`` holds every setting of ``expected`` at its value: a key that only ``got``
    holds, or that ``expected`` leaves to torch (None), as another torch version saves it, is
    not compared."""
    pairs = list(zip(got[0], expected[0])) + [(got[1] or {}, expected[1] or {})]
    try:
        return len(got[0]) == len(expected[0]) and all(_close(
            _plain({k: g.get(k) for k, v in want.items() if v is not None}),
            _plain({k: v for k, v in want.items() if v is not None})) for g, want in pairs)
    except (TypeError, ValueError):  # a tensor or an object among them
        return False

def _resume(path: Path, t: Training, run: dict) -> list[dict]:
    """Load what the checkpoint at ``path`` holds into ``t``; return its history."""
    state = _read_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "scaler", "run", "history") if k not in state]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}")
    diffs = _differences(state["run"], run) if isinstance(state["run"], dict) else ["run"]
    if diffs:
        raise CheckpointError(f"{path} belongs to another run ({'; '.join(diffs)})")
    lacking = [k for row in state["history"] for k in _ROW_KEYS if k not in row]
    if lacking:  # read once the run has ended
        raise CheckpointError(f"{path} is damaged: a row of its history lacks {lacking[0]}")
    try:
        epochs = [row["epoch"] for row in state["history"]]
        expected = _settings_after(t, len(epochs) * run["steps_per_epoch"])
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        if t.scheduler is not None:
            t.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] != {} or not t.scaler.is_enabled():  # {}: saved where it was off
            t.scaler.load_state_dict(state["scaler"])  # (CPU, MPS): on a GPU it starts afresh
        if any(not torch.is_tensor(v) or v.shape != p.shape for p, s in t.optimizer.state.items()
               for v in s.values()):  # torch checks this only at the next step, if at all
            raise ValueError("the optimizer's state does not match the weights")
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} does not fit this model: {e}") from None
    steps = getattr(t.scheduler, "last_epoch", len(epochs) * run["steps_per_epoch"])
    if epochs != list(range(1, len(epochs) + 1)) or state.get("epoch") != len(epochs) or \
            steps != len(epochs) * run["steps_per_epoch"]:
        raise CheckpointError(f"{path} is damaged: its history, epoch and schedule disagree")
    if not _same_settings(_settings(t), expected):  # what torch would fail on, or train with
        raise CheckpointError(f"{path} is damaged: its optimizer or schedule settings are not "
                              "those its recipe makes")
    return list(state["history"])

def _same_weights(path: Path, want: dict) -> bool:
    """Whether the weights file at ``path`` reads and holds what ``want`` holds."""
    try:
        got = _read_checkpoint(path)
    except CheckpointError:  # missing or damaged
        return False
    try:
        same = got["model"].keys() == want["model"].keys() and all(
            torch.equal(got["model"][k], v) for k, v in want["model"].items())
    except (TypeError, RuntimeError):  # not a tensor where one belongs
        return False
    return same and _plain([got.get("run"), got.get("history")]) == _plain(
        [_with_defaults(want["run"]), want["history"]])  # as _read_checkpoint reads it

def save_weights(path: str | os.PathLike, model: nn.Module, run: dict,
                 history: Sequence[dict] = ()) -> None:
    """Save the weights with ``run`` (its "recipe", data, normalisation) and ``history``."""
    save_checkpoint(path, dict(model=model.state_dict(), run=_plain(run),
                               history=_plain(list(history))))  # numpy floats as floats

def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Net, dict]:
    """The ``Net`` of a weights file or checkpoint, in eval mode, and all the file holds."""
    state = _read_checkpoint(path)
    try:
        recipe, classes = Recipe(**state["run"]["recipe"]), len(state["model"]["out.1.bias"])
        with torch.device("meta"):  # shapes only: a net too large to build is not built
            model = build_model(recipe, num_classes=classes)
        want = model.state_dict()
        if want.keys() != state["model"].keys() or any(
                tuple(state["model"][k].shape) != tuple(v.shape) for k, v in want.items()):
            raise ValueError("its tensors are not those of its recipe's net")
        model = model.to_empty(device="cpu")  # memory only: every tensor comes from the file
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} holds no model of this project ({e})") from None
    bad = _first_non_finite(state["model"])  # either would be scored without a word
    negative = [k for k, v in state["model"].items() if k.endswith("running_var") and (v < 0).any()]
    if bad is not None or negative:
        raise CheckpointError(f"{path} is damaged: " + (f"{bad} holds nan or inf" if bad else
                                                        f"{negative[0]} holds a negative variance"))
    return model.to(device).eval(), state


# =========================================================================== reports
def predict(model: nn.Module, batches: Iterable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted labels, true labels and each image's cross-entropy, in order."""
    logits, labels = predict_logits(model, batches)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return logits.argmax(1).cpu().numpy(), labels.cpu().numpy(), losses.cpu().numpy()

def hardest_mistakes(labels: np.ndarray, preds: np.ndarray, losses: np.ndarray, n: int
                     ) -> np.ndarray:
    """Indices of the ``n`` wrong predictions with the highest loss (the least probability
    given to the true class)."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(preds))
    return wrong[np.argsort(-np.asarray(losses)[wrong], kind="stable")][:n]

def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true labels as rows and predictions as columns."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if not (labels.ndim == 1 and labels.shape == preds.shape and all(
            np.issubdtype(a.dtype, np.integer) and ((0 <= a) & (a < num_classes)).all()
            for a in (labels, preds))):
        raise ValueError("expected labels and predictions as two vectors of one length, of "
                         f"integers in 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm

def confused_pairs(cm: np.ndarray, classes: Sequence[str], n: int = 5) -> Any:
    """The ``n`` most frequent mistakes: true class, predicted class, count, share of the class."""
    import pandas as pd
    cm = np.asarray(cm)
    if not (cm.ndim == 2 and cm.shape == (len(classes),) * 2 and cm.dtype.kind in "iu"):
        raise ValueError(f"expected counts (confusion_matrix's integers) in a {len(classes)}x"
                         f"{len(classes)} matrix, got {cm.dtype} {cm.shape}: rows in % would "
                         "be read as images")
    off = cm.astype(float) * (1 - np.eye(len(cm)))
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    rows = [(classes[i], classes[j], int(cm[i, j]), 100 * cm[i, j] / max(cm[i].sum(), 1))
            for i, j in zip(*np.unravel_index(order, cm.shape)) if off[i, j] > 0]
    return pd.DataFrame(rows, columns=["true", "predicted", "images", "% of the true class"])

def class_report(labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]) -> Any:
    """Precision, recall (the class's accuracy) and F1 in %, and the images of each class."""
    import pandas as pd
    from sklearn.metrics import precision_recall_fscore_support
    confusion_matrix(labels, preds, len(classes))  # refuses a label outside the classes
    p, r, f1, support = precision_recall_fscore_support(
        labels, preds, labels=list(range(len(classes))), zero_division=0)
    return pd.DataFrame({"precision %": 100 * p, "recall %": 100 * r, "F1 %": 100 * f1,
                         "images": support}, index=pd.Index(classes, name="class")).round(1)

def _unit_centres(model: nn.Module, layer: nn.Module, input_size: int) -> tuple[float, int]:
    """Where the units of ``layer``'s output sit on the input: (the first one's receptive-field
    centre, the spacing between them), from the convs that run up to it (padding p of a kernel
    spanning k_eff moves the centre by ((k_eff - 1)/2 - p) * jump_in)."""
    table = receptive_field_table(model, input_size)
    name = next(n for n, m in model.named_modules() if m is layer)
    mine = [i for i, m in enumerate(table.module) if m == name or m.startswith(f"{name}.")
            or not name]
    if not mine:
        raise ValueError(f"grad_cam: the layer {name!r} holds no conv or pooling layer")
    centre = sum((r.dilation * (r.kernel - 1) / 2 - r.padding) * r.jump_in
                 for r in table.iloc[:mine[-1] + 1].itertuples())
    return float(centre), int(table.jump_out.iloc[mine[-1]])

def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module,
             class_idx: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in 0..1 for ``class_idx`` (default: the prediction), each
    of ``layer``'s units drawn at the centre of its receptive field."""
    if not any(m is layer for m in model.modules()):
        raise ValueError("grad_cam: layer is not a part of model")
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
    # each unit's value placed at the centre of its receptive field, bilinear in between
    centre, jump = _unit_centres(model, layer, x.shape[-1])
    g = [2 * (torch.arange(n, device=cam.device) - centre) / jump / max(m - 1, 1) - 1
         for n, m in zip(x.shape[-2:], cam.shape[-2:])]  # pixel -> unit: -1..1 over the units
    grid = torch.stack(torch.meshgrid(g[1], g[0], indexing="xy"), -1).to(cam.dtype)
    cam = F.grid_sample(cam, grid.expand(len(cam), -1, -1, -1), padding_mode="border",
                        align_corners=True)[:, 0]
    cam = cam - cam.amin((1, 2), keepdim=True)
    return (cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-8)).detach().cpu().numpy()


# =========================================================================== plots
def _image_grid(panels: Sequence[tuple], cols: int, size: float = 1.6) -> Any:
    """A figure of (image, title[, heat map]) panels, ``cols`` to a row, axes hidden."""
    import matplotlib.pyplot as plt
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, title, *heat) in zip(axes.flat, panels):
        if image is None:
            continue
        ax.imshow(image)
        if heat and heat[0] is not None:
            ax.imshow(heat[0], cmap="jet", alpha=0.45)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig

def plot_samples(images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 per_class: int = 8, seed: int = 0) -> Any:
    """One row per class: ``per_class`` random images of it, the class named above the first."""
    rng, panels = np.random.default_rng(seed), []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(np.asarray(labels) == c)
        picks = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
        panels += [(images[i], name if k == 0 else "") for k, i in enumerate(picks)]
        panels += [(np.full_like(images[0], 255), "")] * (per_class - len(picks))
    return _image_grid(panels, per_class, size=1.2)

_SHORT_NAMES = {"HorizontalFlip": "flip", "Affine": "affine", "CoarseDropout": "cutout"}

def plot_pipeline(rows: Sequence[tuple[np.ndarray, Callable]], n_aug: int = 9) -> Any:
    """One row per (image, augment): the image, then ``n_aug`` copies titled by what fired.

    Each augment must record what it applied (``exercise_augmentations(..., record=True)``).
    """
    panels = []
    for image, augment in rows:
        panels.append((image, "original"))
        for _ in range(n_aug):
            out = augment(image=image)
            fired = [_SHORT_NAMES.get(name, name) for name, _ in out["applied_transforms"]]
            panels.append((out["image"], " + ".join(fired) or "unchanged"))
    return _image_grid(panels, n_aug + 1)

def plot_history(history: Sequence[dict], split: str = "test") -> Any:
    """Loss, accuracy and learning rate per epoch; ``split`` names what was evaluated."""
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="tight")
    for ax, what, scale in ((axes[0], "loss", 1), (axes[1], "acc", 100)):
        ax.plot(ep, [scale * h[f"train_{what}"] for h in history], marker="o",
                label="train (augmented)")
        ax.plot(ep, [scale * h[f"eval_{what}"] for h in history], marker="o", label=split)
    axes[1].axhline(85, color="grey", ls="--", lw=1, label="85% target")
    axes[2].plot(ep, [h["lr"] for h in history], marker="o")
    for ax, title in zip(axes, ("loss (train's with label smoothing)", "accuracy (%)",
                                "SGD's learning rate at epoch start")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    return fig

def plot_mistakes(model: nn.Module, layer: nn.Module, images: np.ndarray, labels: np.ndarray,
                  preds: np.ndarray, idx: Sequence[int], classes: Sequence[str]) -> Any:
    """Each image of ``idx`` (true -> predicted) above its Grad-CAM map for the prediction."""
    cols = min(5, max(1, len(idx)))
    if len(idx) == 0:
        return _image_grid([], cols)
    device = next(model.parameters()).device
    cams = grad_cam(model, to_input(images[idx], device), layer,
                    [int(preds[i]) for i in idx])
    panels: list[tuple] = []
    for start in range(0, len(idx), cols):  # a row of images, then a row of their maps
        row = list(idx[start:start + cols])
        panels += [(images[i], f"{classes[labels[i]]} -> {classes[preds[i]]}") for i in row]
        panels += [(None, "")] * (cols - len(row))
        panels += [(images[i], "Grad-CAM", cams[start + k]) for k, i in enumerate(row)]
        panels += [(None, "")] * (cols - len(row))
    return _image_grid(panels, cols, size=2.0)

def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str]) -> Any:
    """The confusion matrix with each row as % of its true class, to 0.1 (rows sum to 100)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    share = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 6.5), layout="tight")
    sns.heatmap(share, annot=True, fmt=".1f", annot_kws={"size": 9}, cmap="Blues",
                xticklabels=classes, yticklabels=classes, ax=ax, cbar=False, vmin=0, vmax=100)
    ax.set(xlabel="predicted", ylabel="true", title="% of each true class")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")  # no touching
    return fig

def plot_receptive_field(table: Any) -> Any:
    """Receptive field after each layer of a ``receptive_field_table``, with the 44 bar."""
    import matplotlib.pyplot as plt
    colors = {"conv": "tab:blue", "depthwise": "tab:orange", "pointwise": "tab:grey"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(table) + 1.2), layout="tight")
    y = np.arange(len(table))[::-1]
    for kind in table["kind"].unique():  # one colour, and one legend entry, per kind of layer
        rows = (table["kind"] == kind).to_numpy()
        ax.barh(y[rows], table["rf_out"][rows], color=colors.get(kind, "tab:green"), label=kind)
    for yi, row in zip(y, table.itertuples()):
        note = f"  stride {row.stride}" if row.stride > 1 else \
            f"  dilation {row.dilation}" if row.dilation > 1 else ""
        ax.text(row.rf_out + 1, yi, f"{row.rf_out}{note}", va="center", fontsize=9,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5))  # legible on the 44 line
    ax.set_yticks(y, [f"{r.block} {r.layer} ({r.n_out}x{r.n_out})" for r in table.itertuples()],
                  fontsize=9)
    ax.axvline(44, color="red", ls="--", lw=1, label="rule: RF > 44")
    ax.set_xlabel("receptive field after the layer (pixels)")
    ax.legend(fontsize=9, loc="upper right")
    return fig

def figures_folder(requested: str | os.PathLike | None, scratch: bool,
                   default: str = "images") -> str | None:
    """Where a notebook run saves its figures: ``requested`` ("" for nowhere), else ``default``
    after a full training run, and nowhere after a ``scratch`` one (a smoke run, or one that
    trained nothing), which so never replaces a full run's figures."""
    return (str(requested) or None) if requested is not None else (None if scratch else default)

def save_figure(fig: Any, folder: str | os.PathLike | None, name: str) -> None:
    """Save ``fig`` as ``folder/name`` (PNG, 100 dpi); do nothing when folder is empty/None."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(folder) / name, dpi=100, bbox_inches="tight")


# =========================================================================== benchmark
EPOCH_IMAGES, EVAL_IMAGES = 50_000, 10_000  # a CIFAR-10 training epoch and its test set
BENCH_ROUNDS = 4  # alternations of model-only and end-to-end timing in ``bench``

def _pipeline(recipe: Recipe, data: CifarData, x_y: tuple, device: torch.device,
              workers: int | None, seed: int) -> tuple[DataLoader, TensorBatches, Net, dict]:
    """The recipe's training loader, evaluation batches, model and normalisation from ``x_y``."""
    x_tr, y_tr, x_ev, y_ev = x_y
    mean, std = compute_mean_std(x_tr)
    if min(std) == 0:  # normalising would divide by 0: nan, as if training diverged
        raise UsageError(f"the training images of {data.source} do not vary in channel "
                         f"{'RGB'[std.index(0)]}: they cannot be normalised")
    augment = EpochAugment(exercise_augmentations(mean, recipe.p_flip, recipe.p_affine,
                                                  recipe.p_dropout, seed=seed), seed)
    loader, batches = make_loaders(CifarDataset(x_tr, y_tr, augment), CifarDataset(x_ev, y_ev),
                                   recipe.batch_size, device, seed, workers)
    model = build_model(recipe, len(data.classes), mean, std).to(device)
    return loader, batches, model, dict(mean=mean, std=std)

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

def _cycle(batches: Iterable) -> Iterator:
    """``batches`` without end: a new pass (as in a new epoch) whenever one ends."""
    while True:
        yield from batches

def bench(data: CifarData, recipe: Recipe | str = "standard", device: torch.device | None = None,
          workers: int | None = None, seconds: float = 8.0) -> dict:
    """Images/s of the loader, the training step, both as ``fit`` runs them (alternating rounds:
    drift slows both alike) and evaluation, each for ``seconds`` after a warm-up."""
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise ValueError(f"no recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    name, recipe = (recipe, RECIPES[recipe]) if isinstance(recipe, str) else ("custom", recipe)
    device = torch.device(device) if device is not None else get_device(verbose=False)
    loader, test, model, _ = _pipeline(recipe, data, (data.x_train, data.y_train, data.x_test,
                                                      data.y_test), device, workers, 0)
    # a schedule far longer than any timing, so that it never runs out
    t = start_training(model, replace(recipe, epochs=10_000), 1000 * len(loader))
    g, n = torch.Generator().manual_seed(0), recipe.batch_size
    fake = _cycle([(torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
                    .to(device), torch.randint(0, len(data.classes), (n,), generator=g)
                    .to(device))] * 4)
    train = lambda batches: train_one_epoch(t, batches, progress=False)  # noqa: E731
    real, warm = _cycle(loader), 2 + loader.num_workers * (loader.prefetch_factor or 0)
    timed = dict(loader=_timed(lambda b: sum(1 for _ in b), real, seconds, warm))
    train(itertools.islice(fake, 3))  # warm-up
    rounds: dict[str, list[tuple[int, float]]] = {"model": [], "end_to_end": []}
    for _ in range(BENCH_ROUNDS):
        rounds["model"].append(_timed(train, fake, seconds / BENCH_ROUNDS, 0))
        rounds["end_to_end"].append(_timed(train, real, seconds / BENCH_ROUNDS, warm))
    timed.update({k: (sum(n for n, _ in v), sum(s for _, s in v)) for k, v in rounds.items()})
    evaluate(model, itertools.islice(test, 1))  # warm-up
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < seconds:  # whole passes of the test set
        evaluate(model, test)
        passes += 1
    timed["eval"] = (passes * len(test.images), time.perf_counter() - start)
    real.close()  # lets the persistent workers go
    rate = {k: n / s for k, (n, s) in timed.items()}
    return dict(recipe=name, device=str(device), torch=torch.__version__, cpus=os.cpu_count(),
                threads=torch.get_num_threads(), workers=loader.num_workers, batch_size=n,
                seconds=seconds, params=count_parameters(model), macs=count_macs(model),
                **{f"{k}_images_per_s": v for k, v in rate.items()},
                end_to_end_pct_of_model=100 * rate["end_to_end"] / rate["model"],
                epoch_seconds=EPOCH_IMAGES / rate["end_to_end"],
                eval_seconds=EVAL_IMAGES / rate["eval"],
                eval_pct_of_epoch=100 * rate["end_to_end"] * EVAL_IMAGES / rate["eval"] /
                EPOCH_IMAGES, timed_images={k: v[0] for k, v in timed.items()},
                timed_seconds={k: v[1] for k, v in timed.items()})

def bench_table(result: dict) -> str:
    """A ``bench`` result as a small readable table."""
    r, w = result, result["workers"]
    rows = [("loader only", "loader", f"albumentations and collation, {w} worker(s)"),
            ("model only", "model", "training steps on random uint8 batches"),
            ("end-to-end training", "end_to_end", f"{r['end_to_end_pct_of_model']:.1f}% of model "
             f"only; {EPOCH_IMAGES:,} images in {r['epoch_seconds']:.1f} s"),
            ("evaluation", "eval", f"{EVAL_IMAGES:,} images in {r['eval_seconds']:.2f} s = "
             f"{r['eval_pct_of_epoch']:.1f}% of an epoch")]
    return "\n".join([f"recipe {r['recipe']} ({r['macs'] / 1e6:.1f}M multiply-adds/image), batch "
                      f"{r['batch_size']}, {r['device']}, torch {r['torch']}, {r['threads']} "
                      f"threads, {r['seconds']:g} s per figure", f"{'':<22}{'images/s':>10}  note"]
                     + [f"{label:<22}{r[key + '_images_per_s']:>10,.0f}  {note}"
                        for label, key, note in rows])


# =========================================================================== command line
class UsageError(ValueError):
    """Bad command-line input found after parsing: one line on stderr, exit status 2."""

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``) with exit status 2, and whose
    options are never abbreviated (the sub-commands' parsers are of this class too)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

def _option(p: argparse.ArgumentParser, name: str, kind: type, words: str, help: str,
            ok: Callable[[Any], bool] = lambda v: True, **kw: Any) -> None:
    """Add ``--name``: a ``kind`` for which ``ok`` holds (``words``), else a one-line error."""
    def parse(text: str) -> Any:
        try:
            if ok(value := kind(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
    p.add_argument(name, type=parse, help=f"{help} ({words})", **kw)

def _common_options(p: argparse.ArgumentParser, command: str) -> None:
    """--data-dir, --download, --threads and (except for evaluate) one option per Recipe field."""
    p.add_argument("--data-dir", required=True, metavar="DIR", type=os.path.expanduser,
                   help="folder with CIFAR-10: official batches, or train/<class>/*.jpg|png")
    p.add_argument("--download", action="store_true",
                   help="download with torchvision if the data is not in --data-dir")
    _run_option(p, "threads", "torch CPU threads; default: all cores" + (
        " (with --resume: the run's own count)" if command == "train" else ""))
    if command == "evaluate":  # the weights carry their recipe
        return
    resumed = command == "train"  # --resume: the run's own recipe, seed, subsets, split
    p.add_argument("--recipe", default=None if resumed else "standard", choices=sorted(RECIPES),
                   help="the recipe that the options below override (default standard"
                   + ("; with --resume: the run's own settings)" if resumed else ")"))
    for f in fields(Recipe):  # derived from the field itself
        many, meta = isinstance(f.default, tuple), f.metadata
        _option(p, "--" + f.name.replace("_", "-"), type(f.default[0] if many else f.default),
                meta["words"], f"{meta['help']}; default: the recipe's",
                nargs=len(f.default) if many else None, metavar=meta["metavar"])

def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="helpers.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one recipe, logging every epoch to --out",
                       description="Train one recipe, logging and "
                       "checkpointing every epoch to --out. Every option is checked before any "
                       "data is read, except those that depend on the data (subset sizes, the "
                       "validation split).")
    e = sub.add_parser("evaluate", help="test accuracy of saved weights (and flip TTA)",
                       description="Score saved weights on all test "
                       "images: the test accuracy and flip TTA, as a JSON line and as text.")
    b = sub.add_parser("bench", help="images/s of the loader, the model, training, evaluation",
                       description="Time the loader alone, the training "
                       "step alone (random batches), training as fit runs it, and evaluation, "
                       "for the recipe's net, optimizer, batch size and augmentation (--epochs "
                       "changes nothing here).")
    for name, cmd in (("train", t), ("evaluate", e), ("bench", b)):
        _common_options(cmd, name)
    for cmd in (t, b):
        _run_option(cmd, "workers", "data-loader processes; default: 0 on a CPU or Apple GPU, up "
                    "to 8 on CUDA" + (" (with --resume: the run's)" if cmd is t else ""))
    _run_option(t, "seed", "seed of every random choice: weights, data order, augmentation, "
                "subsets (the validation split is drawn with seed 0 from the training images "
                "used); default 0 (with --resume: the run's)")
    for split in ("train", "test"):
        _run_option(t, f"{split}_subset", f"use N random {split} images only (with --resume: as "
                    "the run did)")
    _run_option(t, "val_fraction", "hold out this share of the training images and score it "
                "instead of the test set, to choose settings (with --resume: as the run did)")
    t.add_argument("--out", default="runs/latest", metavar="DIR", help="the run's folder "
                   "(default runs/latest)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from "
                       "its last checkpoint with its own settings (any option given must agree "
                       "with them), or start it if --out holds none")
    again.add_argument("--overwrite", action="store_true", help="replace the run in --out; "
                       "it is kept until the new run's first checkpoint is saved")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.add_argument("--weights", required=True, metavar="FILE",
                   help="weights.pt or model.pt of a run, or a file in weights/")
    _option(b, "--seconds", float, "a number of seconds in (0, 3600]", "timed seconds per "
            "figure; default 8", lambda v: 0 < v <= 3600, default=8.0, metavar="S")
    b.add_argument("--device", choices=("cpu", "cuda", "mps"),
                   help="the device to time (default: the best available)")
    return p

def _recipe_from_args(args: argparse.Namespace, base: Recipe | None = None) -> Recipe:
    """The named recipe (or ``base``, when none is named) with the options given; a bad value is
    refused naming its option."""
    recipe = RECIPES[args.recipe or "standard"] if base is None else base
    for f in fields(Recipe):
        if getattr(args, f.name) is not None:
            try:
                recipe = replace(recipe, **{f.name: getattr(args, f.name)})
            except ValueError as e:
                raise UsageError(f"argument --{f.name.replace('_', '-')}: "
                                 f"{str(e).split(': ', 1)[1]}") from None
    return recipe

def _read_data(args: argparse.Namespace, splits: Sequence[str] = ("train", "test")
               ) -> CifarData:
    """The data in ``--data-dir`` (``splits`` of it), or a UsageError saying what is wrong."""
    try:
        return load_cifar10(args.data_dir, args.download, splits=splits)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None

def _set_up(args: argparse.Namespace, threads: int | None = None) -> torch.device:
    """Set the thread count; the device asked for (``--device``), else the best available."""
    if args.threads or threads:
        torch.set_num_threads(args.threads or threads)
    asked = getattr(args, "device", None)
    if asked == "cuda" and not torch.cuda.is_available() or asked == "mps" and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"argument --device: no {asked} device on this machine")
    return torch.device(asked) if asked else get_device(verbose=args.command == "train")

def _classes_beside(weights: Path) -> Any:
    """The class names in the run's config.json beside ``weights``, if it reads; else None."""
    config = weights.parent / "config.json"
    try:
        return json.loads(config.read_text()).get("classes") if config.is_file() else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None

def run_evaluate(args: argparse.Namespace) -> dict:
    """``evaluate``: the final test accuracy of saved weights, and with flip TTA."""
    device = _set_up(args)
    model, state = load_model(args.weights, device)
    data = _read_data(args, ("test",))  # the training images are not needed: not decoded
    if model.out[-1].out_features != len(data.classes):
        raise UsageError(f"{args.weights} has {model.out[-1].out_features} outputs, but "
                         f"{data.source} holds {len(data.classes)} classes")
    trained_on = state["run"].get("classes")
    if trained_on is None and "optimizer" in state:  # a run's model.pt: its config.json
        trained_on = _classes_beside(Path(args.weights))  # beside it names them
    if trained_on is not None and not (type(trained_on) is list and all(
            type(c) is str for c in trained_on)):
        raise UsageError(f"{args.weights} is damaged: its classes are not a list of names")
    if trained_on is not None and trained_on != list(data.classes):
        raise UsageError(f"{args.weights} was trained on the classes {', '.join(trained_on)}, "
                         f"but {data.source} holds {', '.join(data.classes)}: its labels would "
                         "not match (name the class folders as in training)")
    batches = TensorBatches(data.x_test, data.y_test, device)
    result = dict(weights=str(args.weights), data=data.source, test_images=len(data.y_test),
                  test_acc=evaluate(model, batches)[1],
                  test_acc_flip_tta=evaluate(model, batches, tta=True)[1])
    run, recipe = state["run"], Recipe(**state["run"]["recipe"])  # as load_model read them
    name = next((n for n, r in RECIPES.items() if r == recipe), "custom")  # by its settings
    print(json.dumps(result))
    print(f"test accuracy {100 * result['test_acc']:.2f}% (flip TTA "
          f"{100 * result['test_acc_flip_tta']:.2f}%) on {len(data.y_test):,} images of "
          f"{data.source}; recipe {name}, seed {run.get('seed')}")
    if trained_on is None:
        print(f"note: {args.weights} names no classes: its outputs were read in the order of "
              f"{data.source}'s ({', '.join(data.classes)})")
    return result

def run_bench(args: argparse.Namespace) -> dict:
    """``bench`` on the data in ``--data-dir``: one JSON line, then the table."""
    recipe, device = _recipe_from_args(args), _set_up(args)
    result = bench(_read_data(args), args.recipe if recipe == RECIPES[args.recipe] else recipe,
                   device, args.workers, args.seconds)  # a recipe with options given: "custom"
    print(json.dumps(result))
    print(bench_table(result), flush=True)
    return result


# --------------------------------------------------------------------------- the run folder
_RUN_FILES = ("config.json", "log.jsonl", "model.pt", "weights.pt", "summary.json")
_SAME = ("recipe", "seed", "train_subset", "test_subset", "val_fraction", "workers", "data",
         "classes", "train_images", "eval_split", "eval_images", "mean", "std")
_NOTES = ("device", "threads", "versions")  # may differ when resuming: a note, not a refusal
_FREE = (*_NOTES, "recipe_name", "params", "macs")  # those, and what another version counts
_LATER = ("images_sha256",)  # as _SAME, where the run recorded it (runs before it did not)

# The options of train besides the recipe's, as config.json records them (--resume takes them
# from there, so it is held to the same): kind, accepted values, the check
_RUN_OPTIONS = {
    "threads": (int, "an integer in [1, 1024]", lambda v: 1 <= v <= 1024),
    "workers": (int, "an integer in [0, 64]", lambda v: 0 <= v <= 64),
    "seed": (int, "an integer in [0, 4294967295]", lambda v: 0 <= v < 2 ** 32),
    "train_subset": (int, "an integer >= 1", lambda v: v >= 1),
    "test_subset": (int, "an integer >= 1", lambda v: v >= 1),
    "val_fraction": (float, "a number in (0, 1)", lambda v: 0 < v < 1)}
_UNUSED = ("train_subset", "test_subset", "val_fraction")  # None in config.json: not used

def _run_option(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """Add the option of ``_RUN_OPTIONS[name]`` (``--train-subset N``...) to ``p``."""
    kind, words, ok = _RUN_OPTIONS[name]
    _option(p, "--" + name.replace("_", "-"), kind, words, help, ok,
            metavar="F" if kind is float else "N")

def _edits(told: dict, summary: dict, free: Sequence[str]) -> list[str]:
    """How ``summary`` differs from what the run's other files tell, ``free`` keys aside (a key
    only ``summary`` holds, as a later or earlier version records, is not compared)."""
    keys = [k for k in told if k not in free]
    a, b = _plain({k: told[k] for k in keys}), _plain({k: summary[k] for k in keys if k in summary})
    edits = _differences(a, b) + [f"{k} missing" for k in a if k not in b]  # b's values named
    return edits or (["a setting missing"] if a != b else [])  # (one nested in another)

def _read_json(path: Path, keys: Sequence[str]) -> dict:
    """A run file's dict holding ``keys``; anything else is refused, naming the file."""
    try:
        if path.exists() and not path.is_file():  # a named pipe would be waited on forever
            raise ValueError("not a file")
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        why = "is missing" if isinstance(e, FileNotFoundError) else f"is damaged ({e})"
        raise UsageError(f"{path} {why}, so the run cannot be checked: pass --overwrite to "
                         "start again") from None
    if _nesting(value) > _MAX_NESTING:
        raise UsageError(f"{path} is damaged (nested too deeply); pass --overwrite to start "
                         "again")
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    bad = [k for k, (kind, _, ok) in _RUN_OPTIONS.items() if k in keys and k not in missing
           and not (value[k] is None and k in _UNUSED or type(value[k]) in (
               (int,) if kind is int else (int, float)) and ok(value[k]))]  # True: no int here
    if missing or bad:
        what = f"it lacks {', '.join(missing)}" if missing else f"bad {', '.join(bad)}"
        raise UsageError(f"{path} is damaged: {what}; pass --overwrite to start again")
    return value

class _RunFolder:
    """``--out`` for one command, locked against any other writer until it ends. ``--overwrite``
    moves the old run into ``.replaced`` and deletes it once the new run has a checkpoint; a
    command that ends sooner puts it back (as does the next one on the folder, after a kill).
    ``.overwriting`` marks ``.replaced`` and ``.discarded`` as made by --overwrite."""

    def __init__(self, out: Path) -> None:
        self.out, self.aside, self.epoch, self.created = out, out / ".replaced", 0, []
        self.made_lock = False  # whether this command made .lock (then it removes it if refused)
        self.mark, self.discarded = out / ".overwriting", out / ".discarded"

    def __enter__(self) -> _RunFolder:
        try:
            if self.out.exists() and not self.out.is_dir():
                raise UsageError(f"argument --out: {self.out} is a file, not a folder")
            real = Path(os.path.realpath(self.out))
            for p in (real, *real.parents):
                if p.name.casefold() in (".replaced", ".discarded") and any(
                        (p.parent / name).exists() for name in (".lock", "config.json")):
                    raise UsageError(f"argument --out: {self.out} is inside the folder where a "
                                     "run set aside by --overwrite is kept: choose another --out")
        except OSError as e:  # a name too long
            raise UsageError(f"argument --out: {e.strerror}: {self.out}") from None
        self._take_lock()
        try:
            self._refuse_what_overwrite_did_not_make()
            for path in (self.out / name for name in _RUN_FILES):
                if path.is_dir():  # not ours: --overwrite would delete it, --resume fail on it
                    raise UsageError(f"{path} is a folder, not a file of a run: move it away")
        except UsageError:
            self._give_back(refused=True)
            raise
        shutil.rmtree(self.discarded, ignore_errors=True)  # its deletion was stopped
        if self.aside.exists():  # an --overwrite was killed: finish or undo it
            done = (self.aside / ".complete").exists() and (self.out / "model.pt").exists() \
                and not (self.aside / ".restoring").exists()
            self.discard() if done else self._restore()
        if not self.discarded.exists():
            self.mark.unlink(missing_ok=True)
        return self

    def _take_lock(self) -> None:
        """Lock ``.lock`` (a file, never a link) against any other command, and write our PID.
        A command refused before writing anything deletes the ``.lock`` it made: if the file
        locked here has lost its name meanwhile, this starts again with the one now there."""
        lock = self.out / ".lock"
        try:
            import fcntl  # POSIX only (elsewhere no lock); a record lock ends with this process
        except ImportError:
            fcntl = None
        for _ in range(100):
            fd = self._open_lock(lock)
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a named pipe, a device
                os.close(fd)
                raise UsageError(f"argument --out: {lock} is not a file: move it away")
            self.lock = os.fdopen(fd, "r+")
            if os.fstat(self.lock.fileno()).st_nlink > 1:  # a hard link: another file's content
                self.lock.close()
                raise UsageError(f"argument --out: {lock} is a link (a hard one): move it away")
            if fcntl is None:
                return self._write_pid(lock)
            try:
                fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not its loader workers
            except OSError:
                time.sleep(0.1)  # its holder writes its PID just after locking
                pid = self.lock.read().strip() or "not yet written"
                raise UsageError(f"argument --out: {self.out} is in use by another command (PID "
                                 f"{pid}): wait for it to end, or choose another --out") from None
            try:
                if os.path.samestat(os.fstat(self.lock.fileno()), os.lstat(lock)):
                    return self._write_pid(lock)
            except FileNotFoundError:
                pass
            self.lock.close()
        raise UsageError(f"argument --out: {lock} keeps being deleted by other commands")

    def _open_lock(self, lock: Path) -> int:
        """Make ``--out`` and open its ``.lock``, made (``made_lock``) if missing."""
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        for attempt in itertools.count():
            try:
                self._make_folders()
                if lock.is_symlink():  # opened, it would write into the file it points to
                    raise UsageError(f"argument --out: {lock} is a link: move it away")
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o666)
                    self.made_lock = True
                    return fd
                except FileExistsError:
                    self.made_lock = False
                    return os.open(lock, os.O_RDWR | nofollow)
            except OSError as e:  # (strerror is None for some failures, as with a pipe)
                if isinstance(e, FileNotFoundError) and attempt < 99:
                    continue  # --out or .lock deleted meanwhile by a command that ended
                self._remove_created()  # a name too long: the folders made for it go again
                raise UsageError(f"argument --out: cannot write to {lock}: {e.strerror or e}"
                                 ) from None

    def _write_pid(self, lock: Path) -> None:
        """Write this process's PID into ``.lock``, for a command refused to name."""
        try:
            self.lock.truncate(0)
            print(os.getpid(), file=self.lock, flush=True)
        except OSError as e:  # a file-size limit, a full disk
            raise UsageError(f"argument --out: cannot write to {lock}: {e.strerror}") from None

    def _make_folders(self) -> None:
        """Make ``--out`` and its missing parents, noting each one made (for a refused command
        to remove again)."""
        for folder in (*reversed(self.out.parents), self.out):
            if not os.path.isdir(folder):
                try:
                    os.mkdir(folder)
                    self.created.insert(0, os.path.realpath(folder))  # as resolved: a/../b is b
                except FileExistsError:  # made meanwhile by another command
                    pass

    def _refuse_what_overwrite_did_not_make(self) -> None:
        """Refuse a .replaced or .discarded that is not marked as made by --overwrite or holds
        other files than those it moves there: it is not this program's to move or delete."""
        ours = self.mark.is_file() and not self.mark.is_symlink()  # an --overwrite was stopped
        mine = {*_RUN_FILES, ".complete", ".restoring"}
        for path, kind in ((self.mark, "file"), (self.aside, "folder"), (self.discarded, "folder")):
            if not (path.exists() or path.is_symlink()):
                continue
            names = {p.name for p in path.iterdir()} if path.is_dir() else set()
            fits = ours and not path.is_symlink() and (
                path.is_file() if kind == "file" else path.is_dir() and names <= mine)
            if not fits:
                old = f" (files that an older helpers.py set aside there go back into {self.out})"
                raise UsageError(f"{path} is not a {kind} that --overwrite made: move it away"
                                 + (old if path == self.aside else ""))

    def discard(self) -> None:
        """Delete the old run set aside: renamed first, so that no stop can bring back part."""
        os.replace(self.aside, self.discarded)
        shutil.rmtree(self.discarded)
        self.mark.unlink(missing_ok=True)

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None and self.aside.exists():
            self._restore()
        self._give_back()

    def _give_back(self, refused: bool = False) -> None:
        """Unlock ``--out``. If this command was refused, or wrote nothing there, the ``.lock``
        and the folders it made for it go too (still locked: no other command is using them)."""
        if os.name == "nt":  # Windows deletes no open file (and this code locks none there)
            self.lock.close()
        if (self.created or self.made_lock) and (refused or not any(
                p.name != ".lock" for p in self.out.iterdir())):
            (self.out / ".lock").unlink(missing_ok=True)
            self._remove_created()
        self.lock.close()

    def _remove_created(self) -> None:
        """Remove the folders this command made for ``--out``, deepest first, while empty."""
        for folder in (f for f in self.created if os.path.lexists(f)):  # (or never made)
            try:
                os.rmdir(folder)
            except OSError:  # not empty: something else wrote there
                break

    def _restore(self) -> None:
        (self.aside / ".restoring").touch()  # if stopped again, the next command goes on
        complete = self.aside / ".complete"  # else some old files were never moved
        old = complete.read_text().split() if complete.exists() else _RUN_FILES
        for name in _RUN_FILES:
            if (self.aside / name).exists():
                os.replace(self.aside / name, self.out / name)
            elif name not in old:  # a file of the new run
                (self.out / name).unlink(missing_ok=True)
            _remove_temps(self.out / name)  # of a writer killed in the new run
        shutil.rmtree(self.aside)
        self.mark.unlink(missing_ok=True)
        print(f"restored the run in {self.out} that --overwrite had set aside")

    def files(self) -> list[str]:
        return [name for name in _RUN_FILES if (self.out / name).exists()]

    def _checkpoint_note(self) -> str:
        try:
            self.epoch = int(_read_checkpoint(self.out / "model.pt")["epoch"])
            return f"{self.out}/model.pt keeps epoch {self.epoch}"
        except CheckpointError as e:
            return str(e) if (self.out / "model.pt").exists() else "no checkpoint yet"
        except (KeyError, TypeError, ValueError):  # a dict without an integer epoch
            return f"{self.out}/model.pt holds no epoch"

    def previous(self, resume: bool, overwrite: bool) -> dict | None:
        """The earlier run's config to continue, or None; refuses what the flags do not allow."""
        if not self.files():
            if resume:
                print(f"--resume: {self.out} holds no run yet: starting one")
            return None
        finished = (self.out / "summary.json").exists()
        if overwrite or not resume:
            what = "a finished run" if finished else f"a partial run ({self._checkpoint_note()})"
            if overwrite:
                print(f"--overwrite: {self.out} holds {what}; it is kept until the new run "
                      "saves its first checkpoint")
                return None
            hint = "" if finished else "pass --resume to continue it (with its own options) or "
            raise UsageError(f"argument --out: {self.out} already holds {what}: {hint}pass "
                             "--overwrite to replace it, or choose another --out")
        config = _with_defaults(_read_json(self.out / "config.json", _SAME + _NOTES))
        if finished:
            self._check_finished(config)
        elif (self.out / "model.pt").exists():
            print(f"--resume: continuing {self.out}: {self._checkpoint_note()}")
        return dict(config, finished=finished)

    def _check_finished(self, config: dict) -> None:
        """Refuse a finished run whose files disagree; write a deleted weights.pt or a cut or
        edited log.jsonl again from model.pt."""
        split = config["eval_split"]
        tta, summary = f"final_{split}_acc_flip_tta", _read_json(self.out / "summary.json", [])
        state = _read_checkpoint(self.out / "model.pt")
        try:  # summary.json becomes weights.pt's run: all that model.pt and config.json tell
            history = state["history"]  # must be as they tell it
            told = dict(config, **{f"final_{split}_acc": history[-1]["eval_acc"],
                                   "median_epoch_seconds": float(np.median(
                                       [h["seconds"] for h in history])),
                                   tta: summary.get(tta)})  # checked by _check_free
            moved = ("data",) if "images_sha256" in config else ()  # as refuse_changes allows
            edits = _edits(told, _with_defaults(summary), _FREE + moved)
            agree = state["epoch"] == config["recipe"]["epochs"] and not _differences(
                state["run"], {k: config[k] for k in ("recipe", "seed")}) and not edits
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            agree, edits = False, []
        if not agree:
            why = f" ({'; '.join(edits)})" if edits else ""
            raise UsageError(f"{self.out}/summary.json does not agree with model.pt and "
                             f"config.json{why}: put back what was edited, or pass --overwrite "
                             "to start again")
        self._check_free(summary, split)
        for name in _RUN_FILES:  # nothing more is written: a killed writer's temp files go
            _remove_temps(self.out / name)
        self.write_log(history)  # rebuilt if deleted or edited
        weights = dict(model=state["model"], run=summary, history=history)
        if not _same_weights(self.out / "weights.pt", weights):  # rebuilt if deleted, damaged
            save_checkpoint(self.out / "weights.pt", weights)  # or edited

    def _check_free(self, summary: dict, split: str) -> None:
        """What model.pt and config.json do not tell (the flip TTA accuracy, the machine):
        summary.json must say it as weights.pt does, where weights.pt reads."""
        tta = summary.get(f"final_{split}_acc_flip_tta")
        if not (type(tta) in (int, float) and 0 <= tta <= 1):
            raise UsageError(f"{self.out}/summary.json is damaged: no flip TTA accuracy; put "
                             "back what was edited, or pass --overwrite to start again")
        try:
            saved = _read_checkpoint(self.out / "weights.pt")["run"]
        except (CheckpointError, KeyError, TypeError):  # missing or damaged: written again
            return
        if not isinstance(saved, dict):  # damaged too
            return
        keys = (*_FREE, f"final_{split}_acc_flip_tta")
        diffs = _differences(*(_plain({k: d.get(k) for k in keys}) for d in (saved, summary)))
        if diffs:
            raise UsageError(f"{self.out}/summary.json and weights.pt disagree on what "
                             f"model.pt cannot tell ({'; '.join(diffs)}: weights.pt's, then "
                             "summary.json's): one was edited; put it back, or delete weights.pt "
                             "and --resume to write it again from summary.json")

    def write_log(self, history: list[dict]) -> None:
        """log.jsonl: one JSON row per epoch of ``history`` (unless it holds just that)."""
        log, text = self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode()
        try:  # (a named pipe would be waited on forever)
            same = log.is_file() and log.read_bytes() == text
        except OSError:  # missing, unreadable or not a file: written anew
            same = False
        if not same:
            _write_atomic(log, text)

    def refuse_changes(self, prev: dict | None, new: dict) -> None:
        """Refuse to resume ``prev`` with other settings, naming each; note what may differ."""
        later = [k for k in _LATER if k in (prev or {})]
        moved = ("data",) if later else ()  # the images' hash decides, not the folder's name
        for keys, refuse in ((tuple(k for k in _SAME if k not in moved) + tuple(later), True),
                             (_NOTES + moved, False)):
            diffs = _differences({k: (prev or {}).get(k) for k in keys},
                                 {k: new[k] for k in keys if k in new}) if prev else []
            diffs = ["images_sha256: other images or labels" if d.startswith("images_sha256 ")
                     else d for d in diffs]  # two hashes say nothing more
            if diffs and refuse:
                raise UsageError(f"argument --resume: the run in {self.out} was made with "
                                 f"other settings ({'; '.join(diffs)}): give its own options "
                                 "and data (or no option: --resume takes them from the run), or "
                                 "--overwrite to start again")
            if diffs:
                same = all(d.startswith("data ") for d in diffs)  # the images' hash agrees
                print(f"note: resuming with {'; '.join(diffs)}: " + (
                    "the same images" if same else "results may differ from a run that was "
                    "never interrupted"))

    def train(self, args: argparse.Namespace, model: Net, recipe: Recipe,
              train_loader: DataLoader, batches: TensorBatches, meta: dict) -> list[dict]:
        """Train into the folder: config.json, then after every epoch model.pt and log.jsonl,
        at the end weights.pt and summary.json (whose presence marks the run finished)."""
        try:  # --overwrite: the old run is set aside, to come back if the new one fails
            for name in self.files() if args.overwrite else ():
                if not self.aside.exists():
                    self.mark.touch()  # first, so that every folder it names is known as ours
                    self.aside.mkdir()
                os.replace(self.out / name, self.aside / name)
            if self.aside.exists():  # the names set aside, once all are
                (self.aside / ".complete").write_text(" ".join(os.listdir(self.aside)))
        except OSError as e:
            raise WriteError(f"cannot set the old run aside in {self.aside}: {e.strerror}"
                             ) from None
        if not (self.out / "config.json").exists():
            _write_atomic(self.out / "config.json", json.dumps(meta, indent=2).encode())

        def log(history: list[dict]) -> None:  # called once model.pt holds the epoch
            self.epoch = history[-1]["epoch"]
            if self.aside.exists():  # the new run has a checkpoint of its own now
                self.discard()
            self.write_log(history)
            print(format_row(history[-1], meta["eval_split"], recipe.epochs), flush=True)

        try:
            history = fit(model, recipe, train_loader, batches, self.out / "model.pt",
                          resume=args.resume, progress=not args.no_progress, log=log)
        except KeyboardInterrupt:
            self._checkpoint_note()  # the epoch model.pt holds, logged or not
            raise
        self.write_log(history)  # complete after a stop between a checkpoint and its row
        split = meta["eval_split"]
        summary = {f"final_{split}_acc": history[-1]["eval_acc"],
                   f"final_{split}_acc_flip_tta": evaluate(model, batches, tta=True)[1],
                   "median_epoch_seconds": float(np.median([h["seconds"] for h in history]))}
        save_weights(self.out / "weights.pt", model, dict(meta, **summary), history)
        _write_atomic(self.out / "summary.json", json.dumps({**meta, **summary}, indent=2).encode())
        print(json.dumps(summary))
        return history

def _versions() -> dict:
    """The libraries whose arithmetic, random draws or image decoding a run's result follows."""
    import albumentations
    import cv2
    import PIL
    return dict(torch=torch.__version__, numpy=np.__version__,
                albumentations=albumentations.__version__, opencv=cv2.__version__,
                pillow=PIL.__version__)

def _sha256(arrays: Sequence[np.ndarray]) -> str:
    """A fingerprint of the images and labels a run trains and scores on."""
    import hashlib
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()

def _split_data(args: argparse.Namespace, data: CifarData) -> tuple[tuple, str]:
    """(train images, labels, evaluation images, labels) and the evaluated split's name."""
    for name, n, have in (("train", args.train_subset, len(data.x_train)),
                          ("test", args.test_subset, len(data.x_test))):
        if n is not None and n > have:
            raise UsageError(f"argument --{name}-subset: {n} is more than the {have} "
                             f"{name} images in {data.source}")
    x_tr, y_tr = subset(data.x_train, data.y_train, args.train_subset, args.seed)
    if not args.val_fraction:
        return (x_tr, y_tr, *subset(data.x_test, data.y_test, args.test_subset, args.seed)), "test"
    try:  # tuning: the test set is not touched
        return split_train_val(x_tr, y_tr, args.val_fraction, seed=0), "val"
    except ValueError as e:
        raise UsageError(f"argument --val-fraction: {e}") from None

def _options_of_the_run(args: argparse.Namespace, prev: dict | None, out: Path) -> Recipe:
    """Set each option not given to the resumed run's (``prev``), or to its default; return the
    recipe: the run's own (a recipe named must be its), else the one named, with the options
    given."""
    if prev and args.recipe is not None and args.recipe != prev.get("recipe_name"):
        raise UsageError(f"argument --recipe: the run in {out} was made with the recipe "
                         f"{prev.get('recipe_name')!r}, not {args.recipe!r}: leave --recipe out "
                         "(--resume takes the run's own), or --overwrite to start again")
    try:  # the run's own settings, not its name's, which may have moved since
        base = Recipe(**prev["recipe"]) if prev else None
    except (TypeError, ValueError) as e:
        raise UsageError(f"{out}/config.json holds a recipe that this helpers.py cannot build "
                         f"({e}): name its recipe and options, or pass --overwrite to start "
                         "again") from None
    for name, key in (("recipe", "recipe_name"), ("seed", "seed"), *(
            (k, k) for k in ("train_subset", "test_subset", "val_fraction", "workers"))):
        if getattr(args, name) is None:
            setattr(args, name, (prev or {}).get(key))
    args.recipe, args.seed = args.recipe or "standard", args.seed or 0
    return _recipe_from_args(args, base)

def run_training(args: argparse.Namespace) -> list[dict]:
    """``train``: check the options and ``--out``, read the data, build, train (see README)."""
    recipe = _recipe_from_args(args)  # each option checked before the folder and the data
    if not str(args.out).strip():
        raise UsageError("argument --out: expected a folder name, got ''")
    if args.val_fraction and args.test_subset is not None:
        raise UsageError("argument --test-subset: not allowed with --val-fraction (the test "
                         "set is not used when tuning)")
    try:
        layout, out = _find_layout(Path(args.data_dir)), Path(os.path.realpath(args.out))
    except OSError as e:  # a name too long: bad input, as _read_data says of it
        raise UsageError(f"argument --data-dir: {e.strerror}: {args.data_dir}") from None
    if layout and layout[0] is _load_image_folder and any(  # realpath: no error on a loop
            out.is_relative_to(os.path.realpath(layout[1] / s)) for s in ("train", "test")):
        raise UsageError(f"argument --out: {args.out} is inside {args.data_dir}'s train/ or "
                         "test/ folder, whose files are read as images: choose another folder")
    with _RunFolder(Path(args.out)) as folder:
        prev: Any = False  # until the folder is checked: what it holds is not known yet
        try:
            prev = folder.previous(args.resume, args.overwrite)
            recipe = _options_of_the_run(args, prev, folder.out)
            workers = args.workers
            options = dict(recipe=asdict(recipe), seed=args.seed, train_subset=args.train_subset,
                           test_subset=args.test_subset, val_fraction=args.val_fraction)
            folder.refuse_changes(prev, dict(options, workers=workers) if workers is not None
                                  else options)
            if prev is not None and prev["finished"]:
                print(f"--resume: the run in {folder.out} is finished: nothing to do")
                return []
            device = _set_up(args, (prev or {}).get("threads"))
            data = _read_data(args)
            x_y, split = _split_data(args, data)
            set_seed(args.seed)
            loader, batches, model, norm = _pipeline(recipe, data, x_y, device, workers, args.seed)
            meta = dict(options, workers=loader.num_workers, data=data.source,
                        classes=list(data.classes), train_images=len(x_y[0]), eval_split=split,
                        eval_images=len(x_y[2]), images_sha256=_sha256(x_y), **norm,
                        recipe_name=args.recipe, device=str(device), params=count_parameters(
                            model), macs=count_macs(model), threads=torch.get_num_threads(),
                        versions=_versions())
            folder.refuse_changes(prev, meta)
            print(json.dumps(meta))
            if meta["params"] >= 200_000:
                print(f"note: {meta['params']:,} parameters, over the exercise's 200,000")
            return folder.train(args, model, recipe, loader, batches, meta)
        except (KeyboardInterrupt, OSError, MemoryError, RuntimeError) as e:  # say what is kept
            e.kept = (f": {folder.out}/model.pt keeps epoch {folder.epoch}; continue with "
                      "--resume" if folder.epoch else f": the run in {folder.out} is finished"
                      if prev and prev["finished"] else f": no epoch of {folder.out} finished"
                      if prev is not False else f": {folder.out} is kept as it was")
            raise

def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    """Print ``message`` as one line on stderr, control characters escaped; return ``status``."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(message.split()))
    try:
        print(f"helpers.py {args.command}: {line}", file=sys.stderr, flush=True)
    except OSError:  # stderr closed or full too (2>&1 | head): the status alone says it
        try:  # and Python's flush at exit fails no more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        except (OSError, ValueError):
            pass
    return status

def main(argv: Sequence[str] | None = None) -> int:
    """``python helpers.py train|evaluate|bench --data-dir DIR ...``. Exit status: 0 done, 1
    diverged or out of memory, 2 bad input or an unusable run folder, 74 a file or the output
    not written (or another input/output error), 130 or 143 interrupted by SIGINT or SIGTERM,
    141 its output closed (continue with --resume); errors are one line on stderr."""
    args, running, previous = _build_parser().parse_args(argv), [True], {}
    if hasattr(sys.stdout, "reconfigure"):  # print a folder name that is not UTF-8 escaped
        sys.stdout.reconfigure(errors="backslashreplace")

    def interrupt(signum: int, frame: Any) -> None:  # while the command runs, not as it ends
        if running:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        return _command(args, interrupt, previous)
    except KeyboardInterrupt as e:  # a signal while the command's end was printed
        return 143 if str(e) == "SIGTERM" else 130
    finally:
        running.clear()  # a signal from here on ends nothing: the command has ended
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, and not ours to put back
                signal.signal(sig, signal.SIG_IGN if handler is _interrupted_early else handler)

def _command(args: argparse.Namespace, handler: Callable, previous: dict) -> int:
    """Run the command with ``handler`` for SIGTERM and SIGINT (the old ones into
    ``previous``); a failure is one line on stderr; return the exit status."""
    try:
        try:  # from here a signal is caught below, with the clean-up of Ctrl-C
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        {"train": run_training, "evaluate": run_evaluate, "bench": run_bench}[args.command](args)
        return 0
    except (UsageError, CheckpointError) as e:
        hint = " (--overwrite starts the run again)" if isinstance(e, CheckpointError) and \
            args.command == "train" else ""
        return _fail(args, f"error: {e}{hint}", 2)
    except FloatingPointError as e:
        return _fail(args, f"stopped: {e}. Lower the learning rate or check the data "
                     "normalisation", 1)
    except WriteError as e:
        return _fail(args, f"error: {e}", 74)
    except (MemoryError, RuntimeError) as e:  # torch's out of memory is a RuntimeError
        if not isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) and \
                "can't allocate memory" not in str(e):
            raise  # a fault of the program: its traceback is what to report
        return _fail(args, f"stopped: out of memory ({str(e).strip()[:200]}); lower "
                     f"--batch-size or --widths{getattr(e, 'kept', '')}", 1)
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        return _fail(args, f"interrupted by {name}{getattr(e, 'kept', '')}",
                     143 if name == "SIGTERM" else 130)
    except OSError as e:  # the output closed (| head: stop as SIGPIPE would), or not written
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)  # a full device
        if isinstance(e, BrokenPipeError) or (full and not e.filename):  # the output failed:
            try:  # what is left to print goes nowhere, and Python's flush at exit fails no more
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        kept = getattr(e, "kept", "")
        if isinstance(e, BrokenPipeError):
            return _fail(args, f"stopped: its output was closed{kept}", 141)
        if full:
            return _fail(args, f"error: cannot write {e.filename or 'its output'}: "
                         f"{e.strerror}{kept}", 74)
        return _fail(args, f"error: {type(e).__name__}: {e}{kept}", 74)

if __name__ == "__main__":
    sys.exit(main())
