"""Aggregate finished experiment runs into markdown tables, CSV files and plots (``train/report.py``).

The runs are found by ``diffvision.experiments.runs.discover`` (``result.json``, see
``diffvision.experiments.results``; for classification also the CSV logs ``version_*/metrics.csv``).
``write_report`` writes into its output directory:

* ``classification.csv`` (one row per run) and ``classification.md``: final val/acc1 in % as
  ``mean ± std (n)`` over seeds (std: sample std, ddof=1) per data fraction × attention kind, the
  paired difference DIFF − standard (and GDA − standard) over the seeds both have, and the issue's
  reference table beside it; ``accuracy_vs_fraction.png`` and ``learning_curves.png`` (val/acc1
  vs epoch, mean ± std over seeds, one panel per fraction).
* ``generation.csv`` and ``generation.md``: FID mean ± std (n) per kind × fraction with parameter
  counts, and ``fid_vs_step.png`` (one panel per fraction, one line per kind).
* ``summary.md``: all tables, the per-run wall time, device and command, the summed wall time, and
  every incomplete run (``partial``, ``broken``, ``duplicate``, ``missing``; see ``runs``).

Incomplete runs never stop the report: they are listed and left out of the numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .plots import plot_accuracy_vs_fraction, plot_fid_vs_step, plot_learning_curves
from .results import TASKS
from .runs import discover
from .tables import (classification_markdown, generation_markdown, markdown_table, runs_markdown, unique_text,
                     write_csv)

__all__ = ["DEFAULT_OUT", "add_report_arguments", "build_parser", "main", "run_report", "write_report"]

DEFAULT_OUT = "docs/results"
PLOTS = {"accuracy_vs_fraction.png": plot_accuracy_vs_fraction, "learning_curves.png": plot_learning_curves,
         "fid_vs_step.png": plot_fid_vs_step}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


def write_report(roots: Sequence[Path], out: Path, baseline: str = "standard") -> dict[str, Any]:
    """Tables, CSV files, plots and ``summary.md`` of the runs under ``roots``, the paired differences taken to the
    runs of kind (arm) ``baseline``; returns ``{"runs": [...], "problems": [...], "files": {name: path or None}}``."""
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = discover(roots)
    files: dict[str, Optional[Path]] = {}
    cls_md = classification_markdown(runs, baseline=baseline)
    gen_md = generation_markdown(runs)
    # A task's files and sections are written only when the roots hold finished runs of it (or nothing at
    # all): a report of DiT runs into a folder beside a classification report must not blank it.
    tasks = {r.task for r in runs} or set(TASKS)
    titles = {"classification": "Classification: data-fraction sweep", "generation": "Generation: DIFF-DiT vs DiT"}
    for task, md in (("classification", cls_md), ("generation", gen_md)):
        if task in tasks:
            files[f"{task}.csv"] = write_csv(runs, task, out / f"{task}.csv")
            (out / f"{task}.md").write_text(f"# {titles[task]}\n\n" + "\n".join(md) + "\n")
            files[f"{task}.md"] = out / f"{task}.md"
        else:
            files[f"{task}.csv"] = files[f"{task}.md"] = None
    for name, plot in PLOTS.items():
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
             f"generation {_hours(per_task['generation'])}); devices: {unique_text(r.result.get('device') for r in runs)}.",
             ""]
    if "classification" in tasks:
        lines += ["## Classification", "", *cls_md, "", "### Best epoch", "",
                  *classification_markdown(runs, metric="best", baseline=baseline), "",
                  *image("accuracy_vs_fraction.png"), *image("learning_curves.png")]
    if "generation" in tasks:
        lines += ["## Generation", "", *gen_md, "", *image("fid_vs_step.png")]
    lines += ["## Runs", "", *runs_markdown(runs), "", "## Incomplete and missing runs", ""]
    if problems:
        lines += markdown_table(["run", "status", "detail"], [[p.name, p.status, p.detail] for p in problems])
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
    p.add_argument("--baseline", default="standard",
                   help="the arm (kind) the paired differences are taken to, e.g. replica (issue 17's confounds)")
    return add_report_arguments(p)


def add_report_arguments(parser: argparse.ArgumentParser, default_out: str = DEFAULT_OUT) -> argparse.ArgumentParser:
    """The arguments every report script takes: ``RUNS_ROOT ...`` and ``--out``."""
    parser.add_argument("roots", nargs="+", type=Path, metavar="RUNS_ROOT", help="directories searched for result.json")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output directory")
    return parser


def run_report(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
               write: Callable[[Sequence[Path], Path], dict[str, Any]]) -> int:
    """A report script: parse, check the roots exist, ``write(roots, out)`` (-> ``{"runs", "problems", "files"}``)
    and say what it counted and wrote."""
    args = parser.parse_args(argv)
    absent = [str(r) for r in args.roots if not r.is_dir()]
    if absent:
        parser.error(f"RUNS_ROOT not found (expected directories of runs): {', '.join(absent)}")
    options = {k: v for k, v in vars(args).items() if k not in ("roots", "out")}  # a script's own options
    report = write(args.roots, args.out, **options)
    print(f"{len(report['runs'])} runs counted, {len(report['problems'])} incomplete or missing")
    for problem in report["problems"]:
        print(f"  {problem.status:9s} {problem.name}: {problem.detail}")
    for name, path in report["files"].items():
        print(f"wrote {path}" if path is not None else f"{name}: nothing to write")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_report(build_parser(), argv, write_report)
