"""Run a sweep of ``diffvision fit`` runs (fractions x arms x seeds), side by side on GPUs.

    python train/sweep.py configs/sweeps/cifar10_fractions.yaml
    python train/sweep.py configs/sweeps/cifar10_fractions.yaml --arms diff standard --seeds 0 --dry-run
    python train/sweep.py configs/sweeps/cifar10_dit.yaml --gpus 0 1 --jobs-per-gpu 3
    python train/sweep.py SPEC --root runs/sweeps/NAME -- --data.root /data/cifar10   # extra CLI args

A spec (YAML, ``configs/sweeps/``) names a ``diffvision fit`` config and the arms compared; every run
goes into ``<root>/<arm>_f<fraction>_s<seed>/`` and ends with a ``result.json``; finished runs are
skipped, unfinished ones resume. ``python train/report.py <root>`` turns finished runs into tables and
plots. The logic lives in ``diffvision.experiments.specs`` and ``diffvision.experiments.sweep``.
"""
import sys

from diffvision.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
