"""RouterMonitor: DyDiLA's router use per layer against a recount of the validation tokens' choices
(float64 numpy argmax of x Wᵀ on the attention layers' captured inputs), and its normalised entropy."""
from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from diffvision.attention import DynamicDifferentialLinearAttention
from diffvision.lightning import ImageClassifier, RouterMonitor, read_epoch_metrics


def _loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    xv, yv = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(xv, yv), batch_size=4)


def test_router_use_matches_a_recount_of_the_validation_tokens(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier("dydila_vit_tiny_patch4_32", model_kwargs={"depth": 2, "embed_dim": 64}, warmup_epochs=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[RouterMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(module, train, val)
    logged = read_epoch_metrics(trainer.logger.log_dir)[0]

    model = module.evaluated_model.eval()
    layers = [m for m in model.modules() if isinstance(m, DynamicDifferentialLinearAttention)]
    assert len(layers) == 2
    inputs = {i: [] for i in range(len(layers))}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: inputs[i].append(a[0].detach()))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for x, _ in val:
            model(x)
    for h in hooks:
        h.remove()
    checked = 0
    for i, layer in enumerate(layers):
        x = torch.cat(inputs[i]).double().numpy().reshape(-1, 64)  # (images x tokens, width)
        routers = layer.token_routers()
        assert {"q_router", "k_router"} <= set(routers)
        for name, router in routers.items():
            choice = (x @ router.weight.detach().double().numpy().T).argmax(-1)
            share = np.bincount(choice, minlength=router.out_features) / choice.size
            for c, s in enumerate(share):
                assert logged[f"router/layer_{i}/{name}_use_{c}"] == pytest.approx(s, abs=1e-6)  # logged as float32
            used = share[share > 0]
            entropy = float(-(used * np.log(used)).sum() / np.log(len(share)))
            assert logged[f"router/layer_{i}/{name}_entropy"] == pytest.approx(entropy, abs=1e-6)
            checked += 1
    assert not any(k.startswith("router/layer_2") for k in logged)  # one entry per dydila layer, no more
    assert checked >= 4


def test_a_model_without_dydila_logs_no_router_use(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier("vit_tiny_patch4_32", model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2}, warmup_epochs=0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[RouterMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, *_loaders())
    assert not any(k.startswith("router/") for k in read_epoch_metrics(trainer.logger.log_dir)[0])
