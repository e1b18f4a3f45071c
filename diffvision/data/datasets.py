"""Dataset readers: every source becomes uint8 arrays ``(N, H, W, C)`` + int64 labels, decoded once.

Sources (``dataset=`` of :class:`~diffvision.data.ImageDataModule`):

============================  ==========================================================================
``cifar10``, ``cifar100``,    torchvision's readers (``download=True`` fetches them for online users)
``mnist``, ``fashion_mnist``  under ``root`` (default ``data/``)
``cifar10_npz``               a directory with ``train.npz`` / ``test.npz`` holding concatenated JPEGs
                              (``jpeg``, ``offsets``, ``labels``, ``classes``), as in ``shared/data``
``fashion_mnist_debian``      Debian's ``dataset-fashion-mnist`` directory of idx ``.gz`` files
                              (default ``/usr/share/datasets/fashion-mnist``), read with gzip + numpy
``imagefolder``               ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), any
                              image files PIL reads; resized (shorter side) and centre-cropped to ``img_size``
============================  ==========================================================================

Decoded arrays of the JPEG / idx / image-file sources (torchvision's are raw uint8 already) are
cached as ``.npy`` files in ``cache_dir`` (default ``$DIFFVISION_CACHE/datasets`` or
``~/.cache/diffvision/datasets``), keyed by source kind, resolved path, split, the size and mtime of
every file read, and the decode size: different sources never collide and a changed file is decoded
again. Cache files are written atomically, so concurrent processes are safe.

Bad data is an error, never a silent skip: a missing file or directory, an ImageFolder with fewer
than two classes or a training class folder without images, unreadable (corrupt or truncated) image
files (all of them are listed, with the reason, so they can be fixed or removed in one go), a corrupt
``.npz`` and labels outside ``[0, number of classes)`` raise with the path and what was expected.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "DATASETS",
    "ImageArrays",
    "DatasetInfo",
    "dataset_info",
    "load_split",
    "default_cache_dir",
    "default_root",
    "read_cifar10_npz",
    "write_cifar10_npz",
    "read_idx",
    "read_imagefolder",
    "imagefolder_files",
    "decode_cache_key",
    "resolve_classes",
    "select_classes",
]

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "cifar10_npz", "fashion_mnist_debian",
            "imagefolder")
TORCHVISION = ("cifar10", "cifar100", "mnist", "fashion_mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_CACHE_FORMAT = 1
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]
MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
                 "7 - seven", "8 - eight", "9 - nine"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageArrays:
    """One split, decoded: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")
        if self.labels.size and self.classes:
            bad = np.unique(self.labels[(self.labels < 0) | (self.labels >= len(self.classes))])
            if bad.size:
                raise ValueError(f"class labels {bad[:10].tolist()} are out of range for {len(self.classes)} "
                                 f"classes: labels must be integers in [0, {len(self.classes) - 1}]")


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a source before decoding it (what LightningCLI links into the model)."""

    num_classes: int
    class_names: tuple[str, ...]
    in_chans: int
    native_size: Optional[int]  # None: images of any size (imagefolder), resized at decode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    held_out: str = "test"  # the split used for validation and test
    extra: dict = field(default_factory=dict, compare=False)


# Per-channel statistics of the training splits (the usual published constants).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def default_cache_dir() -> Path:
    base = os.environ.get("DIFFVISION_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "diffvision") / "datasets"


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_root(dataset: str) -> Path:
    """Where ``dataset`` is looked for when ``root`` is not given."""
    if dataset == "cifar10_npz":
        # the offline copy next to the repository (../shared/data/cifar10), from the checkout or the cwd
        candidates = [_repo_root().parent / "shared" / "data" / "cifar10",
                      Path.cwd().parent / "shared" / "data" / "cifar10"]
        for path in candidates:
            if (path / "train.npz").is_file():
                return path
        return candidates[0]
    if dataset == "fashion_mnist_debian":
        return DEBIAN_FASHION_MNIST
    if dataset == "imagefolder":
        raise ValueError("dataset='imagefolder' needs root=<directory with train/ and val/ (or test/)>")
    return Path("data")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {list(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

_NPZ_ARRAYS = ("jpeg", "offsets", "labels", "classes")


def _read_npz_arrays(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """``names`` from the ``.npz`` at ``path``; a missing, truncated or corrupt file raises naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found; a cifar10_npz root is a directory with train.npz and "
                                f"test.npz (arrays {', '.join(_NPZ_ARRAYS)}), as in shared/data/README.md")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = set(names) - set(d.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}; expected {', '.join(_NPZ_ARRAYS)}")
            return {name: d[name] for name in names}
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a readable .npz (truncated or corrupt? {type(err).__name__}: {err}); "
                         f"copy it again") from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path} is not a readable .npz (truncated or corrupt? {err}); copy it again") from err


def write_cifar10_npz(path: Path, jpegs: Sequence[bytes], labels, classes: Sequence[str]) -> Path:
    """Write ``path`` in the layout :func:`read_cifar10_npz` reads: the JPEG files' bytes concatenated
    (``jpeg``), where each starts and ends (``offsets``, ``len(jpegs) + 1``), uint8 ``labels`` and the
    class names (``classes``). Synthetic datasets for tests and benchmarks are written with it."""
    if len(jpegs) != len(labels):
        raise ValueError(f"{len(jpegs)} JPEGs but {len(labels)} labels: give one label per image")
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in jpegs])
    np.savez(path, jpeg=np.frombuffer(b"".join(jpegs), dtype=np.uint8), offsets=offsets,
             labels=np.asarray(labels, dtype=np.uint8), classes=np.asarray(list(classes)))
    return Path(path)


def read_cifar10_npz(path: Path) -> ImageArrays:
    """Decode one ``.npz`` of concatenated JPEGs (``jpeg``, ``offsets``, ``labels``, ``classes``).

    A truncated or corrupt file, offsets that do not cut the ``jpeg`` blob into ``len(labels)``
    pieces, an image that does not decode and labels outside the classes raise a ``ValueError``
    naming the file (and the image's index)."""
    from PIL import Image

    d = _read_npz_arrays(path, _NPZ_ARRAYS)
    jpeg, offsets, labels = d["jpeg"], d["offsets"].astype(np.int64), d["labels"].astype(np.int64)
    classes = [str(c) for c in d["classes"]]
    n = labels.shape[0]
    if offsets.shape != (n + 1,):
        raise ValueError(f"{path}: offsets has shape {offsets.shape}, expected ({n + 1},) for {n} labels")
    if n == 0:
        raise ValueError(f"{path} holds no images")
    if offsets[0] < 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] > jpeg.size:
        raise ValueError(f"{path}: offsets must increase from >= 0 up to the jpeg blob's {jpeg.size} bytes "
                         f"(got {offsets[0]} .. {offsets[-1]}); the file is corrupt")

    def decode(i: int) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
            raise ValueError(f"{path}: image {i} (bytes {offsets[i]}..{offsets[i + 1]}) does not decode "
                             f"({type(err).__name__}: {err}); the file is corrupt") from err

    first = decode(0)
    images = np.empty((n, *first.shape), dtype=np.uint8)
    images[0] = first
    for i in range(1, n):
        image = decode(i)
        if image.shape != first.shape:
            raise ValueError(f"{path}: image {i} is {image.shape}, the first one {first.shape}; "
                             f"all images must have one size")
        images[i] = image
    try:
        return ImageArrays(images, labels, classes)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or plain), the MNIST format: magic ``0 0 8 ndim``, big-endian sizes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file (magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) + 4 + 4 * ndim
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


_DEBIAN_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_fashion_mnist_debian(root: Path, split: str) -> ImageArrays:
    images_file, labels_file = (root / f for f in _DEBIAN_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: images {images.shape} / labels {labels.shape} do not pair up")
    return ImageArrays(images[..., None], labels, list(FASHION_MNIST_CLASSES))


_IMAGEFOLDER_LAYOUT = "root/train/<class>/<image> and root/val/<class>/<image> (or test/)"


def _imagefolder_classes(split_dir: Path) -> list[str]:
    """The class folders of ``split_dir`` (``root/train``), sorted; at least two of them."""
    root = split_dir.parent
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder root {root} does not exist (or is not a directory); "
                                f"expected {_IMAGEFOLDER_LAYOUT}")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"imagefolder root {root} has no {split_dir.name}/ directory; "
                                f"expected {_IMAGEFOLDER_LAYOUT}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir} has no class subdirectories (expected {split_dir}/<class>/<image>)")
    if len(classes) < 2:
        raise ValueError(f"{split_dir} has one class folder ({classes}); a classifier needs at least 2 classes: "
                         f"one folder per class, {split_dir}/<class>/<image>")
    return classes


def _imagefolder_files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` of every image under ``split_dir/<class>/``. In ``train/`` every class folder
    must hold an image (a class never trained on is an error); a held-out split may lack some."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} is not a directory; expected {_IMAGEFOLDER_LAYOUT}")
    files, empty = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise ValueError(f"{split_dir}: class {name!r} (from train/) has no directory here")
        found = [p for p in sorted(class_dir.rglob("*")) if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS]
        files.extend((p, label) for p in found)
        if not found:
            empty.append(name)
    if not files:
        raise ValueError(f"{split_dir} has no image files ({', '.join(_IMAGE_EXTENSIONS)})")
    if empty and split_dir.name == "train":
        raise ValueError(f"{split_dir}: class folder(s) {empty} hold no image files "
                         f"({', '.join(_IMAGE_EXTENSIONS)}); every class needs training images")
    return files


def imagefolder_files(root: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(image files, int64 labels, classes)`` of ``root/<split>/<class>/*``, not decoded (the ``timm``
    preset reads the training files per sample); the same checks as decoding them."""
    classes = _imagefolder_classes(Path(root) / "train")
    files = _imagefolder_files(Path(root) / split, classes)
    return [p for p, _ in files], np.array([label for _, label in files], dtype=np.int64), classes


def _resize_center_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_imagefolder(root: Path, split: str, img_size: int, classes: Optional[list[str]] = None) -> ImageArrays:
    """Decode ``root/<split>/<class>/*`` to RGB, shorter side resized to ``img_size``, centre-cropped.

    Unreadable files (corrupt, truncated, not an image) are not skipped: every file is tried, then a
    ``ValueError`` lists each bad one with PIL's reason and their count, so the dataset is fixed (or
    the files removed) knowingly instead of training on silently fewer images."""
    from PIL import Image

    split_dir = root / split
    classes = classes or _imagefolder_classes(root / "train")
    files = _imagefolder_files(split_dir, classes)
    images = np.empty((len(files), img_size, img_size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    bad = []
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as img:
                images[i] = np.asarray(_resize_center_crop(img.convert("RGB"), img_size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            bad.append(f"{path} ({type(err).__name__}: {err})")
        labels[i] = label
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{split_dir}: {len(bad)} of {len(files)} image files cannot be read (corrupt or "
                         f"truncated); fix or remove them:\n  {shown}")
    return ImageArrays(images, labels, classes)


def _imagefolder_held_out(root: Path) -> str:
    for split in ("val", "test"):
        if (root / split).is_dir():
            return split
    raise FileNotFoundError(f"imagefolder root {root} needs a val/ or test/ directory beside train/")


def _read_torchvision(dataset: str, root: Path, split: str, download: bool) -> ImageArrays:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion_mnist": tvd.FashionMNIST}[dataset]
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(
            f"{dataset} not found under {root} ({err}); pass download=True (needs internet) or "
            f"an offline source: cifar10_npz, fashion_mnist_debian, imagefolder") from err
    images = np.asarray(ds.data, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return ImageArrays(images, np.asarray(ds.targets, dtype=np.int64), [str(c) for c in ds.classes])


# ---------------------------------------------------------------------------------------------
# Info before decoding, and cached loading
# ---------------------------------------------------------------------------------------------

def dataset_info(dataset: str, root: Optional[Path] = None, img_size: Optional[int] = None) -> DatasetInfo:
    """Classes, channels, size and normalisation of a source, read without decoding any image."""
    _check_dataset(dataset)
    root = Path(root) if root is not None else default_root(dataset)
    if dataset in ("cifar10", "cifar10_npz"):
        names = CIFAR10_CLASSES
        if dataset == "cifar10_npz":
            test = root / "test.npz"
            if not test.is_file():
                raise FileNotFoundError(
                    f"cifar10_npz: {test} not found; root must be a directory with train.npz and test.npz "
                    f"(the format of shared/data/README.md)")
            names = [str(c) for c in _read_npz_arrays(test, ["classes"])["classes"]]
        mean, std = _STATS["cifar10"]
        return DatasetInfo(len(names), tuple(names), 3, 32, mean, std)
    if dataset == "cifar100":
        return DatasetInfo(100, tuple(CIFAR100_CLASSES), 3, 32, *_STATS["cifar100"])
    if dataset == "mnist":
        return DatasetInfo(10, tuple(MNIST_CLASSES), 1, 28, *_STATS["mnist"])
    if dataset in ("fashion_mnist", "fashion_mnist_debian"):
        if dataset == "fashion_mnist_debian":
            missing = [f for pair in _DEBIAN_FILES.values() for f in pair if not (root / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"fashion_mnist_debian: {root} lacks {missing}; install Debian's package with "
                    f"`apt-get install -y dataset-fashion-mnist` (it fills {DEBIAN_FASHION_MNIST}) or "
                    f"point root= at a directory holding those idx .gz files")
        return DatasetInfo(10, tuple(FASHION_MNIST_CLASSES), 1, 28, *_STATS["fashion_mnist"])
    # imagefolder
    classes = _imagefolder_classes(root / "train")
    return DatasetInfo(len(classes), tuple(classes), 3, None, IMAGENET_MEAN, IMAGENET_STD,
                       held_out=_imagefolder_held_out(root))


def _files_read(dataset: str, root: Path, split: str) -> list[Path]:
    if dataset == "cifar10_npz":
        return [root / f"{split}.npz"]
    if dataset == "fashion_mnist_debian":
        return [root / f for f in _DEBIAN_FILES[split]]
    if dataset == "imagefolder":
        return [p for p, _ in _imagefolder_files(root / split, _imagefolder_classes(root / "train"))]
    return []  # torchvision sources: their own files, checked by torchvision


def decode_cache_key(dataset: str, root: Path, split: str, img_size: Optional[int] = None) -> str:
    """Cache key: source kind, resolved root, split, decode size and (size, mtime) of each file read."""
    root = Path(root).resolve()
    files = _files_read(dataset, root, split)
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    payload = json.dumps({"format": _CACHE_FORMAT, "dataset": dataset, "root": str(root), "split": split,
                          "img_size": img_size, "files": stats}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def load_split(
    dataset: str,
    split: str,
    root: Optional[Path] = None,
    *,
    img_size: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    download: bool = False,
    use_cache: bool = True,
) -> ImageArrays:
    """One split as uint8 arrays, decoded once and then memory-mapped from the cache.

    ``split`` is ``"train"`` or the held-out split (``"test"``, or ``"val"``/``"test"`` for imagefolder).
    ``img_size`` is the decode size of imagefolder images (required there, ignored elsewhere).
    """
    _check_dataset(dataset)
    root = Path(root) if root is not None else default_root(dataset)
    if dataset == "imagefolder":
        if not img_size:
            raise ValueError("dataset='imagefolder' needs img_size (images are resized to img_size x img_size)")
    else:
        img_size = None

    if dataset == "cifar10_npz" and not (root / f"{split}.npz").is_file():
        _read_npz_arrays(root / f"{split}.npz", [])  # raises FileNotFoundError naming the file and layout

    def decoder() -> ImageArrays:
        if dataset in TORCHVISION:
            return _read_torchvision(dataset, root, split, download)
        if dataset == "cifar10_npz":
            return read_cifar10_npz(root / f"{split}.npz")
        if dataset == "fashion_mnist_debian":
            return read_fashion_mnist_debian(root, split)
        return read_imagefolder(root, split, img_size)

    if dataset in TORCHVISION or not use_cache:
        return decoder()  # torchvision keeps these as raw uint8 already: nothing to cache
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = decode_cache_key(dataset, root, split, img_size)
    stem = cache_dir / f"{dataset}-{split}-{key}"
    images_path, labels_path, meta_path = (Path(f"{stem}-{s}") for s in ("images.npy", "labels.npy", "meta.json"))
    if meta_path.is_file() and images_path.is_file() and labels_path.is_file():
        meta = json.loads(meta_path.read_text())
        return ImageArrays(np.load(images_path, mmap_mode="r"), np.load(labels_path), meta["classes"])
    arrays = decoder()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(images_path, np.ascontiguousarray(arrays.images))
    _atomic_save(labels_path, arrays.labels.astype(np.int64))
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"dataset": dataset, "root": str(root.resolve()), "split": split,
                               "img_size": img_size, "classes": arrays.classes,
                               "shape": list(arrays.images.shape)}))
    tmp.replace(meta_path)  # written last: its presence marks a complete cache entry
    return ImageArrays(np.load(images_path, mmap_mode="r"), np.load(labels_path), list(arrays.classes))


# ---------------------------------------------------------------------------------------------
# A subset of the classes (e.g. CIFAR-10's cat and dog as a binary task)
# ---------------------------------------------------------------------------------------------

def resolve_classes(classes: Sequence, class_names: Sequence[str]) -> list[int]:
    """The source's class indices of ``classes`` (indices or names, at least two, no repeats), in the order given."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or len(classes) < 2:
        raise ValueError(f"classes must be a list of at least 2 class indices or names, got {classes!r}")
    indices = []
    for c in classes:
        if isinstance(c, str) and c in class_names:
            indices.append(list(class_names).index(c))
        elif not isinstance(c, bool) and isinstance(c, int) and 0 <= c < len(class_names):
            indices.append(int(c))
        else:
            raise ValueError(f"class {c!r} is not one of the dataset's: indices 0..{len(class_names) - 1} or names "
                             f"{list(class_names)}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"classes {list(classes)} name a class twice")
    return indices


def select_classes(arrays: ImageArrays, classes: Sequence[int]) -> ImageArrays:
    """The images of ``classes`` (source indices) only, in their order, relabelled ``0 .. len(classes) - 1`` in
    the order of ``classes``."""
    relabel = np.full(len(arrays.classes), -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    keep = np.flatnonzero(relabel[arrays.labels] >= 0)
    return ImageArrays(np.asarray(arrays.images[keep]), relabel[arrays.labels[keep]],
                       [arrays.classes[c] for c in classes])
