"""``Throughput``: training speed in the run's own logs (``perf/epoch_s``, ``perf/images_per_s``)."""
from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

__all__ = ["Throughput"]


class Throughput(pl.Callback):
    """Logs each training epoch's wall time and images per second (all ranks together).

    The clock runs from the epoch's first batch to its last (the start of the validation that
    ends an epoch, or the epoch's end), after a device synchronisation, so start-up, compilation
    before the first batch and validation are left out; two synchronisations per epoch cost nothing
    measurable.
    """

    def __init__(self) -> None:
        self._start = self._end = None
        self._images = 0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._end, self._images = None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(first.shape[0]) * trainer.world_size

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None and self._end is None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:
            return
        if self._end is None:
            self._sync(pl_module)
            self._end = time.perf_counter()
        seconds = self._end - self._start
        pl_module.log("perf/epoch_s", seconds, on_step=False, on_epoch=True, rank_zero_only=True)
        pl_module.log("perf/images_per_s", self._images / max(seconds, 1e-9), on_step=False, on_epoch=True,
                      rank_zero_only=True)
