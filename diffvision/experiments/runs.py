"""The finished runs under run directories, and why the others cannot be counted.

A run is a directory ``<root>/.../<experiment>/`` with a ``result.json`` (``diffvision.experiments.results``)
and its Lightning CSV logs ``version_*/metrics.csv``. Incomplete runs never stop a report: ``discover``
returns them as ``Problem``s: training logs but no ``result.json`` (``partial``), an unreadable or
incomplete ``result.json`` (``broken``), a duplicate of an experiment already counted (``duplicate``),
and a (kind, fraction, seed) of a task's grid with no run (``missing``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .results import RESULT_FILE, TASKS, finite_number, fraction_key, headline, metric_by_epoch, result_problem

__all__ = ["KIND_ORDER", "Problem", "Run", "discover", "order_kinds", "percent"]

# the attention kinds in the order tables and plots show them; other kinds follow, sorted
KIND_ORDER = ("standard", "diff", "gda", "diffv2")
# what a run that records no recipe trained with: the configs' own (configs/recipes/light.yaml names it)
DEFAULT_RECIPE = "light"


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
        return fraction_key(self.result["fraction"])

    @property
    def seed(self) -> int:
        return int(self.result["seed"])

    @property
    def value(self) -> float:
        """The headline number: final val/acc1 in % (classification) or FID (generation)."""
        return headline(self.result)

    @property
    def recipe(self) -> str:
        """The training recipe (``result.json``'s ``recipe``); runs written before the sweep recorded it
        trained with the configs' own recipe, ``light``."""
        return self.result.get("recipe") or DEFAULT_RECIPE

    @property
    def wall_s(self) -> float:
        value = finite_number(self.result.get("wall_s"))
        return 0.0 if value is None else value


@dataclass
class Problem:
    name: str
    path: Path
    status: str  # partial | broken | duplicate | missing
    detail: str


def order_kinds(kinds: Iterable[str]) -> list[str]:
    present = set(kinds)
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _run_name(run_dir: Path, root: Path) -> str:
    return str(run_dir.relative_to(root)) if run_dir != root else root.name


def _log_summary(run_dir: Path) -> str:
    """What the training log of an unfinished run shows."""
    accuracy = metric_by_epoch(run_dir)
    if not accuracy:
        return "no result.json, no validation rows in its logs"
    last = max(accuracy)
    return f"no result.json; logs reach epoch {last} (val/acc1 {100 * accuracy[last]:.2f}%)"


def discover(roots: Sequence[Path]) -> tuple[list[Run], list[Problem]]:
    """Every run under ``roots``: counted runs, and the problems of those that cannot be counted."""
    runs: list[Run] = []
    problems: list[Problem] = []
    seen: set[Path] = set()
    identity: dict[tuple, Run] = {}
    for root in roots:
        root = Path(root)
        finished_dirs = set()
        for path in sorted(root.rglob(RESULT_FILE)):
            run_dir = path.parent
            finished_dirs.add(run_dir.resolve())
            name = _run_name(run_dir, root)
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            try:
                result = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(Problem(name, run_dir, "broken", f"unreadable result.json ({err})"))
                continue
            why = result_problem(result)
            if why is not None:
                problems.append(Problem(name, run_dir, "broken", why))
                continue
            run = Run(name, run_dir, result)
            key = (run.task, run.kind, run.recipe, run.fraction, run.seed,
                   result.get("model_name") or result.get("preset"))
            if key in identity:
                problems.append(Problem(name, run_dir, "duplicate",
                                        f"same task/kind/recipe/fraction/seed/model as {identity[key].path}; not counted"))
                continue
            identity[key] = run
            runs.append(run)
        for metrics in sorted(root.rglob("version_*/metrics.csv")):
            run_dir = metrics.parent.parent
            if run_dir.resolve() in finished_dirs or run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            name = _run_name(run_dir, root)
            problems.append(Problem(name, run_dir, "partial", _log_summary(run_dir)))
    problems += _missing(runs)
    return runs, problems


def _missing(runs: Sequence[Run]) -> list[Problem]:
    """The (kind, fraction, seed) cells of each task's and recipe's grid that no run fills (two recipes
    are two grids: a recipe that ran fewer fractions does not make holes in the other's)."""
    problems = []
    for task in TASKS:
        for recipe in sorted({r.recipe for r in runs if r.task == task}):
            mine = [r for r in runs if r.task == task and r.recipe == recipe]
            have = {(r.kind, r.fraction, r.seed) for r in mine}
            where = task if recipe == DEFAULT_RECIPE else f"{task}/{recipe}"
            for kind in order_kinds(r.kind for r in mine):
                for fraction in sorted({r.fraction for r in mine}):
                    for seed in sorted({r.seed for r in mine}):
                        if (kind, fraction, seed) not in have:
                            problems.append(Problem(f"{where}/{kind}/{percent(fraction)}/seed{seed}", Path("-"),
                                                    "missing", f"no {where} run for kind={kind}, "
                                                               f"fraction={fraction}, seed={seed}"))
    return problems
