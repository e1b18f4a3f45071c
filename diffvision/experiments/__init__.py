"""diffvision.experiments: the experiment library behind the scripts of ``train/``.

``train/sweep.py``, ``train/report.py``, ``train/attention_maps.py`` and ``train/fid_eval.py`` are thin
entry points that call ``main`` of a module here; tests and studies import the modules directly. This
``__init__`` imports none of them, so importing the package stays cheap; import the module you need:

* ``results``: what a finished run's ``result.json`` holds (written by the sweep, checked and read by
  the report), and a run's per-epoch metrics from its Lightning CSV logs.
* ``specs``: sweep specs (YAML) -> jobs -> the ``diffvision fit`` and FID command lines.
* ``sweep``: runs the jobs side by side on GPUs (resume, attempts and wall time, time limit) and writes
  each ``result.json``; ``main`` is ``train/sweep.py``.
* ``runs``: the finished runs under a directory (``discover``), and why the others cannot be counted.
* ``tables``: numbers over seeds (mean ± std, paired deltas) and the markdown and CSV tables.
* ``plots``: the report's figures, and the one headless matplotlib import.
* ``report``: the report of run directories (tables, plots, ``summary.md``); ``main`` is
  ``train/report.py``.
* ``attention_maps``: attention maps out of attention layers (diffvision's and timm's), the measures on
  their rows (entropy, top-k mass) and a recorder of the layers' inputs.
* ``attention_models``: the models compared, from ``diffvision fit`` checkpoints or timm names + weights.
* ``attention_summary``: those measures over many images, as ``summary.csv`` / ``summary.md``.
* ``attention_pictures``: per-head pictures of the maps of a few images.
* ``attention_report``: the whole attention-map run; ``main`` is ``train/attention_maps.py``.
* ``fid_eval``: FID of a diffusion checkpoint; ``main`` is ``train/fid_eval.py``.
* ``espformer``: an experiment replica of ESPFormer's ViT and "DiffTransformer" attention (issue 17), the timm
  model ``espformer_vit_patch4_32`` (registered on import, which ``ImageClassifier`` does for ``espformer_*`` names).
"""
