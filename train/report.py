"""Aggregate finished experiment runs into markdown tables, CSV files and plots.

    python train/report.py RUNS_ROOT [RUNS_ROOT ...] [--out docs/results]

Each run is a directory ``<root>/.../<experiment>/`` holding ``result.json`` (written by the sweep
runner when the run finished) and, for classification, the Lightning CSV log
``version_*/metrics.csv``. ``result.json`` has ``"task": "classification"`` (``kind``,
``model_name``, ``model_kwargs``, ``params``, ``fraction``, ``seed``, ``epochs``, ``final``
``{"val/acc1", "val/loss"}``, ``best`` ``{"val/acc1"}``, ``wall_s``, ``device``, ``command``) or
``"task": "generation"`` (``kind``, ``preset``, ``params``, ``fraction``, ``seed``, ``epochs``,
``steps``, ``fid``, ``fid_num_samples``, ``fid_reference``, ``scheduler``, ``num_inference_steps``,
``guidance_scale``, ``clip_denoised``, ``wall_s``, ``device``, ``command``, ``fid_vs_step``).

Writes into ``--out``:

* ``classification.csv`` (one row per run) and ``classification.md``: final val/acc1 in % as
  ``mean ± std (n)`` over seeds (std: sample std, ddof=1) per data fraction × attention kind, the
  paired difference DIFF − standard (and GDA − standard) over the seeds both have, and the issue's
  reference table beside it; ``accuracy_vs_fraction.png`` and ``learning_curves.png`` (val/acc1
  vs epoch, mean ± std over seeds, one panel per fraction).
* ``generation.csv`` and ``generation.md``: FID mean ± std (n) per kind × fraction with parameter
  counts, and ``fid_vs_step.png`` (one panel per fraction, one line per kind).
* ``summary.md``: all tables, the per-run wall time, device and command, the summed wall time, and
  every incomplete run: a directory with training logs but no ``result.json`` (``partial``), an
  unreadable or incomplete ``result.json`` (``broken``), a duplicate of an experiment already
  counted (``duplicate``), and a (kind, fraction, seed) of the sweep's grid with no run (``missing``).

Incomplete runs never stop the report: they are listed and left out of the numbers.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

DEFAULT_OUT = "docs/results"
KIND_ORDER = ("standard", "diff", "gda")
KIND_LABELS = {"standard": "standard", "diff": "DIFF", "gda": "GDA"}
STANDARD_FRACTIONS = (0.01, 0.10, 0.25, 1.0)
# the reference table (accuracy %, ViT trained from scratch on a fraction of the data)
REFERENCE = {0.01: (49.71, 53.78), 0.10: (57.25, 67.34), 0.25: (72.25, 74.86), 1.0: (78.49, 78.85)}
TASKS = ("classification", "generation")

__all__ = ["Run", "Problem", "discover", "mean_std", "format_mean_std", "paired_delta", "classification_cells",
           "generation_cells", "read_metrics", "main"]


# ---------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str  # experiment directory, relative to its root
    path: Path
    result: dict

    @property
    def task(self) -> str:
        return self.result["task"]

    @property
    def kind(self) -> str:
        return str(self.result["kind"])

    @property
    def fraction(self) -> float:
        return _fraction_key(self.result["fraction"])

    @property
    def seed(self) -> int:
        return int(self.result["seed"])

    @property
    def value(self) -> float:
        """The headline number: final val/acc1 in % (classification) or FID (generation)."""
        if self.task == "classification":
            return 100.0 * float(self.result["final"]["val/acc1"])
        return float(self.result["fid"])

    @property
    def wall_s(self) -> float:
        value = _number(self.result.get("wall_s"))
        return 0.0 if value is None else value


@dataclass
class Problem:
    name: str
    path: Path
    status: str  # partial | broken | duplicate | missing
    detail: str


def _fraction_key(value: Any) -> float:
    return round(float(value), 6)


def _number(value: Any) -> Optional[float]:
    """A finite float, or None."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _check_result(result: Any) -> Optional[str]:
    """Why a result.json cannot be counted, or None when it can."""
    if not isinstance(result, dict):
        return "result.json is not a JSON object"
    task = result.get("task")
    if task not in TASKS:
        return f"task {task!r} is not one of {TASKS}"
    missing = [k for k in ("kind", "fraction", "seed") if k not in result]
    if missing:
        return f"result.json lacks {missing}"
    fraction = _number(result["fraction"])
    if fraction is None or not 0 < fraction <= 1:
        return f"fraction {result['fraction']!r} is not in (0, 1]"
    try:
        int(result["seed"])
    except (TypeError, ValueError):
        return f"seed {result['seed']!r} is not an int"
    if task == "classification":
        final = result.get("final")
        acc = _number(final.get("val/acc1")) if isinstance(final, dict) else None
        if acc is None:
            return "no finite final val/acc1 (run unfinished?)"
        if not 0 <= acc <= 1:
            return f"final val/acc1 = {acc} is not a fraction in [0, 1]"
    elif _number(result.get("fid")) is None:
        return "no finite fid (run unfinished?)"
    return None


def _log_summary(exp_dir: Path) -> str:
    """What the training log of an unfinished run shows."""
    metrics = read_metrics(exp_dir)
    if not metrics:
        return "no result.json, no validation rows in its logs"
    last = max(metrics)
    return f"no result.json; logs reach epoch {last} (val/acc1 {100 * metrics[last]:.2f}%)"


def discover(roots: Sequence[Path]) -> tuple[list[Run], list[Problem]]:
    """Every run under ``roots``: counted runs, and the problems of those that cannot be counted."""
    runs: list[Run] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    identity: dict[tuple, Run] = {}
    for root in roots:
        root = Path(root)
        finished_dirs = set()
        for path in sorted(root.rglob("result.json")):
            exp_dir = path.parent
            finished_dirs.add(exp_dir.resolve())
            name = str(exp_dir.relative_to(root)) if exp_dir != root else root.name
            if exp_dir.resolve() in seen:
                continue
            seen.add(exp_dir.resolve())
            try:
                result = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(Problem(name, exp_dir, "broken", f"unreadable result.json ({err})"))
                continue
            why = _check_result(result)
            if why is not None:
                problems.append(Problem(name, exp_dir, "broken", why))
                continue
            run = Run(name, exp_dir, result)
            key = (run.task, run.kind, run.fraction, run.seed, result.get("model_name") or result.get("preset"))
            if key in identity:
                problems.append(Problem(name, exp_dir, "duplicate",
                                        f"same task/kind/fraction/seed/model as {identity[key].path}; not counted"))
                continue
            identity[key] = run
            runs.append(run)
        for metrics in sorted(root.rglob("version_*/metrics.csv")):
            exp_dir = metrics.parent.parent
            if exp_dir.resolve() in finished_dirs or exp_dir.resolve() in seen:
                continue
            seen.add(exp_dir.resolve())
            name = str(exp_dir.relative_to(root)) if exp_dir != root else root.name
            problems.append(Problem(name, exp_dir, "partial", _log_summary(exp_dir)))
    problems += _missing(runs)
    return runs, problems


def _missing(runs: Sequence[Run]) -> list[Problem]:
    """The (kind, fraction, seed) cells of each task's grid that no run fills."""
    problems = []
    for task in TASKS:
        mine = [r for r in runs if r.task == task]
        have = {(r.kind, r.fraction, r.seed) for r in mine}
        for kind in _kinds(mine):
            for fraction in sorted({r.fraction for r in mine}):
                for seed in sorted({r.seed for r in mine}):
                    if (kind, fraction, seed) not in have:
                        problems.append(Problem(f"{task}/{kind}/{_pct(fraction)}/seed{seed}", Path("-"), "missing",
                                                f"no {task} run for kind={kind}, fraction={fraction}, seed={seed}"))
    return problems


def read_metrics(exp_dir: Path, metric: str = "val/acc1") -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` from ``exp_dir/version_*/metrics.csv`` (later versions, e.g. of a
    resumed run, override earlier ones; the last row of an epoch wins). Unreadable files give {}."""
    out: dict[int, float] = {}
    versions = sorted(exp_dir.glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1)
    for path in versions:
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    value, epoch = _number(row.get(metric)), _number(row.get("epoch"))
                    if value is not None and epoch is not None:
                        out[int(epoch)] = value
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    return out


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


def _kinds(runs: Iterable[Run]) -> list[str]:
    return _order_kinds(r.kind for r in runs)


def _order_kinds(kinds: Iterable[str]) -> list[str]:
    present = set(kinds)
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def _fractions(runs: Iterable[Run], always: Sequence[float] = ()) -> list[float]:
    return sorted({r.fraction for r in runs} | {_fraction_key(f) for f in always})


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


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


def _unique(values: Iterable[Any]) -> str:
    seen = []
    for v in values:
        text = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) if seen else "—"


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def classification_markdown(runs: Sequence[Run], metric: str = "final") -> list[str]:
    runs = [r for r in runs if r.task == "classification"]
    if metric == "best":  # best val/acc1 over the run, where result.json has it
        runs = [Run(r.name, r.path, dict(r.result, final={"val/acc1": r.result["best"]["val/acc1"]}))
                for r in runs if isinstance(r.result.get("best"), dict) and _number(r.result["best"].get("val/acc1")) is not None]
    if not runs:
        return ["_no finished classification runs_"]
    kinds = _kinds(runs)
    cells = classification_cells(runs)
    others = [k for k in kinds if k != "standard"] if "standard" in kinds else []
    header = (["fraction"] + [_label(k) for k in kinds] + [f"{_label(k)} − standard (paired)" for k in others]
              + ["ref. Transformer", "ref. DiffTransformer"])
    rows = []
    for fraction in _fractions(runs, STANDARD_FRACTIONS):
        row = [_pct(fraction)] + [format_mean_std(*cells.get((fraction, k), (math.nan, math.nan, 0))) for k in kinds]
        row += [format_mean_std(*paired_delta(runs, fraction, k), signed=True) for k in others]
        ref = REFERENCE.get(fraction)
        row += [f"{ref[0]:.2f}", f"{ref[1]:.2f}"] if ref else ["—", "—"]
        rows.append(row)
    what = "final" if metric == "final" else "best (max over epochs)"
    lines = [f"{what.capitalize()} validation top-1 accuracy (%), mean ± sample std (number of seeds); the paired "
             "columns are the per-seed difference to the standard ViT. `ref.`: the issue's reference table "
             "(a different task and protocol), for reading only.", ""]
    lines += _table(header, rows)
    if metric != "final":
        return lines
    lines += ["", "Models:", ""]
    lines += _table(["kind", "model", "model_kwargs", "params", "epochs per fraction"], [
        [_label(k), _unique(r.result.get("model_name") for r in runs if r.kind == k),
         _unique(r.result.get("model_kwargs", {}) for r in runs if r.kind == k),
         _unique(f"{r.result['params']:,}" if isinstance(r.result.get("params"), int) else r.result.get("params")
                 for r in runs if r.kind == k),
         ", ".join(f"{_pct(f)}: {_unique(r.result.get('epochs') for r in runs if r.kind == k and r.fraction == f)}"
                   for f in _fractions(r for r in runs if r.kind == k))]
        for k in kinds])
    return lines


def generation_markdown(runs: Sequence[Run]) -> list[str]:
    runs = [r for r in runs if r.task == "generation"]
    if not runs:
        return ["_no finished generation runs_"]
    kinds, fractions = _kinds(runs), _fractions(runs)
    cells = generation_cells(runs)
    header = ["kind", "preset", "params"] + [f"FID @ {_pct(f)}" for f in fractions]
    rows = []
    for k in kinds:
        mine = [r for r in runs if r.kind == k]
        rows.append([_label(k), _unique(r.result.get("preset") for r in mine),
                     _unique(f"{r.result['params']:,}" if isinstance(r.result.get("params"), int) else r.result.get("params")
                             for r in mine)]
                    + [format_mean_std(*cells.get((f, k), (math.nan, math.nan, 0))) for f in fractions])
    if "standard" in kinds:
        for k in kinds:
            if k != "standard":
                rows.append([f"{_label(k)} − standard (paired)", "", ""]
                            + [format_mean_std(*paired_delta(runs, f, k), signed=True) for f in fractions])
    settings = {key: _unique(r.result.get(key) for r in runs)
                for key in ("fid_num_samples", "fid_reference", "scheduler", "num_inference_steps", "guidance_scale",
                            "clip_denoised")}
    lines = ["FID (lower is better), mean ± sample std (number of seeds); paired rows: per-seed difference to the "
             "standard DiT (negative = better than standard).", ""]
    lines += _table(header, rows)
    lines += ["", "Sampling and FID: " + "; ".join(f"{k} = {v}" for k, v in settings.items()),
              "Training length: " + "; ".join(
                  f"{_pct(f)}: epochs {_unique(r.result.get('epochs') for r in runs if r.fraction == f)}, "
                  f"steps {_unique(r.result.get('steps') for r in runs if r.fraction == f)}" for f in fractions)]
    return lines


CLASSIFICATION_COLUMNS = ["experiment", "path", "kind", "model_name", "model_kwargs", "params", "fraction", "seed",
                          "epochs", "final_acc1", "final_loss", "best_acc1", "wall_s", "device", "command"]
GENERATION_COLUMNS = ["experiment", "path", "kind", "preset", "params", "fraction", "seed", "epochs", "steps", "fid",
                      "fid_num_samples", "fid_reference", "scheduler", "num_inference_steps", "guidance_scale",
                      "clip_denoised", "wall_s", "device", "command"]


def _sorted(runs: Iterable[Run]) -> list[Run]:
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(runs, key=lambda r: (r.fraction, order.get(r.kind, len(order)), r.kind, r.seed, r.name))


def write_csv(runs: Sequence[Run], task: str, path: Path) -> Path:
    columns = CLASSIFICATION_COLUMNS if task == "classification" else GENERATION_COLUMNS
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in _sorted(x for x in runs if x.task == task):
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


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_fraction(runs: Sequence[Run], path: Path) -> Optional[Path]:
    runs = [r for r in runs if r.task == "classification"]
    if not runs:
        return None
    plt = _pyplot()
    cells = classification_cells(runs)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    kinds = _kinds(runs)
    for i, kind in enumerate(kinds):
        fractions = [f for f in _fractions(runs) if (f, kind) in cells]
        means = [cells[(f, kind)][0] for f in fractions]
        stds = [0.0 if math.isnan(cells[(f, kind)][1]) else cells[(f, kind)][1] for f in fractions]
        dodge = 10 ** (0.012 * (i - (len(kinds) - 1) / 2))  # side by side, so the error bars stay readable
        ax.errorbar([100 * f * dodge for f in fractions], means, yerr=stds, marker="o", capsize=3, label=_label(kind))
    ref_f = sorted(REFERENCE)
    for i, name in enumerate(("Transformer", "DiffTransformer")):
        ax.plot([100 * f for f in ref_f], [REFERENCE[f][i] for f in ref_f], ls=":", color="gray" if i == 0 else "black",
                alpha=0.6, label=f"ref. {name} (issue table)")
    ax.set_xscale("log")
    ticks = _fractions(runs, STANDARD_FRACTIONS)
    ax.set_xticks([100 * f for f in ticks], [_pct(f) for f in ticks])
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
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fractions = sorted(series)
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.4), squeeze=False, layout="constrained")
    for ax, f in zip(axes[0], fractions):
        for kind in _order_kinds(series[f]):
            curves = [c for c in series[f][kind] if c]
            if not curves:
                continue
            xs = sorted(set().union(*curves))
            stats = [mean_std(c[x] for c in curves if x in c) for x in xs]
            mean = np.array([s[0] for s in stats])
            std = np.array([0.0 if math.isnan(s[1]) else s[1] for s in stats])
            line, = ax.plot(xs, mean, label=f"{_label(kind)} (n={len(curves)})")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_pct(f)} of the data", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(runs: Sequence[Run], path: Path) -> Optional[Path]:
    series: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.task == "classification":
            series[r.fraction][r.kind].append({e: 100 * v for e, v in read_metrics(r.path).items()})
    return _curve_panels(series, path, "epoch", "val top-1 accuracy (%)", "Learning curves (mean ± std over seeds)")


def _fid_curve(run: Run) -> dict[int, float]:
    curve = {}
    for point in run.result.get("fid_vs_step") or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, fid = _number(point[0]), _number(point[1])
            if step is not None and fid is not None:
                curve[int(step)] = fid
    return curve


def plot_fid_vs_step(runs: Sequence[Run], path: Path) -> Optional[Path]:
    series: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.task == "generation":
            series[r.fraction][r.kind].append(_fid_curve(r))
    return _curve_panels(series, path, "training step", "FID", "FID vs step (mean ± std over seeds)")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


def runs_markdown(runs: Sequence[Run]) -> list[str]:
    if not runs:
        return ["none"]
    rows, commands = [], []
    for r in [*_sorted(x for x in runs if x.task == "classification"), *_sorted(x for x in runs if x.task == "generation")]:
        value = f"acc1 {r.value:.2f}%" if r.task == "classification" else f"FID {r.value:.2f}"
        rows.append([r.name, r.task, _label(r.kind), _pct(r.fraction), str(r.seed), value,
                     f"{r.wall_s:,.0f}", str(r.result.get("device", "—"))])
        if r.result.get("command"):
            commands.append(f"{r.name}: {r.result['command']}")
    lines = _table(["experiment", "task", "kind", "fraction", "seed", "result", "wall s", "device"], rows)
    if commands:
        lines += ["", "<details><summary>commands</summary>", "", "```", *commands, "```", "", "</details>"]
    return lines


def write_report(roots: Sequence[Path], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = discover(roots)
    files: dict[str, Optional[Path]] = {}
    cls_md = classification_markdown(runs)
    gen_md = generation_markdown(runs)
    files["classification.csv"] = write_csv(runs, "classification", out / "classification.csv")
    files["generation.csv"] = write_csv(runs, "generation", out / "generation.csv")
    (out / "classification.md").write_text("# Classification: data-fraction sweep\n\n" + "\n".join(cls_md) + "\n")
    (out / "generation.md").write_text("# Generation: DIFF-DiT vs DiT\n\n" + "\n".join(gen_md) + "\n")
    files["classification.md"], files["generation.md"] = out / "classification.md", out / "generation.md"
    for name, plot in (("accuracy_vs_fraction.png", plot_accuracy_vs_fraction),
                       ("learning_curves.png", plot_learning_curves), ("fid_vs_step.png", plot_fid_vs_step)):
        try:
            files[name] = plot(runs, out / name)
        except Exception as err:  # a plot must not sink the tables
            print(f"warning: {name} not drawn: {type(err).__name__}: {err}", file=sys.stderr)
            files[name] = None

    def image(name: str) -> list[str]:
        return [f"![{name}]({name})", ""] if files.get(name) else [f"_{name}: nothing to plot_", ""]

    total = sum(r.wall_s for r in runs)
    per_task = {t: sum(r.wall_s for r in runs if r.task == t) for t in TASKS}
    counts = {t: sum(r.task == t for r in runs) for t in TASKS}
    lines = ["# Experiment report", "",
             f"Runs from: {', '.join(f'`{r}`' for r in roots)}. Counted: {counts['classification']} classification, "
             f"{counts['generation']} generation runs; incomplete or missing: {len(problems)}.",
             f"Wall time summed over the counted runs: {_hours(total)} (classification {_hours(per_task['classification'])}, "
             f"generation {_hours(per_task['generation'])}); devices: {_unique(r.result.get('device') for r in runs)}.", "",
             "## Classification", "", *cls_md, "", "### Best epoch", "",
             *classification_markdown(runs, metric="best"), "",
             *image("accuracy_vs_fraction.png"), *image("learning_curves.png"),
             "## Generation", "", *gen_md, "", *image("fid_vs_step.png"),
             "## Runs", "", *runs_markdown(runs), "", "## Incomplete and missing runs", ""]
    if problems:
        lines += _table(["run", "status", "detail"], [[p.name, p.status, p.detail] for p in problems])
    else:
        lines.append("none")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    files["summary.md"] = out / "summary.md"
    return {"runs": runs, "problems": problems, "files": files}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train/report.py",
        description="Aggregate finished runs (<root>/<experiment>/result.json + version_*/metrics.csv) into "
                    "markdown tables (mean ± std over seeds), CSV files and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path, metavar="RUNS_ROOT", help="directories searched for result.json")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    absent = [str(r) for r in args.roots if not r.is_dir()]
    if absent:
        parser.error(f"RUNS_ROOT not found (expected directories of runs): {', '.join(absent)}")
    report = write_report(args.roots, args.out)
    print(f"{len(report['runs'])} runs counted, {len(report['problems'])} incomplete or missing")
    for problem in report["problems"]:
        print(f"  {problem.status:9s} {problem.name}: {problem.detail}")
    for name, path in report["files"].items():
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
