"""Images per second of the training data paths, to tell whether data or the model bounds a step
(``train/bench_loader.py``).

    python train/bench_loader.py imagefolder --images 3000 --workers 16        # ImageNet-style folder, 224 px
    python train/bench_loader.py augment32 --device cuda --workers 4           # CIFAR-size: device vs timm CPU

* ``imagefolder``: writes a folder of ``--images`` random JPEGs (``--src-size``, ImageNet-like 500x375 by
  default; or reads ``--root``), then times ``ImageDataModule(dataset="imagefolder", img_size=224)``'s
  training loader: decode, timm's transforms (``--recipe deit``: RandAugment m9 + random erasing, as
  ``configs/recipes/deit.yaml``; ``light``: timm's transforms without them) and collation, in
  ``--workers`` processes.
* ``augment32``: ``--images`` random 32x32 images in memory, the ``basic`` preset (crop + flip) on
  whole batches on ``--device`` (``augment_on_device``) against timm's CPU pipeline of the ``deit``
  recipe in ``--workers`` loader processes (the batch copied to ``--device`` as training does).

Each row is one JSON line: images / s over ``--batches`` batches after one warm-up batch (the
worker start-up and first decode are left out). Timings are of this machine at this moment: run
on an otherwise idle machine and report the machine with them (``docs/benchmarks.md``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..data import ArrayImageDataset, BatchImageTransform, ImageDataModule, UInt8ImageDataset

# configs/recipes/deit.yaml's data options
DEIT_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "interpolation": "bicubic", "reprob": 0.25,
                "remode": "pixel", "recount": 1}
RECIPES = {"deit": DEIT_AUGMENT, "light": {}}


def make_jpeg_folder(root: Path, images: int, classes: int = 10, src_size: tuple[int, int] = (500, 375),
                     held_out: int = 2, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg`` (``images`` in all, classes in turn) and ``held_out`` per class in
    ``root/val/``: random smooth JPEGs (noise compresses and decodes unlike photos, a gradient does not)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = src_size
    base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1)  # (h, w, 2)
    for split, count in (("train", images), ("val", held_out * classes)):
        for i in range(count):
            c = i % classes
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, 3)
            pixels = (base[..., :1] * 0.5 + base[..., 1:] * 0.3 + colour * 0.2 + rng.normal(0, 8, (h, w, 3)))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def images_per_second(batches: Iterable, count: int, finish=lambda batch: batch) -> float:
    """Images / s of ``count`` batches of ``batches`` after a first (warm-up) one; ``finish`` completes a
    batch (moves / augments it) and the time includes it."""
    it = iter(batches)
    finish(next(it))
    seen, start = 0, time.perf_counter()
    for _ in range(count):
        out = finish(next(it))
        seen += len(out[0])
    last = out[0]
    if last.device.type == "cuda":
        torch.cuda.synchronize(last.device)
    return seen / (time.perf_counter() - start)


def bench_imagefolder(root: Path, img_size: int, batch_size: int, workers: int, batches: int, recipe: str) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="bench_loader_cache_"))
    data = ImageDataModule("imagefolder", root=str(root), img_size=img_size, augment="timm", batch_size=batch_size,
                           num_workers=workers, cache_dir=str(cache), shuffle_seed=0, **RECIPES[recipe])
    data.setup("fit")
    loader = data.train_dataloader()
    if len(loader) < batches + 1:
        raise SystemExit(f"{len(data.train_dataset)} images make {len(loader)} batches of {batch_size}: "
                         f"fewer than --batches {batches} + 1 warm-up; write more --images")
    rate = images_per_second(loader, batches)
    return {"bench": "imagefolder", "recipe": recipe, "img_size": img_size, "batch_size": batch_size,
            "workers": workers, "images_per_s": round(rate, 1)}


def bench_augment32(images: int, batch_size: int, workers: int, batches: int, device: str) -> list[dict]:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(images) % 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    target = torch.device(device)
    rows = []
    for path in ("device", "timm_cpu"):
        on_device = path == "device"
        # the data module's loader over in-memory arrays (cifar10's settings; nothing is read from disk)
        data = ImageDataModule("cifar10", augment="basic" if on_device else "timm", batch_size=batch_size,
                               num_workers=workers, augment_on_device=on_device, shuffle_seed=0,
                               **({} if on_device else DEIT_AUGMENT))
        data.train_dataset = (UInt8ImageDataset(arrays, labels) if on_device else
                              ArrayImageDataset(arrays, labels, data.train_transform, seed=0))
        loader = data.train_dataloader()
        transform = BatchImageTransform("basic", True, mean, std, seed=0)

        def finish(batch, on_device=on_device):
            if on_device:
                images_, labels_, keys = (t.to(target, non_blocking=True) for t in batch)
                return transform(images_, keys), labels_
            return tuple(t.to(target, non_blocking=True) for t in batch)

        rate = images_per_second(loader, batches, finish)
        rows.append({"bench": "augment32", "path": "basic on " + device if on_device else "timm deit on CPU workers",
                     "batch_size": batch_size, "workers": workers, "images_per_s": round(rate, 1)})
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    folder = sub.add_parser("imagefolder", help="timm's training loader on a folder of JPEGs")
    folder.add_argument("--root", type=Path, help="an imagefolder (train/<class>/*); default: write --images JPEGs")
    folder.add_argument("--images", type=int, default=3000)
    folder.add_argument("--src-size", default="500x375", help="WxH of the written JPEGs")
    folder.add_argument("--img-size", type=int, default=224)
    folder.add_argument("--recipe", choices=list(RECIPES), default="deit")
    small = sub.add_parser("augment32", help="32x32: on-device basic preset vs timm's CPU pipeline")
    small.add_argument("--images", type=int, default=20000)
    small.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for p in (folder, small):
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--workers", type=int, default=8)
        p.add_argument("--batches", type=int, default=10, help="timed batches, after one warm-up batch")
    args = parser.parse_args(argv)
    if args.bench == "imagefolder":
        root = args.root
        if root is None:
            w, h = (int(v) for v in args.src_size.lower().split("x"))
            root = make_jpeg_folder(Path(tempfile.mkdtemp(prefix="bench_loader_")), args.images, src_size=(w, h))
        rows = [bench_imagefolder(root, args.img_size, args.batch_size, args.workers, args.batches, args.recipe)]
    else:
        rows = bench_augment32(args.images, args.batch_size, args.workers, args.batches, args.device)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows
