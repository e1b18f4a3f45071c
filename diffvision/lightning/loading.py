"""Checkpoint loading for diffvision's LightningModules: weights only, and errors that name the file."""
from __future__ import annotations

from typing import Any, Optional

from ..checkpoints import checkpoint_errors

__all__ = ["WeightsOnlyLoading"]


class WeightsOnlyLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint`` with ``weights_only=True`` by default
    for every source (Lightning itself falls back to a full unpickle for ``http(s)://`` checkpoints),
    and errors that name a truncated, corrupt or code-carrying file."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: Optional[bool] = True, **kwargs: Any):
        with checkpoint_errors(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=weights_only, **kwargs)
