"""FID during validation and test, as a Lightning callback: :class:`FIDDuringValidation`.

``DiffusionModule`` hands one to the Trainer from its ``fid_*`` settings (``configure_callbacks``); the
callback also works on its own, with any LightningModule that has ``generate(class_labels, guidance_scale,
seed=, batch_size=)`` (images in [0, 1]) and held-out batches ``(images in [-1, 1], labels)``, as
``DiffusionModule`` has (with ``fid_num_samples=0``, so that its own FID does not replace this one)::

    trainer = Trainer(callbacks=[FIDDuringValidation(num_samples=1000, every_n_epochs=10)])
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..metrics import build_fid, fid_input
from .optim import run_seed, step_seed

__all__ = ["FIDDuringValidation", "due_at_eval_epoch_end"]

log = logging.getLogger(__name__)


def due_at_eval_epoch_end(trainer: pl.Trainer, stage: str, every_n_epochs: int) -> bool:
    """Whether an every-``every_n_epochs`` extra of evaluation (FID, a sample grid) runs at this validation /
    test epoch: every ``every_n_epochs``-th validation epoch of ``fit`` (counting from 1), every ``validate``
    and ``test``, never in the sanity check."""
    if trainer.sanity_checking:
        return False
    return stage == "test" or trainer.state.fn != "fit" or (trainer.current_epoch + 1) % every_n_epochs == 0


class FIDDuringValidation(Callback):
    """FID of generated samples against held-out images, logged as ``val/fid`` (``test/fid`` in ``test``).

    * Real images: the first ``num_samples`` of the held-out split (``batch[0]`` of each validation / test
      batch, images in [-1, 1]), gathered once per split: their Inception statistics are kept, and later
      epochs only sample.
    * Generated images: ``num_samples``, classes balanced (``balanced_class_labels``), from
      ``pl_module.generate(labels, guidance_scale, seed=..., batch_size=batch_size)`` (images in [0, 1]), one
      call per batch, with noise fixed by the run seed and the batch, so that every epoch's FID samples the
      same noise.
    * On a CPU, where one FID takes minutes, it says so as it goes: what it does, how long the first batch
      took and the time left, the value and the time it took.
    * When: every ``every_n_epochs``-th validation epoch of ``fit`` (:func:`due_at_eval_epoch_end`), every
      ``validate`` and ``test``; never in the sanity check.
    * Under DDP each rank takes its share of both (``num_samples`` split as evenly as it goes, shares differing
      by one at most and adding up to ``num_samples``); torchmetrics gathers the statistics, so every rank logs
      the same value, of ``num_samples`` images of each kind.
    * A failure is logged and disables FID for the rest of the run (:attr:`error` says why); training
      goes on with its state intact. Nothing of the callback (the Inception network) goes into checkpoints.

    Args:
        num_samples: generated (and real) images per FID.
        every_n_epochs: FID every that many validation epochs of ``fit``.
        guidance_scale: classifier-free guidance of the samples (1: none).
        batch_size: samples generated (and passed through Inception) at a time.
        weights_path: Inception weights for :func:`diffvision.metrics.build_fid` (default: found offline).
        num_classes: classes to sample (default: ``pl_module.hparams.num_classes``).
    """

    def __init__(self, num_samples: int, every_n_epochs: int = 1, guidance_scale: float = 1.5,
                 batch_size: int = 100, weights_path: Optional[str] = None,
                 num_classes: Optional[int] = None) -> None:
        for name, value in (("num_samples", num_samples), ("every_n_epochs", every_n_epochs),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_samples, self.every_n_epochs, self.batch_size = num_samples, every_n_epochs, batch_size
        self.guidance_scale, self.weights_path, self.num_classes = guidance_scale, weights_path, num_classes
        self.error: Optional[str] = None  # why FID was disabled for the rest of the run
        self.last_duration_s: Optional[float] = None  # how long the last FID took (sampling to value)
        self._metric = None  # torchmetrics' FID, built at first use (it loads the Inception network)
        self._real_seen = 0  # real images this rank has added to the metric for the current split
        self._real_stage: Optional[str] = None  # the split whose real statistics the metric holds

    # ---- when ---------------------------------------------------------------------------------------

    def _due(self, trainer: pl.Trainer, stage: str) -> bool:
        return self.error is None and due_at_eval_epoch_end(trainer, stage, self.every_n_epochs)

    def _share(self, trainer: pl.Trainer) -> tuple[int, int]:
        """This rank's samples ``start .. stop - 1`` of the ``num_samples`` (all of them on one process)."""
        n, world, rank = self.num_samples, trainer.world_size, trainer.global_rank
        return rank * n // world, (rank + 1) * n // world

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start("val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start("test")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, batch, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    # ---- real images -----------------------------------------------------------------------------------

    def _epoch_start(self, stage: str) -> None:
        if self._real_stage != stage:  # real statistics are gathered once per held-out split
            self._real_seen = 0
            if self._metric is not None:
                self._metric.reset_real_features = True
                self._metric.reset()
                self._metric.reset_real_features = False

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, stage: str) -> None:
        if not self._due(trainer, stage) or self._real_stage == stage:
            return
        start, stop = self._share(trainer)
        need = stop - start - self._real_seen
        if need <= 0:
            return
        try:
            real = fid_input((batch[0][:need] + 1.0) / 2.0)
            self._fid(pl_module.device).update(real, real=True)
            self._real_seen += real.shape[0]
        except Exception as err:  # noqa: BLE001 - FID is an extra: training goes on without it
            log.exception("FID (real images) failed; FID disabled for this run, training continues")
            self.error = f"{type(err).__name__}: {err}"

    # ---- generated images and the value -------------------------------------------------------------------

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._due(trainer, stage):
            return
        if self._real_seen > 0:
            self._real_stage = stage
        try:
            self._compute(trainer, pl_module, stage)
        except Exception as err:  # noqa: BLE001 - FID is an extra: training goes on without it
            log.exception("FID failed at epoch %d, step %d; training continues", pl_module.current_epoch,
                          pl_module.global_step)
            self.error = f"{type(err).__name__}: {err}"
            log.error("FID disabled for the rest of this run: %s", self.error)

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from ..diffusion.sampling import balanced_class_labels  # diffusers: loaded when FID first runs

        start, stop = self._share(trainer)
        labels = balanced_class_labels(self._num_classes(pl_module), start, stop)
        fid = self._fid(pl_module.device)
        # on a CPU an FID takes minutes: say so, and how long, rather than stall without a word
        tell = rank_zero_info if pl_module.device.type == "cpu" else (lambda message: None)
        batches = math.ceil((stop - start) / self.batch_size)
        last = f"; the last one took {self.last_duration_s:.0f} s" if self.last_duration_s else ""
        tell(f"{stage}/fid: sampling {self.num_samples} images in {batches} batch(es) and comparing their Inception "
             f"features on the CPU{last} (model.init_args.fid_num_samples 0 turns FID off)")
        t0 = time.monotonic()
        for batch in range(batches):
            # the same noise at every epoch: each batch's seed depends on the run seed, the batch and the rank
            seed = step_seed(run_seed(), batch, 2000 + trainer.global_rank)
            batch_labels = labels[batch * self.batch_size:(batch + 1) * self.batch_size]
            images = pl_module.generate(batch_labels, self.guidance_scale, seed=seed, batch_size=self.batch_size)
            fid.update(fid_input(images), real=False)
            if batch == 0 and batches > 1:
                took = time.monotonic() - t0
                tell(f"{stage}/fid: batch 1 of {batches} took {took:.0f} s; about {took * (batches - 1):.0f} s to go, "
                     f"then the Fréchet distance of the 2048-d features (seconds)")
        value = fid.compute()
        fid.reset()  # fakes only: reset_real_features=False keeps the held-out statistics
        self.last_duration_s = time.monotonic() - t0
        tell(f"{stage}/fid = {value.item():.2f} ({self.last_duration_s:.0f} s)")
        pl_module.log(f"{stage}/fid", value.float(), prog_bar=True, sync_dist=False)

    def _num_classes(self, pl_module: pl.LightningModule) -> int:
        num_classes = self.num_classes or getattr(pl_module, "hparams", {}).get("num_classes")
        if num_classes is None:
            raise ValueError(f"FIDDuringValidation needs num_classes: {type(pl_module).__name__} has no "
                             f"hparams.num_classes; pass num_classes=")
        return num_classes

    def _fid(self, device: torch.device):
        if self._metric is None:
            self._metric = build_fid(weights_path=self.weights_path, reset_real_features=False)
        return self._metric.to(device)

