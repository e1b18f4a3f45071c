"""Per-head pictures of the attention maps of a few images, one figure per image.

Each figure shows, per model and map (standard attention; DIFF signal, noise, difference), the input
and one panel per head plus the mean over heads: the class token's attention to the patches (class /
register tokens dropped) on the patch grid. A row shares one colour scale; the difference uses a
diverging colormap centred at 0. For GDA the noise row shows, per signal head, the noise map that head
subtracts; for DIFF V2 the signal / noise rows are query heads 2i / 2i+1 of output head i.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .attention_maps import AttentionRecorder, attention_maps_of, map_names, patch_rows
from .attention_models import LoadedModel
from .plots import pyplot

__all__ = ["draw_images", "plot_image_maps"]


def plot_image_maps(path: Path, image: np.ndarray, title: str,
                    rows: list[tuple[str, np.ndarray, bool, list[str]]]) -> Path:
    """One figure, one row per (label, maps (H, gh, gw), diverging?, head titles): the image, the heads
    and their mean. A row shares one colour scale; diverging rows are centred at 0."""
    plt = pyplot()
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
    """``out/image<idx>_layer<L>.png`` for each of ``images`` (validation rows ``indices``; ``raw``: the
    pictures as stored), each model's maps at its block ``layer_of[label]``, with its prediction."""
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
            query = m.query
            c = int(probs[b].argmax())
            preds.append(f"{m.kind}: {name_of(c)} ({probs[b, c]:.2f})")
            qname = "CLS" if query == "cls" else "mean query"
            for name in map_names(m.kind):
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

