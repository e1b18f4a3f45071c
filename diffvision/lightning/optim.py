"""What both LightningModules share: weight-decay parameter groups, warmup + cosine LR, per-step RNG.

The parameter groups are timm's (``timm.optim.param_groups_weight_decay`` / ``param_groups_layer_decay``:
what ``timm.optim.create_optimizer_v2`` builds). The optimizer itself stays a factory of the config
(``optimizer: class_path: torch.optim.AdamW`` + ``init_args``), as before: ``create_optimizer_v2`` picks
it by a timm name instead, which existing configs do not use.

The LR schedule stays this closed-form warm-up + cosine (``lr_factor``, a ``LambdaLR`` stepped per
optimizer step) rather than ``timm.scheduler.CosineLRScheduler``, for a measured reason: stepped per
update with ``warmup_prefix=True`` timm's gives ``warmup_lr_init`` (0) to the first step and reaches the
peak one step later (warm-up factors 0, 0.2, ..., 0.8 for 5 steps; here 0.2, 0.4, ..., 1.0), the cosine
after it being the same. Switching would change the LR of the first steps of every existing run, and
the checkpoints saved so far hold ``LambdaLR`` state that a timm scheduler cannot resume from.
timm's layer-wise ``lr_scale`` is applied to each group's starting LR, which ``LambdaLR`` then scales
(timm's schedulers multiply it in the same way).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["LR_SCHEDULES", "param_groups", "lr_factor", "build_lr_scheduler", "check_lr_milestones", "step_seed",
           "step_rng", "default_adamw", "run_seed", "shows_progress_bar"]

LR_SCHEDULES = ("cosine", "linear", "constant")


def default_adamw(params: Iterable) -> torch.optim.Optimizer:
    """The default optimizer, AdamW(lr=1e-3, weight_decay=0.05); configs pass their own callable."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


# A module built in Python keeps its optimizer factory in hparams, so the default factory is pickled (by name)
# into every checkpoint: allowlisted here, where it is defined, so a classifier's checkpoint loads with
# weights_only=True without diffvision.lightning.diffusion (imported lazily now) having been imported
torch.serialization.add_safe_globals([default_adamw])


# timm's group functions write a weight decay into every group; the decayed ones are given this marker and
# then lose the key, so they take the optimizer's own weight_decay (its init_args), whatever it is (0 too)
_OPTIMIZER_WEIGHT_DECAY = 1.0


def param_groups(model: nn.Module, no_weight_decay: Iterable[str] = (), layer_decay: Optional[float] = None) -> list[dict]:
    """timm's parameter groups for an optimizer factory: 1-d params / biases / norms / λ vectors / names in
    ``no_weight_decay`` (e.g. ``pos_embed``, ``cls_token``) get weight_decay=0, the rest the optimizer's.

    Without ``layer_decay``: ``timm.optim.param_groups_weight_decay``, the decayed group first (the order
    of the groups before timm built them, so the optimizer state of older checkpoints lines up). With it:
    ``timm.optim.param_groups_layer_decay``, one group per (layer, decay) with ``lr_scale`` =
    ``layer_decay ** (depth - layer)`` (the head 1, the embedding smallest), for fine-tuning."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_weight_decay = list(no_weight_decay)
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay=_OPTIMIZER_WEIGHT_DECAY,
                                           no_weight_decay_list=no_weight_decay)
        groups.sort(key=lambda g: g["weight_decay"] == 0.0)  # stable: decayed first
    else:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (the LR ratio of one layer to the next), got {layer_decay}")
        groups = param_groups_layer_decay(model, weight_decay=_OPTIMIZER_WEIGHT_DECAY,
                                          no_weight_decay_list=no_weight_decay, layer_decay=layer_decay)
    for group in groups:
        if group["weight_decay"] == _OPTIMIZER_WEIGHT_DECAY:
            del group["weight_decay"]
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0, decay_steps: Iterable[int] = (), gamma: float = 0.1) -> float:
    """LR multiplier for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    ``cosine``: ``r + (1 - r)·½(1 + cos(π·p))``, ``linear``: ``r + (1 - r)(1 - p)`` or ``constant``: 1,
    with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1] and
    ``r = min_lr_ratio``; times ``gamma`` for each of ``decay_steps`` reached (``step >= s``), as torch's
    ``MultiStepLR``.
    """
    decay = gamma ** sum(step >= s for s in decay_steps)
    return decay * _schedule_factor(step, warmup_steps, total_steps, schedule, min_lr_ratio)


def _schedule_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - p)
    raise ValueError(f"unknown lr_schedule {schedule!r}; accepted: {list(LR_SCHEDULES)}")


def check_lr_milestones(milestones: Iterable[int] | None, gamma: float) -> tuple[int, ...]:
    """``milestones`` (epochs) as a tuple of increasing positive ints; ``gamma`` must be in (0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"lr_gamma must be a number in (0, 1] (the LR is multiplied by it at each milestone), "
                         f"got {gamma!r}")
    milestones = tuple(milestones or ())
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) \
            or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"lr_milestones must be increasing positive epoch numbers (e.g. [250]), got {list(milestones)}")
    return milestones


def build_lr_scheduler(optimizer: torch.optim.Optimizer, trainer, warmup_epochs: float, warmup_steps: int,
                       schedule: str, min_lr_ratio: float, milestones: Iterable[int] | None = None,
                       gamma: float = 0.1) -> dict:
    """A per-step ``LambdaLR`` for Lightning: warmup from epochs (via the trainer's steps per epoch)
    or steps, then ``schedule`` to the end of training (``trainer.estimated_stepping_batches``); the LR is
    multiplied by ``gamma`` from the first step of each epoch in ``milestones`` on (as ``MultiStepLR`` stepped
    per epoch)."""
    milestones = check_lr_milestones(milestones, gamma)
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; accepted: {list(LR_SCHEDULES)}")
    total = trainer.estimated_stepping_batches
    if schedule != "constant" and not math.isfinite(total):
        raise ValueError(f"lr_schedule={schedule!r} needs a known training length: set trainer.max_epochs "
                         f"or trainer.max_steps (or use lr_schedule='constant')")
    total = int(total) if math.isfinite(total) else 0
    warmup = int(warmup_steps)
    per_epoch = None
    if warmup_epochs or milestones:
        per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
    if warmup_epochs:
        warmup += int(round(warmup_epochs * per_epoch))
    decay_steps = tuple(m * per_epoch for m in milestones)
    if total and warmup >= total:
        warmup = max(0, total - 1)  # short (e.g. fast_dev_run) runs: keep one post-warmup step
    fn = lambda step: lr_factor(step, warmup, total, schedule, min_lr_ratio, decay_steps, gamma)  # noqa: E731
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, fn), "interval": "step", "frequency": 1,
            "name": "lr"}


def step_seed(base_seed: int, *keys: int) -> int:
    """A 63-bit seed for ``(base_seed, *keys)`` (e.g. epoch, batch, rank), mixed by numpy's
    SeedSequence: deterministic everywhere, unrelated for neighbouring keys."""
    entropy = [int(base_seed) % 2**63, *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def shows_progress_bar(trainer) -> bool:
    """Whether ``trainer`` has a progress bar. Log step values with ``prog_bar=`` this: Lightning turns
    every ``prog_bar=True`` value into a Python number after every batch (``.item()``, a device
    synchronisation that stops the host from running ahead of the GPU), bar or no bar."""
    return trainer is not None and trainer.progress_bar_callback is not None


def run_seed() -> int:
    """The run's ``seed_everything`` value (``PL_GLOBAL_SEED``), or 0 when it was not seeded."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@contextlib.contextmanager
def step_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNGs (torch's CPU and ``device``'s if CUDA, numpy's) seeded by ``seed``, restoring
    them afterwards. Every random draw of a training step (noise, timesteps, dropout, label dropout)
    then depends on (seed, epoch, batch, rank) alone: a resumed run repeats them exactly."""
    devices = [device] if device.type == "cuda" else []
    np_state = np.random.get_state()  # numpy's global generator too: timm's Mixup draws from it
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            np.random.seed(seed % 2**32)
            if devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
