"""The report's figures: accuracy vs data fraction, learning curves and FID vs step (mean ± std over seeds).

Each returns the path it wrote, or None when there is nothing to plot. ``pyplot`` is the one headless
matplotlib import of the experiments (the attention pictures use it too).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .results import finite_number, metric_by_epoch
from .runs import Run, order_kinds, percent
from .tables import REFERENCE, STANDARD_FRACTIONS, classification_cells, fractions_of, kind_label, kinds_of, mean_std

__all__ = ["plot_accuracy_vs_fraction", "plot_fid_vs_step", "plot_learning_curves", "pyplot"]


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed (GPU machines have none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_fraction(runs: Sequence[Run], path: Path) -> Optional[Path]:
    runs = [r for r in runs if r.task == "classification"]
    if not runs:
        return None
    plt = pyplot()
    cells = classification_cells(runs)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    kinds = kinds_of(runs)
    for i, kind in enumerate(kinds):
        fractions = [f for f in fractions_of(runs) if (f, kind) in cells]
        means = [cells[(f, kind)][0] for f in fractions]
        stds = [0.0 if math.isnan(cells[(f, kind)][1]) else cells[(f, kind)][1] for f in fractions]
        dodge = 10 ** (0.012 * (i - (len(kinds) - 1) / 2))  # side by side, so the error bars stay readable
        ax.errorbar([100 * f * dodge for f in fractions], means, yerr=stds, marker="o", capsize=3,
                    label=kind_label(kind))
    ref_f = sorted(REFERENCE)
    for i, name in enumerate(("Transformer", "DiffTransformer")):
        ax.plot([100 * f for f in ref_f], [REFERENCE[f][i] for f in ref_f], ls=":", color="gray" if i == 0 else "black",
                alpha=0.6, label=f"ref. {name} (issue table)")
    ax.set_xscale("log")
    ticks = fractions_of(runs, STANDARD_FRACTIONS)
    ax.set_xticks([100 * f for f in ticks], [percent(f) for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("final val top-1 accuracy (%)")
    ax.set_title("Accuracy vs data fraction (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curve_panels(series: dict[float, dict[str, list[dict[int, float]]]], path: Path, xlabel: str, ylabel: str,
                  title: str) -> Optional[Path]:
    """One panel per fraction, one line per kind: mean ± std over the runs' curves ({x: y})."""
    series = {f: kinds for f, kinds in series.items() if any(c for curves in kinds.values() for c in curves)}
    if not series:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fractions = sorted(series)
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.4), squeeze=False, layout="constrained")
    for ax, f in zip(axes[0], fractions):
        for kind in order_kinds(series[f]):
            curves = [c for c in series[f][kind] if c]
            if not curves:
                continue
            xs = sorted(set().union(*curves))
            stats = [mean_std(c[x] for c in curves if x in c) for x in xs]
            mean = np.array([s[0] for s in stats])
            std = np.array([0.0 if math.isnan(s[1]) else s[1] for s in stats])
            line, = ax.plot(xs, mean, label=f"{kind_label(kind)} (n={len(curves)})")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{percent(f)} of the data", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(runs: Sequence[Run], task: str, curve: Callable[[Run], dict[int, float]]) -> dict:
    """{fraction: {kind: [curve of each run of ``task``]}}."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.task == task:
            series[r.fraction][r.kind].append(curve(r))
    return series


def _accuracy_curve(run: Run) -> dict[int, float]:
    return {e: 100 * v for e, v in metric_by_epoch(run.path).items()}


def plot_learning_curves(runs: Sequence[Run], path: Path) -> Optional[Path]:
    return _curve_panels(_curves(runs, "classification", _accuracy_curve), path, "epoch", "val top-1 accuracy (%)",
                         "Learning curves (mean ± std over seeds)")


def _fid_curve(run: Run) -> dict[int, float]:
    curve = {}
    for point in run.result.get("fid_vs_step") or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, fid = finite_number(point[0]), finite_number(point[1])
            if step is not None and fid is not None:
                curve[int(step)] = fid
    return curve


def plot_fid_vs_step(runs: Sequence[Run], path: Path) -> Optional[Path]:
    return _curve_panels(_curves(runs, "generation", _fid_curve), path, "training step", "FID",
                         "FID vs step (mean ± std over seeds)")
