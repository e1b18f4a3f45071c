"""Checkpoint files written in place, atomically, and verified before they are read back.

Lightning's ``TorchCheckpointIO`` stages every checkpoint in ``$TMPDIR`` (fsspec's transaction:
``tempfile.mkstemp()``) and then *moves* it next to the run. Across filesystems that move is a copy,
so a full disk leaves a truncated ``epoch=1-step=10.ckpt`` under its final name; a full ``$TMPDIR``
fails after an epoch's training with an ``OSError`` that names no file; a kill leaves ``/tmp/tmpXXXX``
behind. ``AtomicCheckpointIO`` writes into the checkpoint's own directory instead.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..checkpoints import verify_checkpoint_file

__all__ = ["AtomicCheckpointIO", "PARTIAL_SUFFIX", "checkpoint_write_error", "partial_path"]

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it replaces ``path``: a hidden file beside it (same filesystem,
    so the final ``os.replace`` is atomic; hidden, so Lightning's version counter never sees it)."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def checkpoint_write_error(path: Path, err: OSError) -> OSError:
    """``err`` (ENOSPC, EACCES, ...) as an error naming the checkpoint, the free space and what survived."""
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
    intact = "the previous one is intact" if path.exists() else "there is no earlier one"
    return OSError(err.errno, f"writing checkpoint {path} failed ({err.strerror or err}; "
                              f"{free if free is not None else '?'} bytes free there); {intact}", str(path))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power cut must not bring back the old name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform / filesystem; the rename itself stays atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint to a hidden ``.<name>.partial`` beside it,
    fsyncs it and renames it over ``<name>``: a full disk, an error or a kill leaves either the old
    file or the new one, never part of one, and nothing in ``$TMPDIR``. A failed write removes its
    partial file and raises an ``OSError`` naming the checkpoint and the free space (a kill cannot:
    the CLI removes such leftovers when it next takes the run directory).

    Loading checks a local file's zip CRCs first (``verify_checkpoint_file``): torch.load does not,
    and a flipped bit would resume with a wrong weight or optimizer state. Remote paths (object
    stores) keep Lightning's behaviour: their uploads are whole-object already.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = partial_path(path)
        # Serialised in memory first (as Lightning does): torch.save writing to a file reports a full disk as
        # a RuntimeError about stream positions, and Python's own writes raise a real ENOSPC.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException as err:  # an interrupt too: no partial file stays behind
            partial.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise checkpoint_write_error(path, err) from err
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if get_protocol(str(path)) == "file" and Path(path).is_file():
            verify_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
