"""The ``timm`` augmentation preset (timm.data.create_transform in the loader workers), the rule of which
preset runs where, the ImageNet-style imagefolder path, and train/bench_loader.py."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from _training_data import CONFIGS, QUIET, make_fashion_idx, make_imagefolder
from diffvision.cli import DiffvisionCLI
from diffvision.data import TIMM_OPTIONS, ImageDataModule, TimmTransform
from diffvision.data.timm_augment import keep_posterize_zero_bits

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "interpolation": "bicubic"}
# one non-default value per option, as timm's create_transform takes it
OPTION_VALUES = {"auto_augment": "rand-m7-n3", "color_jitter": 0.2, "scale": (0.5, 1.0), "ratio": (0.9, 1.1),
                 "hflip": 0.0, "interpolation": "bicubic", "reprob": 0.5, "remode": "rand", "recount": 2}


def image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("option", list(TIMM_OPTIONS))
def test_each_option_reaches_timms_create_transform_under_timms_name(option):
    value = OPTION_VALUES[option]
    erasing = {"re_prob": 0.5} if option in ("remode", "recount") else {}  # they act when erasing is on
    ours = TimmTransform(32, MEAN, STD, **{option: value}, **({"reprob": 0.5} if erasing else {})).transform
    timms = create_transform(32, is_training=True, mean=MEAN, std=STD, **{TIMM_OPTIONS[option]: value}, **erasing)
    assert repr(ours) == repr(timms)
    assert repr(ours) != repr(create_transform(32, is_training=True, mean=MEAN, std=STD, **erasing))  # it did something


def test_the_transform_is_timms_with_the_draws_of_the_sample():
    ours = TimmTransform(32, MEAN, STD, **DEIT)
    timms = create_transform(32, is_training=True, mean=MEAN, std=STD, auto_augment=DEIT["auto_augment"],
                             re_prob=0.25, re_mode="pixel", interpolation="bicubic")
    keep_posterize_zero_bits(timms)
    for index in range(4):
        rng = np.random.default_rng([7, 0, index])
        seed = int(np.random.default_rng([7, 0, index]).integers(0, 2**32))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        expected = timms(Image.fromarray(image(index)))
        torch.testing.assert_close(ours(image(index), rng), expected)


def test_draws_depend_on_seed_epoch_and_image_alone(tmp_path):
    make_fashion_idx(tmp_path / "fm", n_train=20, n_test=10)
    data = ImageDataModule("fashion_mnist_debian", root=str(tmp_path / "fm"), augment="timm", cache_dir=str(tmp_path),
                           num_workers=0, shuffle_seed=3, **DEIT)
    data.setup("fit")
    ds = data.train_dataset
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = [ds[(0, i)][0] for i in range(4)]
    assert (random.getstate(), torch.get_rng_state().tolist()) == (state[0], state[2].tolist())  # restored
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert all(torch.equal(a, ds[(0, i)][0]) for i, a in enumerate(first))
    assert not all(torch.equal(a, ds[(1, i)][0]) for i, a in enumerate(first))
    assert first[0].shape == (1, 28, 28)  # grayscale stays one channel


@pytest.mark.parametrize("option", ["auto_augment", "reprob", "scale"])
def test_timm_options_need_the_timm_preset(option, tmp_path):
    make_fashion_idx(tmp_path / "fm", n_train=20, n_test=10)
    with pytest.raises(ValueError, match=f"{option}=.* is a timm augmentation option: it needs augment='timm' "
                                         f"\\(got augment='basic'"):
        ImageDataModule("fashion_mnist_debian", root=str(tmp_path / "fm"), augment="basic",
                        **{option: OPTION_VALUES[option]})


def test_the_timm_preset_does_not_run_on_the_device_and_bad_values_are_named(tmp_path):
    make_fashion_idx(tmp_path / "fm", n_train=20, n_test=10)
    root = str(tmp_path / "fm")
    with pytest.raises(ValueError, match="augment='timm' runs timm's transforms .* CPU workers; augment_on_device"):
        ImageDataModule("fashion_mnist_debian", root=root, augment="timm", augment_on_device=True)
    with pytest.raises(ValueError, match="unknown augment preset 'randaug'; accepted: .*'basic', .*'timm'"):
        ImageDataModule("fashion_mnist_debian", root=root, augment="randaug")
    with pytest.raises(ValueError, match="timm cannot build its training transform from auto_augment='rand-q9'"):
        ImageDataModule("fashion_mnist_debian", root=root, augment="timm", auto_augment="rand-q9")


def test_posterize_to_zero_bits_gives_a_black_image():
    transform = TimmTransform(32, MEAN, STD, auto_augment="rand-m10-n1-inc1")
    ops = [op for op in transform.transform.transforms[2].ops if op.name == "PosterizeIncreasing"]
    assert ops
    op = ops[0]
    op.prob, op.magnitude_std = 1.0, 0  # magnitude 10: 0 bits to keep
    out = np.asarray(op(Image.fromarray(image(1))))
    assert out.shape == (32, 32, 3) and not out.any()


def test_imagefolder_trains_from_its_files_and_decodes_only_the_held_out_split(tmp_path):
    make_imagefolder(tmp_path / "folder", classes=("a", "b"), per_class=(3, 2))
    data = ImageDataModule("imagefolder", root=str(tmp_path / "folder"), img_size=24, augment="timm",
                           cache_dir=str(tmp_path / "cache"), num_workers=0, batch_size=4, **DEIT)
    data.prepare_data()
    data.setup("fit")
    assert all(str(p).endswith(".png") for p in data.train_dataset.images)
    assert {p.name.split("-")[1] for p in (tmp_path / "cache").glob("*-meta.json")} == {"val"}
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and set(y.tolist()) <= {0, 1}
    xv, _ = next(iter(data.val_dataloader()))
    assert xv.shape[1:] == (3, 24, 24)


def test_a_class_filter_is_refused_where_training_reads_the_files(tmp_path):
    """data.classes filters decoded arrays; an imagefolder trained from its files under timm's pipeline
    would silently train on every class, so it is an error that says what to do."""
    make_imagefolder(tmp_path / "folder", classes=("a", "b", "c"), per_class=(2, 2, 2))
    data = ImageDataModule("imagefolder", root=str(tmp_path / "folder"), img_size=24, augment="timm",
                           cache_dir=str(tmp_path / "cache"), num_workers=0, batch_size=2, classes=["a", "b"])
    with pytest.raises(ValueError, match=r"data.classes=.* is not supported .* keep only those class folders"):
        data.setup("fit")


def test_imagefolder_config_trains_with_the_deit_recipe(tmp_path):
    """configs/imagenet_vit_small.yaml + configs/recipes/deit.yaml (the README's ImageNet command) on a tiny
    generated folder, a tiny DIFF-ViT-S/16 at 32 px."""
    make_imagefolder(tmp_path / "folder", classes=("a", "b", "c"), per_class=(4, 2))
    cli = DiffvisionCLI(args=["fit", "--config", str(CONFIGS / "imagenet_vit_small.yaml"),
                              "--config", str(CONFIGS / "recipes" / "deit.yaml"), "--data.root", str(tmp_path / "folder"),
                              "--data.img_size", "32", "--model.init_args.model_kwargs",
                              "{embed_dim: 48, depth: 1, num_heads: 2}", "--data.batch_size", "4",
                              "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
                              "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1", *QUIET])
    assert cli.model.hparams.model_name == "diff_vit_small_patch16_224"
    assert cli.trainer.global_step == 3 and "val/acc1" in cli.trainer.callback_metrics
    assert cli.model.ema is not None and cli.model.mixup is not None


def test_loader_benchmark_runs_on_a_small_folder_and_at_32px(tmp_path):
    from diffvision.experiments import loader_bench as bench

    root = bench.make_jpeg_folder(tmp_path / "jpegs", images=12, classes=3, src_size=(64, 48))
    assert len(list((root / "train").rglob("*.jpg"))) == 12
    rows = bench.main(["imagefolder", "--root", str(root), "--img-size", "32", "--batch-size", "4", "--workers", "0",
                       "--batches", "2"])
    rows += bench.main(["augment32", "--images", "64", "--batch-size", "16", "--workers", "0", "--batches", "2",
                        "--device", "cpu"])
    assert [r["bench"] for r in rows] == ["imagefolder", "augment32", "augment32"]
    assert all(r["images_per_s"] > 0 for r in rows)
