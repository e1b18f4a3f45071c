"""``RouterMonitor``: how DyDiLA's routers spread the tokens over their choices, in the run's own logs."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from ..attention import DynamicDifferentialLinearAttention
from .lambda_monitor import ForwardHooks, monitored, trained_layers

__all__ = ["RouterMonitor"]


class RouterMonitor(ForwardHooks):
    """Logs, for every ``dydila`` attention layer ``i`` and each router ``r`` that chooses from the layer's
    input (``DynamicDifferentialLinearAttention.token_routers``: ``q_router``, ``k_router``, ``kernel``,
    ``lambda_q``, ``lambda_k``), over the tokens of each validation run:

    * ``router/layer_<i>/<r>_use_<c>``: the share of tokens that chose ``c``;
    * ``router/layer_<i>/<r>_entropy``: the entropy of those shares over log(choices): 1 when the tokens
      spread evenly, 0 when every token picks the same one (a collapsed router, whose bank is then one
      static projector / γ / λ).

    The counts stay on the device until the validation run ends (no synchronisation per batch). Under
    DDP they are rank 0's share of the validation set. A model without ``dydila`` layers logs nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        layers = trained_layers(monitored(pl_module), (DynamicDifferentialLinearAttention,))
        self._counts = [{} for _ in layers]
        for i, layer in enumerate(layers):
            sizes = {name: router.out_features for name, router in layer.token_routers().items()}
            self._hooks.append(layer.register_forward_hook(self._count(i, sizes)))

    def _count(self, i: int, sizes: dict[str, int]):
        def hook(module, inputs, output):
            for name, choice in module.routing(inputs[0]).items():
                counts = torch.bincount(choice.flatten(), minlength=sizes[name])
                self._counts[i][name] = counts if name not in self._counts[i] else self._counts[i][name] + counts
        return hook

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if trainer.sanity_checking:
            return
        values = {}
        for i, routers in enumerate(self._counts):
            for name, counts in routers.items():
                share = (counts.double() / counts.sum().clamp_min(1)).tolist()  # one read per router and run
                for c, s in enumerate(share):
                    values[f"router/layer_{i}/{name}_use_{c}"] = s
                entropy = -sum(s * math.log(s) for s in share if s > 0)
                values[f"router/layer_{i}/{name}_entropy"] = entropy / math.log(len(share)) if len(share) > 1 else 0.0
        if values:
            pl_module.log_dict(values, on_step=False, on_epoch=True, rank_zero_only=True)
