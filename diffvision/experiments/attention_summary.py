"""The attention measures over many images: rows per (layer, model, map, head), as summary.csv / summary.md.

For each chosen layer of each model, every map's measured row (``attention_maps.measure_rows``: entropy
and top-k mass of the patch distribution, mass on the class/register tokens, and for the difference
map the negative fraction of its absolute mass) is gathered over the images; a row of the table is the
mean ± std over images per head, and over images and heads (head ``mean``). λ is reported with the
difference map (DIFF / GDA: per head, averaged over heads; DIFF V2: σ(W_λ x), averaged over tokens,
heads and images).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .attention_maps import AttentionRecorder, attention_maps_of, measure_rows, num_top_k
from .attention_models import LoadedModel

__all__ = ["SUMMARY_COLUMNS", "summarise", "write_summary"]


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
                    for name, stats in measure_rows(maps, m.num_prefix, m.query, k, difference_mode).items():
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


def _plus_minus(row: dict, stat: str) -> str:
    mean, std = row[f"{stat}_mean"], row[f"{stat}_std"]
    return "—" if mean == "" else f"{_fmt(mean)} ± {_fmt(std)}"


def write_summary(rows: list[dict], out: Path, header: list[str]) -> tuple[Path, Path]:
    """``out/summary.csv`` (every row) and ``out/summary.md`` (``header`` lines, then the per-layer comparison
    and the mean rows as tables)."""
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
        lines.append(f"| {r['layer']} | {r['model']} ({r['kind']}) | {r['map']} | {_plus_minus(r, 'entropy')} | "
                     f"{_fmt(r['normalized_entropy_mean'])} | {_plus_minus(r, 'top_k_mass')} | "
                     f"{_plus_minus(r, 'prefix_mass')} | {_plus_minus(r, 'negative_fraction')} |")
    lines += ["", "Per-head rows: summary.csv.", ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path
