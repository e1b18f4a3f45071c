"""Attention maps of a standard ViT and a DIFF-ViT (or GDA-ViT, DIFF V2-ViT): per-head pictures and a measured summary.

    python train/attention_maps.py STANDARD DIFF [--indices 0 1 2 3] [--layer -1|all]
        [--num-summary 1000] [--dataset cifar10_npz] [--root DIR] [--out docs/results/attention]

``STANDARD`` and ``DIFF`` are each a Lightning checkpoint of a ``diffvision fit`` run (``.ckpt``: the
model is rebuilt from its hyper-parameters, and its data settings are the default data), or a timm
model name whose weights come from ``--standard-weights`` / ``--diff-weights`` (a state dict,
``.pth``/``.pt``/``.safetensors``, or a ``.ckpt``) with ``--standard-kwargs`` / ``--diff-kwargs``
(JSON ``create_model`` keywords). Checkpoints are read with ``diffvision.models.load_checkpoint_file`` (safetensors or ``torch.load(weights_only=True)``).

What it writes into ``--out``:

* ``image<idx>_layer<L>.png`` for each ``--indices`` validation image: the input, then one row per
  map (standard attention; DIFF signal, noise, difference), one column per head plus the mean over
  heads. Each map is the class token's attention to the patches (class / register tokens dropped)
  on the patch grid; a row shares one colour scale; the difference uses a diverging colormap
  centred at 0. For GDA the noise row shows, per signal head, the noise map that head subtracts; for
  DIFF V2 the signal / noise rows are query heads 2i / 2i+1 of output head i.
* ``summary.csv`` / ``summary.md``: over ``--num-summary`` validation images (evenly spaced over the
  split, so class-sorted data is covered), per layer, model, map and head: the entropy (nats) of the
  class token's attention over the patches, that entropy over its maximum log(P), and the mass on
  the top k = max(1, round(0.05·P)) patches. Entropy and top-k mass are measured on the row
  restricted to the patches and renormalised to sum to 1; for the difference map
  (signal − λ·noise, which has negative entries) on its **normalised positive part**
  ``max(d, 0) / Σ max(d, 0)`` (``--difference-mode abs`` uses ``|d| / Σ|d|`` instead). Also
  reported: the mass of the raw row on the class/register tokens and, for the difference, the
  fraction of its absolute mass that is negative, and λ (DIFF / GDA: per head, averaged over heads;
  DIFF V2: σ(W_λ x) per token and head, averaged over tokens, heads and images).

Models without a class token get the mean over patch queries instead of the class token's row
(said in the outputs). Runs on CUDA when available (``--device`` to choose).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from diffvision.models import load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "docs/results/attention"
DEFAULT_DATASET = "cifar10_npz"
DIFFERENCE_MODES = ("positive", "abs")

__all__ = [
    "entropy", "top_k_mass", "to_distribution", "num_top_k", "attention_maps_of", "query_rows", "patch_rows",
    "load_model", "LoadedModel", "summarise", "main",
]


# ---------------------------------------------------------------------------------------------
# Measures on attention rows
# ---------------------------------------------------------------------------------------------

def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of distributions along ``dim``, with 0·log 0 = 0."""
    p = p.double()
    return torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim)


def top_k_mass(p: Tensor, k: int, dim: int = -1) -> Tensor:
    """Mass of distributions along ``dim`` on their ``k`` largest entries."""
    if not 1 <= k <= p.shape[dim]:
        raise ValueError(f"k must be in [1, {p.shape[dim]}] (the number of entries), got {k}")
    return p.double().topk(k, dim=dim).values.sum(dim)


def num_top_k(num_patches: int, fraction: float = 0.05) -> int:
    """k = fraction of the patches, rounded, at least 1."""
    return max(1, min(num_patches, int(round(fraction * num_patches))))


def to_distribution(row: Tensor, mode: str = "renormalize") -> Tensor:
    """Rows over the patches -> distributions (sum 1 along the last dim); NaN where nothing is left.

    ``renormalize``: a non-negative (softmax) row divided by its sum; ``positive``: the positive
    part ``max(row, 0)`` normalised; ``abs``: ``|row|`` normalised.
    """
    row = row.double()
    if mode == "renormalize":
        if (row < 0).any():
            raise ValueError("mode 'renormalize' takes non-negative rows; use 'positive' or 'abs' for differences")
    elif mode == "positive":
        row = row.clamp_min(0)
    elif mode == "abs":
        row = row.abs()
    else:
        raise ValueError(f"unknown mode {mode!r}; accepted: 'renormalize', 'positive', 'abs'")
    total = row.sum(-1, keepdim=True)
    return torch.where(total > 0, row / total.clamp_min(1e-300), torch.full_like(row, math.nan))


# ---------------------------------------------------------------------------------------------
# Maps out of attention modules
# ---------------------------------------------------------------------------------------------

def _timm_attention_maps(attn: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                         is_causal: bool = False) -> dict[str, Tensor]:
    """The softmax map of timm's ``Attention`` (what its forward applies to v), in float32 or wider."""
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * attn.scale
    if is_causal:
        attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.to(dtype))
    return {"attention": scores.softmax(-1)}


def attention_maps_of(attn: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False) -> dict[str, Tensor]:
    """``attn.attention_maps`` for diffvision's modules, the same for timm's ``Attention``."""
    if hasattr(attn, "attention_maps"):
        return attn.attention_maps(x, attn_mask=attn_mask, is_causal=is_causal)
    from timm.layers import Attention
    if isinstance(attn, Attention):
        return _timm_attention_maps(attn, x, attn_mask, is_causal)
    raise TypeError(f"cannot read attention maps from {type(attn).__name__}; accepted: diffvision's attention "
                    f"layers (diffvision.attention.ATTN_KINDS) and timm's Attention")


def query_rows(maps: Tensor, num_prefix: int, query: str = "cls") -> Tensor:
    """(B, H, N, N) maps -> (B, H, N) attention rows over all keys: the class token's row (``cls``) or
    the mean over the patch queries (``mean``, for models without a class token)."""
    if query == "cls":
        if num_prefix < 1:
            raise ValueError("query 'cls' needs a class token (num_prefix >= 1)")
        return maps[:, :, 0, :]
    if query == "mean":
        return maps[:, :, num_prefix:, :].mean(2)
    raise ValueError(f"unknown query {query!r}; accepted: 'cls', 'mean'")


def patch_rows(maps: Tensor, num_prefix: int, query: str = "cls") -> Tensor:
    """(B, H, N, N) maps -> (B, H, P) query rows over the P patches (class / register columns dropped)."""
    return query_rows(maps, num_prefix, query)[..., num_prefix:]


class AttentionRecorder:
    """Forward pre-hooks on ``model.blocks[i].attn``: keep each chosen layer's attention input."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self.inputs: dict[int, tuple[Tensor, Optional[Tensor], bool]] = {}
        self.handles = [model.blocks[i].attn.register_forward_pre_hook(partial(self._hook, i), with_kwargs=True)
                        for i in layers]

    def _hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        is_causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
        self.inputs[layer] = (x.detach(), attn_mask, bool(is_causal))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> "AttentionRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    label: str  # "standard" or "diff"
    model: nn.Module
    source: str
    model_name: str
    hparams: dict = field(default_factory=dict)
    data_hparams: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The attention kind (``standard``, ``diff``, ``gda``, ``diffv2``), from the attention modules
        themselves (timm's own ``Attention`` is ``standard``)."""
        return getattr(self.model.blocks[0].attn, "attn_kind", "standard")

    @property
    def num_prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)


def _model_state_dict(checkpoint: Any, path: Path) -> dict[str, Tensor]:
    """The timm model's weights from a plain state dict, a {'state_dict'|'model': ...} wrapper or a
    Lightning checkpoint (keys under ``model.``), with torch.compile's ``_orig_mod.`` dropped."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict' / 'model')")
    state = {k.replace("_orig_mod.", ""): v for k, v in checkpoint.items()}
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def _read_weights(path: Path) -> dict[str, Tensor]:
    return _model_state_dict(load_checkpoint_file(path), path)  # safetensors or weights_only, never code


def read_checkpoint(spec: str) -> Optional[dict]:
    """A Lightning checkpoint's contents when ``spec`` is a ``.ckpt`` file, else None (a model name)."""
    path = Path(spec)
    if path.suffix != ".ckpt":
        return None
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint of an ImageClassifier (no hyper_parameters / "
                         f"state_dict); pass a timm model name with --*-weights for plain state dicts")
    if "model_name" not in checkpoint["hyper_parameters"]:
        raise ValueError(f"{path}: hyper_parameters have no model_name; is it an ImageClassifier checkpoint?")
    return checkpoint


def load_model(label: str, spec: str, data_info: dict, weights: Optional[str] = None,
               model_kwargs: Optional[dict] = None, checkpoint: Optional[dict] = None) -> LoadedModel:
    """Build and load one model, in eval mode. ``data_info``: num_classes, in_chans, img_size of the data."""
    from diffvision.lightning.classifier import create_classifier

    if checkpoint is not None:
        if weights is not None or model_kwargs:
            raise ValueError(f"{label}: {spec} is a checkpoint; --{label}-weights / --{label}-kwargs apply to model names")
        hp = checkpoint["hyper_parameters"]
        model = create_classifier(hp["model_name"], hp.get("num_classes", data_info["num_classes"]),
                                  hp.get("in_chans", data_info["in_chans"]), hp.get("img_size", data_info["img_size"]),
                                  **dict(hp.get("model_kwargs") or {}))
        model.load_state_dict(_model_state_dict(checkpoint, Path(spec)))
        return LoadedModel(label, model.eval(), spec, hp["model_name"], dict(hp),
                           dict(checkpoint.get("datamodule_hyper_parameters") or {}))
    if weights is None:
        raise ValueError(f"{label}: {spec!r} is not a .ckpt file, so it is read as a timm model name and needs "
                         f"--{label}-weights PATH (a state dict) with the trained weights")
    kwargs = dict(model_kwargs or {})
    num_classes = kwargs.pop("num_classes", data_info["num_classes"])
    in_chans = kwargs.pop("in_chans", data_info["in_chans"])
    img_size = kwargs.pop("img_size", data_info["img_size"])
    try:
        model = create_classifier(spec, num_classes, in_chans, img_size, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"{label}: {spec!r} is neither a .ckpt file nor a timm model name") from err
        raise
    model.load_state_dict(_read_weights(Path(weights)))
    return LoadedModel(label, model.eval(), f"{spec} + {weights}", spec, {"model_kwargs": kwargs})


def _check_model(m: LoadedModel, img_size: int, in_chans: int) -> None:
    if not hasattr(m.model, "blocks") or not hasattr(m.model, "patch_embed"):
        raise ValueError(f"{m.label}: {m.model_name} is not a ViT (no blocks / patch_embed)")
    size = tuple(m.model.patch_embed.img_size)
    if size != (img_size, img_size) or m.model.patch_embed.proj.in_channels != in_chans:
        raise ValueError(f"{m.label}: {m.model_name} takes {m.model.patch_embed.proj.in_channels}x{size} images, "
                         f"the data has {in_chans}x{(img_size, img_size)}")


# ---------------------------------------------------------------------------------------------
# Summary over many images
# ---------------------------------------------------------------------------------------------

def _map_names(kind: str) -> tuple[str, ...]:
    return ("attention",) if kind == "standard" else ("signal", "noise", "difference")


def measure_rows(maps: dict[str, Tensor], num_prefix: int, query: str, k: int,
                 difference_mode: str = "positive") -> dict[str, dict[str, Tensor]]:
    """Per map: (B, H) entropy, top-k mass, prefix mass and (difference) negative fraction."""
    out = {}
    for name, full in maps.items():
        if name == "lambda":
            continue
        row = query_rows(full, num_prefix, query)
        patches = row[..., num_prefix:]
        mode = difference_mode if name == "difference" else "renormalize"
        p = to_distribution(patches, mode)
        stats = {"entropy": entropy(p), "top_k_mass": top_k_mass(p, k),
                 "prefix_mass": row[..., :num_prefix].double().sum(-1)}
        if name == "difference":
            absolute = patches.double().abs().sum(-1)
            stats["negative_fraction"] = patches.double().clamp_max(0).abs().sum(-1) / absolute.clamp_min(1e-300)
        out[name] = stats
    return out


def _cls_query(m: LoadedModel) -> str:
    return "cls" if m.has_class_token else "mean"


@torch.no_grad()
def summarise(models: Sequence[LoadedModel], images: Tensor, layers: dict[str, list[int]], batch_size: int,
              device: torch.device, top_k_fraction: float = 0.05, difference_mode: str = "positive") -> list[dict]:
    """Rows of the summary table: one per (layer, model, map, head) and one per (layer, model, map) with
    head 'mean' (statistics over all images and heads)."""
    collected: dict[tuple, dict[str, list[Tensor]]] = {}
    lambdas: dict[tuple, float] = {}
    for m in models:
        num_patches = int(np.prod(m.grid))
        k = num_top_k(num_patches, top_k_fraction)
        with AttentionRecorder(m.model, layers[m.label]) as rec:
            for start in range(0, len(images), batch_size):
                m.model(images[start:start + batch_size].to(device))
                for layer, (x, mask, causal) in rec.inputs.items():
                    maps = attention_maps_of(m.model.blocks[layer].attn, x, mask, causal)
                    if "lambda" in maps:
                        lambdas[(layer, m.label)] = float(maps["lambda"].mean())
                    for name, stats in measure_rows(maps, m.num_prefix, _cls_query(m), k, difference_mode).items():
                        bucket = collected.setdefault((layer, m.label, name, num_patches, k), {})
                        for stat, value in stats.items():
                            bucket.setdefault(stat, []).append(value.cpu())
                rec.inputs.clear()
    rows = []
    order = {m.label: i for i, m in enumerate(models)}
    for (layer, label, name, num_patches, k), stats in sorted(collected.items(),
                                                              key=lambda kv: (kv[0][0], order[kv[0][1]])):
        kind = next(m.kind for m in models if m.label == label)
        values = {stat: torch.cat(chunks) for stat, chunks in stats.items()}  # (images, heads)
        num_images, heads = values["entropy"].shape
        for head in ["mean", *range(heads)]:
            row = {"layer": layer, "model": label, "kind": kind, "map": name, "head": head,
                   "num_images": num_images, "num_patches": num_patches, "k": k,
                   "max_entropy": math.log(num_patches),
                   "lambda": lambdas.get((layer, label), "") if name == "difference" else ""}
            for stat in ("entropy", "top_k_mass", "prefix_mass", "negative_fraction"):
                if stat not in values:
                    row[f"{stat}_mean"] = row[f"{stat}_std"] = ""
                    continue
                v = values[stat] if head == "mean" else values[stat][:, head]
                v = v[~torch.isnan(v)]
                row[f"{stat}_mean"] = float(v.mean()) if len(v) else math.nan
                row[f"{stat}_std"] = float(v.std()) if len(v) > 1 else math.nan
            row["normalized_entropy_mean"] = row["entropy_mean"] / row["max_entropy"]
            rows.append(row)
    return rows


SUMMARY_COLUMNS = ["layer", "model", "kind", "map", "head", "num_images", "num_patches", "k", "lambda",
                   "entropy_mean", "entropy_std", "max_entropy", "normalized_entropy_mean", "top_k_mass_mean",
                   "top_k_mass_std", "prefix_mass_mean", "prefix_mass_std", "negative_fraction_mean",
                   "negative_fraction_std"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value == "" or value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_summary(rows: list[dict], out: Path, header: list[str]) -> tuple[Path, Path]:
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in SUMMARY_COLUMNS})
    means = [r for r in rows if r["head"] == "mean"]
    lines = ["# Attention summary: standard vs differential attention", "", *header, ""]
    # compact comparison: the standard map against the DIFF difference (and signal) per layer
    by_key = {(r["layer"], r["model"], r["map"]): r for r in means}
    layers = sorted({r["layer"] for r in means})
    diff_label = "diff"
    lines += ["## Per layer (mean over images and heads)", "",
              "| layer | standard H | DIFF signal H | DIFF difference H | standard top-k | "
              "DIFF signal top-k | DIFF difference top-k | λ |",
              "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        std = by_key.get((layer, "standard", "attention"), {})
        sig = by_key.get((layer, diff_label, "signal"), {})
        dif = by_key.get((layer, diff_label, "difference"), {})
        lines.append(f"| {layer} | {_fmt(std.get('entropy_mean'))} | {_fmt(sig.get('entropy_mean'))} | "
                     f"{_fmt(dif.get('entropy_mean'))} | {_fmt(std.get('top_k_mass_mean'))} | "
                     f"{_fmt(sig.get('top_k_mass_mean'))} | {_fmt(dif.get('top_k_mass_mean'))} | "
                     f"{_fmt(dif.get('lambda'))} |")
    lines += ["", "## All maps (mean ± std over images and heads)", "",
              "| layer | model | map | entropy (nats) | entropy / log P | top-k mass | mass on class/register tokens "
              "| negative fraction |", "|---|---|---|---|---|---|---|---|"]
    for r in means:
        def pm(stat):
            mean, std = r[f"{stat}_mean"], r[f"{stat}_std"]
            return "—" if mean == "" else f"{_fmt(mean)} ± {_fmt(std)}"
        lines.append(f"| {r['layer']} | {r['model']} ({r['kind']}) | {r['map']} | {pm('entropy')} | "
                     f"{_fmt(r['normalized_entropy_mean'])} | {pm('top_k_mass')} | {pm('prefix_mass')} | "
                     f"{pm('negative_fraction')} |")
    lines += ["", "Per-head rows: summary.csv.", ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

def plot_image_maps(path: Path, image: np.ndarray, title: str,
                    rows: list[tuple[str, np.ndarray, bool, list[str]]]) -> Path:
    """One figure, one row per (label, maps (H, gh, gw), diverging?, head titles): the image, the heads
    and their mean. A row shares one colour scale; diverging rows are centred at 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    ncols = 2 + max(maps.shape[0] for _, maps, _, _ in rows)
    # a fixed grid (no constrained layout: it triples the drawing time); the last column holds the colour bars
    fig, axes = plt.subplots(len(rows), ncols + 1, figsize=(1.6 * ncols + 0.9, 1.75 * len(rows) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * ncols + [0.08]})
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.02, top=1 - 0.45 / (1.75 * len(rows) + 0.4),
                        wspace=0.25, hspace=0.35)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    gray = image.shape[-1] == 1
    for r, (label, maps, diverging, head_titles) in enumerate(rows):
        # the input again at the start of every row, labelled with the row's map
        axes[r, 0].imshow(image.squeeze(-1) if gray else image, cmap="gray" if gray else None)
        axes[r, 0].set_ylabel(label, fontsize=8)
        panels = list(maps) + [maps.mean(0)]
        if diverging:
            vmax = float(max(np.abs(maps).max(), 1e-12))
            norm, cmap = Normalize(-vmax, vmax), "RdBu_r"
        else:
            norm, cmap = Normalize(0.0, float(max(maps.max(), 1e-12))), "viridis"
        im = None
        for c, (panel, head_title) in enumerate(zip(panels, head_titles + ["mean"])):
            ax = axes[r, 1 + c]
            im = ax.imshow(panel, cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(head_title, fontsize=7)
        fig.colorbar(im, cax=axes[r, -1])
        axes[r, -1].tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def draw_images(models: Sequence[LoadedModel], images: Tensor, raw: np.ndarray, labels: Sequence[int],
                indices: Sequence[int], class_names: Sequence[str], layer_of: dict[str, int], out: Path,
                device: torch.device) -> list[Path]:
    per_model = {}
    for m in models:
        layer = layer_of[m.label]
        with AttentionRecorder(m.model, [layer]) as rec:
            probs = m.model(images.to(device)).softmax(-1).cpu()
            x, mask, causal = rec.inputs[layer]
        maps = attention_maps_of(m.model.blocks[layer].attn, x, mask, causal)
        per_model[m.label] = (m, probs, {k: v.float().cpu() for k, v in maps.items()}, layer)

    def name_of(c: int) -> str:
        return class_names[c] if c < len(class_names) else str(c)

    paths = []
    for b, idx in enumerate(indices):
        rows, preds = [], []
        for label, (m, probs, maps, layer) in per_model.items():
            gh, gw = m.grid
            query = _cls_query(m)
            c = int(probs[b].argmax())
            preds.append(f"{m.kind}: {name_of(c)} ({probs[b, c]:.2f})")
            qname = "CLS" if query == "cls" else "mean query"
            for name in _map_names(m.kind):
                row = patch_rows(maps[name][b:b + 1], m.num_prefix, query)[0].numpy().reshape(-1, gh, gw)
                heads = row.shape[0]
                titles = [f"h{h}" for h in range(heads)]
                if name == "noise" and m.kind == "gda":
                    group = heads // m.model.blocks[layer].attn.noise_heads
                    titles = [f"h{h} (n{h // group})" for h in range(heads)]
                text = f"{m.kind} {name}\nL{layer} {qname}"
                if name == "difference":
                    text += f"\nλ={float(maps['lambda'].mean()):.3f}"
                rows.append((text, row, name == "difference", titles))
        title = f"val #{idx}: {name_of(int(labels[b]))} | " + " | ".join(preds)
        layer_tag = "-".join(sorted({str(layer) for *_, layer in per_model.values()}))
        paths.append(plot_image_maps(out / f"image{idx:05d}_layer{layer_tag}.png", raw[b], title, rows))
    return paths


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

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
        _check_model(m, dm.img_size, dm.in_chans)
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


if __name__ == "__main__":
    sys.exit(main())
