"""Issue 16's variant study: the CSV, tables (paired gains, the decision rule applied) and figures.

    python train/variant_study.py runs/sweeps/cifar10_variants [--out docs/results]

The runs come from ``python train/sweep.py configs/sweeps/cifar10_variants.yaml``; the rule is stated in
``docs/variant_study.md``. The logic lives in ``diffvision.experiments.variant_study``.
"""
import sys

from diffvision.experiments.variant_study import main

if __name__ == "__main__":
    sys.exit(main())
