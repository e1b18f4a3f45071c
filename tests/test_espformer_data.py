"""ESPFormer's data protocol on CIFAR-10 (issue 17): a class subset, unstratified nested subsets, the
random-resized-crop preset and unnormalised pixels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _training_data import REAL_CIFAR10, make_cifar_npz
from diffvision.data import ImageArrays, ImageDataModule
from diffvision.data.datasets import resolve_classes, select_classes
from diffvision.data.fractions import training_subset, unstratified_subset
from diffvision.data.transforms import ImageTransform, random_resized_crop, resized_crop_box

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_unstratified_subsets_are_nested_prefixes_blind_to_classes():
    n = 10_000
    subsets = {f: unstratified_subset(n, f, seed=0) for f in (0.01, 0.1, 0.25, 1.0)}
    assert [len(s) for s in subsets.values()] == [100, 1000, 2500, 10000]
    assert set(subsets[0.01]) < set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[1.0]) == set(range(n))
    labels = np.repeat([0, 1], n // 2)
    shuffled = np.random.default_rng(7).permutation(labels)
    # blind to the labels: the same indices whatever they are; stratified picks depend on them
    assert np.array_equal(training_subset(labels, 0.01, 0, "unstratified"),
                          training_subset(shuffled, 0.01, 0, "unstratified"))
    assert not np.array_equal(training_subset(labels, 0.01, 0), training_subset(shuffled, 0.01, 0))
    # not stratified: over seeds, the two classes' shares of 100 vary (a stratified subset is always 50 / 50)
    shares = {int(labels[unstratified_subset(n, 0.01, seed)].sum()) for seed in range(10)}
    assert len(shares) > 1 and {int(labels[training_subset(labels, 0.01, s)].sum()) for s in range(10)} == {50}
    assert not np.array_equal(unstratified_subset(n, 0.01, 0), unstratified_subset(n, 0.01, 1))


def test_bad_subset_settings_are_named():
    with pytest.raises(ValueError, match="keeps no sample of 40"):
        unstratified_subset(40, 0.01, 0)
    with pytest.raises(ValueError, match="unknown fraction_mode 'nested'"):
        training_subset(np.zeros(10, dtype=np.int64), 0.5, 0, "nested")


def test_select_classes_keeps_and_relabels_in_the_given_order():
    labels = np.arange(30) % 10
    images = np.zeros((30, 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(30)  # image i carries its index
    picked = select_classes(ImageArrays(images, labels, NAMES), resolve_classes(["dog", 3], NAMES))
    assert picked.classes == ["dog", "cat"]
    kept = picked.images[:, 0, 0, 0].astype(int)
    assert sorted(kept) == [3, 5, 13, 15, 23, 25]
    assert all(lab == (0 if labels[i] == 5 else 1) for i, lab in zip(kept, picked.labels))


@pytest.mark.parametrize("classes, message", [
    ([3], "at least 2"), ("cat", "at least 2"), ([3, 10], "class 10 is not one"), (["cat", "wolf"], "class 'wolf'"),
    ([3, "cat"], "name a class twice"),
])
def test_bad_classes_are_named(classes, message):
    with pytest.raises(ValueError, match=message):
        resolve_classes(classes, NAMES)


@pytest.mark.skipif(not (REAL_CIFAR10 / "train.npz").is_file(), reason="the offline CIFAR-10 copy is absent")
def test_cifar10_cat_vs_dog_has_the_protocol_sizes():
    sizes = {}
    for split in ("train", "test"):
        with np.load(REAL_CIFAR10 / f"{split}.npz") as d:
            sizes[split] = int(np.isin(d["labels"], [3, 5]).sum())
    assert sizes == {"train": 10_000, "test": 2_000}


def test_the_data_module_serves_cat_vs_dog_on_one_subset_for_every_seed(tmp_path):
    root = make_cifar_npz(tmp_path / "cifar", per_class_train=40, per_class_test=5)
    kept = {}
    for run_seed in (0, 1):
        dm = ImageDataModule("cifar10_npz", root=str(root), classes=[3, 5], fraction_mode="unstratified",
                             data_fraction=0.25, fraction_seed=0, shuffle_seed=run_seed, augment="random_resized_crop",
                             normalize=False, batch_size=8, num_workers=0, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"] and dm.mean == (0, 0, 0)
        assert len(dm.train_dataset) == 20 and len(dm.val_dataset) == 10
        kept[run_seed] = dm.subset_indices
        images, labels = next(iter(dm.train_dataloader()))
        assert set(labels.tolist()) <= {0, 1} and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        summary = dm.subset_summary()
        assert summary["fraction_mode"] == "unstratified" and summary["classes"] == [3, 5]
        assert sum(summary["per_class"].values()) == 20
    assert np.array_equal(kept[0], kept[1])
    with pytest.raises(ValueError, match="CPU only"):
        ImageDataModule("cifar10_npz", root=str(root), augment="random_resized_crop", augment_on_device=True)


# ---------------------------------------------------------------------------------------------
# random resized crop
# ---------------------------------------------------------------------------------------------

def test_resized_crop_boxes_stay_inside_with_the_sampled_area_and_aspect():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = resized_crop_box(32, 32, rng)
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
        # rounding w and h to whole pixels moves area and aspect by at most half a pixel each way
        assert (math.sqrt(0.08 * 1024) - 1) ** 2 <= h * w <= 1024
        assert 3 / 4 * (h - 1) / (h + 1) <= w / h <= 4 / 3 * (h + 1) / (h - 1)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one = random_resized_crop(image, np.random.default_rng(5))
    assert one.shape == image.shape and one.dtype == np.uint8
    assert np.array_equal(one, random_resized_crop(image, np.random.default_rng(5)))
    flat = np.full((32, 32, 3), 77, dtype=np.uint8)
    assert np.array_equal(random_resized_crop(flat, np.random.default_rng(2)), flat)


def test_the_preset_crops_and_flips_in_training_only():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    train = ImageTransform("random_resized_crop", True, (0, 0, 0), (1, 1, 1))
    evaluation = ImageTransform("random_resized_crop", False, (0, 0, 0), (1, 1, 1))
    plain = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert torch.equal(evaluation(image), plain)
    outputs = [train(image, np.random.default_rng(s)) for s in range(8)]
    assert all(not torch.equal(o, plain) for o in outputs)
