"""diffvision.lightning: LightningModules (classifier, diffusion), callbacks and optimisation helpers.

``DiffusionModule`` and ``GaussianDiffusionTerms`` (defined in :mod:`diffvision.diffusion`, re-exported
here under its old name) load diffusers, so they are imported on first use (PEP 562): the ``diffvision``
command and classifier runs start without diffusers. ``class_path: diffvision.lightning.DiffusionModule``
imports it as usual.
"""
from __future__ import annotations

import importlib
from typing import Any

from .callbacks import (
    DivergenceGuard,
    ExportOnFitEnd,
    LastCheckpoint,
    LogShortEpochs,
    PredictionWriter,
    RemoveFailedStart,
    StopAfterEpochs,
    TrainingDivergedError,
    export_module,
)
from .checkpoint_io import AtomicCheckpointIO
from .classifier import ImageClassifier, create_classifier
from .fid import FIDDuringValidation
from .lambda_monitor import LambdaMonitor
from .router_monitor import RouterMonitor
from .loggers import ResumableCSVLogger, read_epoch_metrics, wait_past_event_files
from .optim import lr_factor, param_groups

_LAZY = {"DiffusionModule": "diffvision.lightning.diffusion",
         "GaussianDiffusionTerms": "diffvision.diffusion.gaussian_diffusion"}

__all__ = [
    "AtomicCheckpointIO",
    "DiffusionModule",
    "DivergenceGuard",
    "ExportOnFitEnd",
    "FIDDuringValidation",
    "GaussianDiffusionTerms",
    "ImageClassifier",
    "LambdaMonitor",
    "RouterMonitor",
    "LastCheckpoint",
    "LogShortEpochs",
    "PredictionWriter",
    "RemoveFailedStart",
    "ResumableCSVLogger",
    "StopAfterEpochs",
    "TrainingDivergedError",
    "create_classifier",
    "export_module",
    "lr_factor",
    "param_groups",
    "read_epoch_metrics",
    "wait_past_event_files",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffvision.lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
