"""diffvision.lightning: LightningModules (classifier, diffusion), callbacks and optimisation helpers.

``GaussianDiffusionTerms`` is defined in :mod:`diffvision.diffusion` and re-exported here under its old name.
"""
from ..diffusion.gaussian_diffusion import GaussianDiffusionTerms
from .callbacks import ExportOnFitEnd, LastCheckpoint, PredictionWriter, StopAfterEpochs, export_module
from .classifier import ImageClassifier, create_classifier
from .diffusion import DiffusionModule
from .fid import FIDDuringValidation
from .lambda_monitor import LambdaMonitor
from .loggers import ResumableCSVLogger, read_epoch_metrics, wait_past_event_files
from .optim import lr_factor, param_groups

__all__ = [
    "DiffusionModule",
    "ExportOnFitEnd",
    "FIDDuringValidation",
    "GaussianDiffusionTerms",
    "ImageClassifier",
    "LambdaMonitor",
    "LastCheckpoint",
    "PredictionWriter",
    "ResumableCSVLogger",
    "StopAfterEpochs",
    "create_classifier",
    "export_module",
    "lr_factor",
    "param_groups",
    "read_epoch_metrics",
    "wait_past_event_files",
]
