"""Batch (on-device) augmentation: the same presets as the per-image CPU path, drawn per (seed, epoch, image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _training_data import make_cifar_npz
from diffvision.data import BatchImageTransform, ImageDataModule, ImageTransform, augmentation_draws

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class _FixedRng:
    """Stands in for numpy's generator: hands ImageTransform the offsets / flip the batch path drew."""

    def __init__(self, top: int, left: int, flip: bool) -> None:
        self._crop, self._flip = np.array([top, left]), flip

    def integers(self, low, high, size):
        assert np.all((self._crop >= low) & (self._crop < high))
        return self._crop

    def random(self):
        return 0.0 if self._flip else 0.9


@pytest.mark.parametrize("preset", ["none", "flip", "basic", "diffusion"])
def test_batch_transform_equals_per_image_transform_with_the_same_draws(preset):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    keys = torch.stack([torch.full((64,), 3), torch.arange(100, 164)], dim=1)
    batch = BatchImageTransform(preset, True, MEAN, STD, seed=7)
    out = batch(torch.from_numpy(images), keys)
    top, left, flip, pad = batch.params(keys, 16)
    per_image = ImageTransform(preset, True, MEAN, STD)
    for i in range(64):
        draw = _FixedRng(int(top[i]), int(left[i]), bool(flip[i])) if per_image.random else None
        torch.testing.assert_close(out[i], per_image(images[i], draw), rtol=0, atol=1e-6)
    if preset == "basic":
        assert pad == 2 and top.max() <= 4 and left.max() <= 4
    if preset in ("none", "diffusion"):
        assert not batch.cpu.crop


def test_evaluation_transform_only_normalises():
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    out = BatchImageTransform("basic", False, MEAN, STD)(images)
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_draws_depend_only_on_seed_epoch_and_image_and_are_uniform():
    idx = torch.arange(20000)
    a = augmentation_draws(5, torch.zeros_like(idx), idx, 3)
    assert torch.equal(a[123:456], augmentation_draws(5, torch.zeros(333, dtype=torch.long), idx[123:456], 3))
    assert not torch.equal(a, augmentation_draws(5, torch.ones_like(idx), idx, 3))   # the next epoch differs
    assert not torch.equal(a, augmentation_draws(6, torch.zeros_like(idx), idx, 3))  # another seed differs
    assert not torch.equal(a, augmentation_draws(5 + 2**40, torch.zeros_like(idx), idx, 3))  # high seed bits count
    # offsets 0..8 (img 32 -> padding 4) and the flip bit are close to uniform (chi-square, 8 and 1 dof)
    for column, bins in ((0, 9), (1, 9), (2, 2)):
        counts = torch.bincount(a[:, column] % bins, minlength=bins).double()
        chi2 = ((counts - len(idx) / bins) ** 2 / (len(idx) / bins)).sum().item()
        assert chi2 < 30, (column, counts)
    # the three draws of one image are not the same number
    assert (a[:, 0] != a[:, 1]).float().mean() > 0.99


def test_bad_batch_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        BatchImageTransform("basic", True, MEAN, STD)(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="keys"):
        BatchImageTransform("basic", True, MEAN, STD)(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))


def test_datamodule_on_device_batches_match_the_subset_and_transform(tmp_path):
    root = make_cifar_npz(tmp_path / "cifar", per_class_train=10, per_class_test=3)
    dm = ImageDataModule("cifar10_npz", root=str(root), data_fraction=0.5, batch_size=16, num_workers=0,
                         augment="basic", augment_on_device=True, shuffle_seed=3, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    images, labels, keys = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 32, 32, 3) and labels.dtype == torch.int64
    assert set(keys[:, 1].tolist()) <= set(dm.subset_indices.tolist()) and torch.all(keys[:, 0] == 2)
    train = dm._load("train")
    np.testing.assert_array_equal(images.numpy(), train.images[keys[:, 1].numpy()])
    np.testing.assert_array_equal(labels.numpy(), train.labels[keys[:, 1].numpy()])
    x, y = dm.on_after_batch_transfer((images, labels, keys), 0)  # no trainer: the evaluation transform
    expected = BatchImageTransform("basic", False, dm.mean, dm.std)(images)
    assert torch.equal(x, expected) and torch.equal(y, labels)


def test_held_out_split_is_served_class_interleaved(tmp_path):
    """A class-sorted held-out split: every prefix (limit_val_batches, an FID real set) is class-balanced."""
    from diffvision.data.datamodule import class_interleaved_order

    labels = np.repeat(np.arange(5), [4, 4, 4, 4, 2])
    order = class_interleaved_order(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    np.testing.assert_array_equal(labels[order][:10], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    for c in range(5):  # each class keeps its own order
        assert np.all(np.diff(order[labels[order] == c]) > 0)
    root = make_cifar_npz(tmp_path / "cifar", per_class_train=2, per_class_test=6)
    dm = ImageDataModule("cifar10_npz", root=str(root), batch_size=4, eval_batch_size=20, num_workers=0,
                         cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    _, first = next(iter(dm.val_dataloader()))
    assert np.bincount(first.numpy(), minlength=10).tolist() == [2] * 10
