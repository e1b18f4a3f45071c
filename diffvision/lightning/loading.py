"""Checkpoint loading for diffvision's LightningModules: weights only, verified, and errors that name the file."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from ..checkpoints import checkpoint_errors, verify_checkpoint_file

__all__ = ["WeightsOnlyLoading"]

# Keys of a model's keyword dicts that change neither its weights nor what it computes at evaluation:
# dropout rates and the attention kernel backend. A resume may change them.
_NOT_ARCHITECTURE = re.compile(r".*(drop|backend).*")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and the keyword dicts' non-architecture keys left out."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not _NOT_ARCHITECTURE.fullmatch(str(k))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class WeightsOnlyLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint`` with ``weights_only=True`` by default
    for every source (Lightning itself falls back to a full unpickle for ``http(s)://`` checkpoints),
    a local file's zip CRCs checked first (torch.load does not: a flipped bit would load silently), and
    errors that name a truncated, corrupt or code-carrying file.

    ``ARCHITECTURE_HPARAMS``: the hyperparameters that define the network (what ``checkpoint_mismatch``
    compares)."""

    ARCHITECTURE_HPARAMS: tuple[str, ...] = ()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: Optional[bool] = True, **kwargs: Any):
        if isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_file():
            verify_checkpoint_file(checkpoint_path)
        with checkpoint_errors(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=weights_only, **kwargs)

    def checkpoint_mismatch(self, checkpoint: dict) -> list[str]:
        """How the network saved in a Lightning ``checkpoint`` differs from this module's: architecture
        hyperparameters set to other values, then state-dict keys and shapes. [] when it fits."""
        saved = checkpoint.get("hyper_parameters") or {}
        found = []
        for key in self.ARCHITECTURE_HPARAMS:
            theirs, ours = saved.get(key), self.hparams.get(key)
            if theirs is None or ours is None:  # unset on one side (built in Python, an older checkpoint)
                continue
            if _plain(theirs) != _plain(ours):
                found.append(f"{key}: checkpoint {theirs!r}, config {ours!r}")
        state = checkpoint.get("state_dict") or {}
        mine = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = [k for k in mine if k not in state]
        unexpected = [k for k in state if k not in mine]
        resized = [f"{k} {tuple(state[k].shape)} vs {mine[k]}" for k in mine
                   if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != mine[k]]
        for what, keys in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                           ("of another shape", resized)):
            if keys:
                found.append(f"{len(keys)} weights {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        return found
