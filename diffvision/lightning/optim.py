"""What both LightningModules share: weight-decay parameter groups, warmup + cosine LR, per-step RNG."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Iterator

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


def param_groups(model: nn.Module, no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """Two groups: weights (the optimizer's weight decay) and 1-d params / biases / norms / λ vectors
    / names in ``no_weight_decay`` (e.g. timm's ``pos_embed``, ``cls_token``), with weight_decay=0."""
    skip = set(no_weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
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
    import numpy as np

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
    """Run a block with the global RNGs (CPU, and ``device``'s if CUDA) seeded by ``seed``, restoring
    them afterwards. Every random draw of a training step (noise, timesteps, dropout, label dropout)
    then depends on (seed, epoch, batch, rank) alone: a resumed run repeats them exactly."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
