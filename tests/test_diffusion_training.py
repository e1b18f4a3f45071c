"""DiffusionModule: DiT's loss terms against independent formulas, training through the CLI configs,
EMA, sample grids, FID at validation (the module's own and a FIDDuringValidation given to the Trainer),
failure isolation, resume and the pipeline export."""
from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDPMScheduler

from _configs import config_args
from _training_data import QUIET, make_cifar_npz, make_fashion_idx
from diffvision.cli import DiffvisionCLI
from diffvision.data import ImageDataModule
from diffvision.diffusion import GaussianDiffusionTerms
from diffvision.lightning import DiffusionModule, FIDDuringValidation

TINY_DIT = ["--model.init_args.transformer_kwargs",
            "{num_layers: 1, num_attention_heads: 6, attention_head_dim: 8, patch_size: 4}",
            "--model.init_args.sample_steps", "2", "--model.init_args.num_sample_images", "4",
            "--model.init_args.fid_num_samples", "0"]
DIFFUSION_CONFIGS = ["cifar10_dit+diff", "cifar10_dit", "cifar10_dit+gda", "cifar10_dit+diffv2",
                     "fashion_mnist_dit+diff"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    make_cifar_npz(base / "cifar10", per_class_train=4, per_class_test=2)  # 40 train, 20 test
    make_fashion_idx(base / "fashion", n_train=40, n_test=20)
    return SimpleNamespace(cifar=base / "cifar10", fashion=base / "fashion", cache=base / "cache")


def run_cli(config, data, root, *extra, subcommand="fit"):
    source = data.fashion if config.startswith("fashion") else data.cifar
    return DiffvisionCLI(args=[
        subcommand, *config_args(config), "--data.root", str(source),
        "--data.cache_dir", str(data.cache), "--data.num_workers", "0", "--data.batch_size", "10",
        "--data.eval_batch_size", "10", "--trainer.default_root_dir", str(root), *QUIET, *TINY_DIT, *extra])


def tiny_module(**kw) -> DiffusionModule:
    args = dict(transformer_kwargs={"num_layers": 1, "num_attention_heads": 6, "attention_head_dim": 8,
                                    "patch_size": 4}, img_size=8, in_chans=3, num_classes=4, sample_steps=2,
                num_sample_images=0, fid_num_samples=0)
    args.update(kw)
    return DiffusionModule(**args)


# ---------------------------------------------------------------------------------------------
# DiT's loss terms
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def terms():
    return GaussianDiffusionTerms(DDPMScheduler(num_train_timesteps=1000).betas).double()


def test_posterior_is_the_gaussian_product_of_the_forward_process(terms):
    betas = DDPMScheduler(num_train_timesteps=1000).betas.double()
    ac = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 5, 100, 500, 999])
    x0, xt = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    # q(x_{t-1}|x_0) = N(sqrt(ac_{t-1}) x0, 1 - ac_{t-1}); q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, beta_t)
    prec = 1 / (1 - ac[t - 1]) + (1 - betas[t]) / betas[t]
    mean = (ac[t - 1].sqrt() * x0[:, 0] / (1 - ac[t - 1]) + (1 - betas[t]).sqrt() * xt[:, 0] / betas[t]) / prec
    got_mean, got_log_var = terms.q_posterior(x0, xt, t)
    torch.testing.assert_close(got_mean[:, 0], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_log_var[:, 0].exp(), 1 / prec, rtol=1e-5, atol=0)
    # the same variance as diffusers' DDPM (fixed_small), which computes it in float32
    sched = DDPMScheduler(num_train_timesteps=1000)
    for s, p in zip(t, prec):
        assert math.isclose(float(sched._get_variance(int(s))), float(1 / p), rel_tol=1e-3)


def test_vlb_kl_matches_torch_distributions_and_vanishes_for_the_true_model(terms):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 50, 400, 999])
    ac = torch.cumprod(1 - DDPMScheduler(num_train_timesteps=1000).betas.double(), 0)[t].view(-1, 1, 1, 1)
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    got = terms.vb_terms_bpd(x0, xt, t, eps, v)
    q_mean, q_log_var = terms.q_posterior(x0, xt, t)
    p_mean, p_log_var = terms.p_mean_logvar(xt, t, eps, v)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(q_mean, (0.5 * q_log_var).exp()),
                                           torch.distributions.Normal(p_mean, (0.5 * p_log_var).exp()))
    torch.testing.assert_close(got, kl.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-6, atol=1e-9)
    exact = terms.vb_terms_bpd(x0, xt, t, noise, -torch.ones_like(v))  # true ε, v = −1: σ² = posterior σ̃²
    torch.testing.assert_close(exact, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-9)


def test_decoder_nll_at_t0_is_the_discretised_gaussian(terms):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1
    t = torch.zeros(2, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = math.sqrt(1 - 1e-4) * x0 + 0.01 * noise  # beta_0 = 1e-4
    eps = noise + 0.2 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # a good, imperfect model
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    mean, log_var = terms.p_mean_logvar(xt, t, eps, v)
    normal = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    nll = -(upper - lower).clamp(min=1e-12).log().mean(dim=(1, 2, 3)) / math.log(2)
    # DiT approximates the normal CDF with tanh: agreement to 0.2%
    torch.testing.assert_close(terms.vb_terms_bpd(x0, xt, t, eps, v), nll, rtol=2e-3, atol=0)


def test_vb_term_trains_only_the_variance_and_mse_only_the_noise():
    module = tiny_module(learn_sigma=True)
    out = torch.randn(2, 6, 8, 8, requires_grad=True)
    fake_model = lambda x_t, t, class_labels: SimpleNamespace(sample=out)  # noqa: E731
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    losses = module.diffusion_loss(fake_model, x0, torch.tensor([0, 1]), noise, torch.tensor([10, 300]))
    assert losses["mse"].item() == pytest.approx((out[:, :3] - noise).pow(2).mean().item(), rel=1e-6)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (grad_vb,) = torch.autograd.grad(losses["vb"], out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"], out)
    assert grad_vb[:, :3].abs().max() == 0 and grad_vb[:, 3:].abs().max() > 0  # frozen ε, as in DiT
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().max() > 0


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="class_dropout_prob"):
        tiny_module(class_dropout_prob=0.0, guidance_scale=4.0)
    with pytest.raises(ValueError, match="sampler"):
        tiny_module(sampler="euler-ish")
    with pytest.raises(ValueError, match="fid_num_samples"):
        tiny_module(fid_num_samples=-1)


def test_moved_names_stay_importable_from_their_old_homes():
    import diffvision.diffusion as diffusion
    import diffvision.lightning as lightning
    import diffvision.lightning.diffusion as lightning_diffusion

    assert lightning.GaussianDiffusionTerms is diffusion.GaussianDiffusionTerms
    assert lightning_diffusion.build_sampler is diffusion.build_sampler
    assert lightning_diffusion.SAMPLERS is diffusion.SAMPLERS


def test_fid_settings_become_the_callback_the_module_hands_to_the_trainer():
    module = tiny_module(fid_num_samples=6, fid_every_n_epochs=3, fid_guidance_scale=2.0, fid_batch_size=4)
    (callback,) = module.configure_callbacks()
    assert callback is module.fid_callback and isinstance(callback, FIDDuringValidation)
    assert (callback.num_samples, callback.every_n_epochs, callback.guidance_scale, callback.batch_size,
            callback.num_classes) == (6, 3, 2.0, 4, 4)
    assert tiny_module(fid_num_samples=0).configure_callbacks() == []
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        FIDDuringValidation(num_samples=10, batch_size=0)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got True"):
        FIDDuringValidation(num_samples=True)


def test_fid_callback_on_its_own(data, tmp_path):
    """A FIDDuringValidation given to the Trainer (the module's own FID off): val/fid at the epochs it is due."""
    module = tiny_module(img_size=32, num_classes=10)
    dm = ImageDataModule("cifar10_npz", root=str(data.cifar), augment="diffusion", batch_size=10, num_workers=0,
                         cache_dir=str(data.cache))
    calls, generate = [], module.generate
    module.generate = lambda *args, **kwargs: calls.append(args[0]) or generate(*args, **kwargs)
    fid = FIDDuringValidation(num_samples=4, every_n_epochs=2, batch_size=4)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=[fid], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=False)
    trainer.fit(module, dm)
    assert fid.error is None and math.isfinite(trainer.callback_metrics["val/fid"].item())
    assert calls == [[0, 1, 2, 3]]  # the second epoch's validation only; classes balanced
    results = trainer.validate(module, dm, verbose=False)  # outside fit: every validation computes it
    assert math.isfinite(results[0]["val/fid"]) and len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", DIFFUSION_CONFIGS)
def test_fast_dev_run_of_each_diffusion_config(config, data, tmp_path):
    cli = run_cli(config, data, tmp_path, "--trainer.fast_dev_run", "true")
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    cfg = cli.model.transformer.config
    fashion = config.startswith("fashion")
    assert (cfg.in_channels, cfg.sample_size, cfg.num_classes) == ((1, 28, 10) if fashion else (3, 32, 10))
    assert cli.model.transformer.out_channels == 2 * cfg.in_channels  # learned sigma
    expected = config.partition("+")[2] or "standard"
    assert cfg.attn_kind == expected
    assert cli.model.ema.n_averaged.item() == 1


def test_training_logs_samples_and_fid_then_exports_the_ema_pipeline(data, tmp_path):
    cli = run_cli("cifar10_dit+diff", data, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_val_batches",
                  "1", "--trainer.check_val_every_n_epoch", "1", "--model.init_args.fid_num_samples", "6",
                  "--model.init_args.fid_batch_size", "4", "--model.init_args.ema_decay", "0.5",
                  "--experiment", "dit")
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    fid = [float(r["val/fid"]) for r in rows if r.get("val/fid")]
    assert len(fid) == 1 and math.isfinite(fid[0]) and fid[0] > 0
    assert any(r.get("val/loss_ema") for r in rows) and any(r.get("train/vb") for r in rows)
    state = torch.load(log_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if "inception" in k or k.startswith("_fid")]  # the FID network stays out
    pngs = list((log_dir / "samples").glob("*.png"))
    assert len(pngs) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    assert "samples" in events.Tags()["images"]
    # export: the EMA weights (not the online ones) as a DiffDiTPipeline
    from diffvision.diffusion import DiffDiTPipeline

    module = cli.model
    out = module.export_pipeline(tmp_path / "pipe")
    pipe = DiffDiTPipeline.from_pretrained(str(out))
    ema, online = module.ema.module.state_dict(), module.transformer.state_dict()
    loaded = pipe.transformer.state_dict()
    assert any(not torch.equal(ema[k], online[k]) for k in ema)
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert pipe.get_label_ids(["cat", "truck"]) == [3, 9]  # id2label travels with the pipeline
    pipe.set_progress_bar_config(disable=True)
    mine = module.generate([1, 2], guidance_scale=2.0, seed=5)
    theirs = pipe([1, 2], guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                  output_type="pt").images
    torch.testing.assert_close(theirs, mine)
    # `test` evaluates the checkpoint's weights (loss + FID on the test split); `predict` samples per label
    test = run_cli("cifar10_dit+diff", data, tmp_path, "--experiment", "dit", "--ckpt_path", "last",
                   "--model.init_args.fid_num_samples", "6", "--model.init_args.fid_batch_size", "4",
                   "--trainer.limit_test_batches", "1", subcommand="test")
    metrics = test.trainer.callback_metrics
    assert math.isfinite(metrics["test/fid"].item()) and math.isfinite(metrics["test/loss_ema"].item())
    pred = run_cli("cifar10_dit+diff", data, tmp_path, "--experiment", "dit", "--ckpt_path", "last",
                   "--trainer.limit_predict_batches", "1", "--trainer.callbacks+=diffvision.lightning.PredictionWriter",
                   subcommand="predict")
    pred_dir = Path(pred.trainer.log_dir)
    rows = list(csv.DictReader(open(pred_dir / "predictions.csv")))
    assert len(rows) == 10 and all((pred_dir / r["file"]).is_file() for r in rows)


def test_a_failing_sample_or_fid_step_does_not_stop_training(data, tmp_path, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(DiffusionModule, "generate", broken)
    with caplog.at_level(logging.ERROR, logger="diffvision.lightning"):  # the module and its FID callback
        cli = run_cli("cifar10_dit+diff", data, tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_val_batches",
                      "1", "--trainer.check_val_every_n_epoch", "1", "--model.init_args.fid_num_samples", "4")
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 2
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 1  # 40 images / 10 per batch, 2 epochs
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "sample grid failed" in messages and "FID failed" in messages and "sampler exploded" in caplog.text
    assert cli.model.fid_callback.error == "RuntimeError: sampler exploded"


def test_diffusion_resume_restores_weights_and_ema_exactly(data, tmp_path):
    common = ["--trainer.max_epochs", "3", "--trainer.limit_val_batches", "1", "--model.init_args.ema_decay", "0.7",
              "--trainer.deterministic", "true"]
    run_cli("fashion_mnist_dit+diff", data, tmp_path, *common, "--experiment", "straight")
    run_cli("fashion_mnist_dit+diff", data, tmp_path, *common, "--experiment", "stopped",
            "--trainer.callbacks+=diffvision.lightning.StopAfterEpochs", "--trainer.callbacks.epochs", "1")
    run_cli("fashion_mnist_dit+diff", data, tmp_path, *common, "--experiment", "stopped", "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "stopped/version_0/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("ema.module.") for k in a) and a["ema.n_averaged"].item() == 12
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _RecordParams(pl.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, module, *args):  # runs before the module's own hook (EMA update)
        self.history.append({k: v.detach().double().clone() for k, v in module.transformer.named_parameters()})


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_exponential_average_of_the_trajectory(data, tmp_path, warmup):
    module = DiffusionModule(transformer_kwargs={"num_layers": 1, "num_attention_heads": 6, "attention_head_dim": 8,
                                                 "patch_size": 4}, img_size=32, in_chans=3, num_classes=10,
                             ema_decay=0.8, ema_warmup=warmup, num_sample_images=0, fid_num_samples=0)
    dm = ImageDataModule("cifar10_npz", root=str(data.cifar), augment="diffusion", batch_size=10, num_workers=0,
                         cache_dir=str(data.cache))
    recorder = _RecordParams()
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, dm)
    assert len(recorder.history) == 4
    names = list(recorder.history[0])
    if warmup:  # the reference: diffusers' EMAModel, whose default decay is min(decay, (1 + n) / (10 + n))
        from diffusers.training_utils import EMAModel

        start = [torch.zeros_like(recorder.history[0][k]).requires_grad_() for k in names]
        reference = EMAModel(start, decay=0.8)
        for params in recorder.history:  # its first step has decay 0: a copy, as ours
            reference.step([params[k].clone().requires_grad_() for k in names])
        ema = dict(zip(names, reference.shadow_params))
        assert ([round(module.ema_decay_at(n), 6) for n in (1, 2, 3, 100)]
                == [round(2 / 11, 6), 0.25, round(4 / 13, 6), 0.8])
    else:
        ema = dict(recorder.history[0])  # the first update copies the weights
        for params in recorder.history[1:]:
            ema = {k: 0.8 * ema[k] + 0.2 * params[k] for k in ema}
    got = dict(module.ema.module.named_parameters())
    for key, value in ema.items():
        torch.testing.assert_close(got[key].double(), value.double(), rtol=1e-6, atol=1e-7)


def test_diffusion_needs_images_in_minus_one_one(data):
    module = tiny_module(img_size=32, num_classes=10)
    dm = ImageDataModule("cifar10_npz", root=str(data.cifar), augment="basic", batch_size=10, num_workers=0,
                         cache_dir=str(data.cache))
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="augment: diffusion"):
        trainer.fit(module, dm)


def test_two_process_cpu_ddp_with_samples_and_fid(data, tmp_path):
    import os
    import shutil
    import subprocess

    script = shutil.which("diffvision", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "diffvision.cli"]
    args = ["fit", *config_args("cifar10_dit+diff"), "--data.root", str(data.cifar),
            "--data.cache_dir", str(data.cache), "--data.num_workers", "0", "--data.batch_size", "10",
            "--data.eval_batch_size", "4", "--trainer.default_root_dir", str(tmp_path), *QUIET, *TINY_DIT,
            "--model.init_args.fid_num_samples", "6", "--model.init_args.fid_batch_size", "4",
            "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--experiment", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log_dir = tmp_path / "ddp" / "version_0"
    ckpt = torch.load(log_dir / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # 40 images, 20 per rank, 10 per batch
    assert ckpt["state_dict"]["ema.n_averaged"].item() == 2
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    assert [r for r in rows if r.get("val/fid")], "no FID logged"
    assert len(list((log_dir / "samples").glob("*.png"))) == 1
