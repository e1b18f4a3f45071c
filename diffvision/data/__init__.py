"""diffvision.data: dataset readers (decoded once, cached), augmentation presets, data-fraction
subsets and the LightningDataModule that ties them together."""
from .datamodule import AUGMENTATIONS, SUBSET_FILENAME, ArrayImageDataset, EpochSampler, ImageDataModule, UInt8ImageDataset
from .datasets import DATASETS, DatasetInfo, ImageArrays, dataset_info, imagefolder_files, load_split
from .fractions import check_fraction, check_seed, per_class_counts, stratified_subset
from .timm_augment import TIMM_OPTIONS, TimmTransform
from .transforms import PRESETS, BatchImageTransform, ImageTransform, augmentation_draws, build_transforms

__all__ = [
    "AUGMENTATIONS",
    "TIMM_OPTIONS",
    "TimmTransform",
    "imagefolder_files",
    "DATASETS",
    "PRESETS",
    "SUBSET_FILENAME",
    "ArrayImageDataset",
    "BatchImageTransform",
    "DatasetInfo",
    "EpochSampler",
    "ImageArrays",
    "ImageDataModule",
    "ImageTransform",
    "build_transforms",
    "check_fraction",
    "check_seed",
    "dataset_info",
    "load_split",
    "per_class_counts",
    "stratified_subset",
    "UInt8ImageDataset",
    "augmentation_draws",
]
