"""Reading CIFAR-10: load_cifar10 in every layout, the data it refuses rather than silently
change the task (from Python and from the command line), statistics, subsets, the dataset and
the loaders."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from conftest import (CLASSES, TINY_RUN, cli, make_arrays, one_line, snapshot, write_batches,
                      write_image_folder)

ACCEPTED = ("cifar-10-batches-py", "train/<class>")


def _stat(root: Path) -> dict:
    """Every path under root (folders too) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _check_exact(data, arrays):
    x_tr, y_tr, x_te, y_te = arrays
    assert data.x_train.dtype == np.uint8 and data.x_train.shape == (30, 32, 32, 3)
    assert data.x_test.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(data.x_train, x_tr)
    np.testing.assert_array_equal(data.y_train, y_tr)
    np.testing.assert_array_equal(data.x_test, x_te)
    np.testing.assert_array_equal(data.y_test, y_te)
    # HWC order: the marker written at row 5, column 7 is pure blue
    assert tuple(data.x_train[0, 5, 7]) == (0, 0, 255)
    assert tuple(data.classes) == CLASSES


# --------------------------------------------------------------------------- layouts
def test_batches_folder_inside_root(batches_root, arrays):
    data = helpers.load_cifar10(batches_root)
    _check_exact(data, arrays)
    assert "batches" in data.source


def test_batches_folder_as_root(batches_root, arrays):
    data = helpers.load_cifar10(batches_root / "cifar-10-batches-py")
    _check_exact(data, arrays)


def test_batches_chw_order_against_raw_bytes(batches_root):
    """The first 1024 bytes of a row are the red plane, row-major (official format)."""
    with open(batches_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    img = helpers.load_cifar10(batches_root).x_train[0]
    assert img[5, 7, 0] == raw[0 * 1024 + 5 * 32 + 7]
    assert img[5, 7, 2] == raw[2 * 1024 + 5 * 32 + 7]
    assert img[31, 0, 1] == raw[1 * 1024 + 31 * 32 + 0]


def test_batches_without_meta_uses_cifar_names(batches_root, arrays):
    (batches_root / "cifar-10-batches-py" / "batches.meta").unlink()
    data = helpers.load_cifar10(batches_root)
    assert tuple(data.classes) == helpers.CIFAR10_CLASSES


def test_png_folder_round_trip(png_root, arrays):
    data = helpers.load_cifar10(png_root)
    _check_exact(data, arrays)
    assert "image folder" in data.source


@pytest.mark.parametrize("layout", ["batches_root", "png_root"])
def test_a_split_left_out_is_not_read(layout, arrays, request):
    """``splits=("test",)``: the test split as a full load gives it, the training split empty
    (its images are not decoded: a corrupt one goes unnoticed); a misspelt split is refused."""
    root = request.getfixturevalue(layout)
    full = helpers.load_cifar10(root)
    for corrupt in sorted(root.rglob("data_batch_1")) + sorted(root.glob("train/*/*"))[:1]:
        corrupt.write_bytes(b"not an image")
    data = helpers.load_cifar10(root, splits=("test",))
    np.testing.assert_array_equal(data.x_test, full.x_test)
    np.testing.assert_array_equal(data.y_test, full.y_test)
    assert data.x_train.shape == (0, 32, 32, 3) and data.y_train.shape == (0,)
    assert data.classes == full.classes
    with pytest.raises(ValueError, match="Cannot read"):
        helpers.load_cifar10(root)  # read in full, the damage is found
    for bad in (("tset",), "test", ()):
        with pytest.raises(ValueError, match="splits: expected"):
            helpers.load_cifar10(root, splits=bad)


def test_jpeg_folder_shapes_and_labels(jpeg_root, arrays):
    x_tr, y_tr, x_te, y_te = arrays
    data = helpers.load_cifar10(jpeg_root)
    assert data.x_train.shape == x_tr.shape and data.x_train.dtype == np.uint8
    assert data.x_test.shape == x_te.shape
    np.testing.assert_array_equal(data.y_train, y_tr)
    np.testing.assert_array_equal(data.y_test, y_te)
    assert tuple(data.classes) == CLASSES
    # lossy: random noise is the worst case for JPEG, yet far from unrelated images (~85)
    assert np.abs(data.x_train.astype(int) - x_tr.astype(int)).mean() < 80


def test_jpeg_smooth_image_close(tmp_path):
    """A smooth gradient survives JPEG within a few grey levels."""
    g = np.linspace(0, 255, 32).astype(np.uint8)
    img = np.stack([np.tile(g, (32, 1)), np.tile(g[:, None], (1, 32)),
                    np.full((32, 32), 90, np.uint8)], axis=-1)
    x = np.stack([img] * 10)
    y = np.arange(10)
    root = write_image_folder(tmp_path / "j", x, y, x, y, ext=".jpg")
    data = helpers.load_cifar10(root)
    assert np.abs(data.x_train.astype(int) - x.astype(int)).mean() < 4


def test_uppercase_and_jpeg_extensions_accepted(tmp_path, arrays):
    x_tr, y_tr, x_te, y_te = arrays
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for c in CLASSES[:2]:
            (root / split / c).mkdir(parents=True)
    Image.fromarray(x_tr[0]).save(root / "train" / "airplane" / "a.PNG")
    Image.fromarray(x_tr[1]).save(root / "train" / "automobile" / "b.jpeg", quality=95)
    Image.fromarray(x_te[0]).save(root / "test" / "airplane" / "c.png")
    Image.fromarray(x_te[1]).save(root / "test" / "automobile" / "d.png")
    data = helpers.load_cifar10(root)
    assert data.classes == ("airplane", "automobile")
    np.testing.assert_array_equal(data.y_train, [0, 1])
    np.testing.assert_array_equal(data.x_train[0], x_tr[0])


# --------------------------------------------------------------------------- errors
def test_missing_folder_raises_file_not_found(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        helpers.load_cifar10(missing, download=False)
    msg = str(e.value)
    assert "nowhere" in msg
    for layout in ACCEPTED:
        assert layout in msg
    assert not missing.exists()  # download=False creates nothing


def test_empty_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        helpers.load_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_names_the_file(png_root):
    bad = png_root / "train" / "cat" / "9999.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(ValueError) as e:
        helpers.load_cifar10(png_root)
    assert "9999.png" in str(e.value)


def _png(width: int, height: int, rgb: np.ndarray | None = None) -> bytes:
    """A PNG of ``width`` x ``height`` pixels: ``rgb``'s at 16 bits per channel (which PIL reads
    but cannot write), or none at all (a header claiming that size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    rows = b"" if rgb is None else b"".join(b"\x00" + r.astype(">u2").tobytes() for r in rgb)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(rows)) if rows else b""
    return b"\x89PNG\r\n\x1a\n" + header + pixels + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])
def test_an_image_claiming_a_huge_size_names_the_file(png_root, side):
    """Over PIL's limit: an error; up to twice it, a warning printed beside the refusal."""
    (png_root / "test" / "dog" / "huge.png").write_bytes(_png(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none may escape
        with pytest.raises(ValueError, match="huge.png"):
            helpers.load_cifar10(png_root)


@pytest.mark.parametrize("kind", ["16-bit grey", "16-bit colour", "16-bit grey TIFF",
                                  "a text chunk too large to read"])
def test_an_image_read_wrongly_or_not_at_all_names_the_file(png_root, kind):
    """16-bit pixels came back clipped to 255 (nearly white), silently, or (colour) read as
    their high byte; a PNG whose text chunk PIL will not inflate failed without naming the
    file."""
    path = sorted((png_root / "train" / "cat").iterdir())[0]
    grey = np.asarray(Image.open(path).convert("L"), np.uint16) * 257
    if kind == "16-bit grey":
        Image.fromarray(grey).save(path)
        assert Image.open(path).mode.startswith("I")
        says = "8 bits per channel"
    elif kind == "16-bit grey TIFF":  # PIL's note of how it is stored is a tuple: a traceback
        Image.fromarray(grey).save(path, format="TIFF")
        says = "8 bits per channel"
    elif kind == "16-bit colour":
        path.write_bytes(_png(32, 32, np.asarray(Image.open(path).convert("RGB"), np.uint16) * 257))
        assert Image.open(path).mode == "RGB"  # what PIL makes of it
        says = "8 bits per channel"
    else:
        from PIL import PngImagePlugin
        info = PngImagePlugin.PngInfo()
        info.add_text("note", "x" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)
        Image.open(path).save(path, pnginfo=info)
        says = "Cannot read image"
    assert says in one_line(_refused(png_root, [str(path)]))


@pytest.mark.parametrize("folder", ["test/dog", "train/dog"])
@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_an_image_linked_from_another_class_or_split_is_refused(png_root, tmp_path, folder,
                                                                 kind):
    """A test image linked into train/ trained on the test set; one of another class, twice
    (a hard link was not noticed)."""
    target, link = sorted((png_root / folder).iterdir())[0], png_root / "train/cat/linked.png"
    link.symlink_to(target) if kind == "symbolic" else os.link(target, link)
    _refused(png_root, [str(link), "labels or splits would mix"])
    link.unlink()  # a link within its own class folder, or to outside the data, reads as is
    link.symlink_to(sorted((png_root / "train" / "cat").iterdir())[0])
    shutil.copy(target, tmp_path / "outside.png")
    (png_root / "train" / "cat" / "outside.png").symlink_to(tmp_path / "outside.png")
    assert len(helpers.load_cifar10(png_root).x_train) == 3 * len(CLASSES) + 2  # both read


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_a_batch_file_that_is_another_one_is_refused(batches_root, kind):
    """data_batch_3 as a link to test_batch trained on the test images, without a word."""
    folder = batches_root / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_3").symlink_to("test_batch") if kind == "symbolic" else os.link(
        folder / "test_batch", folder / "data_batch_3")
    _refused(batches_root, ["data_batch_3", "test_batch", "labels or splits would mix"])


def test_a_batch_of_images_in_another_layout_is_refused(batches_root):
    """(N, 32, 32, 3) images were reshaped to (N, 3, 32, 32): red ones came back grey."""
    path = batches_root / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]}, f)
    _refused(batches_root, ["data_batch_2", "rows of 3072 values"])


@pytest.mark.parametrize("name", ["train/cat/x.png", "cifar-10-batches-py/data_batch_3",
                                  "cifar-10-batches-py/batches.meta"])
def test_a_pipe_among_the_images_is_refused_not_waited_on(png_root, batches_root, name):
    """A named pipe called x.png, data_batch_3 or batches.meta: reading it waited for a writer
    forever."""
    root = png_root if name.startswith("train") else batches_root
    (root / name).unlink(missing_ok=True)
    os.mkfifo(root / name)
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("load_cifar10 waited on it"))
    signal.alarm(60)
    try:
        _refused(root, [name.split("/")[-1], "not a file"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_batch_values_out_of_range_name_the_file(batches_root):
    path = batches_root / "cifar-10-batches-py" / "data_batch_2"
    for data, labels in (([300] * 3072, [0]), ([0] * 3072, [2 ** 70]),  # lists, and arrays,
                         (np.full((1, 3072), 300), [0]), (np.full((1, 3072), 0.7), [0]),
                         (np.full((1, 3072), -1), [0]), ([0] * 3072, np.array([1.5]))):
        with open(path, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        with pytest.raises(ValueError, match="data_batch_2"):
            helpers.load_cifar10(batches_root)


def test_wrong_size_image_names_the_file(png_root):
    bad = png_root / "test" / "dog" / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError) as e:
        helpers.load_cifar10(png_root)
    assert "small.png" in str(e.value)
    assert "16x16" in str(e.value)


def test_grayscale_image_converted_to_rgb(png_root):
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(
        png_root / "train" / "cat" / "9998.png")
    data = helpers.load_cifar10(png_root)
    assert data.x_train.shape == (31, 32, 32, 3)
    grey = data.x_train[data.y_train == 3][-1]
    assert (grey == 77).all()


def test_loading_never_modifies_the_folder(batches_root, png_root):
    for root in (batches_root, png_root):
        before, stat = snapshot(root), _stat(root)
        helpers.load_cifar10(root)
        assert snapshot(root) == before and _stat(root) == stat


def test_download_failure_is_runtime_error(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class Offline:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download))
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(RuntimeError) as e:
        helpers.load_cifar10(tmp_path / "dl", download=True)
    assert calls and calls[0][2] is True
    assert "network is unreachable" in str(e.value)
    assert "cifar-10-batches-py" in str(e.value)


def test_download_not_called_when_data_present(batches_root, arrays, monkeypatch):
    import torchvision.datasets

    def boom(*a, **k):
        raise AssertionError("must not download when the data is there")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", boom)
    _check_exact(helpers.load_cifar10(batches_root, download=True), arrays)


def test_download_that_writes_batches_is_loaded(tmp_path, arrays, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False, **kw):
            folder = Path(root) / "cifar-10-batches-py"
            if not folder.exists():
                write_batches(folder, *arrays)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    _check_exact(helpers.load_cifar10(tmp_path / "new", download=True), arrays)


# --------------------------------------------------------------------------- statistics
def test_compute_mean_std_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)
    ref = x.astype(np.float64) / 255.0
    mean, std = helpers.compute_mean_std(x, chunk=5)  # several chunks, a partial last one
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-6)
    assert len(mean) == 3 and all(isinstance(v, float) for v in mean + std)


def test_compute_mean_std_constant_channels():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 255, 51, 0
    mean, std = helpers.compute_mean_std(x)
    np.testing.assert_allclose(mean, (1.0, 0.2, 0.0), atol=1e-12)
    np.testing.assert_allclose(std, (0.0, 0.0, 0.0), atol=1e-6)
    x = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(256, 1, 1, 3)
    for value in range(256):  # 0 exactly, which is what marks a channel to refuse: rounding
        y = np.array(x[[value] * 7])  # left most values about 1e-8 ("constant 128": 5.5e-7)
        y[3:, 0, 0, 0] = (value + 1) % 256  # the first channel varies: it keeps its std
        std = helpers.compute_mean_std(y, chunk=2)[1]
        assert std[1:] == (0.0, 0.0) and std[0] == pytest.approx(np.std(y[..., 0] / 255.0))
    with pytest.raises(ValueError, match="chunk"):
        helpers.compute_mean_std(x, chunk=-1)  # nan


@pytest.mark.parametrize("images", [np.zeros((2, 32, 32, 3)), np.zeros((2, 3, 32, 32), np.uint8),
                                    np.zeros((0, 32, 32, 3), np.uint8),
                                    torch.zeros(2, 32, 32, 3, dtype=torch.uint8)])
def test_compute_mean_std_refuses_what_it_would_get_wrong(images):
    """Floats on 0..1 gave a mean 255 times too small, NCHW 32 "channels", no image nan."""
    with pytest.raises(ValueError, match=r"uint8 array of images \(N, H, W, C\)"):
        helpers.compute_mean_std(images)


def test_subset_size_determinism_and_pairs():
    x = np.arange(100)[:, None] * np.ones((1, 3), int)
    y = np.arange(100)
    xs, ys = helpers.subset(x, y, 10, seed=3)
    assert len(xs) == len(ys) == 10 and len(set(ys.tolist())) == 10
    np.testing.assert_array_equal(xs[:, 0], ys)  # images stay paired with labels
    xs2, ys2 = helpers.subset(x, y, 10, seed=3)
    np.testing.assert_array_equal(ys, ys2)
    _, ys3 = helpers.subset(x, y, 10, seed=4)
    assert not np.array_equal(ys, ys3)
    assert helpers.subset(x, y, None)[1] is y
    assert len(helpers.subset(x, y, 1000)[1]) == 100


def test_split_train_val_disjoint_and_deterministic():
    x = np.arange(50) * 10
    y = np.arange(50)
    x_tr, y_tr, x_va, y_va = helpers.split_train_val(x, y, 0.2, seed=1)
    assert len(y_tr) == 40 and len(y_va) == 10
    assert set(y_tr.tolist()).isdisjoint(y_va.tolist())
    assert sorted(y_tr.tolist() + y_va.tolist()) == list(range(50))
    np.testing.assert_array_equal(x_tr, y_tr * 10)
    again = helpers.split_train_val(x, y, 0.2, seed=1)
    np.testing.assert_array_equal(again[3], y_va)
    other = helpers.split_train_val(x, y, 0.2, seed=2)
    assert not np.array_equal(other[3], y_va)


# --------------------------------------------------------------------------- dataset, loaders
def test_dataset_gives_uint8_hwc_tensors():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[1, 3, 4, 1] = 255
    ds = helpers.CifarDataset(x, np.array([5, 7]))
    img, lab = ds[1]
    assert len(ds) == 2 and lab == 7 and isinstance(lab, int)
    assert img.shape == (32, 32, 3) and img.dtype == torch.uint8
    assert img[3, 4, 1] == 255 and img.sum() == 255
    flip = helpers.CifarDataset(x, np.array([5, 7]),
                                lambda image: {"image": image[:, ::-1]})  # a negative stride
    assert flip[1][0][3, 27, 1] == 255


def test_loaders_shuffle_train_not_test():
    n = 40
    x = np.zeros((n, 32, 32, 3), np.uint8)
    y = np.arange(n)
    ds = helpers.CifarDataset(x, y)
    train, test = helpers.make_loaders(ds, ds, 8, "cpu", seed=0, num_workers=0)
    seen = torch.cat([lab for _, lab in train]).numpy()
    assert len(seen) == n and sorted(seen.tolist()) == list(range(n))
    assert not np.array_equal(seen, y)
    xb, yb = next(iter(train))
    assert xb.shape == (8, 32, 32, 3) and xb.dtype == torch.uint8 and yb.shape == (8,)
    test_labels = torch.cat([lab for _, lab in test]).numpy()
    np.testing.assert_array_equal(test_labels, y)
    assert test.batch_size >= 8


def test_training_order_depends_on_the_seed_only():
    """The global generators do not matter: the same seed gives the same epochs."""
    ds = helpers.CifarDataset(np.zeros((24, 32, 32, 3), np.uint8), np.arange(24))

    def two_epochs(seed: int, torch_seed: int) -> list[list[int]]:
        torch.manual_seed(torch_seed)
        np.random.seed(torch_seed)
        train, _ = helpers.make_loaders(ds, ds, 8, "cpu", seed=seed, num_workers=0)
        return [torch.cat([lab for _, lab in train]).tolist() for _ in range(2)]

    first = two_epochs(5, torch_seed=0)
    assert two_epochs(5, torch_seed=123) == first
    assert first[0] != first[1]  # each epoch its own order
    assert two_epochs(6, torch_seed=0)[0] != first[0]


def test_train_loader_drops_partial_batch():
    ds = helpers.CifarDataset(np.zeros((20, 32, 32, 3), np.uint8), np.arange(20))
    train, test = helpers.make_loaders(ds, ds, 8, "cpu", seed=0, num_workers=0)
    assert [len(b[1]) for b in train] == [8, 8]
    assert sum(len(b[1]) for b in test) == 20


def test_default_num_workers_on_cpu_is_none():
    ds = helpers.CifarDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    train, test = helpers.make_loaders(ds, ds, batch_size=2, device="cpu", seed=0)
    # the training threads use every core: augmentation runs in the main process
    assert train.num_workers == 0
    assert train.pin_memory is False
    assert isinstance(test, helpers.TensorBatches) and test.images.dtype == torch.uint8


def test_a_test_set_with_a_transform_is_refused():
    ds = helpers.CifarDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    augmented = helpers.CifarDataset(ds.images, ds.labels, lambda image: image)
    with pytest.raises(ValueError, match="test images are scored as they are"):
        helpers.make_loaders(ds, augmented, 2, "cpu", seed=0)


def test_make_loaders_needs_a_seed():
    ds = helpers.CifarDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    with pytest.raises(TypeError, match="seed"):
        helpers.make_loaders(ds, ds, 2, "cpu")


# --------------------------------------------------------------------------- hostile folders
def test_hidden_folders_and_files_are_skipped(png_root, arrays):
    """Case 5: .ipynb_checkpoints was taken for a class; macOS ._*.jpg stopped the load."""
    x_tr = arrays[0]
    for split in ("train", "test"):
        hidden = png_root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.fromarray(x_tr[0]).save(hidden / "0000.png")
        (png_root / split / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (png_root / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        # hidden names inside a class folder are skipped too, whatever they hold
        (png_root / split / "dog" / ".ipynb_checkpoints").mkdir()
        Image.fromarray(x_tr[0]).save(png_root / split / "dog" / ".ipynb_checkpoints" / "0.png")
        (png_root / split / "dog" / ".notes.txt").write_text("not an image")
    _check_exact(helpers.load_cifar10(png_root), arrays)


def test_hidden_folder_in_train_only_is_skipped(png_root, arrays):
    (png_root / "train" / ".ipynb_checkpoints").mkdir()
    _check_exact(helpers.load_cifar10(png_root), arrays)


def test_different_class_folders_are_named(png_root):
    (png_root / "train" / "zebra").mkdir()
    (png_root / "test" / "dog").rename(png_root / "test" / "doggo")
    with pytest.raises(ValueError) as e:
        helpers.load_cifar10(png_root)
    assert "only in train: ['dog', 'zebra']" in str(e.value)
    assert "only in test: ['doggo']" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a pickle"])
def test_broken_batch_file_is_named(batches_root, damage):
    """Case 8: 'pickle data was truncated' or 'Ran out of input' without the file's name."""
    path = batches_root / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:len(raw) // 2], "empty": b"",
                      "not a pickle": b"<html>502 Bad Gateway</html>"}[damage])
    with pytest.raises(ValueError) as e:
        helpers.load_cifar10(batches_root)
    assert "data_batch_3" in str(e.value)


def test_batch_file_with_code_is_refused_and_never_run(batches_root, tmp_path):

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = batches_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"test_batch.*not plain arrays"):
        helpers.load_cifar10(batches_root)
    assert not marker.exists()


def test_batch_file_with_mismatched_labels_is_named(batches_root):
    path = batches_root / "cifar-10-batches-py" / "data_batch_2"
    d = pickle.loads(path.read_bytes())
    d[b"labels"] = d[b"labels"][:-1]
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(ValueError, match=r"data_batch_2 as a CIFAR-10 batch \(ValueError: "
                                         r"it holds \d+ images but \d+ labels\)"):
        helpers.load_cifar10(batches_root)


def test_download_from_a_stalled_server_times_out(tmp_path, monkeypatch):
    """Case 7: --download against a server that accepts and then sends nothing."""
    import socket
    import time

    from torchvision.datasets import CIFAR10

    server = socket.create_server(("127.0.0.1", 0))  # listens, never answers
    port = server.getsockname()[1]
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"sent nothing for 0.5 s"):
            helpers.load_cifar10(tmp_path / "dl", download=True, timeout=0.5)
    finally:
        server.close()
    assert time.monotonic() - start < 30
    assert socket.getdefaulttimeout() is None  # restored


def test_test_batches_are_cache_sized_on_cpu():
    ds = helpers.CifarDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
    _, test = helpers.make_loaders(ds, ds, batch_size=2, device="cpu", seed=0, num_workers=0)
    assert 64 <= test.batch_size <= 256  # 256 scored about 1.4x slower than 128 on 2 cores


# --------------------------------------------------------------------------- task-changing data
# Each damage below once loaded without a word and trained on another task (a class lost, an
# extra class, images dropped). Each returns what the one-line error must name.
def _empty_class(root: Path, split: str = "train") -> list[str]:
    for f in (root / split / "cat").iterdir():
        f.unlink()
    return [f"the {split} split", "'cat'"]


def _extra_empty_class(root: Path) -> list[str]:
    for split in ("train", "test"):
        (root / split / "zebra").mkdir()
    return ["'zebra'"]


def _sub_folder(root: Path) -> list[str]:
    inner = root / "train" / "cat" / "more"
    inner.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(inner / "0000.png")
    return [str(inner)]


def _symlink_loop(root: Path) -> list[str]:
    for split in ("train", "test"):
        os.symlink(root / split, root / split / "loop")
    return [str(root / "train" / "loop")]


def _other_extension(root: Path, ext: str = ".webp") -> list[str]:
    path = root / "test" / "dog" / f"extra{ext}"
    if ext == ".txt":
        path.write_text("notes")
    else:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return [str(path)]


def _stray_file(root: Path, split: str = "train") -> list[str]:
    path = root / split / "labels.csv"
    path.write_text("file,label\n")
    return [str(path)]


def _refused(root: Path, must_name: list[str]) -> str:
    """load_cifar10(root) raises a one-line ValueError naming ``must_name``; nothing changes."""
    before = snapshot(root)
    with pytest.raises(ValueError) as e:
        helpers.load_cifar10(root)
    assert type(e.value) is ValueError
    msg = one_line(str(e.value))
    for name in must_name:
        assert name in msg
    assert snapshot(root) == before
    return msg


@pytest.mark.parametrize("split", ["train", "test"])
def test_class_folder_empty_in_one_split_is_refused(png_root, split):
    msg = _refused(png_root, _empty_class(png_root, split))
    assert "every class needs images in both splits" in msg


def test_extra_empty_class_folder_is_refused(png_root):
    _refused(png_root, _extra_empty_class(png_root))


def test_sub_folder_inside_a_class_folder_is_refused(png_root):
    msg = _refused(png_root, _sub_folder(png_root))
    assert "is a folder inside a class folder" in msg


def test_class_folder_linked_back_to_its_split_is_refused(png_root):
    """train/loop -> train looked like an 11th class holding the other classes' folders."""
    _refused(png_root, _symlink_loop(png_root))


@pytest.mark.parametrize("link", ["cat -> dog", "train -> test"])
def test_a_class_or_split_folder_linked_to_another_is_refused(png_root, link):
    """A link would label one folder's images twice, or train on the test set."""
    name, target = ("train/cat", "train/dog") if link == "cat -> dog" else ("train", "test")
    shutil.rmtree(png_root / name)
    os.symlink(png_root / target, png_root / name)
    msg = _refused(png_root, [str(png_root / name)])
    assert "another class folder too" in msg


@pytest.mark.parametrize("ext", [".webp", ".bmp", ".BMP", ".txt"])
def test_file_of_another_kind_in_a_class_folder_is_refused(png_root, ext):
    msg = _refused(png_root, _other_extension(png_root, ext))
    assert "not a PNG or JPEG file" in msg


@pytest.mark.parametrize("split", ["train", "test"])
def test_file_directly_in_a_split_folder_is_refused(png_root, split):
    msg = _refused(png_root, _stray_file(png_root, split))
    assert "only class folders belong" in msg


def test_split_folders_without_class_folders_are_refused(tmp_path):
    root = tmp_path / "nothing"
    for split in ("train", "test"):
        (root / split / ".ipynb_checkpoints").mkdir(parents=True)
    _refused(root, [str(root)])


@pytest.mark.parametrize("split", ["train", "test"])
def test_batches_with_a_class_missing_from_a_split_are_refused(tmp_path, split):
    x_tr, y_tr = make_arrays(3, seed=1)
    x_te, y_te = make_arrays(2, seed=2)
    if split == "train":
        x_tr, y_tr = x_tr[y_tr != 9], y_tr[y_tr != 9]
    else:
        x_te, y_te = x_te[y_te != 9], y_te[y_te != 9]
    write_batches(tmp_path / "cifar-10-batches-py", x_tr, y_tr, x_te, y_te)
    msg = _refused(tmp_path, [f"the {split} split", "'truck'"])
    assert "cifar-10-batches-py" in msg


@pytest.mark.parametrize("damage", [_empty_class, _extra_empty_class, _sub_folder, _symlink_loop,
                                    _other_extension, _stray_file],
                         ids=lambda f: f.__name__.strip("_"))
def test_command_line_refuses_such_data_before_training(png_root, tmp_path, capsys, damage):
    must_name = damage(png_root)
    before = snapshot(png_root)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--data-dir", png_root, "--out", out,
                            "--epochs", "1", *TINY_RUN)
    line = one_line(err)
    assert code == 2 and line.startswith("helpers.py train: error: ")
    for name in must_name:
        assert name in line
    # no training started: neither the run's settings nor an epoch row were printed
    assert "train_images" not in stdout
    assert not any(row.startswith("epoch ") for row in stdout.splitlines())
    assert not out.exists()  # and no run folder is left behind
    assert snapshot(png_root) == before
