"""Reports (confusion matrix, per-class accuracy, Grad-CAM, denormalize) and plots."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

import helpers

TINY = (8, 16, 16, 16)
MEAN = (0.49, 0.48, 0.45)
CLASSES = helpers.CIFAR10_CLASSES


@pytest.fixture
def labels_preds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 10, 300))
    return labels, preds


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def show(*a, **k):
        raise AssertionError("helpers must return figures, never call plt.show")

    monkeypatch.setattr(plt, "show", show)


# --------------------------------------------------------------------------- metrics
def test_confusion_matrix_matches_sklearn(labels_preds):
    labels, preds = labels_preds
    cm = helpers.confusion_matrix(labels, preds, 10)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(labels, preds, labels=range(10)))
    assert cm.sum() == len(labels)


def test_confusion_matrix_rows_are_true_labels():
    cm = helpers.confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 3)
    np.testing.assert_array_equal(cm, [[0, 2, 0], [0, 1, 0], [0, 0, 0]])


def test_per_class_accuracy(labels_preds):
    labels, preds = labels_preds
    df = helpers.per_class_accuracy(labels, preds, CLASSES)
    assert list(df.index) == list(CLASSES)
    for k, name in enumerate(CLASSES):
        mask = labels == k
        assert df.loc[name, "images"] == mask.sum()
        assert df.loc[name, "correct"] == (preds[mask] == k).sum()
        assert df.loc[name, "accuracy"] == pytest.approx((preds[mask] == k).mean())


def test_per_class_accuracy_absent_class_is_zero():
    df = helpers.per_class_accuracy(np.array([0, 0]), np.array([0, 1]), ("a", "b", "c"))
    assert df["accuracy"].tolist() == [0.5, 0.0, 0.0]
    assert df["images"].tolist() == [2, 0, 0]


def test_classification_report_df(labels_preds):
    labels, preds = labels_preds
    df = helpers.classification_report_df(labels, preds, CLASSES)
    assert set(CLASSES) <= set(df.index)
    assert {"precision", "recall", "f1-score", "support"} <= set(df.columns)
    for k, name in enumerate(CLASSES):
        tp = np.sum((labels == k) & (preds == k))
        precision = tp / np.sum(preds == k)
        recall = tp / np.sum(labels == k)
        f1 = 2 * precision * recall / (precision + recall)
        assert df.loc[name, "precision"] == pytest.approx(precision)
        assert df.loc[name, "recall"] == pytest.approx(recall)
        assert df.loc[name, "f1-score"] == pytest.approx(f1)
        assert df.loc[name, "support"] == np.sum(labels == k)


def test_misclassified_indices(labels_preds):
    labels, preds = labels_preds
    np.testing.assert_array_equal(helpers.misclassified_indices(labels, preds),
                                  np.flatnonzero(labels != preds))
    first = helpers.misclassified_indices(labels, preds, n=5)
    np.testing.assert_array_equal(first, np.flatnonzero(labels != preds)[:5])
    assert len(helpers.misclassified_indices(labels, labels)) == 0


def test_misclassified_sample_spreads_over_a_class_sorted_split():
    """A test split sorted by class must not give a grid of one class (the first wrong ones)."""
    labels = np.repeat(np.arange(10), 100)  # like the image-folder test split
    preds = (labels + 1) % 10  # every prediction wrong
    wrong = np.flatnonzero(labels != preds)
    assert set(labels[helpers.misclassified_indices(labels, preds, n=20)]) == {0}
    a = helpers.misclassified_indices(labels, preds, n=20, seed=0)
    assert len(a) == 20 and len(set(a)) == 20 and set(a) <= set(wrong)
    assert np.all(np.diff(a) > 0) and len(set(labels[a])) >= 5
    np.testing.assert_array_equal(a, helpers.misclassified_indices(labels, preds, n=20, seed=0))
    assert not np.array_equal(a, helpers.misclassified_indices(labels, preds, n=20, seed=1))
    np.testing.assert_array_equal(helpers.misclassified_indices(labels, preds, n=5000, seed=0),
                                  wrong)


def test_predict_in_loader_order(cpu):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (13, 32, 32, 3), dtype=torch.uint8)
    y = torch.arange(13) % 10
    loader = helpers.TensorBatches(x, y, batch_size=4)
    model = helpers.Net(TINY).eval()
    preds, labels = helpers.predict(model, loader, cpu)
    assert isinstance(preds, np.ndarray) and len(preds) == len(labels) == 13
    np.testing.assert_array_equal(labels, y.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(preds, model(x.permute(0, 3, 1, 2)).argmax(1).numpy())


# --------------------------------------------------------------------------- Grad-CAM
def _manual_grad_cam(model, x, layer, classes):
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    model.eval()
    logits = model(x)
    h.remove()
    act = store["a"]
    score = logits[torch.arange(len(x)), torch.as_tensor(classes)].sum()
    (grads,) = torch.autograd.grad(score, act)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    out = []
    for c in cam.detach().numpy():
        c = c - c.min()
        out.append(c / c.max() if c.max() > 1e-8 else c)
    return np.stack(out)


def test_grad_cam_shape_range_and_value():
    torch.manual_seed(0)
    model = helpers.Net(TINY)
    x = torch.randn(3, 3, 32, 32)
    cams = helpers.grad_cam(model, x, model.c3, class_idx=[1, 2, 3])
    assert cams.shape == (3, 32, 32)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    ref = _manual_grad_cam(model, x, model.c3, [1, 2, 3])
    np.testing.assert_allclose(cams, ref, atol=1e-4)


def test_grad_cam_defaults_to_prediction_and_keeps_mode():
    torch.manual_seed(1)
    model = helpers.Net(TINY).train()
    x = torch.randn(2, 3, 32, 32)
    cams = helpers.grad_cam(model, x, model.c2)
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hook removed
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).tolist()
    np.testing.assert_allclose(cams, _manual_grad_cam(model, x, model.c2, pred), atol=1e-4)


# --------------------------------------------------------------------------- plots
def _history(split="test"):
    return [dict(epoch=e, lr=0.1 * e, train_loss=1.0 / e, train_acc=0.3 * e, eval_split=split,
                 eval_loss=1.1 / e, eval_acc=0.28 * e, seconds=1.0, images_per_s=10.0)
            for e in (1, 2, 3)]


def test_plot_image_grid(images):
    fig = helpers.plot_image_grid(images, np.arange(12) % 10, CLASSES, n=10, cols=5)
    assert isinstance(fig, Figure)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == [CLASSES[i] for i in range(10)]


def test_plot_augmentations(images):
    aug = helpers.exercise_augmentations(MEAN, seed=0)
    fig = helpers.plot_augmentations(images, aug, n_images=2, n_aug=3)
    assert isinstance(fig, Figure)
    assert sum(1 for ax in fig.axes if ax.images) == 2 * 4


def test_plot_history():
    fig = helpers.plot_history(_history())
    assert isinstance(fig, Figure) and len(fig.axes) == 3


def test_plot_history_and_rows_name_the_evaluated_split():
    fig = helpers.plot_history(_history("val"))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train", "val"]
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), [28, 56, 84])
    assert "val loss 1.100 acc 28.00%" in helpers._format_row(_history("val")[0], 3)
    old = [{k.replace("eval_", "test_"): v for k, v in row.items() if k != "eval_split"}
           for row in _history()]  # log rows written before the rename still plot
    fig = helpers.plot_history(old)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train", "test"]
    assert "test loss 1.100" in helpers._format_row(old[0], 3)


def test_plot_misclassified(images):
    labels = np.arange(12) % 10
    preds = labels.copy()
    preds[[1, 4, 7]] = 0
    fig = helpers.plot_misclassified(images, labels, preds, CLASSES, n=20, cols=5)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [f"{CLASSES[i]} -> airplane" for i in (1, 4, 7)]
    fig = helpers.plot_misclassified(images, labels, preds, CLASSES, n=2, seed=None)
    assert [ax.get_title() for ax in fig.axes if ax.images] == [
        f"{CLASSES[i]} -> airplane" for i in (1, 4)]


def test_plot_misclassified_none_wrong(images):
    labels = np.arange(12) % 10
    assert isinstance(helpers.plot_misclassified(images, labels, labels, CLASSES), Figure)


def test_plot_confusion_matrix(labels_preds):
    cm = helpers.confusion_matrix(*labels_preds, 10)
    fig = helpers.plot_confusion_matrix(cm, CLASSES)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert str(cm[0, 0]) in {t.get_text() for t in ax.texts}


@pytest.mark.parametrize("n_wrong", [10, 5, 3, 2, 1, 6, 7])
def test_plot_gradcam(images, n_wrong):
    """Any number of misclassified images (1..n) gets a top and a bottom panel each."""
    torch.manual_seed(0)
    model = helpers.Net(TINY)
    labels = np.zeros(12, dtype=np.int64)
    preds = labels.copy()
    preds[:n_wrong] = 3
    fig = helpers.plot_gradcam(model, images, labels, preds, CLASSES, model.c4, n=10, cols=5)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles.count("airplane -> cat") == n_wrong
    assert titles.count("Grad-CAM") == n_wrong


def test_plot_gradcam_none_wrong(images):
    """Like plot_misclassified, a model with no mistakes should still give a Figure."""
    model = helpers.Net(TINY)
    labels = np.zeros(12, dtype=np.int64)
    fig = helpers.plot_gradcam(model, images, labels, labels, CLASSES, model.c4)
    assert isinstance(fig, Figure)


def test_plot_augmentation_rows(images):
    augments = {name: helpers.exercise_augmentations(MEAN, *p, seed=0)
                for name, p in (("flip", (1, 0, 0)), ("affine", (0, 1, 0)),
                                ("cutout", (0, 0, 1)))}
    fig = helpers.plot_augmentation_rows(images[0], augments, n_aug=3)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["original", "flip", "flip", "flip", "original", "affine", "affine",
                      "affine", "original", "cutout", "cutout", "cutout"]
    shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(shown[1], images[0][:, ::-1])  # the flip at p = 1


def test_plot_receptive_field():
    table = helpers.receptive_field_table(helpers.Net(TINY))
    fig = helpers.plot_receptive_field(table)
    assert isinstance(fig, Figure)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0] == "C1 stem (32x32)" and ticks[1] == "C1 residual 1, conv 1 (32x32)"
    assert "C2 downsample (16x16)" in ticks
    assert len(fig.axes[0].patches) == len(table)


# --------------------------------------------------------------------------- figures folder
@pytest.mark.parametrize("requested, smoke, expected", [
    (None, False, "images"),    # a full run writes the README's figures
    (None, True, None),         # a smoke run never does
    ("out/figs", True, "out/figs"),  # unless a folder is named explicitly
    ("out/figs", False, "out/figs"),
    ("", False, None),          # "" saves nothing
])
def test_figures_folder(requested, smoke, expected):
    assert helpers.figures_folder(requested, smoke) == expected


def test_save_figure_writes_png_or_nothing(tmp_path):
    fig, _ = plt.subplots()
    assert helpers.save_figure(fig, tmp_path / "figs", "a.png") is None  # no echo in notebooks
    assert (tmp_path / "figs" / "a.png").read_bytes()[:4] == b"\x89PNG"
    for folder in (None, ""):
        helpers.save_figure(fig, folder, "b.png")
    assert not list(tmp_path.rglob("b.png"))
