"""Aggregate finished experiment runs into markdown tables, CSV files and plots.

    python train/report.py RUNS_ROOT [RUNS_ROOT ...] [--out docs/results]

Each run is a directory ``<root>/.../<experiment>/`` holding ``result.json`` (written by the sweep when
the run finished) and its Lightning CSV logs ``version_*/metrics.csv``. Writes ``classification.{csv,md}``,
``generation.{csv,md}``, the plots and ``summary.md`` (with every incomplete or missing run) into
``--out``. The logic lives in ``diffvision.experiments.report`` (``results`` says what ``result.json``
holds).
"""
import sys

from diffvision.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
