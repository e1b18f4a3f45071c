"""diffvision.lightning: LightningModules (classifier, diffusion), callbacks and optimisation helpers.

``GaussianDiffusionTerms`` is defined in :mod:`diffvision.diffusion` and re-exported here under its old name.
"""
from ..diffusion.gaussian_diffusion import GaussianDiffusionTerms
from .callbacks import (DivergenceGuard, ExportOnFitEnd, LastCheckpoint, PredictionWriter, StopAfterEpochs,
                        TrainingDivergedError, export_module)
from .checkpoint_io import AtomicCheckpointIO
from .classifier import ImageClassifier, create_classifier
from .diffusion import DiffusionModule
from .fid import FIDDuringValidation
from .lambda_monitor import LambdaMonitor
from .loggers import ResumableCSVLogger, read_epoch_metrics, wait_past_event_files
from .optim import lr_factor, param_groups

__all__ = [
    "AtomicCheckpointIO",
    "DiffusionModule",
    "DivergenceGuard",
    "ExportOnFitEnd",
    "FIDDuringValidation",
    "GaussianDiffusionTerms",
    "ImageClassifier",
    "LambdaMonitor",
    "LastCheckpoint",
    "PredictionWriter",
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
