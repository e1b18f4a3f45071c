"""Training through the real CLI and YAML configs: classifiers, links, run layout, resume, DDP, exports."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from _configs import config_args
from _training_data import CONFIGS, QUIET, REPO, make_cifar_npz, make_fashion_idx
from diffvision.cli import DiffvisionCLI
from diffvision.data import stratified_subset
from diffvision.lightning import ImageClassifier, lr_factor

TINY_VIT = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}"]
CLASSIFIER_CONFIGS = ["cifar10_vit", "cifar10_vit+diff", "cifar10_vit+gda", "cifar10_vit+diffv2",
                      "fashion_mnist_vit", "fashion_mnist_vit+diff", "fashion_mnist_vit+gda"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    make_cifar_npz(base / "cifar10", per_class_train=10, per_class_test=4)  # 100 train, 40 test
    make_fashion_idx(base / "fashion", n_train=100, n_test=40)
    return SimpleNamespace(cifar=base / "cifar10", fashion=base / "fashion", cache=base / "cache")


def run_cli(config: str, data, root: Path, *extra: str, subcommand: str = "fit", run: bool = True):
    source = data.fashion if config.startswith("fashion") else data.cifar
    args = ([subcommand] if run else []) + [
        *config_args(config), "--data.root", str(source),
        "--data.cache_dir", str(data.cache), "--data.num_workers", "0", "--data.batch_size", "20",
        "--trainer.default_root_dir", str(root), *QUIET, *extra]
    return DiffvisionCLI(args=args, run=run)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Every classifier config trains through the CLI
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CLASSIFIER_CONFIGS)
def test_fast_dev_run_of_each_classifier_config(config, data, tmp_path):
    cli = run_cli(config, data, tmp_path, "--trainer.fast_dev_run", "true", *TINY_VIT)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    model = cli.model.model
    fashion = config.startswith("fashion")
    assert model.patch_embed.proj.in_channels == (1 if fashion else 3)  # linked in_chans
    assert model.patch_embed.num_patches == (49 if fashion else 64)  # linked img_size (28 or 32), patch 4
    assert model.num_classes == 10
    attn = type(model.blocks[0].attn).__name__
    expected = {"diff": "DifferentialAttention", "gda": "GroupedDifferentialAttention",
                "diffv2": "DifferentialAttentionV2", "": "Attention"}
    assert attn == expected[config.partition("+")[2]]


@pytest.mark.parametrize("config", ["cifar10_vit+diff", "cifar10_dit+diff"])
def test_bf16_mixed_precision_runs(config, data, tmp_path):
    extra = (["--model.init_args.transformer_kwargs",
              "{num_layers: 1, num_attention_heads: 6, attention_head_dim: 8, patch_size: 4}",
              "--model.init_args.sample_steps", "2", "--model.init_args.num_sample_images", "2",
              "--model.init_args.fid_num_samples", "0"] if "dit" in config else TINY_VIT)
    cli = run_cli(config, data, tmp_path, "--trainer.fast_dev_run", "true", *extra, "--trainer.precision", "bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.state.finished
    assert math.isfinite(cli.trainer.callback_metrics["train/loss_step"].item())


def test_default_callbacks_and_loggers(data, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from diffvision.lightning import LastCheckpoint

    cli = DiffvisionCLI(args=["--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(data.cifar),
                              "--trainer.default_root_dir", str(tmp_path), *TINY_VIT], run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert RichProgressBar in kinds and LearningRateMonitor in kinds and kinds[-1] is LastCheckpoint
    assert [type(lg) for lg in cli.trainer.loggers][0] is TensorBoardLogger
    assert isinstance(cli.trainer.loggers[1], CSVLogger)
    assert cli.trainer.loggers[0].log_dir == cli.trainer.loggers[1].log_dir == str(tmp_path / "cifar10_vit/version_0")


def test_print_config_through_the_console_script():
    script = shutil.which("diffvision", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "diffvision.cli"]
    out = subprocess.run(cmd + ["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--config",
                                str(CONFIGS / "kinds" / "diff.yaml"), "--print_config"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["class_path"] == "diffvision.lightning.ImageClassifier"
    # the recipe and the kind still to apply (the run's config.yaml records the built twin: test_configs.py)
    assert cfg["model"]["init_args"]["model_name"] == "vit_tiny_patch4_32" and cfg["attn_kind"] == "diff"
    assert cfg["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert "num_classes" not in cfg["model"]["init_args"]  # linked from the data module, not configured
    assert cfg["data"]["dataset"] == "cifar10_npz" and cfg["checkpoint"]["monitor"] == "val/acc1"


def test_data_properties_are_linked_into_the_model(data, tmp_path):
    cli = run_cli("fashion_mnist_vit", data, tmp_path, *TINY_VIT, "--data.img_size", "32", run=False)
    hp = cli.model.hparams
    assert (hp.num_classes, hp.img_size, hp.in_chans) == (10, 32, 1)
    assert hp.class_names == cli.datamodule.class_names and hp.class_names[-1] == "Ankle boot"
    assert cli.model.model.patch_embed.num_patches == 64


def test_plain_timm_models_work_too():
    vit = ImageClassifier("vit_tiny_patch16_224", {"patch_size": 8, "depth": 1}, num_classes=5, img_size=32,
                          in_chans=1)
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    cnn = ImageClassifier("resnet10t", num_classes=3, img_size=32, in_chans=3)  # takes no img_size: left out
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 3) and not cnn.top5


# ---------------------------------------------------------------------------------------------
# A real run: layout, subset file, export, test, predict
# ---------------------------------------------------------------------------------------------

def test_fit_run_layout_export_test_and_predict(data, tmp_path):
    cli = run_cli("cifar10_vit+diff", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "2",
                  "--data.data_fraction", "0.5", "--data.fraction_seed", "3", "--experiment", "exp",
                  "--trainer.callbacks+=diffvision.lightning.ExportOnFitEnd")
    log_dir = tmp_path / "exp" / "version_0"
    assert Path(cli.trainer.log_dir) == log_dir
    for name in ("config.yaml", "hparams.yaml", "metrics.csv", "subset_indices.json", "checkpoints/last.ckpt"):
        assert (log_dir / name).is_file(), name
    assert list(log_dir.glob("events.out.tfevents.*"))
    # the subset file holds exactly the stratified subset of the training labels
    subset = json.loads((log_dir / "subset_indices.json").read_text())
    with np.load(data.cifar / "train.npz") as d:
        labels = d["labels"].astype(np.int64)
    assert subset["indices"] == stratified_subset(labels, 0.5, 3).tolist()
    assert subset["num_samples"] == 50 and set(subset["per_class"].values()) == {5}
    rows = read_csv_rows(log_dir / "metrics.csv")
    val = [r for r in rows if r.get("val/acc1")]
    assert [int(r["epoch"]) for r in val] == [0, 1]
    # the export (ExportOnFitEnd) reloads with timm and gives the module's logits
    module = cli.model.eval()
    reloaded = timm.create_model(f"local-dir:{log_dir / 'export'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), module(x), rtol=0, atol=0)
    cfg = reloaded.pretrained_cfg
    assert tuple(cfg["mean"]) == pytest.approx(cli.datamodule.mean) and tuple(cfg["input_size"]) == (3, 32, 32)
    assert json.loads((log_dir / "export" / "config.json").read_text())["label_names"][0] == "airplane"
    # `test --ckpt_path last` evaluates the last weights on the same held-out split as validation
    test = run_cli("cifar10_vit+diff", data, tmp_path, *TINY_VIT, "--experiment", "exp", "--ckpt_path", "last",
                   subcommand="test")
    assert test.trainer.callback_metrics["test/acc1"].item() == pytest.approx(float(val[-1]["val/acc1"]), abs=1e-6)
    pred = run_cli("cifar10_vit+diff", data, tmp_path, *TINY_VIT, "--experiment", "exp", "--ckpt_path", "last",
                   "--trainer.callbacks+=diffvision.lightning.PredictionWriter", subcommand="predict")
    rows = read_csv_rows(Path(pred.trainer.log_dir) / "predictions.csv")
    assert len(rows) == 40 and {r["label"] for r in rows} == {str(c) for c in range(10)}
    # `index` is the stored row of the test split, whatever order the loader served it in
    stored = np.load(data.cifar / "test.npz")["labels"]
    assert sorted(int(r["index"]) for r in rows) == list(range(40))
    assert all(int(r["label"]) == stored[int(r["index"])] for r in rows)
    accuracy = np.mean([r["label"] == r["prediction"] for r in rows])
    assert accuracy == pytest.approx(float(val[-1]["val/acc1"]), abs=1e-6)


def test_ckpt_path_last_without_a_checkpoint(data, tmp_path):
    with pytest.warns(UserWarning, match="starts from scratch"):
        cli = run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "1",
                      "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--ckpt_path", "last")
    assert cli.trainer.global_step == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--experiment", "never_trained", "--ckpt_path", "last",
                subcommand="validate")


# ---------------------------------------------------------------------------------------------
# Resume: stopped after epoch 1, resumed with --ckpt_path last == never stopped
# ---------------------------------------------------------------------------------------------

def test_resume_with_ckpt_path_last_matches_an_uninterrupted_run(data, tmp_path):
    common = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48, drop_path_rate: 0.2}",
              "--trainer.max_epochs", "3", "--trainer.deterministic", "true", "--data.augment", "basic"]
    run_cli("cifar10_vit+diff", data, tmp_path, *common, "--experiment", "straight")
    run_cli("cifar10_vit+diff", data, tmp_path, *common, "--experiment", "stopped",
            "--trainer.callbacks+=diffvision.lightning.StopAfterEpochs", "--trainer.callbacks.epochs", "1")
    first = torch.load(tmp_path / "stopped/version_0/checkpoints/last.ckpt", weights_only=False)
    assert first["global_step"] == 5  # 100 images / 20 per batch, one epoch
    run_cli("cifar10_vit+diff", data, tmp_path, *common, "--experiment", "stopped", "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight/version_0/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "stopped/version_0/checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 15
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # the resumed run continued its own log directory, keeping the first epoch's rows
    assert not (tmp_path / "stopped" / "version_1").exists()
    epochs = [int(r["epoch"]) for r in read_csv_rows(tmp_path / "stopped/version_0/metrics.csv") if r.get("val/acc1")]
    assert epochs == [0, 1, 2]
    # resuming on another subset is refused before the run's config.yaml is touched
    config = (tmp_path / "stopped/version_0/config.yaml").read_text()
    with pytest.raises(ValueError, match="different data subset"):
        run_cli("cifar10_vit+diff", data, tmp_path, *common, "--trainer.max_epochs", "4", "--experiment", "stopped",
                "--data.data_fraction", "0.5", "--ckpt_path", "last")
    assert (tmp_path / "stopped/version_0/config.yaml").read_text() == config


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes with gloo
# ---------------------------------------------------------------------------------------------

def test_two_process_cpu_ddp(data, tmp_path):
    script = shutil.which("diffvision", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "diffvision.cli"]
    args = ["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(data.cifar),
            "--data.cache_dir", str(data.cache), "--data.num_workers", "0", "--data.batch_size", "20",
            "--trainer.default_root_dir", str(tmp_path), *QUIET, *TINY_VIT, "--trainer.max_epochs", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--experiment", "ddp"]
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp/version_0/checkpoints/last.ckpt", weights_only=False)
    # each rank sees half of the 100 images: ceil(50 / 20) = 3 steps per epoch, not 5
    assert ckpt["global_step"] == 2 * math.ceil(50 / 20)
    assert "distributed_backend=gloo" in out.stderr + out.stdout
    assert (tmp_path / "ddp/version_0/subset_indices.json").is_file()
    assert not (tmp_path / "ddp/version_1").exists()  # one run directory for both ranks


# ---------------------------------------------------------------------------------------------
# The module's maths: accuracy, loss, schedule, weight-decay groups, compile
# ---------------------------------------------------------------------------------------------

def test_logged_accuracy_equals_a_hand_computation():
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=16)
    x = torch.randn(23, 3, 16, 16)
    with torch.no_grad():
        logits = module.eval()(x).double()
    y = torch.randint(0, 10, (23,))
    y[:9] = logits[:9].argmax(-1)  # make top-1 far from chance
    top5 = logits.topk(5, dim=-1).indices
    expected_top1 = (logits.argmax(-1) == y).double().mean().item()
    expected_top5 = (top5 == y[:, None]).any(-1).double().mean().item()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    out = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=7))[0]  # uneven batches: 7,7,7,2
    assert out["val/acc1"] == pytest.approx(expected_top1, abs=1e-7) and expected_top1 >= 9 / 23
    assert out["val/acc5"] == pytest.approx(expected_top5, abs=1e-7)
    expected_loss = F.cross_entropy(logits, y).item()  # val/loss: mean over the batches' means
    batch_losses = [F.cross_entropy(logits[i:i + 7], y[i:i + 7]).item() for i in range(0, 23, 7)]
    weights = [min(7, 23 - i) for i in range(0, 23, 7)]
    assert out["val/loss"] == pytest.approx(np.average(batch_losses, weights=weights), rel=1e-5)
    assert out["val/loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_training_loss_is_label_smoothed_cross_entropy():
    module = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=16,
                             label_smoothing=0.2)
    module.log = lambda *a, **k: None
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 9])
    module.train()
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        logp = torch.log_softmax(module(x).double(), -1)
    eps = 0.2  # (1 - ε)·NLL + ε·mean over classes of −log p (Szegedy et al., 2016)
    expected = ((1 - eps) * -logp[torch.arange(4), y] + eps * -logp.mean(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def fake_trainer(total_steps: int, batches_per_epoch: int):
    return SimpleNamespace(estimated_stepping_batches=total_steps, num_training_batches=batches_per_epoch,
                           accumulate_grad_batches=1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    module = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=16,
                             lr_schedule=schedule, warmup_epochs=0.6, warmup_steps=1, min_lr_ratio=0.1)
    module._trainer = fake_trainer(total_steps=20, batches_per_epoch=5)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    warmup, total, base = 1 + round(0.6 * 5), 20, 1e-3
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    for s, lr in enumerate(lrs):
        if s < warmup:
            expected = base * (s + 1) / warmup
        else:
            p = (s - warmup) / (total - warmup)
            decay = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[schedule]
            expected = base * (decay if schedule == "constant" else 0.1 + 0.9 * decay)
        assert lr == pytest.approx(expected, rel=1e-9), s
    assert lr_factor(0, 0, 10, "cosine") == 1.0


def test_weight_decay_skips_norms_biases_lambdas_and_position_embeddings():
    module = ImageClassifier("diff_vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48, "lambda_mode": "reparam"},
                             num_classes=10, img_size=16)  # learned λ: λ vectors to keep out of the decay
    module._trainer = fake_trainer(10, 5)
    groups = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "blocks.0.attn.lambda_q1", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"} <= decay
    assert all(module.model.get_parameter(n).ndim >= 2 for n in decay)


def test_compile_flag_keeps_the_state_dict_and_outputs():
    torch.manual_seed(0)
    plain = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=16)
    compiled = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=16,
                               compile=True, compile_kwargs={"backend": "eager"})
    compiled.load_state_dict(plain.state_dict())
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compiled.eval()(x), plain.eval()(x))
