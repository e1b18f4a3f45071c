"""Attention maps of a standard ViT and a DIFF-ViT (or GDA-ViT, DIFF V2-ViT): per-head pictures and a
measured summary (``train/attention_maps.py``).

The two models (``attention_models``: a ``diffvision fit`` checkpoint, or a timm name + weights) are
run on the validation split of their data (as given, else as the checkpoints were trained on). What
``run`` writes into ``--out``:

* ``image<idx>_layer<L>.png`` for each ``--indices`` validation image (``attention_pictures``);
* ``summary.csv`` / ``summary.md`` over ``--num-summary`` validation images, evenly spaced over the
  split so class-sorted data is covered (``attention_summary``): per layer, model, map and head, the
  entropy (nats) of the class token's attention over the patches, that entropy over its maximum
  log(P), and the mass on the top k = max(1, round(0.05·P)) patches (``attention_maps`` says how the
  difference map becomes a distribution: ``--difference-mode``).

Models without a class token get the mean over patch queries instead of the class token's row (said
in the outputs). Runs on CUDA when available (``--device`` to choose).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .attention_maps import DIFFERENCE_MODES, num_top_k
from .attention_models import check_model, load_model, read_checkpoint
from .attention_pictures import draw_images
from .attention_summary import summarise, write_summary

__all__ = ["DEFAULT_DATASET", "DEFAULT_OUT", "build_parser", "main", "run"]

DEFAULT_OUT = "docs/results/attention"
DEFAULT_DATASET = "cifar10_npz"


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 6}}', got {text!r}")
    return value


def _layer(text: str) -> str:
    if text != "all":
        try:
            int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"layer must be a block index (negative counts from the end) or 'all', got {text!r}")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None / False ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train/attention_maps.py",
        description="Per-head CLS-to-patch attention maps of a standard ViT and a DIFF-ViT (signal, noise, "
                    "difference) as PNGs, and an entropy / top-k-mass summary over many validation images.",
        formatter_class=_HelpFormatter)
    p.add_argument("standard", help="standard ViT: a diffvision fit checkpoint (.ckpt) or a timm model name")
    p.add_argument("diff", help="DIFF-ViT (or GDA-ViT): a diffvision fit checkpoint (.ckpt) or a timm model name")
    for label in ("standard", "diff"):
        p.add_argument(f"--{label}-weights", help=f"state dict for the {label} model when it is given by name")
        p.add_argument(f"--{label}-kwargs", type=_json_dict, default=None,
                       help=f"JSON create_model keywords for the {label} model given by name, e.g. '{{\"depth\": 6}}'")
    p.add_argument("--dataset", default=None,
                   help=f"ImageDataModule dataset (default: the checkpoints' dataset, else {DEFAULT_DATASET})")
    p.add_argument("--root", default=None, help="dataset root (default: the checkpoints' root, else the dataset's default)")
    p.add_argument("--cache-dir", default=None, help="decoded-dataset cache (ImageDataModule cache_dir)")
    p.add_argument("--download", action="store_true", help="let torchvision datasets download")
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="validation image indices to draw")
    p.add_argument("--layer", type=_layer, default="-1",
                   help="block index for the pictures and the summary (negative counts from the end), or 'all': "
                        "summary of every layer, pictures of --png-layer")
    p.add_argument("--png-layer", type=int, default=None, help="block drawn when --layer all (default: the last)")
    p.add_argument("--num-summary", type=int, default=1000, help="validation images in the summary (0: none)")
    p.add_argument("--batch-size", type=int, default=250, help="batch size of the summary")
    p.add_argument("--top-k-fraction", type=float, default=0.05, help="k of the top-k mass, as a fraction of the patches")
    p.add_argument("--difference-mode", choices=DIFFERENCE_MODES, default="positive",
                   help="how the difference map becomes a distribution: normalised positive part or |d| normalised")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    return p


def _resolve_layers(spec: str, depth: int, label: str) -> list[int]:
    if spec == "all":
        return list(range(depth))
    layer = int(spec)
    if not -depth <= layer < depth:
        raise ValueError(f"--layer {layer} is out of range for the {label} model's {depth} blocks")
    return [layer % depth]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Pictures and summary for ``build_parser``'s arguments (plus ``args.argv``, the command line, recorded in
    summary.md); returns ``{"pngs", "device", "dataset"}`` and, with a summary, its rows and files."""
    from diffvision.data import ImageDataModule

    if args.num_summary < 0 or args.batch_size < 1:
        raise ValueError(f"--num-summary must be >= 0 and --batch-size >= 1, got {args.num_summary}, {args.batch_size}")
    if not 0 < args.top_k_fraction <= 1:
        raise ValueError(f"--top-k-fraction must be in (0, 1], got {args.top_k_fraction}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoints = {label: read_checkpoint(getattr(args, label)) for label in ("standard", "diff")}

    # the data: as given, else as the checkpoints were trained on
    data_hp = next((c.get("datamodule_hyper_parameters") or {} for c in checkpoints.values()
                    if c is not None and c.get("datamodule_hyper_parameters")), {})
    dataset = args.dataset or data_hp.get("dataset") or DEFAULT_DATASET
    root = args.root if args.root is not None else (data_hp.get("root") if dataset == data_hp.get("dataset") else None)
    img_size = next((c["hyper_parameters"].get("img_size") for c in checkpoints.values()
                     if c is not None and c["hyper_parameters"].get("img_size")), None)
    dm = ImageDataModule(dataset=dataset, root=root, img_size=img_size, augment="none", batch_size=args.batch_size,
                         num_workers=0, cache_dir=args.cache_dir, download=args.download)
    dm.setup("validate")
    val = dm.val_dataset
    data_info = {"num_classes": dm.num_classes, "in_chans": dm.in_chans, "img_size": dm.img_size}

    models = []
    for label in ("standard", "diff"):
        m = load_model(label, getattr(args, label), data_info, getattr(args, f"{label}_weights"),
                       getattr(args, f"{label}_kwargs"), checkpoints[label])
        check_model(m, dm.img_size, dm.in_chans)
        m.model.to(device)
        models.append(m)
    standard, diff = models
    if standard.kind != "standard":
        raise ValueError(f"the first model ({standard.model_name}) has {standard.kind} attention; expected standard")
    if diff.kind == "standard":
        raise ValueError(f"the second model ({diff.model_name}) has standard attention; expected diff or gda")

    layers = {m.label: _resolve_layers(args.layer, len(m.model.blocks), m.label) for m in models}
    png_layer = args.png_layer if args.layer == "all" else int(args.layer)
    png_layers = {m.label: _resolve_layers(str(-1 if png_layer is None else png_layer), len(m.model.blocks), m.label)[0]
                  for m in models}

    bad = [i for i in args.indices if not 0 <= i < len(val.labels)]
    if bad:
        raise ValueError(f"--indices {bad} out of range: the validation split has {len(val)} images (0..{len(val) - 1})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # --indices are rows of the split as stored (the data module serves it class-interleaved)
    images = torch.stack([val.transform(val.images[i]) for i in args.indices])
    labels = [int(val.labels[i]) for i in args.indices]
    raw = np.stack([val.images[i] for i in args.indices])
    pngs = draw_images(models, images, raw, labels, args.indices, dm.class_names, png_layers, out, device)

    result: dict[str, Any] = {"pngs": pngs, "device": str(device), "dataset": dataset}
    num = min(args.num_summary, len(val))
    if num > 0:
        chosen = np.unique(np.linspace(0, len(val) - 1, num).round().astype(int))
        summary_images = torch.stack([val[int(i)][0] for i in chosen])
        rows = summarise(models, summary_images, layers, args.batch_size, device, args.top_k_fraction,
                         args.difference_mode)
        queries = {m.label: ("the class token's row" if m.has_class_token else
                             "the mean over patch queries (no class token)") for m in models}
        k = num_top_k(int(np.prod(standard.grid)), args.top_k_fraction)
        diff_rule = ("its normalised positive part max(d, 0) / Σ max(d, 0)" if args.difference_mode == "positive"
                     else "|d| / Σ|d|")
        header = [
            f"- command: `python train/attention_maps.py {' '.join(shlex.quote(a) for a in args.argv)}`",
            f"- standard: `{standard.source}` ({standard.model_name}); DIFF: `{diff.source}` ({diff.model_name}, {diff.kind})",
            f"- data: {dataset} validation split, {len(chosen)} images evenly spaced over its {len(val)}; device {device}",
            f"- row: {queries['standard']} (standard), {queries['diff']} (DIFF), over the P = {int(np.prod(standard.grid))} "
            f"patches (class/register tokens dropped), renormalised to sum 1",
            f"- difference map (signal − λ·noise): entropy and top-k mass of {diff_rule}",
            f"- H = entropy in nats (uniform: log P = {math.log(int(np.prod(standard.grid))):.3f}; one-hot: 0); "
            f"top-k mass with k = {k} ({args.top_k_fraction:.0%} of the patches)",
        ]
        result["summary_rows"] = rows
        result["summary_csv"], result["summary_md"] = write_summary(rows, out, header)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for path in result["pngs"]:
        print(f"wrote {path}")
    if "summary_md" in result:
        print(f"wrote {result['summary_csv']}\nwrote {result['summary_md']}")
    return 0
