"""ModelEMA (diffvision.diffusion.ema): bit for bit the EMA the DiffusionModule has always kept.

The reference is the formula written out by hand, tensor by tensor: the first update copies the model's
parameters and buffers; the update after ``n`` earlier ones moves each floating-point tensor ``e`` to
``lerp(e, m, 1 - d)`` and each integer one to ``e·d + m·(1 − d)`` (cast back), with
``d = min(decay, (1 + n) / (10 + n))`` (warm-up, diffusers' EMAModel rule) or ``d = decay``. That is what
``get_ema_multi_avg_fn`` computes, applied per device and dtype group as ``AveragedModel`` does.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffvision.diffusion import DiffDiTTransformer2DModel, ModelEMA

DECAY = 0.8


def reference_decay(n: int, warmup: bool) -> float:
    return min(DECAY, (1 + n) / (10 + n)) if warmup else DECAY


def reference_ema(history: list[list[torch.Tensor]], warmup: bool) -> list[torch.Tensor]:
    ema = [t.clone() for t in history[0]]  # the first update copies
    for n, model in enumerate(history[1:], start=1):
        d = reference_decay(n, warmup)
        ema = [e.lerp(m, 1 - d) if e.is_floating_point() else (e * d + m * (1 - d)).to(e.dtype)
               for e, m in zip(ema, model)]
    return ema


class Mixed(nn.Module):
    """Parameters of two dtypes, a float buffer and an integer buffer (a step counter, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, 3))
        self.b = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.register_buffer("running", torch.randn(3))
        self.register_buffer("count", torch.tensor([7, -3, 1000]))


def tiny_dit() -> nn.Module:
    return DiffDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                     sample_size=8, patch_size=4, num_classes=4, attn_kind="diff")


def tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in itertools.chain(model.parameters(), model.buffers())]


def train_a_little(model: nn.Module, g: torch.Generator) -> None:
    """Stand-in for an optimizer step: every parameter and buffer moves."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
            else:
                t.add_(torch.randint(-50, 50, t.shape, generator=g, dtype=t.dtype))


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("make", [Mixed, tiny_dit], ids=["mixed-dtypes", "dit"])
def test_updates_equal_the_formula_bit_for_bit(make, warmup):
    torch.manual_seed(0)
    model, g = make(), torch.Generator().manual_seed(1)
    ema = ModelEMA(model, DECAY, warmup)
    history = []
    for _ in range(12):
        train_a_little(model, g)
        history.append(tensors(model))
        ema.update_parameters(model)
    expected = reference_ema(history, warmup)
    got = tensors(ema.module)
    assert len(got) == len(expected)
    for name, a, b in zip([n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())], got,
                          expected):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ema.n_averaged.item() == 12
    assert [ema.decay_at(n) for n in (1, 2, 100)] == [reference_decay(n, warmup) for n in (1, 2, 100)]


@pytest.mark.parametrize("warmup", [True, False])
def test_updates_equal_torchs_averaged_model_with_the_same_decays(warmup):
    """``AveragedModel.update_parameters`` itself, its decay set per update, gives the same tensors."""
    torch.manual_seed(0)
    model, g = Mixed(), torch.Generator().manual_seed(2)
    ours, torchs = ModelEMA(model, DECAY, warmup), AveragedModel(model, use_buffers=True)
    for n in range(8):
        train_a_little(model, g)
        ours.update_parameters(model)
        torchs.multi_avg_fn = get_ema_multi_avg_fn(reference_decay(n, warmup))
        torchs.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(tensors(ours.module), tensors(torchs.module)))
    assert ours.state_dict().keys() == torchs.state_dict().keys()  # the checkpoint layout of before
    assert torch.equal(ours.n_averaged, torchs.n_averaged)


def test_a_restored_ema_goes_on_as_if_never_stopped():
    torch.manual_seed(0)
    model, g = Mixed(), torch.Generator().manual_seed(3)
    straight, snapshots = ModelEMA(model, DECAY), []
    for step in range(7):
        train_a_little(model, g)
        snapshots.append(copy.deepcopy(model.state_dict()))
        straight.update_parameters(model)
        if step == 2:
            saved = copy.deepcopy(straight.state_dict())
    # another EMA, whose host copy of the count (1) is stale once the checkpoint (count 3) is loaded
    resumed_model = Mixed()
    resumed = ModelEMA(resumed_model, DECAY)
    resumed.update_parameters(resumed_model)
    resumed.load_state_dict(saved)
    for state in snapshots[3:]:
        resumed_model.load_state_dict(state)
        resumed.update_parameters(resumed_model)
    assert all(torch.equal(a, b) for a, b in zip(tensors(resumed.module), tensors(straight.module)))
    assert resumed.n_averaged.item() == 7


class NoHostReads(torch.Tensor):
    """A tensor that fails when read back to the host (a device synchronisation on a GPU)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.tolist):
            raise AssertionError("n_averaged was read on the host")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_updates_never_read_the_counter_back_after_the_first():
    model = Mixed()
    ema = ModelEMA(model, DECAY)
    ema.update_parameters(model)  # reads n_averaged once
    ema.n_averaged = ema.n_averaged.as_subclass(NoHostReads)
    for _ in range(3):
        ema.update_parameters(model)
    assert torch.Tensor.item(ema.n_averaged.as_subclass(torch.Tensor)) == 4
    torchs = AveragedModel(model, use_buffers=True)  # the check itself sees torch's two reads per update
    torchs.n_averaged = torchs.n_averaged.as_subclass(NoHostReads)
    with pytest.raises(AssertionError, match="read on the host"):
        torchs.update_parameters(model)
