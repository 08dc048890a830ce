"""Augmentation and the input path: the exercise's albumentations pipeline (its defaults,
what each transform does and how often, the record of what fired), EpochAugment's per-epoch
streams, the mapping from the exercise's 1.x names, to_input and InputNorm."""
from __future__ import annotations

import inspect
import math
import warnings

import albumentations  # noqa: F401  (import-time warnings are not the pipelines' fault)
import numpy as np
import pytest
import torch

import helpers

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.1)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_pipelines_build_and_run_without_warnings():
    img = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        helpers.exercise_augmentations(MEAN)
        aug = helpers.exercise_augmentations(MEAN, 1.0, 1.0, 1.0, seed=0)
        aug(image=img)
        helpers.EpochAugment(aug, seed=0)(image=img)
        helpers.exercise_augmentations(MEAN, seed=0, record=True)(image=img)


def test_input_norm_is_exact_normalisation():
    img = _image(1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    out = helpers.InputNorm(MEAN, STD)(x)
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 3, 32, 32)
    ref = (img.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out[0].numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    torch.testing.assert_close(helpers.InputNorm(MEAN, STD)(x.float()), out)


def test_to_input_gives_channels_last_floats_on_the_cpu():
    batch = torch.from_numpy(np.stack([_image(2), _image(3)]))  # uint8 NHWC
    x = helpers.to_input(batch, torch.device("cpu"))
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, batch.permute(0, 3, 1, 2).float())
    assert "channels_last" not in inspect.signature(helpers.to_input).parameters
    torch.testing.assert_close(helpers.to_input(batch, "cpu"), x)  # a name will do, or nothing
    assert helpers.to_input(batch).is_contiguous(memory_format=torch.channels_last)


def test_a_model_classifies_raw_images_through_to_input():
    """What README shows for one's own images gives ``predict``'s labels."""
    torch.manual_seed(0)
    model = helpers.build_model(helpers.Recipe(widths=(4, 8, 8, 8))).eval()
    images = np.stack([_image(i) for i in range(6)])  # as load_cifar10 gives them
    with torch.no_grad():
        labels = model(helpers.to_input(images)).argmax(1).numpy()
    batch = torch.from_numpy(images)
    preds, _, _ = helpers.predict(model, [(batch, torch.zeros(6, dtype=torch.long))])
    np.testing.assert_array_equal(labels, preds)
    torch.testing.assert_close(helpers.to_input(images), helpers.to_input(batch))
    mirrored = images[:, :, ::-1]  # a view with a negative stride, as NumPy flips give
    torch.testing.assert_close(helpers.to_input(mirrored), helpers.to_input(batch.flip(2)))


def test_to_input_is_plain_contiguous_elsewhere():
    """Devices other than CPU and CUDA (MPS; here the shape-only meta device) get NCHW."""
    batch = torch.from_numpy(np.stack([_image(2), _image(3)]))
    x = helpers.to_input(batch, torch.device("meta"))
    assert x.device.type == "meta" and x.dtype == torch.float32
    assert tuple(x.shape) == (2, 3, 32, 32) and x.is_contiguous()


@pytest.mark.parametrize("batch", [
    torch.rand(2, 32, 32, 3),  # floats in 0..1, as torchvision's ToTensor gives
    torch.zeros(2, 3, 32, 32, dtype=torch.uint8),  # NCHW
    np.random.default_rng(0).random((2, 32, 32, 3))], ids=["float", "nchw", "numpy-float"])
def test_images_in_another_format_are_refused_not_scored(batch):
    """Raw uint8 NHWC pixels only: floats or NCHW would be scored near chance without a word."""
    with pytest.raises(ValueError, match=r"uint8 tensor of images \(N, H, W, 3\)"):
        helpers.to_input(batch, torch.device("cpu"))
    model = helpers.build_model(helpers.Recipe(widths=(4, 8, 8, 8)))
    with pytest.raises(ValueError, match="raw pixels 0..255"):
        helpers.predict_logits(model, [(batch, torch.zeros(2, dtype=torch.long))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_input_gives_channels_last_floats_on_cuda():
    batch = torch.from_numpy(np.stack([_image(2), _image(3)]))
    x = helpers.to_input(batch, torch.device("cuda"))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.cpu(), batch.permute(0, 3, 1, 2).float())


def test_epoch_augment_draws_depend_on_seed_and_epoch_only():
    img = _image(9)

    def draws(aug, epoch, n=6):
        aug.set_epoch(epoch)
        return [aug(image=img)["image"] for _ in range(n)]

    def make(seed):
        return helpers.EpochAugment(helpers.exercise_augmentations(MEAN, 0.5, 0.5, 0.5), seed)

    a, b = make(3), make(3)
    first = draws(a, 0)
    draws(a, 1)
    for u, v in zip(draws(a, 0), first):  # epoch 0 again: the same stream
        np.testing.assert_array_equal(u, v)
    for u, v in zip(draws(b, 0), first):  # another object, same seed: the same stream
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, v) for u, v in zip(draws(b, 1), first))
    assert any(not np.array_equal(u, v) for u, v in zip(draws(make(4), 0), first))


def test_epoch_augment_needs_a_seed():
    with pytest.raises(TypeError, match="seed"):
        helpers.EpochAugment(helpers.exercise_augmentations(MEAN))


# --------------------------------------------------------------------------- defaults and record
def test_default_probabilities_are_the_recipes():
    params = inspect.signature(helpers.exercise_augmentations).parameters
    recipe = helpers.Recipe()
    for name in ("p_flip", "p_affine", "p_dropout"):
        assert params[name].default == getattr(recipe, name)
    assert (recipe.p_flip, recipe.p_affine, recipe.p_dropout) == (0.5, 0.25, 0.25)
    assert params["record"].default is False and params["seed"].default is None
    built = [t.p for t in helpers.exercise_augmentations(MEAN).transforms]
    assert built == [recipe.p_flip, recipe.p_affine, recipe.p_dropout]


@pytest.mark.parametrize("fired", ["HorizontalFlip", "Affine", "CoarseDropout"])
def test_record_names_exactly_the_transform_that_fired(fired):
    p = {name: float(name == fired) for name in ("HorizontalFlip", "Affine", "CoarseDropout")}
    aug = helpers.exercise_augmentations(MEAN, p["HorizontalFlip"], p["Affine"],
                                         p["CoarseDropout"], seed=0, record=True)
    img = _image(8)
    for _ in range(5):
        out = aug(image=img)
        assert [name for name, _ in out["applied_transforms"]] == [fired]
        assert not np.array_equal(out["image"], img)


def test_record_names_all_three_in_order_and_none():
    img = _image(8)
    every = helpers.exercise_augmentations(MEAN, 1.0, 1.0, 1.0, seed=0, record=True)
    assert [n for n, _ in every(image=img)["applied_transforms"]] == [
        "HorizontalFlip", "Affine", "CoarseDropout"]
    none = helpers.exercise_augmentations(MEAN, 0.0, 0.0, 0.0, seed=0, record=True)(image=img)
    assert none["applied_transforms"] == []
    np.testing.assert_array_equal(none["image"], img)
    plain = helpers.exercise_augmentations(MEAN, 1.0, 1.0, 1.0, seed=0)(image=img)
    assert set(plain) == {"image"}  # nothing recorded unless asked


def test_record_agrees_with_the_image_and_default_rates():
    """With the default probabilities each transform fires at its rate, and the record says
    what happened: nothing recorded leaves the image as it was, a lone flip mirrors it."""
    img = _image(10)
    aug = helpers.exercise_augmentations(MEAN, seed=0, record=True)
    n, counts = 1200, dict(HorizontalFlip=0, Affine=0, CoarseDropout=0)
    for _ in range(n):
        out = aug(image=img)
        names = [name for name, _ in out["applied_transforms"]]
        for name in names:
            counts[name] += 1
        if not names:
            np.testing.assert_array_equal(out["image"], img)
        elif names == ["HorizontalFlip"]:
            np.testing.assert_array_equal(out["image"], img[:, ::-1])
        else:
            assert not np.array_equal(out["image"], img)
    recipe = helpers.Recipe()
    for name, p in (("HorizontalFlip", recipe.p_flip), ("Affine", recipe.p_affine),
                    ("CoarseDropout", recipe.p_dropout)):
        assert abs(counts[name] - n * p) < 4 * math.sqrt(n * p * (1 - p)), (name, counts)


def test_exercise_augmentations_keep_shape_and_dtype():
    aug = helpers.exercise_augmentations(MEAN, 1.0, 1.0, 1.0, seed=0)
    img = _image(4)
    for _ in range(5):
        out = aug(image=img)["image"]
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_dropout_cuts_one_16x16_hole_of_mean_colour():
    aug = helpers.exercise_augmentations(MEAN, p_flip=0.0, p_affine=0.0, p_dropout=1.0, seed=0)
    img = np.zeros((32, 32, 3), np.uint8)
    expected = np.array([round(m * 255) for m in MEAN])
    corners = set()
    for _ in range(20):
        out = aug(image=img)["image"]
        changed = (out != 0).any(-1)
        rows, cols = np.nonzero(changed)
        assert changed.sum() == 256
        assert rows.max() - rows.min() + 1 == 16 and cols.max() - cols.min() + 1 == 16
        hole = out[changed].astype(int)
        assert np.abs(hole - expected).max() <= 1
        corners.add((rows.min(), cols.min()))
    assert len(corners) > 1  # the hole moves


def test_no_augmentation_is_identity():
    img = _image(5)
    aug = helpers.exercise_augmentations(MEAN, 0.0, 0.0, 0.0, seed=0)
    np.testing.assert_array_equal(aug(image=img)["image"], img)


def test_flip_always_mirrors():
    img = _image(6)
    aug = helpers.exercise_augmentations(MEAN, p_flip=1.0, p_affine=0.0, p_dropout=0.0, seed=0)
    np.testing.assert_array_equal(aug(image=img)["image"], img[:, ::-1])


def test_flip_rate_is_one_half():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 0] = 255  # asymmetric: a bright left column
    aug = helpers.exercise_augmentations(MEAN, p_flip=0.5, p_affine=0.0, p_dropout=0.0, seed=0)
    n, flips = 2000, 0
    for _ in range(n):
        out = aug(image=img)["image"]
        if np.array_equal(out, img[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, img)
    sigma = math.sqrt(n * 0.25)
    assert abs(flips - n / 2) < 4 * sigma


def test_seed_makes_augmentation_reproducible():
    img = _image(7)
    a = helpers.exercise_augmentations(MEAN, 0.5, 0.5, 0.5, seed=123)
    b = helpers.exercise_augmentations(MEAN, 0.5, 0.5, 0.5, seed=123)
    for _ in range(5):
        np.testing.assert_array_equal(a(image=img)["image"], b(image=img)["image"])


def test_affine_reflects_the_border():
    """Reflect-101 border: no black corners on a bright image after rotate/shift."""
    img = np.full((32, 32, 3), 200, np.uint8)
    aug = helpers.exercise_augmentations(MEAN, p_flip=0.0, p_affine=1.0, p_dropout=0.0, seed=1)
    for _ in range(10):
        out = aug(image=img)["image"]
        assert out.min() >= 190


def test_augmentation_mapping_names_new_api():
    text = " ".join(" ".join(row) for row in helpers.AUGMENTATION_MAPPING)
    assert "num_holes_range" in text
    assert "Affine" in text and "ShiftScaleRotate" in text
    assert all(len(row) == 3 for row in helpers.AUGMENTATION_MAPPING)


@pytest.mark.parametrize("bad", ["max_holes", "fill_value"])
def test_mapping_new_side_avoids_old_names(bad):
    new_side = " ".join(row[1] for row in helpers.AUGMENTATION_MAPPING)
    assert bad not in new_side


def test_affine_keeps_the_aspect_ratio():
    """ShiftScaleRotate drew one scale for both axes: the Affine must too (keep_ratio)."""
    import albumentations as A
    aug = helpers.exercise_augmentations(MEAN, 0.5, 0.5, 0.5, seed=0)
    affine = [t for t in aug.transforms if isinstance(t, A.Affine)]
    assert len(affine) == 1 and affine[0].keep_ratio is True
    assert affine[0].scale["x"] == affine[0].scale["y"] == (0.9, 1.1)
    mapped = [row[1] for row in helpers.AUGMENTATION_MAPPING if row[1].startswith("Affine")]
    assert mapped and "keep_ratio=True" in mapped[0]


def test_mapping_names_the_versions_that_renamed():
    notes = {row[0].split("(")[0]: row[2] for row in helpers.AUGMENTATION_MAPPING}
    assert "1.4.5" in notes["CoarseDropout"] and "1.4.22" in notes["CoarseDropout"]
    assert "2.0" in notes["CoarseDropout"] and "2.0" in notes["ShiftScaleRotate"]
