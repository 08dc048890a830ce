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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "RECIPES", "Recipe", "build_model",
    "get_device", "set_seed", "CifarData", "load_cifar10", "subset", "split_train_val",
    "compute_mean_std", "exercise_augmentations", "AUGMENTATION_MAPPING", "RAMPS",
    "ramp_probability", "EpochAugment", "CifarDataset",
    "TensorBatches", "to_input", "make_loaders",
    "ACTIVATIONS", "InputNorm", "ConvBNAct", "DepthwiseSeparable", "Residual", "Net",
    "whiten_stem", "count_parameters", "count_macs",
    "receptive_field_table", "empirical_receptive_field", "check_rules",
    "make_optimizer", "make_scheduler", "train_one_epoch", "ema_update", "predict_logits",
    "evaluate", "fit", "save_checkpoint", "load_checkpoint", "run_training",
    "predict", "misclassified_indices", "confusion_matrix", "classification_report_df",
    "per_class_accuracy", "grad_cam",
    "plot_image_grid", "plot_augmentations", "plot_history", "plot_misclassified",
    "plot_confusion_matrix", "plot_gradcam", "plot_receptive_field", "save_figure",
    "EPOCH_IMAGES", "EVAL_IMAGES", "bench", "bench_table", "main",
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


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_batches(folder: Path) -> CifarData:
    """Read the official ``cifar-10-batches-py`` folder."""
    def read(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            d = _read_pickle(folder / name)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return np.concatenate(xs).transpose(0, 2, 3, 1).copy(), np.concatenate(ys)

    x_tr, y_tr = read([f"data_batch_{i}" for i in range(1, 6)])
    x_te, y_te = read(["test_batch"])
    meta = folder / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta.exists():
        classes = tuple(n.decode() for n in _read_pickle(meta)[b"label_names"])
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


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def _load_split_folder(split_dir: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        images += [_read_image(p) for p in files]
        labels += [idx] * len(files)
    if not images:
        raise ValueError(f"No PNG or JPEG images found under {split_dir}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _load_image_folder(root: Path) -> CifarData:
    """Read an image-folder tree ``train/<class>/*`` and ``test/<class>/*``."""
    classes = _class_folders(root / "train")
    if _class_folders(root / "test") != classes:
        raise ValueError(f"{root}/train and {root}/test hold different class folders")
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


def _download(root: Path) -> None:
    """Download CIFAR-10 with torchvision into ``root`` (adds cifar-10-batches-py)."""
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(str(root), train=True, download=True)
        CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise RuntimeError(f"Downloading CIFAR-10 into {root} failed: {e}. "
                           + _HOW_TO_GET_DATA) from e


_HOW_TO_GET_DATA = (
    "Accepted layouts: (a) torchvision's download (pass download=True), (b) an official "
    "'cifar-10-batches-py' folder (data_batch_1..5, test_batch) inside the folder or as the "
    "folder itself, (c) an image-folder tree train/<class>/*.png|jpg and test/<class>/*. "
    "Get the data from https://www.cs.toronto.edu/~kriz/cifar.html or unpack "
    "cifar10-jpeg.tar.gz into the folder.")


def load_cifar10(data_dir: str | os.PathLike, download: bool = False) -> CifarData:
    """Load CIFAR-10 from ``data_dir`` in any supported layout, downloading only if asked."""
    root = Path(data_dir).expanduser()
    found = _find_layout(root) if root.is_dir() else None
    if found is None and download:
        root.mkdir(parents=True, exist_ok=True)
        _download(root)
        found = _find_layout(root)
    if found is None:
        raise FileNotFoundError(f"No CIFAR-10 data found in {root.resolve()}. " + _HOW_TO_GET_DATA)
    kind, path = found
    return _load_batches(path) if kind == "batches" else _load_image_folder(path)


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of ``n`` examples (all of them when n is None or too large)."""
    if n is None or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carve a validation split from the training set (never use the test set to choose)."""
    idx = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
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
AUGMENTATION_MAPPING = [
    ("HorizontalFlip(p)", "HorizontalFlip(p)", "unchanged"),
    ("ShiftScaleRotate(shift_limit=0.0625, scale_limit=0.1, rotate_limit=15)",
     "Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), "
     "border_mode=cv2.BORDER_REFLECT_101)",
     "ShiftScaleRotate is deprecated in 2.x; Affine does the same, reflect border kept"),
    ("CoarseDropout(max_holes=1, max_height=16, max_width=16, min_holes=1, "
     "min_height=16, min_width=16, fill_value=mean, mask_fill_value=None)",
     "CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), "
     "hole_width_range=(16, 16), fill=mean * 255, fill_mask=None)",
     "2.x ignores the old names with only a warning, so they must be renamed"),
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
                 border_mode=cv2.BORDER_REFLECT_101, p=p_affine),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16),
                        hole_width_range=(16, 16), fill=fill, fill_mask=None, p=p_dropout),
    ], seed=seed)


RAMPS = ("flat", "down", "up")


def ramp_probability(p: float, ramp: str, epoch: int, epochs: int) -> float:
    """A transform's probability in ``epoch`` (0-based) of ``epochs``; its mean over the run is p.

    "flat" keeps p; "down" falls linearly from about 2p to 0, "up" rises from 0 to about 2p.
    """
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, not {ramp!r}")
    t = (epoch + 0.5) / epochs
    return p if ramp == "flat" else min(1.0, 2 * p * ((1 - t) if ramp == "down" else t))


class EpochAugment:
    """``augment`` with its Affine and CoarseDropout probabilities set per epoch (``aug_ramp``).

    The epoch number sits in shared memory, so persistent loader workers (which hold copies of
    this object) see each ``set_epoch`` made in the main process before the epoch starts.
    """

    def __init__(self, augment: Any, p_affine: float, p_dropout: float, ramp: str,
                 epochs: int) -> None:
        self.augment, self.ramp, self.epochs = augment, ramp, epochs
        self.p_affine, self.p_dropout = p_affine, p_dropout
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._applied = -1
        ramp_probability(p_affine, ramp, 0, epochs)  # checks the ramp name

    def set_epoch(self, epoch: int) -> None:
        """Use the probabilities of ``epoch`` (0-based) from now on."""
        self._epoch[0] = epoch

    def set_random_seed(self, seed: int) -> None:
        self.augment.set_random_seed(seed)

    def __call__(self, **data: Any) -> dict:
        epoch = int(self._epoch[0])
        if epoch != self._applied:
            import albumentations as A
            for t in self.augment.transforms:
                p = (self.p_affine if isinstance(t, A.Affine) else self.p_dropout
                     if isinstance(t, A.CoarseDropout) else None)
                if p is not None:
                    t.p = ramp_probability(p, self.ramp, epoch, self.epochs)
            self._applied = epoch
        return self.augment(**data)


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


def make_loaders(train_ds: CifarDataset, test_ds: CifarDataset, batch_size: int = 128,
                 device: torch.device | str = "cpu", num_workers: int | None = None
                 ) -> tuple[DataLoader, TensorBatches]:
    """Training loader (shuffled, drops the last partial batch) and the test set as a tensor."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if num_workers is None:  # CPU: one worker overlaps augmentation with compute
        num_workers = min(8, os.cpu_count() or 1) if cuda else min(1, (os.cpu_count() or 1) - 1)
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=True,
                       drop_last=len(train_ds) > batch_size, num_workers=num_workers,
                       pin_memory=cuda, persistent_workers=num_workers > 0,
                       worker_init_fn=_seed_worker,
                       prefetch_factor=4 if num_workers > 0 else None)
    # Large test batches feed a GPU; on a CPU 256 images keep the activations in cache
    # (batches of 1000 scored about 1.6x slower on a 2-core CPU).
    test = TensorBatches(test_ds.images, test_ds.labels,
                         256 if device.type == "cpu" else 1000, device)
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
    ``depths[3]`` residual blocks of two depthwise separable convs (kernel ``kernel``).
    The input is raw pixels (0..255); ``InputNorm`` normalises them with ``mean`` and ``std``.
    """

    def __init__(self, widths: Sequence[int] = (16, 40, 96, 192),
                 depths: Sequence[int] = (0, 1, 1, 1), num_classes: int = 10,
                 kernel: int = 3, act: str = "relu", dropout: float = 0.0,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
                 ) -> None:
        super().__init__()
        (c1, c2, c3, c4), (d1, d2, d3, d4) = widths, depths
        if d2 < 1:
            raise ValueError("C2 needs at least one block: it holds the dilated conv")

        def conv_block(c: int, dilation: int = 1) -> nn.Module:
            return Residual(ConvBNAct(c, c, dilation=dilation, act=act), ConvBNAct(c, c, act=act))

        def dws_block(c: int) -> nn.Module:
            return Residual(DepthwiseSeparable(c, c, kernel, act=act),
                            DepthwiseSeparable(c, c, kernel, act=act))

        self.norm = InputNorm(mean, std)
        self.c1 = nn.Sequential(ConvBNAct(3, c1, act=act), *[conv_block(c1) for _ in range(d1)])
        self.c2 = nn.Sequential(ConvBNAct(c1, c2, stride=2, act=act), conv_block(c2, 2),
                                *[conv_block(c2) for _ in range(d2 - 1)])
        self.c3 = nn.Sequential(DepthwiseSeparable(c2, c3, 3, 2, act),
                                *[dws_block(c3) for _ in range(d3)])
        self.c4 = nn.Sequential(DepthwiseSeparable(c3, c4, 3, 2, act),
                                *[dws_block(c4) for _ in range(d4)])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c4, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before global average pooling."""
        return self.c4(self.c3(self.c2(self.c1(self.norm(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gap(self.features(x)))


@torch.no_grad()
def whiten_stem(model: Net, images: np.ndarray, eps: float = 5e-4, n: int = 5000) -> None:
    """Set C1's first conv to whiten 3x3 patches of ``images`` and freeze it.

    The top ``c1 // 2`` eigenvectors of the patch covariance, each scaled by
    ``1 / sqrt(eigenvalue + eps)``, and their negatives, so a ReLU passes either sign.
    """
    conv = model.c1[0][0]
    k = conv.out_channels // 2
    x = model.norm(torch.as_tensor(images[:n]).permute(0, 3, 1, 2).float()).double()
    patches = F.unfold(x, conv.kernel_size).transpose(1, 2).reshape(-1, x.shape[1] * 9)
    patches = patches - patches.mean(0)
    vals, vecs = torch.linalg.eigh(patches.T @ patches / len(patches))
    vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k].T
    w = (vecs / (vals + eps).sqrt().view(-1, 1)).view(k, *conv.weight.shape[1:])
    conv.weight.copy_(torch.cat([w, -w]).to(conv.weight))
    conv.weight.requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, frozen ones (a whitened stem) included."""
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


def receptive_field_table(model: nn.Module, input_size: int = 32) -> Any:
    """RF table from the model's real conv/pool layers in the order they run.

    For each layer with kernel k, dilation d, stride s and padding p (effective kernel
    k_eff = d(k-1)+1): n_out = floor((n_in + 2p - k_eff)/s) + 1, r_out = r_in + (k_eff-1)*j_in,
    j_out = j_in*s. With identity skips only, the longest path is the chain of convs.
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
        n_in, j_in = n, j
        n = (n + 2 * p - k_eff) // s + 1
        r, j = r + (k_eff - 1) * j_in, j_in * s
        groups = getattr(m, "groups", 1)
        kind = ("depthwise" if groups > 1 else "pointwise" if k == 1 else "conv") \
            if isinstance(m, nn.Conv2d) else type(m).__name__
        rows.append(dict(layer=rec["name"], kind=kind, kernel=k, stride=s, padding=p,
                         dilation=d, n_in=n_in, n_out=n, jump_in=j_in, rf=r))
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


def _downsamplers(records: list[dict]) -> list[tuple[str, bool]]:
    """Describe each layer that shrinks the feature map, and whether the rules allow it."""
    found = []
    for rec in records:
        m, n_in, n_out = rec["module"], rec["in_shape"][-1], rec["out_shape"][-1]
        if len(rec["out_shape"]) != 4 or not 1 < n_out < n_in:
            continue
        k, s = _pair(getattr(m, "kernel_size", 0)), _pair(getattr(m, "stride", 1))
        d = _pair(getattr(m, "dilation", 1))
        desc = f"{rec['name']}: {type(m).__name__} {k}x{k} stride {s} dilation {d} " \
               f"({n_in}->{n_out})"
        found.append((desc, isinstance(m, nn.Conv2d) and ((k == 3 and s == 2) or d > 1)))
    return found


def check_rules(model: nn.Module, input_size: int = 32) -> Any:
    """The exercise's rules, each with the measured value and pass or fail, as a DataFrame."""
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
    rf = int(receptive_field_table(model, input_size)["rf"].iloc[-1])
    downs = _downsamplers(recs)
    n_params = count_parameters(model)
    rules = [
        ("C1 C2 C3 C4 then output", "blocks c1..c4", ", ".join(blocks), len(blocks) == 4),
        ("parameters", "< 200,000", f"{n_params:,}", n_params < 200_000),
        ("no MaxPooling", "0 MaxPool layers",
         str(sum(isinstance(m, nn.MaxPool2d) for m in model.modules())),
         not any(isinstance(m, nn.MaxPool2d) for m in model.modules())),
        ("depthwise separable conv", ">= 1", str(dw_sep), dw_sep >= 1),
        ("dilated conv", ">= 1", str(dilated), dilated >= 1),
        ("global average pooling", "present", str(len(gap)), len(gap) >= 1),
        ("receptive field", "> 44", str(rf), rf > 44),
        ("downsampling", "3x 3x3 stride 2 (or dilated)",
         "; ".join(desc for desc, _ in downs) or "none",
         len(downs) == 3 and all(ok for _, ok in downs)),
    ]
    df = pd.DataFrame(rules, columns=["rule", "required", "measured", "passed"])
    df["passed"] = df["passed"].astype(bool)
    return df


# --------------------------------------------------------------------------- training
@dataclass
class Recipe:
    """Hyper-parameters of one training recipe (units in the comments)."""

    epochs: int = 10                 # passes over the training set
    batch_size: int = 128            # images per step
    lr: float = 0.2                  # OneCycle peak learning rate (SGD, Nesterov momentum 0.9)
    weight_decay: float = 5e-4       # L2 on conv/linear weights
    label_smoothing: float = 0.1     # 0 disables
    pct_start: float = 0.25          # fraction of steps spent warming up
    widths: tuple[int, ...] = (16, 40, 96, 192)   # channels of C1..C4
    depths: tuple[int, ...] = (0, 1, 1, 1)        # residual blocks in C1..C4
    kernel: int = 3                  # depthwise kernel size in C3 and C4 blocks
    act: str = "gelu"                # activation: "relu" or "gelu"
    whiten: bool = False             # C1's first conv whitens 3x3 patches (frozen)
    dropout: float = 0.0             # before the final linear layer
    p_flip: float = 0.5              # probability of HorizontalFlip
    p_affine: float = 0.25           # probability of the shift-scale-rotate Affine
    p_dropout: float = 0.25          # probability of the 16x16 CoarseDropout hole
    aug_ramp: str = "flat"           # Affine/CoarseDropout probability over the run: "flat",
    #                                  "down" (2p to 0) or "up" (0 to 2p); each averages p
    mixup: float = 0.0               # Beta(a, a) mixup of image pairs (0: off)
    ema: float = 0.0                 # per-step decay of a weight average (0: off; e.g. 0.999)


def build_model(recipe: Recipe, num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
                std: Sequence[float] = CIFAR10_STD) -> Net:
    """The recipe's ``Net`` (widths, depths, kernel, activation, dropout)."""
    return Net(recipe.widths, recipe.depths, num_classes, recipe.kernel, recipe.act,
               recipe.dropout, mean, std)


RECIPES: dict[str, Recipe] = {
    "fast": Recipe(),
    "accurate": Recipe(epochs=60, batch_size=256, widths=(32, 64, 96, 128), depths=(1, 1, 1, 1)),
    "small": Recipe(epochs=60, batch_size=256, widths=(16, 32, 48, 64), depths=(1, 1, 1, 1)),
}


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
                    desc: str = "train", ema: nn.Module | None = None, ema_decay: float = 0.0,
                    mixup: float = 0.0) -> tuple[float, float]:
    """One pass over ``loader``, stepping the scheduler (and ``ema``) per batch: (loss, acc)."""
    model.train()
    use_amp = scaler is not None and scaler.is_enabled()
    # Sums stay on the device: reading a GPU number each step would stall the pipeline.
    total_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64,
                             device=device)
    correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
    for step, (x, y) in enumerate(_progress(loader, desc, progress)):
        x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device):
            if mixup > 0:
                lam = float(np.random.beta(mixup, mixup))
                perm = torch.randperm(len(y), device=device)
                logits = model(lam * x + (1 - lam) * x[perm])
                loss = lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])
            else:
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
        if ema is not None:
            ema_update(ema, model, ema_decay)
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    if not torch.isfinite(total_loss):
        raise FloatingPointError("Loss became nan or inf during the epoch: lower the "
                                 "learning rate or check the data normalisation.")
    return total_loss.item() / seen, correct.item() / seen


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for weights and BatchNorm statistics."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:  # counters such as num_batches_tracked
            e.copy_(m)


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, device: torch.device,
                   channels_last: bool = True, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and labels over uint8 NHWC batches (tta: average with the mirror image)."""
    model.eval()
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


def _training_parts(model: nn.Module, recipe: Recipe, device: torch.device,
                    steps_per_epoch: int, channels_last: bool) -> tuple:
    """Move ``model`` to ``device``; its optimizer, scheduler, criterion, scaler and EMA copy."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    ema = copy.deepcopy(model) if recipe.ema > 0 else None
    return optimizer, scheduler, criterion, scaler, ema


def fit(model: nn.Module, train_loader: DataLoader, eval_batches: Iterable,
        recipe: Recipe, device: torch.device, channels_last: bool | None = None,
        progress: bool = True, log: Callable[[dict], None] | None = print,
        checkpoint: str | os.PathLike | None = None) -> list[dict]:
    """Train with OneCycle (per batch); return one history row per epoch.

    ``eval_batches`` is evaluated after each epoch for the log only: the model returned is the
    final one, never an epoch picked by its score. With ``recipe.ema`` the scores, checkpoint
    and returned weights are those of the running average of the weights. With
    ``recipe.whiten`` the stem must already be whitened (``whiten_stem``).
    """
    if channels_last is None:
        channels_last = device.type in ("cpu", "cuda")
    optimizer, scheduler, criterion, scaler, ema = _training_parts(
        model, recipe, device, len(train_loader), channels_last)
    scored = ema if ema is not None else model
    history: list[dict] = []
    for epoch in range(1, recipe.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        transform = getattr(train_loader.dataset, "transform", None)
        if hasattr(transform, "set_epoch"):
            transform.set_epoch(epoch - 1)
        tr_loss, tr_acc = train_one_epoch(model, train_loader, optimizer, scheduler, criterion,
                                          device, scaler, channels_last, progress,
                                          desc=f"epoch {epoch}/{recipe.epochs}", ema=ema,
                                          ema_decay=recipe.ema, mixup=recipe.mixup)
        train_seconds = time.perf_counter() - start
        ev_loss, ev_acc = evaluate(scored, eval_batches, device, None, channels_last)
        row = dict(epoch=epoch, lr=lr, train_loss=tr_loss, train_acc=tr_acc, test_loss=ev_loss,
                   test_acc=ev_acc, train_seconds=train_seconds,
                   seconds=time.perf_counter() - start,
                   images_per_s=len(train_loader) * train_loader.batch_size / train_seconds)
        history.append(row)
        if log is not None:
            log(row if log is not print else _format_row(row, recipe.epochs))
        if checkpoint is not None:
            save_checkpoint(checkpoint, scored, optimizer, epoch, history)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    return history


def _format_row(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4f}  "
            f"train loss {row['train_loss']:.3f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.3f} acc {100 * row['test_acc']:.2f}%  "
            f"{row['seconds']:.0f}s ({row['images_per_s']:.0f} img/s)")


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                    history: list[dict] | None = None) -> None:
    """Save model (and optimizer) state atomically: a temp file renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(model=model.state_dict(), epoch=epoch, history=history or [],
                 optimizer=optimizer.state_dict() if optimizer is not None else None)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint into ``model`` (and optimizer); clear errors if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
    except Exception as e:
        raise RuntimeError(f"Checkpoint {path} is corrupt or does not fit this model: {e}") from e
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
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
    """Loss, accuracy and learning rate per epoch."""
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(ep, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
        axes[1].plot(ep, [100 * h[key] for h in history], marker="o", label=label)
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
    fig, ax = plt.subplots(figsize=(10, 3.8))
    colors = {"conv": "tab:blue", "depthwise": "tab:orange", "pointwise": "tab:grey"}
    labels = [f"{row.layer} ({row.n_out}x{row.n_out})" for row in table.itertuples()]
    ax.bar(range(len(table)), table["rf"], color=[colors.get(k, "tab:green")
                                                   for k in table["kind"]])
    for i, row in enumerate(table.itertuples()):
        note = f"s{row.stride}" if row.stride > 1 else f"d{row.dilation}" if row.dilation > 1 \
            else ""
        ax.text(i, row.rf + 1, f"{row.rf}{' ' + note if note else ''}", ha="center", fontsize=7)
    ax.axhline(44, color="red", ls="--", lw=1, label="rule: RF > 44")
    ax.set_xticks(range(len(table)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("receptive field (pixels)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles + ax.get_legend_handles_labels()[0], [*colors, "rule: RF > 44"],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def save_figure(fig: Any, folder: str | os.PathLike, name: str) -> Path | None:
    """Save ``fig`` as ``folder/name`` (PNG, 100 dpi); do nothing when folder is empty."""
    if not folder:
        return None
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- benchmark
EPOCH_IMAGES, EVAL_IMAGES = 50_000, 10_000  # a CIFAR-10 training epoch and its test set


def _recipe_pipeline(recipe: Recipe, arrays: Sequence[np.ndarray], mean: Sequence[float],
                     std: Sequence[float], device: torch.device, workers: int | None,
                     seed: int = 0, num_classes: int = 10
                     ) -> tuple[DataLoader, TensorBatches, Net]:
    """The recipe's augmented training loader, test batches and (whitened) model."""
    x_tr, y_tr, x_te, y_te = arrays
    augment = EpochAugment(exercise_augmentations(mean, recipe.p_flip, seed=seed),
                           recipe.p_affine, recipe.p_dropout, recipe.aug_ramp, recipe.epochs)
    train_loader, test_batches = make_loaders(
        CifarDataset(x_tr, y_tr, augment), CifarDataset(x_te, y_te), recipe.batch_size, device,
        workers)
    model = build_model(recipe, num_classes, mean, std)
    if recipe.whiten:
        whiten_stem(model, x_tr)
    return train_loader, test_batches, model


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
    run(itertools.islice(batches, max(1, warmup)))
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


def _random_batches(n: int, batch_size: int, shape: Sequence[int], num_classes: int,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of random uint8 NHWC images and labels, already on ``device``."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch_size, *shape), generator=g, dtype=torch.uint8)
             .to(device), torch.randint(0, num_classes, (batch_size,), generator=g).to(device))
            for _ in range(n)]


def bench(data: CifarData | Sequence[np.ndarray], recipe: Recipe | str = "fast",
          device: torch.device | str | None = None, workers: int | None = None,
          batch_size: int | None = None, seconds: float = 8.0) -> dict:
    """Images/s of the training loader, the model's training step, both together, evaluation.

    ``data`` is a CifarData or (x_train, y_train, x_test, y_test). The recipe's model and
    augmentation run as in ``fit``; each figure is timed for ``seconds`` after a warm-up
    (model only in two halves, before and after end-to-end, so the two see the same load).
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
    optimizer, scheduler, criterion, scaler, ema = _training_parts(
        model, recipe, device, 10 ** 7, channels_last)  # a schedule that never runs out

    def train(batches: Iterable) -> None:
        train_one_epoch(model, batches, optimizer, scheduler, criterion, device, scaler,
                        channels_last, False, ema=ema, ema_decay=recipe.ema, mixup=recipe.mixup)

    fake = _cycle(_random_batches(4, recipe.batch_size, arrays[0].shape[1:], n_cls, device))
    real, warm = _cycle(loader), 2 + loader.num_workers * (loader.prefetch_factor or 0)
    t = dict(loader=_timed(_consume, real, seconds, warm))
    # model only in two halves around end-to-end: a load that drifts touches both alike
    first = _timed(train, fake, seconds / 2, 3)
    t["end_to_end"] = _timed(train, real, seconds, warm)
    second = _timed(train, fake, seconds / 2, 1)
    t["model"] = (first[0] + second[0], first[1] + second[1])
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
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helpers.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one recipe and log every epoch")
    t.add_argument("--data-dir", required=True, help="folder with CIFAR-10 in a known layout")
    t.add_argument("--download", action="store_true", help="download with torchvision")
    t.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    t.add_argument("--epochs", type=int, help="override the recipe's epochs")
    t.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    t.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    t.add_argument("--widths", type=int, nargs=4, help="override the C1..C4 channel widths")
    t.add_argument("--weight-decay", type=float, help="override the recipe's weight decay")
    t.add_argument("--p-affine", type=float, help="override the Affine probability")
    t.add_argument("--p-dropout", type=float, help="override the CoarseDropout probability")
    t.add_argument("--aug-ramp", choices=RAMPS, help="override how the Affine and "
                   "CoarseDropout probabilities change over the run (each averages its p)")
    t.add_argument("--ema", type=float, help="average the weights with this per-step decay")
    t.add_argument("--depths", type=int, nargs=4, metavar=("D1", "D2", "D3", "D4"),
                   help="override the residual blocks in C1..C4")
    t.add_argument("--kernel", type=int, help="override the depthwise kernel size of C3, C4")
    t.add_argument("--act", choices=sorted(ACTIVATIONS), help="override the activation")
    t.add_argument("--whiten", action=argparse.BooleanOptionalAction,
                   help="override whether C1's first conv whitens 3x3 patches")
    t.add_argument("--mixup", type=float, help="override the mixup Beta parameter (0: off)")
    t.add_argument("--label-smoothing", type=float, help="override the label smoothing")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-subset", type=int, help="train on this many images only")
    t.add_argument("--test-subset", type=int, help="test on this many images only")
    t.add_argument("--val-fraction", type=float, help="hold out this part of the training "
                   "set and evaluate on it instead of the test set (for tuning)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    t.add_argument("--workers", type=int, help="data-loader worker processes (default: auto)")
    t.add_argument("--out", default="runs/latest", help="folder for the log and checkpoint")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b = sub.add_parser("bench", help="images/s of the loader, the model, training, evaluation")
    b.add_argument("--data-dir", required=True, help="folder with CIFAR-10 in a known layout")
    b.add_argument("--download", action="store_true", help="download with torchvision")
    b.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    b.add_argument("--workers", type=int, help="data-loader worker processes (default: auto)")
    b.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    b.add_argument("--seconds", type=float, default=8.0, help="timed seconds per figure")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    b.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    return p


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    names = {f.name for f in fields(Recipe)}  # options named like Recipe fields override them
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("widths", "depths"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return Recipe(**{**asdict(RECIPES[args.recipe]), **overrides})


def run_training(args: argparse.Namespace) -> list[dict]:
    """The headless recipe: load, seed, build, train, log one row per epoch to ``--out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, out = _recipe_from_args(args), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_cifar10(args.data_dir, download=args.download)
    x_tr, y_tr = subset(data.x_train, data.y_train, args.train_subset, args.seed)
    x_te, y_te = subset(data.x_test, data.y_test, args.test_subset, args.seed)
    split = "val" if args.val_fraction else "test"
    if args.val_fraction:  # tuning: the test set is not touched
        x_tr, y_tr, x_te, y_te = split_train_val(x_tr, y_tr, args.val_fraction, seed=0)
    mean, std = compute_mean_std(x_tr)
    set_seed(args.seed)
    device = get_device()
    train_loader, test_batches, model = _recipe_pipeline(
        recipe, (x_tr, y_tr, x_te, y_te), mean, std, device, args.workers, args.seed)
    meta = dict(recipe=asdict(recipe), seed=args.seed, data=data.source, device=str(device),
                params=count_parameters(model), macs=count_macs(model),
                train_images=len(x_tr), eval_split=split, eval_images=len(x_te),
                threads=torch.get_num_threads())
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    log_path = out / "log.jsonl"
    log_path.write_text("")

    def log(row: dict) -> None:
        print(_format_row(row, recipe.epochs), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    history = fit(model, train_loader, test_batches, recipe, device,
                  progress=not args.no_progress, log=log, checkpoint=out / "model.pt")
    _, tta_acc = evaluate(model, test_batches, device, tta=True)
    summary = {f"final_{split}_acc": history[-1]["test_acc"],
               f"final_{split}_acc_flip_tta": tta_acc,
               "median_epoch_seconds": float(np.median([h["seconds"] for h in history])),
               "median_images_per_s": float(np.median([h["images_per_s"] for h in history]))}
    (out / "summary.json").write_text(json.dumps({**meta, **summary}, indent=2))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python helpers.py train|bench --data-dir DIR ...``."""
    args = _build_parser().parse_args(argv)
    if args.command == "train":
        run_training(args)
    elif args.command == "bench":
        _run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
