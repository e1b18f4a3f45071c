"""``ImageDataModule``: one LightningDataModule for every source, with data-fraction subsets."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .datasets import (DATASETS, ImageArrays, dataset_info, default_root, imagefolder_files, load_split,
                       resolve_classes, select_classes)
from .fractions import FRACTION_MODES, check_fraction, check_seed, training_subset
from .timm_augment import TimmTransform, check_timm_options
from .transforms import CPU_ONLY_PRESETS, PRESETS, BatchImageTransform, ImageTransform, build_transforms

__all__ = ["ImageDataModule", "ArrayImageDataset", "UInt8ImageDataset", "EpochSampler", "SUBSET_FILENAME",
           "AUGMENTATIONS", "class_interleaved_order"]

SUBSET_FILENAME = "subset_indices.json"
# the array presets (CPU workers, or the device with augment_on_device) and timm's pipeline (CPU workers)
AUGMENTATIONS = (*PRESETS, "timm")


class ArrayImageDataset(Dataset):
    """Samples ``(image tensor, label)`` from uint8 arrays (or, for the ``timm`` preset on an imagefolder,
    image file paths, decoded per sample), optionally restricted to ``indices``.

    A key is an index or an ``(epoch, index)`` pair (from :class:`EpochSampler`); random
    augmentations draw from ``default_rng([seed, epoch, dataset_index])``, so they depend on
    nothing but the seed, the epoch and the image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ImageTransform,
                 indices: Optional[np.ndarray] = None, seed: int = 0) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.labels)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        j = int(self.indices[i]) if self.indices is not None else int(i)
        rng = np.random.default_rng([self.seed, int(epoch), j]) if self.transform.random else None
        return self.transform(self.images[j], rng), int(self.labels[j])


class UInt8ImageDataset(ArrayImageDataset):
    """``ArrayImageDataset`` that leaves augmentation to the device: a batch of keys gives one
    ``(uint8 images (B, H, W, C), labels (B,), keys (B, 2) = (epoch, dataset index))`` tuple, cut from
    the arrays with one fancy index (``__getitems__``); :class:`BatchImageTransform` finishes it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: Optional[np.ndarray] = None) -> None:
        super().__init__(images, labels, transform=None, indices=indices)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = np.array([k if isinstance(k, tuple) else (0, k) for k in keys], dtype=np.int64).reshape(-1, 2)
        rows = self.indices[pairs[:, 1]] if self.indices is not None else pairs[:, 1]
        return (torch.from_numpy(np.ascontiguousarray(self.images[rows])),
                torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64)),
                torch.from_numpy(np.stack([pairs[:, 0], rows], axis=1)))


def class_interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Indices that visit the classes in turn (1st of each class, then 2nd of each, ...), keeping each
    class's own order. Held-out splits are served in this order, so any prefix of them (``limit_val_batches``,
    an FID reference set of the first N images) has every class in proportion, even when the split is
    stored class by class (as CIFAR-10's npz copy is)."""
    labels = np.asarray(labels, dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))  # by rank within the class, then by class


def _whole_batch(batch):
    """collate_fn of :class:`UInt8ImageDataset`: ``__getitems__`` already returns the batch."""
    return batch


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``, sharded by rank) that hands the epoch to
    the dataset as ``(epoch, index)`` keys. Being a ``DistributedSampler``, Lightning keeps it under
    DDP instead of swapping in its own, and calls ``set_epoch`` on it every epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in super().__iter__():
            yield (epoch, index)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 (N, H, W, C) array to (N, size, size, C)."""
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for start in range(0, images.shape[0], 4096):
        x = torch.from_numpy(np.array(images[start:start + 4096])).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out[start:start + 4096] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


class ImageDataModule(pl.LightningDataModule):
    """Image classification / class-conditional generation data, on a stratified fraction of it.

    Args:
        dataset: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` (torchvision),
            ``cifar10_npz`` (offline JPEG npz directory), ``fashion_mnist_debian`` (Debian's idx
            files) or ``imagefolder`` (``root/train/<class>/``, ``root/val/`` or ``root/test/``).
        root: data directory; default ``../shared/data/cifar10`` beside the repository for
            ``cifar10_npz``, ``/usr/share/datasets/fashion-mnist`` for ``fashion_mnist_debian``,
            ``data/`` for torchvision sources; required for ``imagefolder``.
        data_fraction: fraction of the *training* split to use, in (0, 1]; stratified by class,
            deterministic and nested (see :mod:`diffvision.data.fractions`). Validation and test
            always use the full held-out split.
        fraction_seed: non-negative int choosing the subset.
        augment: training augmentation preset: ``none``, ``flip``, ``basic`` or ``diffusion``
            (``diffusion`` also scales to [-1, 1] instead of normalising by mean / std), on decoded
            arrays, in the CPU workers or (``augment_on_device``) on the device; or ``timm``:
            ``timm.data.create_transform``'s training pipeline on PIL images in the CPU workers, set
            by the timm options below (:mod:`diffvision.data.timm_augment`). An imagefolder then
            trains from its image files (random resized crops of the originals, as timm does);
            evaluation always sees the decoded, normalised images.
        auto_augment, color_jitter, scale, ratio, hflip, interpolation, reprob, remode, recount:
            timm's training-transform options (``train.py``'s names; ``reprob`` / ``remode`` /
            ``recount`` are random erasing's), for ``augment='timm'`` only; None keeps timm's default.
        img_size: side of the images the model sees; None keeps the native size (32 for CIFAR,
            28 for (Fashion-)MNIST). Required for ``imagefolder``.
        batch_size: training batch size per process.
        eval_batch_size: validation / test / predict batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        cache_dir: where decoded arrays are cached (default ``$DIFFVISION_CACHE/datasets`` or
            ``~/.cache/diffvision/datasets``).
        download: let torchvision sources download (needs internet).
        shuffle_seed: seed of the training order and augmentations; None uses the run's
            ``seed_everything`` value (``PL_GLOBAL_SEED``), or 0.
        augment_on_device: the loaders hand over uint8 batches and the augmentation preset runs
            batch-wise on the training device (``on_after_batch_transfer``): no CPU work per image,
            for GPUs whose CPU workers cannot keep up with small models. Same presets and
            per-(seed, epoch, image) randomness, different draws than the CPU path. Loaders used
            outside a Trainer then yield ``(uint8 images, labels, keys)``.
        classes: keep only these classes of the source (indices or names, e.g. ``[3, 5]`` or
            ``[cat, dog]`` of CIFAR-10), in every split, relabelled ``0, 1, ...`` in the order given.
        fraction_mode: ``stratified`` (default) or ``unstratified``: ``data_fraction`` keeps a prefix of one
            random order of the whole training split, classes ignored (ESPFormer's subsets; see
            :mod:`diffvision.data.fractions`).
        normalize: ``False`` feeds pixels in ``[0, 1]`` (mean 0, std 1) instead of normalising with the
            dataset's statistics.
    """

    def __init__(
        self,
        dataset: str = "cifar10_npz",
        root: Optional[str] = None,
        data_fraction: float = 1.0,
        fraction_seed: int = 0,
        fraction_mode: str = "stratified",
        classes: Optional[list[Union[int, str]]] = None,
        augment: str = "basic",
        normalize: bool = True,
        img_size: Optional[int] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        cache_dir: Optional[str] = None,
        download: bool = True,
        shuffle_seed: Optional[int] = None,
        augment_on_device: bool = False,
        auto_augment: Optional[str] = None,
        color_jitter: Optional[float] = None,
        scale: Optional[Sequence[float]] = None,
        ratio: Optional[Sequence[float]] = None,
        hflip: Optional[float] = None,
        interpolation: Optional[str] = None,
        reprob: Optional[float] = None,
        remode: Optional[str] = None,
        recount: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; accepted: {list(DATASETS)}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment preset {augment!r}; accepted: {list(AUGMENTATIONS)}")
        timm_options = dict(auto_augment=auto_augment, color_jitter=color_jitter, scale=scale, ratio=ratio,
                            hflip=hflip, interpolation=interpolation, reprob=reprob, remode=remode, recount=recount)
        check_timm_options(augment, augment_on_device, **timm_options)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1),
                            ("num_workers", num_workers + 1), ("img_size", img_size or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if shuffle_seed is not None:
            check_seed(shuffle_seed)
        if fraction_mode not in FRACTION_MODES:
            raise ValueError(f"unknown fraction_mode {fraction_mode!r}; accepted: {list(FRACTION_MODES)}")
        if augment_on_device and augment in CPU_ONLY_PRESETS:
            raise ValueError(f"augment={augment!r} runs on the CPU only: set augment_on_device: false")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = Path(root) if root is not None else default_root(dataset)
        self.data_fraction = check_fraction(data_fraction)
        self.fraction_seed = check_seed(fraction_seed)
        self.augment = augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.download = download
        self.shuffle_seed = shuffle_seed
        self.augment_on_device = bool(augment_on_device)
        self._batch_transforms: dict[bool, BatchImageTransform] = {}
        self.info = dataset_info(dataset, self.root, img_size)
        self.fraction_mode = fraction_mode
        self.classes = None if classes is None else resolve_classes(classes, self.info.class_names)
        if self.classes is not None:
            self.info = dataclasses.replace(self.info, num_classes=len(self.classes),
                                            class_names=tuple(self.info.class_names[c] for c in self.classes))
        if not normalize:
            self.info = dataclasses.replace(self.info, mean=(0.0,) * self.info.in_chans, std=(1.0,) * self.info.in_chans)
        if self.info.native_size is None and img_size is None:
            raise ValueError("dataset='imagefolder' needs img_size (images are resized to img_size x img_size)")
        self._img_size = img_size or self.info.native_size
        # log the resolved size: Lightning merges these hparams with the model's, which has it linked
        self.hparams["img_size"] = self._img_size
        self._hparams_initial = copy.deepcopy(self._hparams)
        if augment == "timm":
            self.train_transform = TimmTransform(self._img_size, self.info.mean, self.info.std, **timm_options)
            self.eval_transform = ImageTransform("none", False, self.info.mean, self.info.std)
        else:
            self.train_transform, self.eval_transform = build_transforms(augment, self.info.mean, self.info.std)
        self.subset_indices: Optional[np.ndarray] = None
        self.train_dataset: Optional[ArrayImageDataset] = None
        self.val_dataset: Optional[ArrayImageDataset] = None
        self.test_dataset: Optional[ArrayImageDataset] = None
        self._train_size: Optional[int] = None

    # ---- what LightningCLI links into the model (known before setup) -------------------------

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def in_chans(self) -> int:
        return self.info.in_chans

    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.info.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.info.std)

    @property
    def held_out_splits(self) -> tuple[str, str]:
        """(validation split, test split): ``test`` for every source but imagefolder's ``val``/``test``."""
        if self.dataset != "imagefolder":
            return "test", "test"
        val = "val" if (self.root / "val").is_dir() else "test"
        test = "test" if (self.root / "test").is_dir() else "val"
        return val, test

    # ---- loading --------------------------------------------------------------------------------

    def _load(self, split: str) -> ImageArrays:
        arrays = load_split(self.dataset, split, self.root, img_size=self._img_size, cache_dir=self.cache_dir,
                            download=self.download)
        if self.classes is not None:
            arrays = select_classes(arrays, self.classes)
        if arrays.images.shape[1:3] != (self._img_size, self._img_size):
            arrays = ImageArrays(_resize_uint8(arrays.images, self._img_size), arrays.labels, arrays.classes)
        if arrays.images.shape[3] != self.in_chans:
            raise ValueError(f"{self.dataset} {split}: images have {arrays.images.shape[3]} channels, "
                             f"expected {self.in_chans}")
        return arrays

    @property
    def trains_from_files(self) -> bool:
        """An imagefolder under timm's pipeline trains on its files (crops of the originals), not on a
        decoded copy at ``img_size``."""
        return self.dataset == "imagefolder" and self.augment == "timm"

    def _load_train(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The training split: ``(images, labels, classes)``, images an array or, from files, their paths."""
        if self.trains_from_files:
            if self.classes is not None:  # the class filter works on decoded arrays (select_classes)
                raise ValueError(f"data.classes={self.classes!r} is not supported for an imagefolder trained from "
                                 f"its files (augment='timm'); keep only those class folders under {self.root}")
            paths, labels, classes = imagefolder_files(self.root, "train")
            return np.array([str(p) for p in paths], dtype=object), labels, classes
        train = self._load("train")
        return train.images, train.labels, train.classes

    def prepare_data(self) -> None:
        """Decode (and for torchvision sources download) every split once, into the cache."""
        for split in {"train", *self.held_out_splits} - ({"train"} if self.trains_from_files else set()):
            load_split(self.dataset, split, self.root, img_size=self._img_size, cache_dir=self.cache_dir,
                       download=self.download)

    @property
    def _shuffle_seed(self) -> int:
        if self.shuffle_seed is not None:
            return self.shuffle_seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) % (2**63)

    def setup(self, stage: Optional[str] = None) -> None:
        val_split, test_split = self.held_out_splits
        if stage in (None, "fit") and self.train_dataset is None:
            images, labels, classes = self._load_train()
            self._train_size = len(labels)
            self.subset_indices = training_subset(labels, self.data_fraction, self.fraction_seed,
                                                  self.fraction_mode, classes)
            indices = None if len(self.subset_indices) == len(labels) else self.subset_indices
            self.train_dataset = self._dataset(images, labels, self.train_transform, indices, seed=self._shuffle_seed)
        if stage in (None, "fit"):
            self._save_subset_to_log_dir(self.train_dataset.labels)  # every fit: each run keeps its copy
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            held = self._load(val_split)
            self.val_dataset = self._dataset(held.images, held.labels, self.eval_transform,
                                             class_interleaved_order(held.labels))
        if stage in (None, "test", "predict") and self.test_dataset is None:
            held = self._load(test_split)
            self.test_dataset = self._dataset(held.images, held.labels, self.eval_transform,
                                              class_interleaved_order(held.labels))

    def _dataset(self, images: np.ndarray, labels: np.ndarray, transform, indices: Optional[np.ndarray] = None,
                 seed: int = 0) -> ArrayImageDataset:
        if self.augment_on_device:
            return UInt8ImageDataset(images, labels, indices)
        return ArrayImageDataset(images, labels, transform, indices, seed=seed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With ``augment_on_device``: augment / normalise the uint8 batch where it now lives."""
        if not self.augment_on_device:
            return batch
        images, labels, keys = batch
        training = self.trainer is not None and self.trainer.training
        transform = self._batch_transforms.get(training)
        if transform is None:
            preset = self.train_transform if training else self.eval_transform
            transform = BatchImageTransform(preset.preset, preset.train, self.mean, self.std,
                                            seed=self._shuffle_seed, padding=preset.padding)
            self._batch_transforms[training] = transform
        return transform(images, keys), labels

    # ---- the subset, saved with the run --------------------------------------------------------

    def subset_summary(self, train_labels: Optional[np.ndarray] = None) -> dict:
        """What ``subset_indices.json`` holds: the settings, per-class counts and the indices."""
        if self.subset_indices is None:
            raise RuntimeError("the training subset is computed in setup('fit'); call setup first")
        labels = train_labels if train_labels is not None else self.train_dataset.labels
        kept = np.asarray(labels)[self.subset_indices]
        per_class = np.bincount(kept, minlength=self.num_classes)
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "split": "train",
            "data_fraction": self.data_fraction,
            "fraction_seed": self.fraction_seed,
            "fraction_mode": self.fraction_mode,
            "classes": self.classes,
            "num_samples": int(len(self.subset_indices)),
            "num_train_total": int(self._train_size),
            "per_class": {name: int(n) for name, n in zip(self.class_names, per_class)},
            "sha1": self._subset_sha1(),
            "indices": self.subset_indices.tolist(),
        }

    def _subset_sha1(self) -> str:
        return hashlib.sha1(np.ascontiguousarray(self.subset_indices, dtype="<i8").tobytes()).hexdigest()

    def save_subset(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.subset_summary(), indent=1))
        return path

    def _save_subset_to_log_dir(self, train_labels: np.ndarray) -> None:
        trainer = self.trainer
        if trainer is None or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if log_dir and trainer.is_global_zero:
            path = Path(log_dir) / SUBSET_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            # written beside it, then renamed over it: a kill mid-write leaves no empty or half file
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(json.dumps(self.subset_summary(train_labels), indent=1))
            os.replace(partial, path)

    # ---- checkpoints: a resumed run must train on the same subset ---------------------------------

    def state_dict(self) -> dict:
        state = {"dataset": self.dataset, "data_fraction": self.data_fraction, "fraction_seed": self.fraction_seed,
                 "fraction_mode": self.fraction_mode, "classes": self.classes}
        if self.subset_indices is not None:
            state.update(num_samples=int(len(self.subset_indices)), subset_sha1=self._subset_sha1())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Check that a checkpoint was trained on this subset (settings, and indices once set up)."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn not in (None, "fit"):
            return  # validate / test / predict use the full held-out split: any training subset will do
        mine = self.state_dict()
        differs = {k: (state_dict[k], mine[k]) for k in mine if k in state_dict and state_dict[k] != mine[k]}
        if differs:
            raise ValueError(
                "the checkpoint was trained on a different data subset than this data module selects: "
                + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differs.items())
                + "; resume with the checkpoint's dataset / data_fraction / fraction_seed")

    # ---- loaders -------------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        collate = _whole_batch if isinstance(dataset, UInt8ImageDataset) else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True,
                               seed=self._shuffle_seed)
        return self._loader(self.train_dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
