"""``LambdaMonitor``: λ of every differential attention layer in the run's own logs (``lambda/layer_<i>``)."""
from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..attention import DifferentialAttentionV2, GroupedDifferentialAttention, attention_layers

__all__ = ["ForwardHooks", "LambdaMonitor", "differential_layers", "trained_layers"]


def _averaged_copies(module: nn.Module) -> list[nn.Module]:
    """Weight-averaged copies inside ``module`` (torch's ``AveragedModel``, e.g. the DiT's EMA; timm's
    ``ModelEma*``): they hold a second set of the same attention layers."""
    from timm.utils import ModelEma, ModelEmaV2, ModelEmaV3

    return [m for m in module.modules() if isinstance(m, (AveragedModel, ModelEma, ModelEmaV2, ModelEmaV3))]


def trained_layers(module: nn.Module, kinds: tuple[type, ...]) -> list[nn.Module]:
    """The attention modules of types ``kinds`` in the network ``module`` trains, in definition order
    (layer 0 is the first block's); the layers of a weight-averaged (EMA) copy are not counted again."""
    in_copies = {id(m) for copy in _averaged_copies(module) for m in copy.modules()}
    return [m for m in attention_layers(module) if isinstance(m, kinds) and id(m) not in in_copies]


def differential_layers(module: nn.Module) -> list[nn.Module]:
    """The DIFF / GDA / DIFF V2 attention modules of the network ``module`` trains (:func:`trained_layers`)."""
    return trained_layers(module, (GroupedDifferentialAttention, DifferentialAttentionV2))


def monitored(pl_module: pl.LightningModule) -> nn.Module:
    """The weights whose λ is logged: a classifier's evaluated ones (its EMA's, with ``ema_eval``), else the module."""
    return getattr(pl_module, "evaluated_model", pl_module)


class ForwardHooks(pl.Callback):
    """A callback that watches layers through forward hooks it holds in ``self._hooks``: removed with
    ``_remove_hooks`` and, whatever happens, when the run fails."""

    def __init__(self) -> None:
        self._hooks: list = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class LambdaMonitor(ForwardHooks):
    """Logs λ per differential attention layer as ``lambda/layer_<i>`` (``i`` counts the DIFF / GDA /
    DIFF V2 modules in definition order, i.e. blocks in depth order).

    * DIFF and GDA: λ is a parameter-defined value (``reparam``: exp(λq1·λk1) − exp(λq2·λk2) + λinit;
      ``scalar``: one per signal head, averaged here; ``fixed``: λinit), logged at the end of every
      ``every_n_epochs``-th training epoch and of the last one: its trajectory, and λ at the end of training.
    * DIFF V2: λ = σ(W_λ x) depends on the token, so the logged value is its mean over every token, head
      and image of each validation run (forward hooks on ``lambda_proj`` while validating; under DDP, of
      rank 0's share of the validation set).

    A model without differential attention logs nothing.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self._sums: list[Optional[torch.Tensor]] = []
        self._counts: list[int] = []
        self._v2_index: list[int] = []   # the layer numbers of the DIFF V2 modules being watched

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        values = {}
        for i, layer in enumerate(differential_layers(monitored(pl_module))):
            if isinstance(layer, GroupedDifferentialAttention):
                with torch.no_grad():
                    values[f"lambda/layer_{i}"] = float(layer.lam().float().mean())
        if values:
            pl_module.log_dict(values, on_step=False, on_epoch=True, rank_zero_only=True)

    # DIFF V2: the mean of σ(W_λ x) over a validation run

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        v2 = [(i, m) for i, m in enumerate(differential_layers(monitored(pl_module))) if isinstance(m, DifferentialAttentionV2)]
        self._v2_index = [i for i, _ in v2]
        self._sums, self._counts = [None] * len(v2), [0] * len(v2)
        for j, (_, layer) in enumerate(v2):
            self._hooks.append(layer.lambda_proj.register_forward_hook(self._accumulate(j)))

    def _accumulate(self, j: int):
        def hook(module, inputs, output):
            total = torch.sigmoid(output.detach().float()).sum()  # stays on the device: no sync per batch
            self._sums[j] = total if self._sums[j] is None else self._sums[j] + total
            self._counts[j] += output.numel()
        return hook

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if trainer.sanity_checking:
            return
        values = {f"lambda/layer_{i}": float(s) / c
                  for i, s, c in zip(self._v2_index, self._sums, self._counts) if s is not None and c}
        if values:
            pl_module.log_dict(values, on_step=False, on_epoch=True, rank_zero_only=True)
