"""Numbers over seeds (mean ± sample std, paired differences) and the report's markdown and CSV tables.

A cell is a (fraction, kind) of one task's runs: ``mean ± std (n)`` of the runs' headline value (final
val/acc1 in %, or FID) over their seeds, with the sample std (ddof=1). A paired difference is taken over
the seeds both kinds have.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .results import finite_number, fraction_key, headline_text
from .runs import KIND_ORDER, Run, order_kinds, percent

__all__ = [
    "CLASSIFICATION_COLUMNS", "GENERATION_COLUMNS", "REFERENCE", "STANDARD_FRACTIONS", "classification_cells",
    "classification_markdown", "format_mean_std", "fractions_of", "generation_cells", "generation_markdown",
    "kind_label", "kinds_of", "markdown_table", "mean_std", "paired_delta", "runs_markdown", "sorted_runs",
    "unique_text", "write_csv",
]

KIND_LABELS = {"standard": "standard", "diff": "DIFF", "gda": "GDA", "diffv2": "DIFF V2",
               "diff_vision": "DIFF (vision λ: 0.8 fixed)"}  # stage 3 of issue 16 names its DIFF arm apart
STANDARD_FRACTIONS = (0.01, 0.10, 0.25, 1.0)
# the reference table (accuracy %, ViT trained from scratch on a fraction of the data)
REFERENCE = {0.01: (49.71, 53.78), 0.10: (57.25, 67.34), 0.25: (72.25, 74.86), 1.0: (78.49, 78.85)}


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; NaN for one value), n); (NaN, NaN, 0) for none."""
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def format_mean_std(mean: float, std: float, n: int, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std (n)``; ``mean ± — (1)`` for one value; ``—`` for none."""
    if n == 0:
        return "—"
    sign = "+" if signed else ""
    spread = "—" if math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:{sign}.{digits}f} ± {spread} ({n})"


def _one_task(runs: Sequence[Run]) -> None:
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        raise ValueError(f"runs of one task expected, got {sorted(tasks)}: filter by Run.task first")


def classification_cells(runs: Sequence[Run]) -> dict[tuple[float, str], tuple[float, float, int]]:
    """{(fraction, kind): (mean, std, n)} of final val/acc1 in % (or FID, for generation runs)."""
    _one_task(runs)
    groups: dict[tuple[float, str], list[float]] = defaultdict(list)
    for r in runs:
        groups[(r.fraction, r.kind)].append(r.value)
    return {key: mean_std(values) for key, values in groups.items()}


generation_cells = classification_cells  # the same grouping of Run.value (FID for generation runs)


def paired_delta(runs: Sequence[Run], fraction: float, kind: str, baseline: str = "standard") -> tuple[float, float, int]:
    """Mean ± sample std over seeds of (kind − baseline), pairing the runs (of one task) by seed."""
    _one_task(runs)
    by_seed = {k: {r.seed: r.value for r in runs if r.fraction == fraction and r.kind == k} for k in (kind, baseline)}
    seeds = sorted(set(by_seed[kind]) & set(by_seed[baseline]))
    return mean_std(by_seed[kind][s] - by_seed[baseline][s] for s in seeds)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def kinds_of(runs: Iterable[Run]) -> list[str]:
    return order_kinds(r.kind for r in runs)


def fractions_of(runs: Iterable[Run], always: Sequence[float] = ()) -> list[float]:
    return sorted({r.fraction for r in runs} | {fraction_key(f) for f in always})


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def unique_text(values: Iterable[Any]) -> str:
    """The distinct values, in order of appearance, joined by commas (``—`` for none)."""
    seen = []
    for v in values:
        text = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) if seen else "—"


def _params_text(runs: Iterable[Run]) -> str:
    return unique_text(f"{r.result['params']:,}" if isinstance(r.result.get("params"), int) else r.result.get("params")
                       for r in runs)


def _cell_text(cells: dict, fraction: float, kind: str) -> str:
    return format_mean_std(*cells.get((fraction, kind), (math.nan, math.nan, 0)))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def classification_markdown(runs: Sequence[Run], metric: str = "final", baseline: str = "standard") -> list[str]:
    """The accuracy table: one column per kind (arm), the paired difference of every other kind to ``baseline``
    (e.g. ``replica``: what removing each of its confounds changes), and the issue's reference table."""
    runs = [r for r in runs if r.task == "classification"]
    if metric == "best":  # best val/acc1 over the run, where result.json has it
        runs = [Run(r.name, r.path, dict(r.result, final={"val/acc1": r.result["best"]["val/acc1"]}))
                for r in runs
                if isinstance(r.result.get("best"), dict) and finite_number(r.result["best"].get("val/acc1")) is not None]
    if not runs:
        return ["_no finished classification runs_"]
    kinds = kinds_of(runs)
    cells = classification_cells(runs)
    others = [k for k in kinds if k != baseline] if baseline in kinds else []
    header = (["fraction"] + [kind_label(k) for k in kinds]
              + [f"{kind_label(k)} − {kind_label(baseline)} (paired)" for k in others]
              + ["ref. Transformer", "ref. DiffTransformer"])
    rows = []
    for fraction in fractions_of(runs, STANDARD_FRACTIONS):
        row = [percent(fraction)] + [_cell_text(cells, fraction, k) for k in kinds]
        row += [format_mean_std(*paired_delta(runs, fraction, k, baseline), signed=True) for k in others]
        ref = REFERENCE.get(fraction)
        row += [f"{ref[0]:.2f}", f"{ref[1]:.2f}"] if ref else ["—", "—"]
        rows.append(row)
    what = "final" if metric == "final" else "best (max over epochs)"
    lines = [f"{what.capitalize()} validation top-1 accuracy (%), mean ± sample std (number of seeds); the paired "
             f"columns are the per-seed difference to `{baseline}`. `ref.`: the issue's reference table "
             "(a different task and protocol), for reading only.", ""]
    lines += markdown_table(header, rows)
    if metric != "final":
        return lines
    lines += ["", "Models:", ""]
    lines += markdown_table(["kind", "model", "model_kwargs", "params", "epochs per fraction"], [
        [kind_label(k), unique_text(r.result.get("model_name") for r in runs if r.kind == k),
         unique_text(r.result.get("model_kwargs", {}) for r in runs if r.kind == k),
         _params_text(r for r in runs if r.kind == k),
         ", ".join(f"{percent(f)}: {unique_text(r.result.get('epochs') for r in runs if r.kind == k and r.fraction == f)}"
                   for f in fractions_of(r for r in runs if r.kind == k))]
        for k in kinds])
    return lines


def generation_markdown(runs: Sequence[Run]) -> list[str]:
    runs = [r for r in runs if r.task == "generation"]
    if not runs:
        return ["_no finished generation runs_"]
    kinds, fractions = kinds_of(runs), fractions_of(runs)
    cells = generation_cells(runs)
    header = ["kind", "preset", "params"] + [f"FID @ {percent(f)}" for f in fractions]
    rows = []
    for k in kinds:
        mine = [r for r in runs if r.kind == k]
        rows.append([kind_label(k), unique_text(r.result.get("preset") for r in mine), _params_text(mine)]
                    + [_cell_text(cells, f, k) for f in fractions])
    if "standard" in kinds:
        for k in kinds:
            if k != "standard":
                rows.append([f"{kind_label(k)} − standard (paired)", "", ""]
                            + [format_mean_std(*paired_delta(runs, f, k), signed=True) for f in fractions])
    settings = {key: unique_text(r.result.get(key) for r in runs)
                for key in ("fid_num_samples", "fid_reference", "scheduler", "num_inference_steps", "guidance_scale",
                            "clip_denoised")}
    lines = ["FID (lower is better), mean ± sample std (number of seeds); paired rows: per-seed difference to the "
             "standard DiT (negative = better than standard).", ""]
    lines += markdown_table(header, rows)
    lines += ["", "Sampling and FID: " + "; ".join(f"{k} = {v}" for k, v in settings.items()),
              "Training length: " + "; ".join(
                  f"{percent(f)}: epochs {unique_text(r.result.get('epochs') for r in runs if r.fraction == f)}, "
                  f"steps {unique_text(r.result.get('steps') for r in runs if r.fraction == f)}" for f in fractions)]
    return lines


def sorted_runs(runs: Iterable[Run]) -> list[Run]:
    """By fraction, then kind (in ``KIND_ORDER``), seed and name."""
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(runs, key=lambda r: (r.fraction, order.get(r.kind, len(order)), r.kind, r.seed, r.name))


def runs_markdown(runs: Sequence[Run]) -> list[str]:
    """One row per run (classification first): its result, wall time and device; then the commands."""
    if not runs:
        return ["none"]
    rows, commands = [], []
    for r in [*sorted_runs(x for x in runs if x.task == "classification"),
              *sorted_runs(x for x in runs if x.task == "generation")]:
        rows.append([r.name, r.task, kind_label(r.kind), percent(r.fraction), str(r.seed), headline_text(r.result),
                     f"{r.wall_s:,.0f}", str(r.result.get("device", "—"))])
        if r.result.get("command"):
            commands.append(f"{r.name}: {r.result['command']}")
    lines = markdown_table(["experiment", "task", "kind", "fraction", "seed", "result", "wall s", "device"], rows)
    if commands:
        lines += ["", "<details><summary>commands</summary>", "", "```", *commands, "```", "", "</details>"]
    return lines


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

CLASSIFICATION_COLUMNS = ["experiment", "path", "kind", "model_name", "model_kwargs", "params", "fraction", "seed",
                          "epochs", "final_acc1", "final_loss", "best_acc1", "wall_s", "device", "command"]
GENERATION_COLUMNS = ["experiment", "path", "kind", "preset", "params", "fraction", "seed", "epochs", "steps", "fid",
                      "fid_num_samples", "fid_reference", "scheduler", "num_inference_steps", "guidance_scale",
                      "clip_denoised", "wall_s", "device", "command"]


def write_csv(runs: Sequence[Run], task: str, path: Path) -> Path:
    """One row per run of ``task``, in ``sorted_runs`` order."""
    columns = CLASSIFICATION_COLUMNS if task == "classification" else GENERATION_COLUMNS
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in sorted_runs(x for x in runs if x.task == task):
            res = r.result
            row = {c: res.get(c, "") for c in columns}
            row.update(experiment=r.name, path=str(r.path), fraction=r.fraction, seed=r.seed)
            if task == "classification":
                final, best = res.get("final") or {}, res.get("best") or {}
                row.update(model_kwargs=json.dumps(res.get("model_kwargs", {}), sort_keys=True),
                           final_acc1=final.get("val/acc1", ""), final_loss=final.get("val/loss", ""),
                           best_acc1=best.get("val/acc1", "") if isinstance(best, dict) else "")
            writer.writerow(row)
    return path
