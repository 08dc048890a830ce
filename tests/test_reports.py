"""Reports (predictions, hardest mistakes, confusion matrix, confused pairs, per-class
report, Grad-CAM) against independent answers, and what each plot shows."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import classification_report as sk_classification_report
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

import helpers
from conftest import CLASSES, TINY

MEAN = (0.49, 0.48, 0.45)


@pytest.fixture
def labels_preds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 10, 300))
    return labels, preds


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def tiny_net():
    """A tiny Net whose BatchNorm layers hold running statistics of their own."""
    torch.manual_seed(0)
    model = helpers.Net(TINY).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (16, 3, 32, 32)).float())
    return model.eval()


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def show(*a, **k):
        raise AssertionError("helpers must return figures, never call plt.show")

    monkeypatch.setattr(plt, "show", show)


def panels(fig):
    """The axes that show an image, in the grid's reading order."""
    return [ax for ax in fig.axes if ax.images]


def shown(ax, k=0):
    return np.asarray(ax.images[k].get_array())


# --------------------------------------------------------------------------- predictions
def test_predict_in_loader_order_with_each_images_loss(tiny_net):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (13, 32, 32, 3), dtype=torch.uint8)
    y = (torch.arange(13) * 7) % 10
    preds, labels, losses = helpers.predict(tiny_net, helpers.TensorBatches(x, y, batch_size=4))
    assert all(isinstance(a, np.ndarray) and len(a) == 13 for a in (preds, labels, losses))
    np.testing.assert_array_equal(labels, y.numpy())
    with torch.no_grad():
        logits = tiny_net.eval()(x.permute(0, 3, 1, 2).float())
    np.testing.assert_allclose(losses, F.cross_entropy(logits, y, reduction="none").numpy(),
                               rtol=1e-4, atol=1e-5)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-3).numpy()  # leave out near-ties of folded BN
    assert clear.sum() >= 10
    np.testing.assert_array_equal(preds[clear], logits.argmax(1).numpy()[clear])


def _hardest(labels, preds, losses, n):
    wrong = [i for i in range(len(labels)) if labels[i] != preds[i]]
    return sorted(wrong, key=lambda i: (-losses[i], i))[:n]  # ties: the earlier image first


@pytest.mark.parametrize("n", [0, 1, 3, 5, 100])
def test_hardest_mistakes_by_decreasing_loss(n):
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    preds = np.array([0, 2, 2, 4, 5, 5, 7, 8, 8, 0])  # wrong: 1, 3, 4, 6, 7, 9
    losses = np.array([9.0, 0.5, 8.0, 2.0, 0.5, 7.0, 2.0, 3.0, 6.0, 0.1])  # ties: 1/4, 3/6
    got = helpers.hardest_mistakes(labels, preds, losses, n)
    assert got.tolist() == _hardest(labels, preds, losses, n)
    assert got.tolist()[:6] == [7, 3, 6, 1, 4, 9][:n]
    assert len(got) == min(n, 6)  # n beyond the mistakes: all of them


def test_hardest_mistakes_random_and_none_wrong(labels_preds):
    labels, preds = labels_preds
    losses = np.round(np.random.default_rng(3).random(len(labels)), 2)  # many ties
    got = helpers.hardest_mistakes(labels, preds, losses, 40)
    assert got.tolist() == _hardest(labels, preds, losses, 40)
    assert np.all(np.diff(losses[got]) <= 0) and np.all(labels[got] != preds[got])
    assert len(helpers.hardest_mistakes(labels, labels, losses, 10)) == 0


# --------------------------------------------------------------------------- metrics
def test_confusion_matrix_matches_sklearn(labels_preds):
    labels, preds = labels_preds
    cm = helpers.confusion_matrix(labels, preds, 10)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(labels, preds, labels=range(10)))
    assert cm.sum() == len(labels)


def test_confusion_matrix_rows_are_true_labels():
    cm = helpers.confusion_matrix(np.array([0, 0, 1]), np.array([1, 1, 1]), 3)
    np.testing.assert_array_equal(cm, [[0, 2, 0], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("labels, preds", [([-1, 0], [0, 0]), ([0, 3], [0, 0]), ([0], [0, 1]),
                                           ([0.0, 1.0], [0, 1]), ([[0, 1]], [[0, 1]])])
def test_confusion_matrix_refuses_what_would_count_wrongly(labels, preds):
    """A label -1 went to the last row, one label was broadcast over many predictions."""
    with pytest.raises(ValueError, match="integers in 0..2"):
        helpers.confusion_matrix(np.array(labels), np.array(preds), 3)


def _pairs(cm, classes, n):
    cells = [(-cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm))
             if i != j and cm[i, j] > 0]
    return [(classes[i], classes[j], -c, 100 * -c / cm[i].sum())
            for c, i, j in sorted(cells)[:n]]


@pytest.mark.parametrize("n", [1, 5, 12, 200])
def test_confused_pairs_ranks_off_diagonal_counts(labels_preds, n):
    cm = helpers.confusion_matrix(*labels_preds, 10)
    df = helpers.confused_pairs(cm, CLASSES, n)
    assert list(df.columns) == ["true", "predicted", "images", "% of the true class"]
    want = _pairs(cm, CLASSES, n)
    assert len(df) == len(want) == min(n, int((cm - np.diag(np.diag(cm)) > 0).sum()))
    assert [tuple(r[:3]) for r in df.itertuples(index=False)] == [w[:3] for w in want]
    np.testing.assert_allclose(df["% of the true class"], [w[3] for w in want])


def test_confused_pairs_ties_and_few_mistakes():
    cm = np.array([[5, 2, 0], [0, 5, 0], [2, 3, 0]])  # a tie (0->1, 2->0), an empty class
    df = helpers.confused_pairs(cm, ("a", "b", "c"), 10)
    assert [tuple(r) for r in df.itertuples(index=False)] == [
        ("c", "b", 3, 60.0), ("a", "b", 2, 100 * 2 / 7), ("c", "a", 2, 40.0)]
    assert len(helpers.confused_pairs(np.diag([3, 4, 5]), ("a", "b", "c"))) == 0


@pytest.mark.parametrize("cm", [np.eye(3) * 100, np.ones((3, 2), int), np.ones((4, 4), int)])
def test_confused_pairs_refuses_what_is_not_a_matrix_of_counts(cm):
    """A matrix in % of each class was read as image counts (4.3% became 4 images)."""
    with pytest.raises(ValueError, match="expected counts"):
        helpers.confused_pairs(cm, ("a", "b", "c"))


def test_class_report_matches_sklearn(labels_preds):
    labels, preds = labels_preds
    df = helpers.class_report(labels, preds, CLASSES)
    assert list(df.index) == list(CLASSES)
    assert list(df.columns) == ["precision %", "recall %", "F1 %", "images"]
    ref = sk_classification_report(labels, preds, labels=range(10), output_dict=True,
                                   zero_division=0)
    for k, name in enumerate(CLASSES):
        for col, key in (("precision %", "precision"), ("recall %", "recall"),
                         ("F1 %", "f1-score")):
            assert df.loc[name, col] == pytest.approx(round(100 * ref[str(k)][key], 1),
                                                      abs=1e-9), (name, col)
        mask = labels == k
        assert df.loc[name, "recall %"] == pytest.approx(100 * (preds[mask] == k).mean(),
                                                         abs=0.05)  # recall: class accuracy
        assert df.loc[name, "images"] == mask.sum()
    assert df["images"].dtype.kind == "i"
    values = df[["precision %", "recall %", "F1 %"]].to_numpy()
    np.testing.assert_allclose(values * 10, np.round(values * 10), atol=1e-6)  # 1 decimal


def test_class_report_absent_class_is_zero():
    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    df = helpers.class_report(labels, preds, ("a", "b", "c"))
    p, r, f1, support = precision_recall_fscore_support(labels, preds, labels=[0, 1, 2],
                                                        zero_division=0)
    np.testing.assert_allclose(df["precision %"], np.round(100 * p, 1))
    np.testing.assert_allclose(df["recall %"], np.round(100 * r, 1))
    np.testing.assert_allclose(df["F1 %"], np.round(100 * f1, 1))
    assert df["images"].tolist() == support.tolist() == [2, 2, 0]
    assert df.loc["c"].tolist() == [0, 0, 0, 0]
    assert df.loc["a"].tolist() == [100.0, 50.0, 66.7, 2]
    with pytest.raises(ValueError, match="integers in 0..2"):  # ignored, as confusion_matrix
        helpers.class_report(np.array([0, 3]), np.array([0, 1]), ("a", "b", "c"))  # refuses


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
    cam = torch.relu((weights * act).sum(1))
    out = []
    for c in cam.detach().numpy():  # one value per unit of the layer
        c = c - c.min()
        out.append(c / c.max() if c.max() > 1e-8 else c)
    return np.stack(out)


def test_grad_cam_shape_range_and_value():
    torch.manual_seed(0)
    model = helpers.Net(TINY)
    x = torch.randn(3, 3, 32, 32) * 60 + 128
    cams = helpers.grad_cam(model, x, model.c3, class_idx=[1, 2, 3])
    assert cams.shape == (3, 32, 32)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    # C3's 8x8 units are centred on pixels 0, 4, ..., 28 (two stride-2 convs of padding 1)
    np.testing.assert_allclose(cams[:, ::4, ::4], _manual_grad_cam(model, x, model.c3, [1, 2, 3]),
                               atol=1e-4)


def test_grad_cam_puts_each_unit_at_the_centre_of_its_receptive_field():
    # stride 2 twice, then a dilated 3x3 without padding (the extra credit's downsampler):
    # the 4x4 units are centred on pixels 8, 12, 16, 20; kernels heavier at the centre make the
    # unit centred on a lone bright pixel the hottest, so the map must peak on that pixel
    convs = [nn.Conv2d(3, 1, 3, 2, 1, bias=False), nn.Conv2d(1, 1, 3, 2, 1, bias=False),
             nn.Conv2d(1, 1, 3, dilation=2, bias=False)]
    for conv in convs:
        nn.init.ones_(conv.weight)
        conv.weight.data[..., 1, 1] = 4.0
    layer = nn.Sequential(*convs)
    model = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    nn.init.ones_(model[-1].weight)  # class 0 grows with every unit: its map is the layer's
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, 12, 16] = x[1, :, 16, 12] = 1.0
    for image, pixel in zip(helpers.grad_cam(model, x, layer, class_idx=[0, 0]), [(12, 16),
                                                                                  (16, 12)]):
        assert image[pixel] == 1.0 and (image == 1.0).sum() == 1


def test_grad_cam_of_a_layer_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="not a part of model"):
        helpers.grad_cam(helpers.Net(TINY), torch.zeros(1, 3, 32, 32), nn.Conv2d(3, 3, 3))


def test_grad_cam_defaults_to_prediction_and_keeps_mode():
    torch.manual_seed(1)
    model = helpers.Net(TINY).train()
    x = torch.randn(2, 3, 32, 32) * 60 + 128
    cams = helpers.grad_cam(model, x, model.c2)
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hook removed
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).tolist()
    np.testing.assert_allclose(cams[:, ::2, ::2], _manual_grad_cam(model, x, model.c2, pred),
                               atol=1e-4)  # C2's 16x16 units: pixels 0, 2, ..., 30


# --------------------------------------------------------------------------- plots
def _history(split_values=(1, 2, 3)):
    return [dict(epoch=e, lr=0.1 * e, train_loss=1.0 / e, train_acc=0.3 * e, eval_loss=1.1 / e,
                 eval_acc=0.28 * e, train_seconds=1.0, seconds=1.0, images_per_s=10.0)
            for e in split_values]


def _rows_of(axes):
    """Group axes by their row on the figure (top row first)."""
    ys = sorted({round(ax.get_position().y0, 6) for ax in axes}, reverse=True)
    return [[ax for ax in axes if round(ax.get_position().y0, 6) == y] for y in ys]


@pytest.mark.parametrize("per_class", [2, 3])
def test_plot_samples_one_row_per_class(arrays, per_class):
    x, y = arrays[0], arrays[1]  # 3 training images of each class
    fig = helpers.plot_samples(x, y, CLASSES, per_class=per_class, seed=0)
    assert isinstance(fig, Figure)
    shown_axes = panels(fig)
    assert len(shown_axes) == 10 * per_class
    rows = _rows_of(shown_axes)
    assert [len(r) for r in rows] == [per_class] * 10
    for c, row in enumerate(rows):
        assert [ax.get_title() for ax in row] == [CLASSES[c]] + [""] * (per_class - 1)
        of_class = x[y == c]
        picked = [next((k for k, img in enumerate(of_class)
                        if np.array_equal(shown(ax), img)), None) for ax in row]
        assert None not in picked, f"row {CLASSES[c]} shows an image of another class"
        assert len(set(picked)) == per_class  # no image twice


def test_plot_samples_fills_a_short_class_with_blanks(arrays):
    x, y = arrays[0], arrays[1]
    fig = helpers.plot_samples(x, y, CLASSES, per_class=4)
    rows = _rows_of(panels(fig))
    assert [len(r) for r in rows] == [4] * 10
    for c, row in enumerate(rows):
        real = [ax for ax in row if any(np.array_equal(shown(ax), img) for img in x[y == c])]
        assert len(real) == 3 and row[0] in real and row[0].get_title() == CLASSES[c]
        assert (shown(row[3]) == 255).all()  # the fourth: blank


def test_plot_pipeline_titles_what_fired(images):
    all_fire = helpers.exercise_augmentations(MEAN, 1, 1, 1, seed=0, record=True)
    fig = helpers.plot_pipeline([(images[0], all_fire), (images[1], all_fire)], n_aug=3)
    axes = panels(fig)
    assert len(axes) == 2 * 4 and [len(r) for r in _rows_of(axes)] == [4, 4]
    assert [ax.get_title() for ax in axes] == (["original"] + ["flip + affine + cutout"] * 3) * 2
    np.testing.assert_array_equal(shown(axes[0]), images[0])
    np.testing.assert_array_equal(shown(axes[4]), images[1])
    assert not np.array_equal(shown(axes[1]), images[0])


def test_plot_pipeline_unchanged_and_flip_only(images):
    none = helpers.exercise_augmentations(MEAN, 0, 0, 0, seed=0, record=True)
    axes = panels(helpers.plot_pipeline([(images[0], none)], n_aug=2))
    assert [ax.get_title() for ax in axes] == ["original", "unchanged", "unchanged"]
    for ax in axes:
        np.testing.assert_array_equal(shown(ax), images[0])
    flip = helpers.exercise_augmentations(MEAN, 1, 0, 0, seed=0, record=True)
    axes = panels(helpers.plot_pipeline([(images[0], flip)], n_aug=2))
    assert [ax.get_title() for ax in axes] == ["original", "flip", "flip"]
    np.testing.assert_array_equal(shown(axes[1]), images[0][:, ::-1])


def test_plot_pipeline_each_augmentation_alone_one_row_each(images):
    augments = {name: helpers.exercise_augmentations(MEAN, *p, seed=0, record=True)
                for name, p in (("flip", (1, 0, 0)), ("affine", (0, 1, 0)),
                                ("cutout", (0, 0, 1)))}
    fig = helpers.plot_pipeline([(images[0], a) for a in augments.values()], n_aug=3)
    assert isinstance(fig, Figure)
    rows = _rows_of(panels(fig))
    assert len(rows) == 3
    for row, name in zip(rows, augments):
        assert [ax.get_title() for ax in row] == ["original", name, name, name]
        np.testing.assert_array_equal(shown(row[0]), images[0])
    for ax in rows[0][1:]:
        np.testing.assert_array_equal(shown(ax), images[0][:, ::-1])  # the flip at p = 1
    for ax in rows[1][1:] + rows[2][1:]:
        assert not np.array_equal(shown(ax), images[0])


@pytest.mark.parametrize("split", ["test", "val"])
def test_plot_history_panels_legend_and_target(split):
    fig = helpers.plot_history(_history(), split=split)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == [
        "loss (train's with label smoothing)", "accuracy (%)", "SGD's learning rate at epoch start"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    loss, acc, lr = fig.axes
    train = "train (augmented)"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [train, split]
    assert [t.get_text() for t in acc.get_legend().get_texts()] == [train, split, "85% target"]
    np.testing.assert_allclose(loss.lines[1].get_ydata(), [1.1, 0.55, 1.1 / 3])
    np.testing.assert_allclose(acc.lines[0].get_ydata(), [30, 60, 90])
    np.testing.assert_allclose(acc.lines[1].get_ydata(), [28, 56, 84])
    assert any(np.allclose(line.get_ydata(), 85) for line in acc.lines[2:])
    np.testing.assert_allclose(lr.lines[0].get_ydata(), [0.1, 0.2, 0.3])
    assert f"{split} loss 1.100 acc 28.00%" in helpers.format_row(_history()[0], split, 3)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 10])
def test_plot_mistakes_image_above_its_grad_cam(images, tiny_net, cpu, n):
    labels = np.arange(12) % 10
    preds = (labels + 3) % 10
    idx = np.arange(12)[::-1][:n]  # any order, any count
    fig = helpers.plot_mistakes(tiny_net, tiny_net.c4, images, labels, preds, idx, CLASSES)
    assert isinstance(fig, Figure)
    axes = panels(fig)
    tops = [ax for ax in axes if ax.get_title() != "Grad-CAM"]
    cams = [ax for ax in axes if ax.get_title() == "Grad-CAM"]
    assert [ax.get_title() for ax in tops] == [
        f"{CLASSES[labels[i]]} -> {CLASSES[preds[i]]}" for i in idx]
    assert len(cams) == n and all(len(ax.images) == 2 for ax in cams)  # heat map overlay
    assert all(len(ax.images) == 1 for ax in tops)
    want = _manual_grad_cam(tiny_net, helpers.to_input(torch.as_tensor(images[idx]), cpu),
                            tiny_net.c4, preds[idx].tolist())
    for k, i in enumerate(idx):
        top = tops[k]
        below = [ax for ax in cams if np.isclose(ax.get_position().x0, top.get_position().x0)
                 and ax.get_position().y0 < top.get_position().y0]
        cam = max(below, key=lambda ax: ax.get_position().y0)  # the panel right below
        np.testing.assert_array_equal(shown(top), images[i])
        np.testing.assert_array_equal(shown(cam, 0), images[i])
        np.testing.assert_allclose(shown(cam, 1)[::8, ::8], want[k], atol=1e-4)  # 0, 8, .., 24
    assert len(_rows_of(axes)) == 2 * -(-n // 5)  # at most 5 a row, each with its maps


def test_plot_mistakes_none(images, tiny_net):
    labels = np.zeros(12, dtype=np.int64)
    fig = helpers.plot_mistakes(tiny_net, tiny_net.c4, images, labels, labels,
                                np.array([], dtype=np.int64), CLASSES)
    assert isinstance(fig, Figure) and panels(fig) == []
    fig = helpers.plot_mistakes(tiny_net, tiny_net.c4, images, labels, labels,
                                helpers.hardest_mistakes(labels, labels, np.ones(12), 10),
                                CLASSES)
    assert panels(fig) == []


def test_plot_confusion_matrix_rows_in_percent(labels_preds):
    cm = helpers.confusion_matrix(*labels_preds, 10)
    fig = helpers.plot_confusion_matrix(cm, CLASSES)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASSES)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    grid = np.full((10, 10), np.nan)
    for t in ax.texts:
        x, y = t.get_position()
        grid[int(y), int(x)] = float(t.get_text())
    assert not np.isnan(grid).any()
    share = 100 * cm / cm.sum(1, keepdims=True)
    np.testing.assert_allclose(grid, share, atol=0.05 + 1e-9)  # rounded to 0.1 percent
    assert np.all(np.abs(grid.sum(1) - 100) <= 0.5)  # each row: about 100


def test_plot_confusion_matrix_class_names_do_not_touch(labels_preds):
    fig = helpers.plot_confusion_matrix(helpers.confusion_matrix(*labels_preds, 10), CLASSES)
    renderer = fig.canvas.get_renderer()
    for axis in ("x", "y"):
        boxes = [t.get_window_extent(renderer).padded(3) for t in  # a visible gap: 6 pixels
                 getattr(fig.axes[0], f"get_{axis}ticklabels")()]
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), axis


def test_plot_receptive_field_bars_labels_and_rule():
    table = helpers.receptive_field_table(helpers.Net(TINY))
    fig = helpers.plot_receptive_field(table)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == len(table)
    assert sorted(p.get_width() for p in ax.patches) == sorted(table["rf_out"])
    ticks = ax.get_yticklabels()
    by_height = sorted(zip(ax.get_yticks(), ticks), key=lambda yt: -yt[0])
    names = [t.get_text() for _, t in by_height]  # the first layer at the top
    assert names == [f"{r.block} {r.layer} ({r.n_out}x{r.n_out})" for r in table.itertuples()]
    assert names[0] == "C1 stem (32x32)" and names[1] == "C1 residual 1, conv 1 (32x32)"
    assert "C2 downsample (16x16)" in names
    assert all(t.get_fontsize() >= 9 for t in ticks)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "rule: RF > 44" in legend and {"conv", "depthwise", "pointwise"} <= set(legend)
    assert any(np.allclose(line.get_xdata(), 44) for line in ax.lines)
    assert "receptive field" in ax.get_xlabel()


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
