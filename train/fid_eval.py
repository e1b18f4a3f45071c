"""FID of a trained DIFF-DiT / DiT checkpoint: sample with the diffusers pipeline, compare with real images.

    python train/fid_eval.py runs/cifar10_diff_dit/version_0/checkpoints/last.ckpt --num-samples 10000
    python train/fid_eval.py CKPT --scheduler dpmsolver --steps 25 --guidance-scale 1.5 --out fid.json

* Samples ``--num-samples`` images, classes balanced (``i % num_classes``), from the EMA weights
  through :class:`~diffvision.diffusion.DiffDiTPipeline` with any of the schedulers in
  ``diffvision.diffusion.SAMPLERS`` (built from the training noise schedule), quantised to 8 bits as
  saved images would be.
* The reference is a whole split of the training data (default ``train``: FID-10k against the
  training set, as in the DiT / ADM papers); its Inception statistics are cached per dataset file
  in ``$DIFFVISION_CACHE/fid_reference`` so that several evaluations compute them once.
* FID is torchmetrics' ``FrechetInceptionDistance`` with the exact TF Inception weights found
  offline (:func:`diffvision.metrics.build_fid`; ``--fid-weights`` or ``DIFFVISION_FID_WEIGHTS``
  to point at a file).
* Writes a JSON summary (``--out``) and a sample grid, one row per class (``--grid``).

The logic lives in ``diffvision.experiments.fid_eval``.
"""
import sys

from diffvision.experiments.fid_eval import main

if __name__ == "__main__":
    sys.exit(main())
