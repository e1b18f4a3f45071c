"""Small datasets on disk for the training tests: a CIFAR-10 npz cut from the real offline copy
(synthetic JPEGs when it is absent), Debian-style Fashion-MNIST idx files and an ImageFolder tree."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from diffvision.data.datasets import write_cifar10_npz

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REAL_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
# CLI flags every training test passes: quiet output and float32 on the CPU
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.precision", "32-true"]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_cifar_npz(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """``root/train.npz`` and ``root/test.npz`` in the offline format: the first images of each class
    of the real copy when it is there, else random 32x32 JPEGs."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, k in (("train", per_class_train), ("test", per_class_test)):
        src = REAL_CIFAR10 / f"{split}.npz"
        jpegs, labels = [], []
        if src.is_file():
            with np.load(src) as d:
                blob, offsets, all_labels = d["jpeg"], d["offsets"], d["labels"]
                classes = [str(c) for c in d["classes"]]
            for c in range(10):
                for i in np.flatnonzero(all_labels == c)[:k]:
                    jpegs.append(blob[offsets[i]:offsets[i + 1]].tobytes())
                    labels.append(c)
        else:
            classes = CIFAR10_CLASSES
            for c in range(10):
                for _ in range(k):
                    jpegs.append(jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                    labels.append(c)
        write_cifar10_npz(root / f"{split}.npz", jpegs, labels, classes)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (gz) as MNIST ships them: magic 0x0000 0x08 ndim, big-endian sizes, uint8 data."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_fashion_idx(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0):
    """Debian-layout Fashion-MNIST files with random 28x28 images, balanced labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class=(3, 2), held_out="val", seed: int = 0):
    """``root/train/<class>/*.png`` and ``root/<held_out>/<class>/*.png`` of assorted sizes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class[0]), (held_out, per_class[1])):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root
