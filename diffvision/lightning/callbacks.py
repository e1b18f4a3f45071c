"""Callbacks: export the trained model at the end of ``fit``; write ``predict`` outputs to CSV."""
from __future__ import annotations

import copy
import csv
import logging
import math
import os
import shutil
import weakref
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from ..models import load_checkpoint_file
from .checkpoint_io import AtomicCheckpointIO, checkpoint_write_error, partial_path

__all__ = ["DivergenceGuard", "ExportOnFitEnd", "LastCheckpoint", "LogShortEpochs", "PredictionWriter",
           "RemoveFailedStart", "StopAfterEpochs", "TrainingDivergedError", "export_module"]

log = logging.getLogger(__name__)


def export_module(module: pl.LightningModule, save_directory, datamodule=None) -> Path:
    """Export a trained module: an ``ImageClassifier`` as a timm ``save_for_hf`` folder, a
    ``DiffusionModule`` as a ``DiffDiTPipeline`` (EMA weights). The data module, when given,
    supplies class names and the normalisation the module does not already know."""
    from .classifier import ImageClassifier

    if isinstance(module, ImageClassifier):
        kwargs = {}
        if datamodule is not None:
            kwargs = {"mean": module.mean or getattr(datamodule, "mean", None),
                      "std": module.std or getattr(datamodule, "std", None),
                      "class_names": module.class_names or getattr(datamodule, "class_names", None)}
        return module.export(save_directory, **kwargs)
    from .diffusion import DiffusionModule  # diffusers: only for a diffusion model

    if isinstance(module, DiffusionModule):
        if module.class_names is None and datamodule is not None:
            module.class_names = getattr(datamodule, "class_names", None)
        return module.export_pipeline(save_directory)
    raise TypeError(f"cannot export {type(module).__name__}: expected ImageClassifier or DiffusionModule")


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch (after its validation, if any).

    Lightning >= 2.6 refreshes ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` only when a top-k
    checkpoint is written (so with a monitored metric that stopped improving it is the best epoch,
    not the last), and with ``check_val_every_n_epoch > 1`` not at all between validations: this
    callback keeps the latest state for ``--ckpt_path last``. It runs after the other checkpoint
    callbacks, so their (best-model) state is current in ``last.ckpt``.

    ``every_n_epochs`` (default 1) spaces the writes out for runs of many short epochs (a 32M-param
    DiT with its EMA and AdamW state is ~0.5 GB a write); the last epoch of ``fit``
    (``max_epochs`` or ``max_steps`` reached, or a callback stopping it) is always written, so
    ``last.ckpt`` holds the final weights. The CLI takes it from ``--checkpoint.every_n_epochs``.

    Writes are atomic on local disks: the checkpoint goes to ``.last.ckpt.partial`` in the same
    directory and then replaces ``last.ckpt`` (``os.replace``), so a crash, a kill or a full disk
    while writing leaves the previous ``last.ckpt`` whole. A failed write removes the partial file
    and raises an ``OSError`` naming the checkpoint and the free space. Under the CLI's
    ``AtomicCheckpointIO`` (which does the same for every checkpoint) the write is left to it.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_epochs: int = 1, **kwargs) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, enable_version_counter=False, save_on_train_epoch_end=True,
                         every_n_epochs=every_n_epochs, **kwargs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer):
            return
        if (trainer.current_epoch + 1) % self._every_n_epochs == 0 or self._fit_ends_now(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _fit_ends_now(trainer: pl.Trainer) -> bool:
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (trainer.should_stop or (max_epochs is not None and max_epochs >= 0
                                        and trainer.current_epoch + 1 >= max_epochs)
                or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if get_protocol(str(filepath)) != "file" or isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            # object stores: whole-object uploads; AtomicCheckpointIO (the CLI's): atomic already
            return super()._save_checkpoint(trainer, filepath)
        path = Path(filepath)
        partial = partial_path(path)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)  # every rank: strategies gather here
            if trainer.is_global_zero:
                if partial.is_dir():  # sharded strategies save a directory: no atomic swap for those
                    shutil.rmtree(path, ignore_errors=True)
                os.replace(partial, path)
        except OSError as err:
            if trainer.is_global_zero:
                if partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)
                elif partial.exists():
                    partial.unlink()
            raise checkpoint_write_error(path, err) from err
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(weakref.proxy(self))


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights (or started from them)."""


def _non_finite_parameters(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]


class DivergenceGuard(Callback):
    """Stop ``fit`` with ``TrainingDivergedError`` once training has diverged, before a non-finite state
    is saved: a checkpoint written earlier (``last.ckpt``) keeps the last finite weights.

    * every training step's loss is checked; the check is accumulated on the device and read every
      ``check_every_n_steps`` steps (default: ``trainer.log_every_n_steps``), as each read waits for a GPU;
    * before any checkpoint is written (``on_save_checkpoint``) the pending loss check is read and every
      parameter must be finite, so no checkpoint callback ever saves a diverged state;
    * training must start from finite weights: resuming a checkpoint of a diverged run is refused.

    With float16 mixed precision a non-finite loss can be a scaler overflow (the GradScaler skips that
    step and lowers its scale), so there only non-finite weights stop training.
    """

    def __init__(self, check_every_n_steps: Optional[int] = None) -> None:
        if check_every_n_steps is not None and (isinstance(check_every_n_steps, bool) or not isinstance(
                check_every_n_steps, int) or check_every_n_steps < 1):
            raise ValueError(f"check_every_n_steps must be a positive int or None, got {check_every_n_steps!r}")
        self.check_every_n_steps = check_every_n_steps
        self._bad_steps: Optional[torch.Tensor] = None   # per process: steps with a non-finite loss
        self._first_bad: Optional[torch.Tensor] = None   # the first of them (-1: none)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bad_steps = self._first_bad = None
        bad = _non_finite_parameters(pl_module)
        if bad:
            raise TrainingDivergedError(
                f"the model's weights are not finite before training starts ({len(bad)} parameter tensors, e.g. "
                f"{bad[0]!r}): the checkpoint resumed ({trainer.ckpt_path}) comes from a diverged run; resume from "
                f"an earlier checkpoint with a lower learning rate")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        step = torch.tensor(trainer.global_step, device=bad.device)
        if self._bad_steps is None:
            self._bad_steps, self._first_bad = bad.long(), torch.where(bad, step, -1)
        else:
            self._first_bad = torch.where((self._first_bad < 0) & bad, step, self._first_bad)
            self._bad_steps = self._bad_steps + bad.long()
        every = self.check_every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.global_step % every == 0:
            self._check(trainer, pl_module, weights=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, weights=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer, pl_module, weights=True)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: bool) -> None:
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        bad_steps = int(self._bad_steps) if self._bad_steps is not None else 0
        what = None
        # every rank checks at the same steps; one rank's bad loss must stop them all, not leave them waiting
        if trainer.strategy.reduce_boolean_decision(bad_steps > 0, all=False):
            what = (f"the training loss was not finite at {bad_steps} steps, the first at step {int(self._first_bad)} "
                    f"(now at {where})" if bad_steps else f"the training loss was not finite on another process "
                                                           f"(now at {where})")
        elif weights:
            bad = _non_finite_parameters(pl_module)
            if bad:
                what = f"{len(bad)} parameter tensors are not finite at {where} (e.g. {bad[0]!r})"
        if what is None:
            return
        kept = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}" for cb in trainer.checkpoint_callbacks
                if isinstance(cb, LastCheckpoint) and cb.dirpath]
        kept = [p for p in kept if p.is_file()]
        saved = (f"{kept[0]} keeps the last finite state" if kept else "no checkpoint had been written yet")
        raise TrainingDivergedError(
            f"training diverged: {what}. Stopped before saving a non-finite state; {saved}. Lower the learning rate "
            f"(or add warmup / gradient clipping) and resume from it")


class StopAfterEpochs(Callback):
    """Stop ``fit`` after this process has trained ``epochs`` epochs, with the LR schedule still
    planned for ``trainer.max_epochs``: chunked training on time-limited job slots, resumed with
    ``--ckpt_path last`` (``--trainer.callbacks+=diffvision.lightning.StopAfterEpochs
    --trainer.callbacks.epochs 5``)."""

    def __init__(self, epochs: int) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        self.epochs = epochs
        self._trained = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained += 1
        if self._trained >= self.epochs:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {}  # counts this process's epochs only: a resumed run trains `epochs` more


class ExportOnFitEnd(Callback):
    """At the end of ``fit``, export the model into ``dirpath`` (default ``<log_dir>/export``).

    Args:
        dirpath: export folder; default ``export/`` in the run's log dir.
        weights: ``"last"`` (the weights training ended with) or ``"best"`` (the best checkpoint of
            the run's ``ModelCheckpoint``, when it monitors a metric).
    """

    def __init__(self, dirpath: Optional[str] = None, weights: str = "last") -> None:
        if weights not in ("last", "best"):
            raise ValueError(f"weights must be 'last' or 'best', got {weights!r}")
        self.dirpath, self.weights = dirpath, weights
        self.export_path: Optional[Path] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        log_dir = trainer.log_dir  # collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        target = Path(self.dirpath) if self.dirpath else Path(log_dir or trainer.default_root_dir) / "export"
        module = pl_module
        if self.weights == "best":
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            if not best:
                log.warning("ExportOnFitEnd(weights='best'): no best checkpoint; exporting the last weights")
            else:
                module = copy.deepcopy(pl_module)
                state = load_checkpoint_file(best, map_location=pl_module.device)["state_dict"]
                module.load_state_dict(state)
        self.export_path = export_module(module, target, trainer.datamodule)
        log.info("exported %s to %s", type(pl_module).__name__, self.export_path)
        print(f"exported {type(pl_module).__name__} ({self.weights} weights) to {self.export_path}")


class PredictionWriter(BasePredictionWriter):
    """Writes ``diffvision predict`` outputs into the run's log dir (or ``output_dir``).

    Classifier outputs go to ``predictions.csv`` (index, label, prediction, its name and
    probability); generated images (``DiffusionModule``) to ``predictions/<index>.png`` with an
    index ``predictions.csv`` (index, label, file). ``index`` is the image's row in its split as
    stored (the loader may serve the split in another order). Under DDP each rank writes
    ``predictions-rank<r>.csv``.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        from torchvision.utils import save_image

        out_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        index_lists = batch_indices[0] if batch_indices and isinstance(batch_indices[0], list) else batch_indices
        names = getattr(pl_module, "class_names", None)
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        row_of = getattr(getattr(loader, "dataset", None), "indices", None)  # loader position -> stored row
        with open(out_dir / name, "w", newline="") as f:
            writer = csv.writer(f)
            images = bool(batches) and "images" in batches[0]
            writer.writerow(["index", "label", "file"] if images else
                            ["index", "label", "prediction", "prediction_name", "probability"])
            counter = 0
            for batch, indices in zip(batches, index_lists or [None] * len(batches)):
                n = len(batch["labels"] if "labels" in batch else batch["preds"])
                indices = list(indices) if indices is not None else list(range(counter, counter + n))
                if row_of is not None:
                    indices = [int(row_of[i]) for i in indices]
                counter += n
                labels = batch["labels"].tolist() if "labels" in batch else [""] * n
                if images:
                    (out_dir / "predictions").mkdir(exist_ok=True)
                    for i, y, image in zip(indices, labels, batch["images"]):
                        file = Path("predictions") / f"{i:06d}.png"
                        save_image(image.float(), out_dir / file)
                        writer.writerow([i, y, str(file)])
                    continue
                preds, probs = batch["preds"].tolist(), batch["probs"].max(dim=-1).values.tolist()
                for i, y, p, q in zip(indices, labels, preds, probs):
                    writer.writerow([i, y, p, names[p] if names else "", f"{q:.6f}"])


class LogShortEpochs(Callback):
    """Logs every training step when an epoch has fewer batches than ``trainer.log_every_n_steps``
    (Lightning's default 50): short runs then have step metrics (``train/loss_step``, the learning rate)
    instead of none. Longer epochs keep the configured interval."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if math.isfinite(batches) and 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = 1


class RemoveFailedStart(Callback):
    """Removes the run directory this process created, ``log_dir``, with its content, and the ``parents``
    it created when empty, when ``fit`` fails before its first training step or ``validate`` / ``test`` /
    ``predict`` fail (a missing checkpoint, unreadable data): a failed start leaves no empty ``version_N``
    behind. A run that trained a step keeps everything (its logs explain the failure)."""

    def __init__(self, log_dir, parents=()) -> None:
        self.log_dir, self.parents = Path(log_dir), [Path(p) for p in parents]
        self._trained = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._trained = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.remove()

    def remove(self) -> None:
        """Remove the directories unless a training step ran; again: nothing (the CLI calls it for a failure
        outside ``trainer.fit`` too)."""
        if self._trained:
            return
        shutil.rmtree(self.log_dir, ignore_errors=True)
        for path in self.parents:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty (other runs) or already gone
                pass
