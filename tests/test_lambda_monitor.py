"""LambdaMonitor: the λ it logs per layer against λ recomputed in float64 from the trained parameters
(the paper's reparameterisation; DIFF V2's σ(W_λ x) over the validation tokens), and result.json's copy."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from diffvision.experiments.results import lambda_per_layer, run_record
from diffvision.lightning import ImageClassifier, LambdaMonitor, read_epoch_metrics

DEPTH = 2
EPOCHS = 3


def _loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    xv = torch.randn(10, 3, 32, 32, generator=g)
    yv = torch.randint(0, 10, (10,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(xv, yv), batch_size=4)


def _fit(tmp_path, model_name: str, every_n_epochs: int = 1, **model_kwargs):
    pl.seed_everything(0)
    heads = {"noise_heads": 1} if model_name.startswith("gda") else {}   # 2 heads (GDA: 2 signal : 1 noise)
    module = ImageClassifier(model_name, model_kwargs={"depth": DEPTH, "embed_dim": 96, "num_heads": 2, **heads, **model_kwargs},
                             warmup_epochs=0)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[LambdaMonitor(every_n_epochs)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(module, train, val)
    return module, read_epoch_metrics(trainer.logger.log_dir), val


def _reparam_lambda(attn) -> float:
    q1, k1, q2, k2 = (p.detach().double() for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2))
    return math.exp(float(q1 @ k1)) - math.exp(float(q2 @ k2)) + attn.lambda_init


@pytest.mark.parametrize("model_name", ["diff_vit_tiny_patch4_32", "gda_vit_tiny_patch4_32"])
def test_logged_lambda_is_the_papers_reparameterisation(tmp_path, model_name):
    module, metrics, _ = _fit(tmp_path, model_name, lambda_init="schedule", lambda_mode="reparam")
    final = metrics[EPOCHS - 1]
    expected = [_reparam_lambda(block.attn) for block in module.model.blocks]
    assert lambda_per_layer(final) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # λ moved during training: the first epoch's values are not the last's
    first = lambda_per_layer(metrics[0])
    assert first != pytest.approx(lambda_per_layer(final), rel=1e-9, abs=1e-12)
    assert all(f"lambda/layer_{i}" in metrics[e] for e in range(EPOCHS) for i in range(DEPTH))


def test_fixed_lambda_is_lambda_init_every_other_epoch(tmp_path):
    _, metrics, _ = _fit(tmp_path, "diff_vit_tiny_patch4_32", every_n_epochs=2, lambda_init=0.8, lambda_mode="fixed")
    assert lambda_per_layer(metrics[1]) == pytest.approx([0.8] * DEPTH)
    assert lambda_per_layer(metrics[0]) is None                    # epoch 1 of 3 is not a multiple of 2 ...
    assert lambda_per_layer(metrics[EPOCHS - 1]) == pytest.approx([0.8] * DEPTH)   # ... the last always is


def test_diffv2_lambda_is_the_mean_sigmoid_over_validation_tokens(tmp_path):
    module, metrics, val = _fit(tmp_path, "diffv2_vit_tiny_patch4_32")
    model = module.model.double().eval()
    sums, count = [0.0] * DEPTH, 0
    with torch.no_grad():
        for x, _ in val:  # the block inputs recomputed through timm's own forward pieces, in float64
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x.double()))))
            for i, block in enumerate(model.blocks):
                lam = torch.sigmoid(block.norm1(tokens) @ block.attn.lambda_proj.weight.T)
                sums[i] += float(lam.sum())
                tokens = block(tokens)
            count += lam.numel()
    assert lambda_per_layer(metrics[EPOCHS - 1]) == pytest.approx([s / count for s in sums], rel=1e-5)


def test_standard_attention_logs_no_lambda_and_result_says_none(tmp_path):
    _, metrics, _ = _fit(tmp_path, "vit_tiny_patch4_32")
    assert not any(k.startswith("lambda/") for m in metrics.values() for k in m)
    record = run_record("classification", metrics, kind="standard", fraction=1.0, seed=0, epochs=EPOCHS, params=1,
                        wall_s=1.0, attempts=1, device="CPU", command="", log_dir=str(tmp_path))
    assert record["lambda_per_layer"] is None


def test_result_record_takes_lambda_of_the_last_epoch(tmp_path):
    _, metrics, _ = _fit(tmp_path, "diff_vit_tiny_patch4_32", lambda_init=0.5, lambda_mode="reparam")
    record = run_record("classification", metrics, kind="diff", fraction=1.0, seed=0, epochs=EPOCHS, params=1,
                        wall_s=1.0, attempts=1, device="CPU", command="", log_dir=str(tmp_path))
    assert record["lambda_per_layer"] == [metrics[EPOCHS - 1][f"lambda/layer_{i}"] for i in range(DEPTH)]


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int, got 0"):
        LambdaMonitor(every_n_epochs=0)


@pytest.mark.parametrize("attn_kind", ["diff", "diffv2"])
def test_an_ema_copy_does_not_add_layers(attn_kind):
    """The DiT module holds its transformer and an EMA copy of it: λ is logged once per block, for the
    trained transformer (issue 16's first DiT runs logged 2 x num_layers values)."""
    from diffvision.lightning import DiffusionModule
    from diffvision.lightning.lambda_monitor import differential_layers

    module = DiffusionModule(attn_kind=attn_kind, img_size=8, num_classes=2, fid_num_samples=0, num_sample_images=0,
                             transformer_kwargs={"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8,
                                                 "patch_size": 2})
    layers = differential_layers(module)
    assert len(layers) == 3
    trained = [m for m in module.transformer.modules() if m in layers]
    assert trained == layers                        # the transformer's own layers, in block order


@pytest.mark.parametrize("model_name", ["linear_vit_tiny_patch4_32", "dydila_vit_tiny_patch4_32"])
def test_linear_attention_layers_are_not_differential_layers(model_name):
    """LambdaMonitor's layer numbers count DIFF / GDA / DIFF V2 modules only: the linear kinds have no λ of
    that kind (dydila's λ is routed per token from a bank), so they are not counted."""
    import timm

    import diffvision.models  # noqa: F401  (registers the timm names)
    from diffvision.attention import attention_layers
    from diffvision.lightning.lambda_monitor import differential_layers

    model = timm.create_model(model_name, depth=2)
    assert len(list(attention_layers(model))) == 2
    assert differential_layers(model) == []
