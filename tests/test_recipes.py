"""Issue 24's classifier pieces from the ecosystem: timm's parameter groups and layer decay, Mixup / CutMix
with soft-target cross-entropy, the weight EMA, timm's lr_base rule; the recipe overlays
(configs/recipes/light.yaml, deit.yaml) over every classification config; and older configs and
checkpoints meaning what they meant."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from _configs import config_args
from _training_data import CONFIGS, QUIET, make_cifar_npz
from diffvision.cli import DiffvisionCLI
from diffvision.experiments.specs import Job, fit_command, recipe_name
from diffvision.lightning import ImageClassifier
from diffvision.lightning.mixup import mix_batch
from diffvision.lightning.optim import step_rng
from test_configs import ParseOnlyCLI, Parsed

LEGACY = Path(__file__).parent / "data" / "legacy"
RECIPES = CONFIGS / "recipes"
TINY = {"depth": 2, "embed_dim": 48}
CLASSIFIER_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.yaml")
                            if "ImageClassifier" in p.read_text())


def classifier(name="diff_vit_tiny_patch4_32", **kwargs) -> ImageClassifier:
    return ImageClassifier(name, dict(TINY), num_classes=10, img_size=16, **kwargs)


def fake_trainer(total_steps=20, batches_per_epoch=5, batch_size=64):
    return SimpleNamespace(estimated_stepping_batches=total_steps, num_training_batches=batches_per_epoch,
                           accumulate_grad_batches=1, world_size=1, datamodule=SimpleNamespace(batch_size=batch_size))


def groups_by_params(groups) -> dict[frozenset, tuple]:
    return {frozenset(id(p) for p in g["params"]): (g["weight_decay"], g["lr"]) for g in groups}


def old_param_groups(model, no_weight_decay):
    """The grouping rule before issue 24 (diffvision.lightning.optim.param_groups at 454ae4f), as reference."""
    skip = set(no_weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [decay, no_decay]


# ---------------------------------------------------------------------------------------------
# Optimizer: timm's groups, layer decay, lr_base
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_param_groups_are_those_timm_create_optimizer_v2_builds(layer_decay):
    module = classifier(layer_decay=layer_decay)
    module._trainer = fake_trainer()
    ours = module.configure_optimizers()["optimizer"].param_groups
    timms = timm.optim.create_optimizer_v2(module.model, "adamw", lr=1e-3, weight_decay=0.05,
                                           layer_decay=layer_decay).param_groups
    # timm's scheduler multiplies each group's LR by its lr_scale; here the group starts there
    expected = {frozenset(id(p) for p in g["params"]): (g["weight_decay"], 1e-3 * g.get("lr_scale", 1.0))
                for g in timms}
    got = groups_by_params(ours)
    assert got.keys() == expected.keys()
    for key, (wd, lr) in expected.items():
        assert got[key][0] == wd and got[key][1] == pytest.approx(lr, rel=1e-12)
    if layer_decay:  # the embedding's LR is layer_decay^(depth + 1) of the head's
        lrs = sorted({g["lr"] for g in ours})
        assert lrs[0] == pytest.approx(1e-3 * layer_decay ** (TINY["depth"] + 1)) and lrs[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "diff_vit_tiny_patch4_32", "gda_vit_tiny_patch4_32",
                                  "diffv2_vit_tiny_patch4_32", "resnet18"])
def test_without_layer_decay_the_groups_are_those_of_before(name):
    module = ImageClassifier(name, {} if name == "resnet18" else dict(TINY), num_classes=10, img_size=16)
    module._trainer = fake_trainer()
    groups = module.configure_optimizers()["optimizer"].param_groups
    no_wd = module.model.no_weight_decay() if hasattr(module.model, "no_weight_decay") else ()
    assert [[id(p) for p in g["params"]] for g in groups] == \
        [[id(p) for p in ps] for ps in old_param_groups(module.model, no_wd)]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_layer_decay_lrs_follow_the_warmup_cosine_closed_form():
    module = classifier(layer_decay=0.5, warmup_steps=3, min_lr_ratio=0.1)
    module._trainer = fake_trainer(total_steps=12)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    scales = [g["lr_scale"] for g in opt.param_groups]
    for step in range(12):
        warm = (step + 1) / 3 if step < 3 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 9))
        for group, scale in zip(opt.param_groups, scales):
            assert group["lr"] == pytest.approx(1e-3 * scale * warm, rel=1e-9), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("scale,rule", [("linear", lambda r: r), ("sqrt", math.sqrt)])
def test_lr_base_scales_by_the_global_batch(scale, rule):
    module = classifier(lr_base=5e-4, lr_base_size=512, lr_base_scale=scale)
    module._trainer = fake_trainer(batch_size=128)
    module._trainer.accumulate_grad_batches = 2
    opt = module.configure_optimizers()["optimizer"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([5e-4 * rule(256 / 512)] * 2)


@pytest.mark.parametrize("kwargs,words", [
    ({"layer_decay": 1.5}, "layer_decay must be in (0, 1]"),
    ({"lr_base_scale": "cube"}, "unknown lr_base_scale 'cube'; accepted: ['linear', 'sqrt']"),
    ({"mixup_mode": "pairs", "mixup_alpha": 0.8}, "unknown mixup_mode 'pairs'; accepted: ['batch', 'pair', 'elem']"),
    ({"mixup_alpha": -1.0}, "mixup_alpha must be >= 0"),
    ({"mixup_switch_prob": 2.0}, "mixup_switch_prob must be in [0, 1], got 2.0"),
    ({"ema_decay": 1.0}, "ema_decay must be in [0, 1)"),
    ({"drop_path_rate": 1.0}, "drop_path_rate must be in [0, 1), got 1.0"),
])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(ValueError) as err:
        module = classifier(**kwargs)
        module._trainer = fake_trainer()
        module.configure_optimizers()
    assert words in str(err.value)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------

def test_mixup_loss_is_timms_soft_target_cross_entropy_of_timms_mixed_batch():
    module = classifier("vit_tiny_patch4_32", mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1).eval()
    module.log = lambda *a, **k: None
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 9])
    loss = module.training_step((x.clone(), y), 3)
    # the reference: timm's Mixup with the same draws (numpy's generator seeded as the step seeds it)
    from diffvision.lightning.optim import run_seed, step_seed

    seed = step_seed(run_seed(), 0, 3, 0)
    with step_rng(seed, torch.device("cpu")):
        mixed, target = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)(x.clone(), y)
    with torch.no_grad():
        expected = SoftTargetCrossEntropy()(module.model(mixed), target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.equal(mixed, x)  # it mixed something
    assert target.sum(-1).allclose(torch.ones(6)) and target.min() >= 0.1 / 10 - 1e-7  # smoothing folded in


def test_mixup_of_an_odd_batch_uses_its_first_images_and_leaves_the_input_alone():
    mixup = Mixup(mixup_alpha=1.0, num_classes=10)
    x, y = torch.randn(5, 3, 8, 8), torch.arange(5)
    before = x.clone()
    mixed, labels, soft = mix_batch(mixup, x, y)
    assert mixed.shape[0] == labels.shape[0] == soft.shape[0] == 4 and torch.equal(labels, y[:4])
    assert torch.equal(x, before)


def test_without_mixup_the_step_is_todays_label_smoothed_cross_entropy():
    module = classifier("vit_tiny_patch4_32", label_smoothing=0.1).eval()
    module.log = lambda *a, **k: None
    assert module.mixup is None
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 9])
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(module.model(x), y, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Recipes as overlays, the sweep, the CLI
# ---------------------------------------------------------------------------------------------

def parse(*args):
    try:
        ParseOnlyCLI(args=["fit", *args])
    except Parsed as parsed:
        return parsed.config
    raise AssertionError("not parsed")


@pytest.mark.parametrize("config", CLASSIFIER_CONFIGS)
def test_light_overlay_changes_nothing_of_any_classification_config(config, tmp_path):
    plain = parse(*config_args(config), "--trainer.default_root_dir", str(tmp_path)).as_dict()
    light = parse(*config_args(config), "--config", str(RECIPES / "light.yaml"),
                  "--trainer.default_root_dir", str(tmp_path)).as_dict()
    for cfg in (plain, light):
        cfg.pop("config")
    assert light == plain


@pytest.mark.parametrize("config", CLASSIFIER_CONFIGS)
def test_deit_overlay_sets_the_recipe_over_any_classification_config(config, tmp_path):
    cfg = parse(*config_args(config), "--config", str(RECIPES / "deit.yaml"), "--trainer.default_root_dir", str(tmp_path))
    base = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]
    assert model["model_name"] == base["model"]["init_args"]["model_name"]  # the config's model stays
    assert model["model_kwargs"] == base["model"]["init_args"].get("model_kwargs")
    assert (model["mixup_alpha"], model["cutmix_alpha"], model["mixup_switch_prob"], model["label_smoothing"],
            model["drop_path_rate"], model["lr_base"], model["lr_base_size"]) == (0.8, 1.0, 0.5, 0.1, 0.1, 5e-4, 512)
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.05
    assert model["ema"] is True and model["warmup_epochs"] == 5 and model["lr_schedule"] == "cosine"
    assert (data["augment"], data["auto_augment"], data["reprob"], data["augment_on_device"]) == \
        ("timm", "rand-m9-mstd0.5-inc1", 0.25, False)
    assert data["batch_size"] == base["data"]["batch_size"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_cifar_npz(tmp_path_factory.mktemp("cifar10"), per_class_train=2, per_class_test=1)


def fit(cifar, root, *args):
    return DiffvisionCLI(args=["fit", *args, "--data.root", str(cifar), "--data.cache_dir", str(root / "cache"),
                               "--data.num_workers", "0", "--data.batch_size", "6", "--data.eval_batch_size", "10",
                               "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
                               "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", *QUIET])


@pytest.mark.parametrize("recipe", ["light", "deit"])
def test_each_recipe_trains_a_tiny_model(recipe, cifar, tmp_path):
    cli = fit(cifar, tmp_path, "--config", str(CONFIGS / "cifar10_vit_fractions.yaml"),
              "--config", str(RECIPES / f"{recipe}.yaml"),
              "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}")
    module = cli.model
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert (module.mixup is not None, module.ema is not None) == ((True, True) if recipe == "deit" else (False, False))
    assert (tmp_path / f"cifar10_vit_fractions_{recipe}").is_dir()  # the recipe names the run
    if recipe == "deit":
        lr = 5e-4 * 6 / 512
        assert [g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups] == pytest.approx([lr] * 2)
        assert module.hparams.model_kwargs["drop_path_rate"] == 0.1


def test_sweep_recipe_key_and_extra_config_stack_the_overlay(tmp_path):
    job = Job("diff", "diff_vit_tiny_patch4_32", {}, 0.1, 1, 10, 5, tmp_path, 1.0)
    spec = {"task": "classification", "config": "configs/cifar10_vit_fractions.yaml"}
    extra = Job(**{**job.__dict__, "extra": ["--config", "configs/recipes/deit.yaml"]})
    assert (recipe_name(spec, job), recipe_name({**spec, "recipe": "configs/recipes/deit.yaml"}, job),
            recipe_name(spec, extra)) == ("light", "deit", "deit")  # what result.json records
    for command in (fit_command({**spec, "recipe": "configs/recipes/deit.yaml"}, job), fit_command(spec, extra)):
        args = command[command.index("fit") + 1:]
        args = [str(CONFIGS.parent / a) if a.startswith("configs/") else a for a in args]
        args = args[:args.index("--ckpt_path")]
        cfg = parse(*args)
        assert cfg["data"]["augment"] == "timm" and cfg["model"]["init_args"]["mixup_alpha"] == 0.8
        assert cfg["model"]["init_args"]["model_name"] == "diff_vit_tiny_patch4_32"  # the job's, not the config's
        assert cfg["data"]["data_fraction"] == 0.1 and cfg["trainer"]["max_epochs"] == 10


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------

def test_ema_follows_the_closed_form_and_is_what_evaluation_and_export_use(cifar, tmp_path):
    import lightning.pytorch as pl

    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.model.head.weight.detach().clone())  # after this step's optimizer step

    cli = DiffvisionCLI(args=["--config", str(CONFIGS / "cifar10_vit_fractions.yaml"),
                              "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}",
                              "--model.init_args.ema", "true", "--model.init_args.ema_decay", "0.5",
                              "--model.init_args.ema_warmup", "false",
                              "--data.augment_on_device", "false",
                              "--data.root", str(cifar), "--data.cache_dir", str(tmp_path / "cache"),
                              "--data.num_workers", "0", "--data.batch_size", "6", "--trainer.default_root_dir",
                              str(tmp_path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                              "--trainer.limit_val_batches", "0", *QUIET], run=False)
    cli.trainer.callbacks.insert(0, Record())
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    expected = seen[0]  # the first update copies, then e <- 0.5 e + 0.5 w
    for w in seen[1:]:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(module.ema.module.head.weight, expected)
    assert not torch.equal(module.model.head.weight, expected)
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(module(x), module.ema.module(x))
    module.export(tmp_path / "export")
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    torch.testing.assert_close(exported.head.weight, expected)


def test_old_checkpoint_resumes_with_todays_code_and_with_the_deit_recipe(tmp_path, cifar):
    """tests/data/legacy/classifier.ckpt (written by commit d999583, 2 steps of a 1-epoch run with its
    config): the config still parses, and fit resumes it for more steps, plainly and with the DeiT overlay
    (whose EMA then starts from the checkpoint's weights)."""
    config = yaml.safe_load((LEGACY / "classifier_config.yaml").read_text())
    config["data"].update(root=str(cifar), cache_dir=str(tmp_path / "cache"))
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["experiment"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoint = torch.load(LEGACY / "classifier.ckpt", map_location="cpu", weights_only=False)
    for recipe in ([], ["--config", str(RECIPES / "deit.yaml")]):
        cli = DiffvisionCLI(args=["fit", "--config", str(path), *recipe, "--trainer.max_epochs", "2",
                                  "--trainer.limit_train_batches", "2", "--ckpt_path", str(LEGACY / "classifier.ckpt"),
                                  *QUIET])
        module = cli.model
        assert cli.trainer.global_step == checkpoint["global_step"] + 2
        if recipe:
            assert module.ema is not None and int(module.ema.n_averaged) == 1 + 2


def test_old_config_means_the_same_lr_per_step(tmp_path):
    """The legacy run config (torch.optim.AdamW + warmup_epochs + lr_schedule cosine) builds today's
    schedule: the closed form, per group, with the groups of before."""
    config = yaml.safe_load((LEGACY / "classifier_config.yaml").read_text())
    init = config["model"]["init_args"]
    module = ImageClassifier(init["model_name"], init["model_kwargs"], num_classes=10, img_size=32,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=init["optimizer"]["init_args"]["lr"],
                                                                        weight_decay=0.05),
                             warmup_epochs=init["warmup_epochs"], lr_schedule=init["lr_schedule"])
    module._trainer = fake_trainer(total_steps=40, batches_per_epoch=2)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    warmup = 5 * 2
    for step in range(40):
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / 30))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor] * 2, rel=1e-9)
        opt.step()
        sched.step()


def test_an_ema_checkpoint_into_a_config_without_ema_says_so(cifar, tmp_path):
    cli = fit(cifar, tmp_path, "--config", str(CONFIGS / "cifar10_vit_fractions.yaml"), "--config",
              str(RECIPES / "deit.yaml"), "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}")
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    plain = ImageClassifier("diff_vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=10, img_size=32)
    problems = plain.checkpoint_mismatch(checkpoint)
    assert problems[0].startswith("the checkpoint keeps an EMA of its weights, this config does not: set "
                                  "model.init_args.ema true")
    assert cli.model.checkpoint_mismatch(checkpoint) == []
