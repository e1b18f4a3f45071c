"""The exponential moving average (EMA) of a model's weights, which samples, FID and exports use.

:class:`ModelEMA` is torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` (so checkpoints hold its
``module.*`` weights and ``n_averaged`` counter, as before) and two additions: diffusers' ``EMAModel``
warm-up of the decay (:meth:`ModelEMA.decay_at`), and an update that never reads the counter back from
the device on the way (see :meth:`ModelEMA.update_parameters`).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ModelEMA"]


class ModelEMA(AveragedModel):
    """An EMA of ``model``'s parameters and buffers: the first update copies them; the update after ``n``
    earlier ones moves each tensor ``e`` towards the model's ``m`` with ``d = decay_at(n)``, as
    ``get_ema_multi_avg_fn(d)`` does: ``lerp(e, m, 1 − d)``, or ``e·d + m·(1 − d)`` for integer buffers.

    Args:
        model: the model to average; a deep copy is kept in ``self.module``, without gradients.
        decay: the EMA decay (DiT: 0.9999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the update after ``n`` earlier ones, as diffusers'
            ``EMAModel`` does by default, so that a short run's EMA is not dominated by the
            initialisation; ``False``: ``decay`` from the second update on.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.requires_grad_(False)
        self._count: Optional[int] = None  # host copy of n_averaged; None: read it at the next update
        self._last_step = -1  # the optimizer step of the last update_after_step
        self.register_load_state_dict_post_hook(_reread_count)  # a restored checkpoint brings its own count

    def decay_at(self, n: int) -> float:
        """The decay of the update after ``n`` earlier ones."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def start_at_step(self, step: int) -> None:
        """Training (re)starts at optimizer step ``step``: the next update is the one after it."""
        self._last_step = step

    def update_after_step(self, model: nn.Module, step: int) -> None:
        """Update once per optimizer step, at the first call after ``step`` moved on (a Lightning module calls
        it at every batch end: with gradient accumulation several batches share one step)."""
        if step > self._last_step:
            self.update_parameters(model)
            self._last_step = step

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """``AveragedModel.update_parameters`` with the same arithmetic, the decay taken from
        :meth:`decay_at`, and no device synchronisation: ``AveragedModel`` tests its on-device counter
        ``n_averaged`` on the host twice per call, which stalls a GPU training loop every step; here a
        host copy of the counter is kept (read from the device once, then after a checkpoint is loaded)."""
        if self._count is None:
            self._count = int(self.n_averaged)
        ema = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        new = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if self._count == 0:
            for e, m in zip(ema, new):
                e.copy_(m)
        else:
            average = get_ema_multi_avg_fn(self.decay_at(self._count))
            for ema_group, new_group in _by_device_and_dtype(ema, new):
                average(ema_group, new_group, self.n_averaged)
        self.n_averaged += 1
        self._count += 1


def _by_device_and_dtype(ema: list[torch.Tensor], new: list[torch.Tensor]) -> Iterable[tuple[list, list]]:
    """The (EMA, model) tensor pairs grouped by the EMA tensor's device and dtype, as ``AveragedModel``
    hands them to ``multi_avg_fn``: one foreach call per group, and integer buffers apart from the
    floating-point ones (``get_ema_multi_avg_fn`` picks its arithmetic by a group's first tensor)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
    for e, m in zip(ema, new):
        pair = groups.setdefault((e.device, e.dtype), ([], []))
        pair[0].append(e)
        pair[1].append(m)
    return groups.values()


def _reread_count(ema: ModelEMA, incompatible_keys) -> None:
    ema._count = None
