"""FID of a trained DIFF-DiT / DiT checkpoint: sample with the diffusers pipeline, compare with real images.

The logic of ``train/fid_eval.py`` (whose docstring gives the usage): :func:`main` parses the same command
line and writes the same JSON summary and grid. The pieces: :func:`load_reference` fills the metric's
real statistics from a split of the training data (cached per dataset file under ``reference_key``),
:func:`sample` yields class-balanced (:func:`diffvision.diffusion.balanced_class_labels`), 8-bit quantised
EMA samples from any of ``diffvision.diffusion.SAMPLERS``, and :func:`save_grid` draws one row per class.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from diffvision.checkpoints import load_checkpoint_file
from diffvision.data import ImageDataModule, load_split
from diffvision.diffusion.sampling import SAMPLERS, balanced_class_labels
from diffvision.lightning import DiffusionModule
from diffvision.metrics import build_fid, cache_dir, fid_input

__all__ = ["load_reference", "main", "reference_key", "sample", "save_grid"]

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def reference_key(dataset: str, root: Path, split: str, img_size: int) -> str:
    """The cache key of a split's reference statistics: the dataset, its folder, the split, the image size
    and the split's files (path, size, mtime), so that changed data is never served stale statistics."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and split in p.name) if Path(root).is_dir() else []
    stamp = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    key = json.dumps([dataset, str(Path(root).resolve()), split, img_size, stamp])
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load_reference(fid, dm: ImageDataModule, split: str, batch_size: int, device: torch.device,
                   limit: Optional[int] = None) -> int:
    """Fill ``fid``'s real statistics with the images of ``split`` (all, or the first ``limit``; cached);
    returns how many."""
    key = reference_key(dm.dataset, dm.root, split, dm.img_size)
    path = cache_dir() / "fid_reference" / f"{dm.dataset}-{split}-{key}{f'-first{limit}' if limit else ''}.pt"
    if path.is_file():
        states = load_checkpoint_file(path, map_location=device)
        for name in REAL_STATES:
            getattr(fid, name).copy_(states[name])
        return int(states["real_features_num_samples"])
    arrays = load_split(dm.dataset, split, dm.root, img_size=dm.img_size)
    total = min(len(arrays.labels), limit or len(arrays.labels))
    for start in range(0, total, batch_size):
        x = torch.from_numpy(np.array(arrays.images[start:min(total, start + batch_size)])).to(device)
        fid.update(fid_input(x.permute(0, 3, 1, 2).float() / 255.0), real=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({name: getattr(fid, name).detach().cpu() for name in REAL_STATES}, tmp)
    tmp.replace(path)
    return total


@torch.no_grad()
def sample(module: DiffusionModule, num_samples: int, scheduler: str, steps: int, guidance_scale: float,
           batch_size: int, seed: int, device: torch.device, clip_denoised: bool = True):
    """Yield uint8-quantised float batches in [0, 1] of balanced classes, and the first 10 per class."""
    pipe = module.pipeline(use_ema=True)
    pipe.scheduler = module.sampling_scheduler(scheduler, clip_denoised)
    pipe.to(device)
    pipe.transformer.eval()
    num_classes = module.hparams.num_classes
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        labels = balanced_class_labels(num_classes, start, min(num_samples, start + batch_size))
        images = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
                      generator=generator, output_type="pt").images
        yield (images * 255).round().clamp(0, 255) / 255.0, labels


def save_grid(images: torch.Tensor, labels: list[int], num_classes: int, path: Path, per_class: int = 10) -> None:
    from torchvision.utils import save_image

    by_class = [[i for i, label in enumerate(labels) if label == c] for c in range(num_classes)]
    k = min(per_class, *(len(members) for members in by_class))  # one row per class, k samples each
    save_image(torch.cat([images[members[:k]] for members in by_class]), path, nrow=k, padding=1)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a DiffusionModule checkpoint (diffvision fit ... last.ckpt)")
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--scheduler", choices=sorted(SAMPLERS), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance (1 = off)")
    parser.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                        help="clip each step's predicted x0 to [-1, 1] (default: the checkpoint's clip_denoised, "
                             "on unless it was trained with it off)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="train", help="split of the training data to compare with")
    parser.add_argument("--reference-limit", type=int, default=None,
                        help="only the first N reference images (quick checks; class-sorted data become unbalanced)")
    parser.add_argument("--data-root", default=None, help="dataset directory (default: the checkpoint's)")
    parser.add_argument("--fid-weights", default=None, help="Inception weights (default: found offline)")
    parser.add_argument("--out", type=Path, default=None, help="JSON summary (default: next to the checkpoint)")
    parser.add_argument("--grid", type=Path, default=None, help="sample grid PNG (default: next to --out)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    if args.num_samples < 2:
        parser.error(f"--num-samples must be >= 2 (FID needs a covariance), got {args.num_samples}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 sampling of 10k images is otherwise GPU-bound
    t0 = time.time()
    module = DiffusionModule.load_from_checkpoint(args.checkpoint, map_location=device)
    hp = module.hparams
    checkpoint = load_checkpoint_file(args.checkpoint, mmap=True)
    data_hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    dataset = data_hp.get("dataset", "cifar10_npz")
    root = args.data_root or data_hp.get("root")
    dm = ImageDataModule(dataset, root=root, img_size=data_hp.get("img_size"), augment="diffusion")

    fid = build_fid(weights_path=args.fid_weights).to(device)
    num_real = load_reference(fid, dm, args.reference, args.batch_size, device, args.reference_limit)
    t_ref = time.time()
    grid_images, grid_labels = [], []
    clip = module.clip_denoised if args.clip_denoised is None else args.clip_denoised
    for images, labels in sample(module, args.num_samples, args.scheduler, args.steps, args.guidance_scale,
                                 args.batch_size, args.seed, device, clip):
        fid.update(fid_input(images), real=False)
        if len(grid_labels) < 10 * hp.num_classes:
            grid_images.append(images.cpu())
            grid_labels += labels
    value = float(fid.compute())
    t_end = time.time()

    out = args.out or args.checkpoint.parent.parent / "fid.json"
    grid = args.grid or out.with_name(out.stem + "_samples.png")
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(grid_images), grid_labels, hp.num_classes, grid)
    summary = {
        "fid": value, "fid_num_samples": args.num_samples,
        "fid_reference": f"{dataset} {args.reference} ({num_real} images)", "scheduler": args.scheduler,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "clip_denoised": clip,
        "sample_seed": args.seed,
        "checkpoint": str(args.checkpoint), "global_step": int(checkpoint.get("global_step", -1)),
        "sampling_s": round(t_end - t_ref, 1), "reference_s": round(t_ref - t0, 1), "grid": str(grid),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
