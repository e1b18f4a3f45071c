"""Issue 16's variant study: which differential attention setting helps vision (``train/variant_study.py``).

Reads the finished runs of ``configs/sweeps/cifar10_variants.yaml`` (``result.json`` + CSV logs) and writes:

* ``variant_study.csv``: one row per run (arm, training recipe, fraction, seed, top-1, parameters, the
  attention's λinit, λ mode and head norm, epochs, wall time, device, the paired gain over the baseline
  and λ per layer at the last epoch);
* ``variant_study.md``: accuracy per arm and fraction, paired gains over ``standard`` (the rule's baseline)
  and ``standard_6x32`` (the head-count control) as mean ± std over seeds with the number of positive
  seeds, each candidate's score and the rule's pick (``RULE``, stated in ``docs/variant_study.md`` before
  the runs), λ per layer at the end of training; with runs of several training recipes (issue 24: the
  ``light`` configs and ``configs/recipes/deit.yaml``) one such section per recipe, then each arm's
  paired change from ``light`` to the other recipe. Runs pair only within a recipe;
* ``variant_study_gain.png`` (paired gain per arm and fraction, every seed shown) and
  ``variant_study_lambda.png`` (λ per layer over training, one seed); ``variant_study_gain_<recipe>.png``
  for every recipe other than ``light``.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from .plots import pyplot
from .report import add_report_arguments, run_report
from .results import finite_number, lambda_layers, version_dirs
from .runs import Run, discover, percent
from .tables import format_mean_std, markdown_table, mean_std

__all__ = ["RULE", "Gain", "Rule", "apply_rule", "attention_settings", "by_recipe", "main", "paired_gains",
           "plot_lambda", "plot_paired_gain", "recipe_change_markdown", "study_markdown", "study_rows",
           "write_study"]


@dataclass(frozen=True)
class Rule:
    """How the vision default is chosen (docs/variant_study.md): the highest score, where score = the mean over
    fractions of the mean paired gain over ``baseline``; scores within ``tie_points`` of the highest tie, and
    the first tied candidate in ``candidates`` (simplest first) wins."""
    baseline: str
    control: str
    candidates: tuple[str, ...]
    tie_points: float


RULE = Rule(baseline="standard", control="standard_6x32",
            candidates=("diff_init08_fixed", "diff_init08_no_norm", "diff_init08", "diff_schedule"), tie_points=0.3)
# the order arms are shown in: the controls, the DIFF candidates (simplest first), then the other kinds
ARM_ORDER = ("standard", "standard_6x32", *RULE.candidates, "gda_init08", "diffv2")


@dataclass(frozen=True)
class Gain:
    mean: float
    std: float
    n: int
    positive: int      # seeds with a gain > 0


def ordered_arms(arms) -> list[str]:
    present = set(arms)
    return [a for a in ARM_ORDER if a in present] + sorted(present - set(ARM_ORDER))


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

def paired_gains(runs: Sequence[Run], baseline: str) -> dict[tuple[str, float], Gain]:
    """{(arm, fraction): Gain} of top-1 (arm − baseline) over the seeds both have."""
    by_cell: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for r in runs:
        by_cell[(r.kind, r.fraction)][r.seed] = r.value
    gains = {}
    for (arm, fraction), values in by_cell.items():
        base = by_cell.get((baseline, fraction), {})
        diffs = [values[s] - base[s] for s in sorted(set(values) & set(base))]
        if arm != baseline and diffs:
            gains[(arm, fraction)] = Gain(*mean_std(diffs), positive=sum(d > 0 for d in diffs))
    return gains


def apply_rule(gains: dict[tuple[str, float], Gain], fractions: Sequence[float],
               rule: Rule = RULE) -> tuple[Optional[str], dict[str, float], list[str]]:
    """(winner, {candidate: score}, tied candidates); a candidate lacking a fraction has no score, and no
    winner is named unless every candidate has one."""
    scores = {c: sum(gains[(c, f)].mean for f in fractions) / len(fractions)
              for c in rule.candidates if all((c, f) in gains for f in fractions)}
    if len(scores) < len(rule.candidates) or not fractions:
        return None, scores, []
    best = max(scores.values())
    tied = [c for c in rule.candidates if scores[c] >= best - rule.tie_points]
    return tied[0], scores, tied


@lru_cache(maxsize=None)
def _settings(model_name: str, kwargs_items: tuple) -> dict:
    import timm
    import torch

    import diffvision.models  # noqa: F401  (registers the timm names)

    with torch.device("meta"):  # the layout only: no memory, no init cost
        model = timm.create_model(model_name, **dict(kwargs_items))
    layouts = [block.attn.layout for block in model.blocks if hasattr(block.attn, "layout")]
    if not layouts:
        return {"attn_kind": "standard", "lambda_init": "", "lambda_mode": "", "head_norm": ""}
    first = layouts[0]
    if first["attn_kind"] == "diffv2":
        return {"attn_kind": "diffv2", "lambda_init": "", "lambda_mode": "sigmoid(W_lambda x)", "head_norm": False}
    inits = {round(layout["lambda_init"], 6) for layout in layouts}
    return {"attn_kind": first["attn_kind"], "lambda_init": inits.pop() if len(inits) == 1 else "schedule",
            "lambda_mode": first["lambda_mode"], "head_norm": first["head_norm"]}


def attention_settings(model_name: str, model_kwargs: dict) -> dict:
    """The attention a run trained: its kind, λinit (a number, or ``schedule`` when it varies with depth),
    λ mode and head norm, read from the model the run's name and keywords build (on the meta device)."""
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "drop_path_rate"}
    return dict(_settings(model_name, tuple(sorted(kwargs.items()))))


def by_recipe(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """{recipe: runs}, ``light`` first, then by name."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.recipe].append(r)
    return {k: groups[k] for k in sorted(groups, key=lambda k: (k != "light", k))}


STUDY_COLUMNS = ["kind", "recipe", "fraction", "seed", "top1", "params", "lambda_init", "lambda_mode", "head_norm", "epochs",
                 "wall_s", "device", "gain_vs_standard"]


def study_rows(runs: Sequence[Run], rule: Rule = RULE) -> list[dict]:
    """The CSV's rows, in arm, fraction, seed order; ``lambda_layer_<i>``: λ at the last epoch."""
    base = {(r.recipe, r.fraction, r.seed): r.value for r in runs if r.kind == rule.baseline}
    order = {a: i for i, a in enumerate(ordered_arms(r.kind for r in runs))}
    recipes = {recipe: i for i, recipe in enumerate(by_recipe(runs))}
    rows = []
    for r in sorted(runs, key=lambda r: (recipes[r.recipe], order[r.kind], r.fraction, r.seed)):
        settings = attention_settings(r.result.get("model_name", ""), r.result.get("model_kwargs") or {})
        paired = base.get((r.recipe, r.fraction, r.seed))  # pairs never cross recipes
        row = {"kind": r.kind, "recipe": r.recipe, "fraction": r.fraction, "seed": r.seed, "top1": round(r.value, 2),
               "params": r.result.get("params"), "lambda_init": settings["lambda_init"],
               "lambda_mode": settings["lambda_mode"], "head_norm": settings["head_norm"],
               "epochs": r.result.get("epochs"), "wall_s": r.result.get("wall_s"), "device": r.result.get("device"),
               "gain_vs_standard": "" if paired is None or r.kind == rule.baseline else round(r.value - paired, 2)}
        for i, lam in enumerate(r.result.get("lambda_per_layer") or []):
            row[f"lambda_layer_{i}"] = round(lam, 4)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def _gain_text(gain: Optional[Gain]) -> str:
    if gain is None:
        return "—"
    return f"{format_mean_std(gain.mean, gain.std, gain.n, signed=True)}, {gain.positive}/{gain.n} > 0"


def study_markdown(runs: Sequence[Run], rule: Rule = RULE) -> list[str]:
    arms = ordered_arms(r.kind for r in runs)
    fractions = sorted({r.fraction for r in runs})
    values: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        values[(r.kind, r.fraction)].append(r.value)
    rows = [[a] + [format_mean_std(*mean_std(values[(a, f)])) for f in fractions] for a in arms]
    lines = ["### Final top-1 (%), mean ± std (seeds)", "",
             *markdown_table(["arm"] + [percent(f) for f in fractions], rows), ""]
    for baseline in (rule.baseline, rule.control):
        gains = paired_gains(runs, baseline)
        rows = [[a] + [_gain_text(gains.get((a, f))) for f in fractions] for a in arms if a != baseline]
        lines += [f"### Paired gain over `{baseline}` (points; mean ± std (seeds), seeds with a gain)", "",
                  *markdown_table(["arm"] + [percent(f) for f in fractions], rows), ""]
    winner, scores, tied = apply_rule(paired_gains(runs, rule.baseline), fractions, rule)
    lines += ["### The rule applied", "",
              *markdown_table(["candidate (simplest first)", "score (mean paired gain over fractions)", "tied with the best"],
                              [[c, f"{scores[c]:+.2f}" if c in scores else "—", "yes" if c in tied else ""]
                               for c in rule.candidates]), ""]
    lines.append(f"Pick: **{winner}** (ties within {rule.tie_points} points go to the simplest)." if winner else
                 "Pick: none yet: a candidate lacks runs at some fraction.")
    lam_rows = []
    for a in arms:
        for f in fractions:
            per_run = [r.result.get("lambda_per_layer") for r in runs if r.kind == a and r.fraction == f]
            per_run = [p for p in per_run if p]
            if per_run:
                layers = [mean_std(p[i] for p in per_run) for i in range(min(map(len, per_run)))]
                lam_rows.append([a, percent(f)] + [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"
                                                   for m, s, _ in layers])
    if lam_rows:
        depth = max(len(r) for r in lam_rows) - 2
        lines += ["", "### λ per layer at the end of training (mean ± std over seeds; DIFF V2: mean σ(W_λ x) over the "
                  "test images' tokens)", "",
                  *markdown_table(["arm", "fraction"] + [f"layer {i}" for i in range(depth)],
                                  [r + [""] * (depth + 2 - len(r)) for r in lam_rows])]
    return lines


def recipe_change_markdown(groups: dict[str, list[Run]]) -> list[str]:
    """Per arm and fraction, the paired change of top-1 from the first recipe (``light``) to each other one,
    over the seeds both ran (the same seed trains on the same subset under either recipe)."""
    first, *others = groups
    lines = []
    for other in others:
        cells: dict[tuple[str, float], list[float]] = defaultdict(list)
        mine = {(r.kind, r.fraction, r.seed): r.value for r in groups[first]}
        for r in groups[other]:
            if (r.kind, r.fraction, r.seed) in mine:
                cells[(r.kind, r.fraction)].append(r.value - mine[(r.kind, r.fraction, r.seed)])
        fractions = sorted({f for _, f in cells})
        arms = ordered_arms(a for a, _ in cells)
        rows = [[a] + [format_mean_std(*mean_std(cells[(a, f)]), signed=True) if cells.get((a, f)) else "—"
                       for f in fractions] for a in arms]
        lines += [f"### `{other}` − `{first}` (points; paired by arm, fraction and seed; mean ± std (seeds))", "",
                  *markdown_table(["arm"] + [percent(f) for f in fractions], rows), ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def plot_paired_gain(runs: Sequence[Run], path: Path, rule: Rule = RULE) -> Optional[Path]:
    """Paired gain over the baseline per arm (x) and fraction (colour): each seed a dot, the mean a bar."""
    fractions = sorted({r.fraction for r in runs})
    arms = [a for a in ordered_arms(r.kind for r in runs) if a != rule.baseline]
    base = {(r.fraction, r.seed): r.value for r in runs if r.kind == rule.baseline}
    if not arms or not base:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(arms) + 2, 4), layout="constrained")
    width = 0.8 / len(fractions)
    for j, f in enumerate(fractions):
        for i, arm in enumerate(arms):
            gains = [r.value - base[(f, r.seed)] for r in runs if r.kind == arm and r.fraction == f
                     and (f, r.seed) in base]
            if not gains:
                continue
            x = i + (j - (len(fractions) - 1) / 2) * width
            ax.bar(x, sum(gains) / len(gains), width * 0.9, color=f"C{j}", alpha=0.35,
                   label=percent(f) if i == 0 else None)
            ax.scatter([x] * len(gains), gains, color=f"C{j}", s=14, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"top-1 gain over {rule.baseline} (points)")
    ax.set_title("Paired gain per arm (bar: mean over seeds, dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="fraction", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lambda_curves(run: Run) -> dict[int, dict[int, float]]:
    """{layer: {epoch: λ}} from the run's CSV logs."""
    from diffvision.lightning.loggers import read_epoch_metrics

    curves: dict[int, dict[int, float]] = defaultdict(dict)
    for version in version_dirs(run.path):
        for epoch, metrics in read_epoch_metrics(version).items():
            for layer, value in lambda_layers(metrics).items():
                if finite_number(value) is not None:
                    curves[layer][epoch] = float(value)
    return curves


def plot_lambda(runs: Sequence[Run], path: Path, seed: int = 0) -> Optional[Path]:
    """λ per layer vs epoch for every arm that logged it, one panel per (fraction, arm), seed ``seed``."""
    chosen = [r for r in runs if r.seed == seed and r.result.get("lambda_per_layer")]
    fractions = sorted({r.fraction for r in chosen})
    arms = ordered_arms(r.kind for r in chosen)
    if not chosen:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(fractions), len(arms), figsize=(2.6 * len(arms), 2.4 * len(fractions)),
                             layout="constrained", squeeze=False, sharey=True)
    for row, f in enumerate(fractions):
        for col, arm in enumerate(arms):
            ax = axes[row][col]
            run = next((r for r in chosen if r.kind == arm and r.fraction == f), None)
            ax.set_title(f"{arm}, {percent(f)}", fontsize=8)
            if run is None:
                continue
            for layer, curve in sorted(_lambda_curves(run).items()):
                epochs = sorted(curve)
                ax.plot([e + 1 for e in epochs], [curve[e] for e in epochs], lw=1, color=f"C{layer}",
                        label=f"layer {layer}")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("epoch")
    fig.supylabel("λ")
    fig.suptitle(f"λ per layer during training (seed {seed})", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------------------------

def write_study(roots: Sequence[Path], out: Path, rule: Rule = RULE) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = discover(roots)
    runs = [r for r in runs if r.task == "classification"]
    rows = study_rows(runs, rule)
    columns = STUDY_COLUMNS + sorted({k for r in rows for k in r if k not in STUDY_COLUMNS},
                                     key=lambda k: int(k.rsplit("_", 1)[1]))
    with open(out / "variant_study.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Variant study: results (generated by `python train/variant_study.py`)", "",
             f"Runs: {len(runs)}; incomplete or missing: {len(problems)}.", ""]
    groups = by_recipe(runs)
    if len(groups) == 1:
        lines += study_markdown(runs, rule)
    else:
        for recipe, members in groups.items():
            lines += [f"## Recipe `{recipe}` ({len(members)} runs)", "", *study_markdown(members, rule), ""]
        lines += recipe_change_markdown(groups)
    if problems:
        lines += ["", "### Incomplete and missing runs", "",
                  *markdown_table(["run", "status", "detail"], [[p.name, p.status, p.detail] for p in problems])]
    (out / "variant_study.md").write_text("\n".join(lines) + "\n")
    names = {recipe: "variant_study_gain.png" if i == 0 else f"variant_study_gain_{recipe}.png"
             for i, recipe in enumerate(groups)}
    files = {"variant_study.csv": out / "variant_study.csv", "variant_study.md": out / "variant_study.md",
             **{name: plot_paired_gain(groups[recipe], out / name, rule) for recipe, name in names.items()},
             "variant_study_lambda.png": plot_lambda(next(iter(groups.values()), []), out / "variant_study_lambda.png")}
    return {"runs": runs, "problems": problems, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python train/variant_study.py", description=__doc__.split("\n")[0])
    return run_report(add_report_arguments(parser), argv, write_study)
