"""Attention maps of a standard ViT and a DIFF-ViT (or GDA-ViT, DIFF V2-ViT): per-head pictures and a measured summary.

    python train/attention_maps.py STANDARD DIFF [--indices 0 1 2 3] [--layer -1|all]
        [--num-summary 1000] [--dataset cifar10_npz] [--root DIR] [--out docs/results/attention]

``STANDARD`` and ``DIFF`` are each a Lightning checkpoint of a ``diffvision fit`` run (``.ckpt``), or a
timm model name whose weights come from ``--standard-weights`` / ``--diff-weights`` with
``--standard-kwargs`` / ``--diff-kwargs`` (JSON ``create_model`` keywords). Writes
``image<idx>_layer<L>.png`` per ``--indices`` image and ``summary.csv`` / ``summary.md`` (entropy and
top-k mass of the class token's attention over the patches) into ``--out``. The logic lives in
``diffvision.experiments.attention_report`` and the ``attention_*`` modules beside it.
"""
import sys

from diffvision.experiments.attention_report import main

if __name__ == "__main__":
    sys.exit(main())
