"""Data: stratified nested subsets, dataset readers and their cache, augmentation, the data module."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from _training_data import REAL_CIFAR10, make_cifar_npz, make_fashion_idx, make_imagefolder, write_idx
from diffvision.data import (
    ArrayImageDataset,
    EpochSampler,
    ImageDataModule,
    ImageTransform,
    dataset_info,
    load_split,
    stratified_subset,
)
from diffvision.data import datasets as datasets_module


def expected_count(fraction: float, n: int) -> int:
    """Round half up of fraction·n, in exact rational arithmetic (the documented k_c)."""
    x = Fraction(str(fraction)) * n
    return int(math.floor(x + Fraction(1, 2)))


def cifar_train_labels() -> np.ndarray:
    if (REAL_CIFAR10 / "train.npz").is_file():
        with np.load(REAL_CIFAR10 / "train.npz") as d:
            return d["labels"].astype(np.int64)
    return np.repeat(np.arange(10), 5000)  # CIFAR-10's layout: 5000 per class, class-sorted


# ---------------------------------------------------------------------------------------------
# Fractions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, per_class", [(0.01, 50), (0.1, 500), (0.25, 1250), (1.0, 5000)])
def test_cifar10_subset_sizes_are_exact_and_stratified(fraction, per_class):
    labels = cifar_train_labels()
    idx = stratified_subset(labels, fraction, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, unique
    assert len(idx) == 10 * per_class
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), [per_class] * 10)


def test_imbalanced_classes_keep_round_half_up_shares():
    sizes = [7, 13, 100, 2, 55]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    np.random.default_rng(1).shuffle(labels)
    for fraction in (0.5, 0.3, 0.77, 1.0):
        idx = stratified_subset(labels, fraction, seed=3)
        counts = np.bincount(labels[idx], minlength=len(sizes))
        assert counts.tolist() == [expected_count(fraction, n) for n in sizes]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), fractions=st.lists(st.floats(0.2, 1.0), min_size=2, max_size=4))
def test_subsets_are_nested_for_one_seed(seed, fractions):
    labels = np.repeat(np.arange(4), [40, 25, 60, 33])
    subsets = [set(stratified_subset(labels, f, seed).tolist()) for f in sorted(fractions)]
    for small, large in zip(subsets, subsets[1:]):
        assert small <= large


def test_nested_1_10_25_100_percent_on_cifar10_labels():
    labels = cifar_train_labels()
    chain = [set(stratified_subset(labels, f, 7).tolist()) for f in (0.01, 0.1, 0.25, 1.0)]
    assert chain[0] < chain[1] < chain[2] < chain[3] == set(range(len(labels)))


def test_seed_picks_the_subset_and_global_rng_does_not():
    labels = np.repeat(np.arange(10), 300)
    torch.manual_seed(0), np.random.seed(0)
    a = stratified_subset(labels, 0.1, seed=5)
    torch.manual_seed(123), np.random.seed(123)
    np.random.rand(1000)
    b = stratified_subset(labels, 0.1, seed=5)
    c = stratified_subset(labels, 0.1, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_subset_is_the_same_in_another_process():
    code = (
        "import hashlib, numpy as np, torch; np.random.seed(99); torch.manual_seed(99);"
        "from diffvision.data import stratified_subset;"
        "labels = np.repeat(np.arange(10), 500)[np.random.default_rng(4).permutation(5000)];"
        "idx = stratified_subset(labels, 0.1, seed=42);"
        "print(hashlib.sha1(idx.astype('<i8').tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    labels = np.repeat(np.arange(10), 500)[np.random.default_rng(4).permutation(5000)]
    idx = stratified_subset(labels, 0.1, seed=42)
    assert out.stdout.strip() == hashlib.sha1(idx.astype("<i8").tobytes()).hexdigest()


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.1", True, None])
def test_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="data_fraction"):
        stratified_subset(np.arange(10) % 2, fraction, seed=0)


@pytest.mark.parametrize("seed", [1.5, 1.0, "3", True, False, -1, None, np.float64(2.0)])
def test_rejects_seeds_that_are_not_non_negative_integers(seed):
    with pytest.raises(ValueError, match="fraction_seed"):
        stratified_subset(np.arange(10) % 2, 0.5, seed=seed)


def test_numpy_integer_seed_is_an_integer():
    labels = np.arange(40) % 4
    np.testing.assert_array_equal(stratified_subset(labels, 0.5, np.int64(3)), stratified_subset(labels, 0.5, 3))


def test_rejects_a_fraction_that_empties_a_class():
    labels = np.concatenate([np.zeros(100, int), np.ones(10, int)])
    with pytest.raises(ValueError, match=r"\['1'\].*data_fraction >= 0.05"):
        stratified_subset(labels, 0.04, seed=0)  # 0.04 * 10 = 0.4 rounds to 0
    assert np.bincount(labels[stratified_subset(labels, 0.05, seed=0)]).tolist() == [5, 1]


def test_data_module_validates_its_arguments(tmp_path):
    root = make_fashion_idx(tmp_path / "fm", 20, 10) and tmp_path / "fm"
    with pytest.raises(ValueError, match="data_fraction"):
        ImageDataModule("fashion_mnist_debian", root=str(root), data_fraction=0)
    with pytest.raises(ValueError, match="fraction_seed"):
        ImageDataModule("fashion_mnist_debian", root=str(root), fraction_seed=0.5)
    with pytest.raises(ValueError, match="unknown dataset"):
        ImageDataModule("cifar11")
    with pytest.raises(ValueError, match="augment"):
        ImageDataModule("fashion_mnist_debian", root=str(root), augment="heavy")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        ImageDataModule("fashion_mnist_debian", root=str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# Readers and the decode cache
# ---------------------------------------------------------------------------------------------

def test_cifar10_npz_decodes_like_pil(tmp_path):
    root = make_cifar_npz(tmp_path / "c10", per_class_train=3, per_class_test=2)
    arrays = load_split("cifar10_npz", "train", root, cache_dir=tmp_path / "cache")
    assert arrays.images.shape == (30, 32, 32, 3) and arrays.images.dtype == np.uint8
    with np.load(root / "train.npz") as d:
        blob, offsets, labels = d["jpeg"], d["offsets"], d["labels"]
        assert arrays.classes == [str(c) for c in d["classes"]]
    np.testing.assert_array_equal(arrays.labels, labels)
    for i in (0, 13, 29):
        ref = np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        np.testing.assert_array_equal(arrays.images[i], ref)


def test_decode_cache_is_reused_and_keyed_by_source(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = make_cifar_npz(tmp_path / "a", 2, 1, seed=0)
    b = make_cifar_npz(tmp_path / "b", 3, 1, seed=1)
    first = load_split("cifar10_npz", "train", a, cache_dir=cache)
    calls = []
    real_reader = datasets_module.read_cifar10_npz
    monkeypatch.setattr(datasets_module, "read_cifar10_npz", lambda p: calls.append(p) or real_reader(p))
    again = load_split("cifar10_npz", "train", a, cache_dir=cache)
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    other = load_split("cifar10_npz", "train", b, cache_dir=cache)
    assert len(calls) == 1 and other.images.shape[0] == 30  # another directory: its own entry
    os.utime(a / "train.npz", ns=(1, 1))  # a changed file is decoded again
    load_split("cifar10_npz", "train", a, cache_dir=cache)
    assert len(calls) == 2
    assert len(list(cache.glob("*-meta.json"))) == 3


def test_fashion_mnist_debian_idx_files(tmp_path):
    written = make_fashion_idx(tmp_path / "fm", n_train=30, n_test=20)
    for split in ("train", "test"):
        arrays = load_split("fashion_mnist_debian", split, tmp_path / "fm", cache_dir=tmp_path / "cache")
        images, labels = written[split]
        np.testing.assert_array_equal(np.asarray(arrays.images)[..., 0], images)
        np.testing.assert_array_equal(arrays.labels, labels)
        assert arrays.images.shape[1:] == (28, 28, 1) and arrays.classes[0] == "T-shirt/top"
    info = dataset_info("fashion_mnist_debian", tmp_path / "fm")
    assert (info.num_classes, info.in_chans, info.native_size) == (10, 1, 28)


def test_idx_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.gz"
    write_idx(bad, np.zeros((2, 3), np.uint8))
    data = bytes(gzip.decompress(bad.read_bytes()))
    (tmp_path / "float").write_bytes(data[:2] + b"\x0d" + data[3:])  # idx type 0x0D = float32
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        datasets_module.read_idx(tmp_path / "float")
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="bytes, expected"):
        datasets_module.read_idx(tmp_path / "short")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist_labels():
    labels = datasets_module.read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_imagefolder_resizes_and_finds_held_out_split(tmp_path):
    root = make_imagefolder(tmp_path / "if", classes=("dog", "cat"), per_class=(3, 2), held_out="val")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=16, cache_dir=str(tmp_path / "cache"),
                         num_workers=0, batch_size=4)
    assert (dm.num_classes, dm.class_names, dm.in_chans, dm.img_size) == (2, ["cat", "dog"], 3, 16)
    assert dm.held_out_splits == ("val", "val")
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 4
    assert dm.train_dataset.images.shape == (6, 16, 16, 3)
    assert sorted(dm.train_dataset.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # a different decode size is a different cache entry
    load_split("imagefolder", "train", root, img_size=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("imagefolder-train-*-meta.json"))) == 2
    with pytest.raises(ValueError, match="img_size"):
        ImageDataModule("imagefolder", root=str(root))
    (root / "val").rename(root / "test")
    assert ImageDataModule("imagefolder", root=str(root), img_size=8).held_out_splits == ("test", "test")
    (root / "test").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="val/ or test/"):
        ImageDataModule("imagefolder", root=str(root), img_size=8)


def test_properties_are_known_before_any_decoding(tmp_path, monkeypatch):
    root = make_cifar_npz(tmp_path / "c10", 2, 1)

    def fail(*args, **kwargs):
        raise AssertionError("decoded before setup")

    monkeypatch.setattr(datasets_module, "read_cifar10_npz", fail)
    dm = ImageDataModule("cifar10_npz", root=str(root))
    assert (dm.num_classes, dm.img_size, dm.in_chans) == (10, 32, 3) and dm.class_names[0] == "airplane"
    dm = ImageDataModule("cifar100", root=str(tmp_path / "none"), download=False)
    assert (dm.num_classes, len(dm.class_names), dm.img_size, dm.in_chans) == (100, 100, 32, 3)
    dm = ImageDataModule("mnist", root=str(tmp_path / "none"), img_size=32)
    assert (dm.num_classes, dm.img_size, dm.in_chans) == (10, 32, 1)


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_sources_read_their_raw_files(dataset, folder, tmp_path):
    raw = tmp_path / folder / "raw"  # where torchvision looks (download=True fills it for online users)
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            write_idx(raw / f"{prefix}-{kind}-ubyte.gz", array)
            packed = (raw / f"{prefix}-{kind}-ubyte.gz").read_bytes()
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(gzip.decompress(packed))
        written[prefix] = (images, labels)
    dm = ImageDataModule(dataset, root=str(tmp_path), download=False, num_workers=0, augment="none")
    dm.setup("fit")
    np.testing.assert_array_equal(np.asarray(dm.train_dataset.images)[..., 0], written["train"][0])
    np.testing.assert_array_equal(np.asarray(dm.val_dataset.labels), written["t10k"][1])
    assert dm.in_chans == 1 and dm.num_classes == 10
    with pytest.raises(FileNotFoundError, match="download=True"):
        ImageDataModule("cifar10", root=str(tmp_path / "empty"), download=False).setup("fit")


# ---------------------------------------------------------------------------------------------
# Transforms, sampler, data module
# ---------------------------------------------------------------------------------------------

def test_presets_scale_and_normalise():
    img = np.array([[[0], [255]], [[51], [102]]], dtype=np.uint8)  # 2x2x1
    x = ImageTransform("diffusion", train=False, mean=(0.5,), std=(0.5,))(img)
    np.testing.assert_allclose(x[0].numpy(), img[..., 0] / 127.5 - 1, atol=1e-6)
    x = ImageTransform("basic", train=False, mean=(0.2,), std=(0.4,))(img)
    np.testing.assert_allclose(x[0].numpy(), (img[..., 0] / 255 - 0.2) / 0.4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        ImageTransform("strong", True, (0.5,), (0.5,))


def test_basic_augmentation_is_a_padded_crop_and_flip_of_the_image():
    rng_img = np.random.default_rng(0)
    img = rng_img.integers(1, 256, (8, 8, 3), dtype=np.uint8)  # no zeros: padding is visible
    t = ImageTransform("basic", train=True, mean=(0, 0, 0), std=(1 / 255,) * 3)  # output = pixel values
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    windows = [padded[i:i + 8, j:j + 8] for i in range(3) for j in range(3)]
    candidates = windows + [w[:, ::-1] for w in windows]
    seen = set()
    for seed in range(40):
        out = t(img, np.random.default_rng(seed)).permute(1, 2, 0).round().numpy().astype(np.uint8)
        matches = [k for k, c in enumerate(candidates) if np.array_equal(out, c)]
        assert matches, "output is not a padded crop (or its mirror) of the input"
        seen.add(matches[0])
    assert len(seen) > 5  # crops and flips do vary


def test_augmentation_depends_on_seed_epoch_and_index_only():
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(6)
    t = ImageTransform("basic", True, (0.5,) * 3, (0.5,) * 3)
    ds = ArrayImageDataset(images, labels, t, seed=3)
    a = ds[(2, 4)][0]
    torch.manual_seed(999), np.random.seed(999)
    assert torch.equal(ds[(2, 4)][0], a)
    assert any(not torch.equal(ds[(e, 4)][0], a) for e in range(3, 12))
    # with a subset, the key is the dataset index: same image, same augmentation
    sub = ArrayImageDataset(images, labels, t, indices=np.array([1, 4]), seed=3)
    assert torch.equal(sub[(2, 1)][0], a) and sub[(2, 1)][1] == 4


def test_epoch_sampler_shards_deterministically():
    ds = list(range(11))
    shards = [list(EpochSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=5)) for r in (0, 1)]
    assert all(e == 0 for shard in shards for e, _ in shard)
    idx = [i for shard in shards for _, i in shard]
    assert len(idx) == 12 and set(idx) == set(range(11))  # padded to a multiple of 2, like DistributedSampler
    s = EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    s.set_epoch(1)
    e1 = list(s)
    assert [e for e, _ in e1] == [1] * 11 and [i for _, i in e1] != [i for _, i in EpochSampler(ds, 1, 0, seed=5)]
    s2 = EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    s2.set_epoch(1)
    assert list(s2) == e1


def test_loader_batches_do_not_depend_on_worker_count(tmp_path):
    root = make_cifar_npz(tmp_path / "c10", 4, 1)
    dm = ImageDataModule("cifar10_npz", root=str(root), data_fraction=0.5, batch_size=8,
                         cache_dir=str(tmp_path / "cache"), num_workers=0, shuffle_seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    ref = [b for b in loader]
    workers = DataLoader(dm.train_dataset, batch_size=8, sampler=loader.sampler, num_workers=2)
    for (x0, y0), (x1, y1) in zip(ref, workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_data_module_uses_the_subset_for_training_only(tmp_path):
    root = make_cifar_npz(tmp_path / "c10", 10, 3)
    dm = ImageDataModule("cifar10_npz", root=str(root), data_fraction=0.3, fraction_seed=2,
                         cache_dir=str(tmp_path / "cache"), num_workers=0)
    dm.setup("fit")
    labels = np.asarray(dm.train_dataset.labels)
    np.testing.assert_array_equal(dm.subset_indices, stratified_subset(labels, 0.3, 2))
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 30  # held-out split in full
    summary = dm.subset_summary()
    assert summary["num_samples"] == 30 and set(summary["per_class"].values()) == {3}
    assert json.loads(dm.save_subset(tmp_path / "s.json").read_text())["indices"] == dm.subset_indices.tolist()
    # a checkpoint from another subset is refused
    state = dm.state_dict()
    other = ImageDataModule("cifar10_npz", root=str(root), data_fraction=0.5, fraction_seed=2,
                            cache_dir=str(tmp_path / "cache"), num_workers=0)
    other.setup("fit")
    with pytest.raises(ValueError, match="different data subset"):
        other.load_state_dict(state)


def test_img_size_resizes_every_split(tmp_path):
    make_fashion_idx(tmp_path / "fm", 20, 10)
    dm = ImageDataModule("fashion_mnist_debian", root=str(tmp_path / "fm"), img_size=32, augment="none",
                         cache_dir=str(tmp_path / "cache"), num_workers=0, batch_size=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 32, 32) and next(iter(dm.val_dataloader()))[0].shape == (5, 1, 32, 32)
