"""Bad inputs to data, training and the CLI: each gives an error that names the bad value (or file)
and what is accepted, never a silent wrong run, a CUDA assert or a bare traceback from deep inside."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from _training_data import CONFIGS, jpeg_bytes, make_cifar_npz, make_imagefolder, write_idx

from diffvision.cli import DiffvisionCLI
from diffvision.data import ImageDataModule, load_split, stratified_subset
from diffvision.data import datasets as datasets_module
from diffvision.data.datasets import write_cifar10_npz
from diffvision.data.fractions import per_class_counts, smallest_fraction
from diffvision.lightning import ImageClassifier


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_cifar_npz(tmp_path_factory.mktemp("data") / "cifar10", per_class_train=2, per_class_test=1)


def imagefolder_module(root: Path, tmp_path: Path) -> ImageDataModule:
    return ImageDataModule("imagefolder", root=str(root), img_size=8, cache_dir=str(tmp_path / "cache"),
                           num_workers=0, batch_size=2)


# ---------------------------------------------------------------------------------------------
# data_fraction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), -float("inf")])
def test_data_fraction_outside_0_1_names_the_value_and_the_range(fraction, cifar):
    with pytest.raises(ValueError, match=r"data_fraction must be in \(0, 1\]") as err:
        ImageDataModule("cifar10_npz", root=str(cifar), data_fraction=fraction)
    assert repr(fraction) in str(err.value)


@pytest.mark.parametrize("fraction", ["0.1", None, True, [0.1], b"1"])
def test_data_fraction_that_is_not_a_number_names_its_type(fraction, cifar):
    with pytest.raises(ValueError, match=r"data_fraction must be a number in \(0, 1\]") as err:
        ImageDataModule("cifar10_npz", root=str(cifar), data_fraction=fraction)
    assert type(fraction).__name__ in str(err.value)


@pytest.mark.parametrize("value", ["abc", "nan", "0.1.2"])
def test_cli_data_fraction_that_is_not_a_number_is_a_usage_error(value, cifar, capsys):
    with pytest.raises(SystemExit) as exit_info:
        DiffvisionCLI(args=["--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(cifar),
                            "--data.data_fraction", value], run=False)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "data.data_fraction" in err and value in err


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_cli_data_fraction_out_of_range_names_it(value, cifar, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        DiffvisionCLI(args=["--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(cifar),
                            "--data.data_fraction", value], run=False)
    text = str(info.value) + capsys.readouterr().err
    assert "data_fraction must be in (0, 1]" in text and value in text


def test_fraction_that_empties_a_class_names_it_and_the_smallest_that_works():
    labels = np.repeat([0, 1, 2], [300, 6, 40])
    names = ["big", "tiny", "mid"]
    with pytest.raises(ValueError, match=r"\['tiny'\] with no training sample.*data_fraction >= 0.0834"):
        stratified_subset(labels, 0.08, seed=0, class_names=names)
    # the suggested fraction works, and it is the smallest one to three significant digits
    kept = labels[stratified_subset(labels, 0.0834, seed=0, class_names=names)]
    assert np.bincount(kept).tolist() == [25, 1, 3]
    with pytest.raises(ValueError, match="tiny"):
        stratified_subset(labels, 0.0833, seed=0, class_names=names)


def test_suggested_fraction_is_the_smallest_that_works_for_every_class_size():
    for n in list(range(1, 2000)) + [4999, 5000, 5001, 123457]:
        f = smallest_fraction(n)
        assert per_class_counts([n], f) == [1], n  # it works (round half up of f * n is 1) ...
        assert f <= 0.5 / n * (1 + 1e-2), n  # ... and is within 3 significant digits of the exact bound
    with pytest.raises(ValueError, match="class_size"):
        smallest_fraction(0)


def test_data_module_names_every_emptied_class(cifar, tmp_path):
    dm = ImageDataModule("cifar10_npz", root=str(cifar), data_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                         num_workers=0)
    with pytest.raises(ValueError, match=r"'airplane'.*'truck'\].*n_c=2\).*data_fraction >= 0.25"):
        dm.setup("fit")  # 2 images per class: 0.2 * 2 = 0.4 rounds to 0 in every class


# ---------------------------------------------------------------------------------------------
# Missing or empty dataset directories
# ---------------------------------------------------------------------------------------------

def test_cifar10_npz_missing_or_empty_root(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError, match=r"test.npz not found; root must be a directory with "
                                                    r"train.npz and test.npz"):
            ImageDataModule("cifar10_npz", root=str(root))


def test_cifar10_npz_without_train_npz_names_it(cifar, tmp_path):
    root = tmp_path / "only_test"
    root.mkdir()
    (root / "test.npz").write_bytes((cifar / "test.npz").read_bytes())
    dm = ImageDataModule("cifar10_npz", root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0)
    assert dm.num_classes == 10  # known from test.npz
    with pytest.raises(FileNotFoundError, match=f"{root / 'train.npz'} not found.*train.npz and test.npz"):
        dm.setup("fit")
    dm.setup("validate")  # the held-out split alone is enough to evaluate


def test_imagefolder_missing_root_or_train_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"imagefolder root {tmp_path / 'none'} does not exist.*"
                                                f"root/train/<class>/<image>"):
        imagefolder_module(tmp_path / "none", tmp_path)
    (tmp_path / "noval" / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no train/ directory"):
        imagefolder_module(tmp_path / "noval", tmp_path)


def test_imagefolder_without_class_folders_or_images(tmp_path):
    root = tmp_path / "if"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "train" / "loose.png").write_bytes(b"")  # a file, not a class folder
    with pytest.raises(ValueError, match=f"{root / 'train'} has no class subdirectories"):
        imagefolder_module(root, tmp_path)
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir()
        (root / "val" / name).mkdir()
    dm = imagefolder_module(root, tmp_path)  # classes are known from the folders alone ...
    with pytest.raises(ValueError, match=r"train has no image files \(.jpg"):
        dm.setup("fit")  # ... but there is nothing to train on


def test_imagefolder_training_class_without_images_names_it(tmp_path):
    root = make_imagefolder(tmp_path / "if", classes=("cat", "dog", "eel"), per_class=(2, 1))
    for f in (root / "train" / "eel").iterdir():
        f.unlink()
    (root / "train" / "eel" / "notes.txt").write_text("not an image")
    dm = imagefolder_module(root, tmp_path)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['eel'\] hold no image files"):
        dm.setup("fit")
    # a held-out split may lack a class: evaluation on the others is still well defined
    for f in (root / "val" / "eel").iterdir():
        f.unlink()
    assert len(load_split("imagefolder", "val", root, img_size=8, use_cache=False).labels) == 2


def test_imagefolder_with_one_class_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path / "if", classes=("cat",), per_class=(2, 1))
    with pytest.raises(ValueError, match=rf"{root / 'train'} has one class folder \(\['cat'\]\); a classifier "
                                         rf"needs at least 2 classes"):
        imagefolder_module(root, tmp_path)


# ---------------------------------------------------------------------------------------------
# Corrupt or truncated files
# ---------------------------------------------------------------------------------------------

def test_corrupt_and_truncated_images_are_listed_not_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "if", classes=("cat", "dog"), per_class=(3, 1))
    png = root / "train" / "cat" / "0.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated PNG
    (root / "train" / "dog" / "1.png").write_bytes(b"this is not an image")
    jpg = root / "train" / "dog" / "cut.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated JPEG
    dm = imagefolder_module(root, tmp_path)
    with pytest.raises(ValueError, match=r"3 of 7 image files cannot be read") as err:
        dm.setup("fit")
    message = str(err.value)
    for bad in (png, root / "train" / "dog" / "1.png", jpg):
        assert str(bad) in message
    for good in ("cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png"):
        assert good not in message
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-decoded was cached


def test_truncated_or_corrupt_npz_names_the_file(cifar, tmp_path):
    data = (cifar / "train.npz").read_bytes()
    truncated = tmp_path / "truncated" / "train.npz"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable .npz \(truncated or corrupt"):
        load_split("cifar10_npz", "train", truncated.parent, use_cache=False)
    flipped = tmp_path / "flipped" / "train.npz"  # same size, some bytes of the JPEG blob zeroed
    flipped.parent.mkdir()
    corrupt = bytearray(data)
    corrupt[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    flipped.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=rf"{flipped} is not a readable .npz.*CRC"):
        load_split("cifar10_npz", "train", flipped.parent, use_cache=False)
    with pytest.raises(ValueError, match=r"test.npz is not a readable .npz"):
        (tmp_path / "flipped" / "test.npz").write_bytes(data[:100])
        ImageDataModule("cifar10_npz", root=str(flipped.parent))  # the class names come from test.npz


def test_npz_with_bad_contents_names_file_and_image(tmp_path):
    good = [jpeg_bytes(np.full((32, 32, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "train.npz"
    write_cifar10_npz(path, [good[0], b"\xff\xd8 garbage", good[1]], [0, 1, 0], ["a", "b"])
    with pytest.raises(ValueError, match=rf"{path}: image 1 \(bytes \d+\.\.\d+\) does not decode"):
        datasets_module.read_cifar10_npz(path)
    write_cifar10_npz(path, good, [0, 7], ["a", "b"])
    with pytest.raises(ValueError, match=rf"{path}: class labels \[7\] are out of range for 2 classes: labels "
                                         rf"must be integers in \[0, 1\]"):
        datasets_module.read_cifar10_npz(path)
    blob = np.frombuffer(b"".join(good), np.uint8)
    np.savez(path, jpeg=blob, offsets=np.array([0, 5000, len(blob)]), labels=np.array([0, 1]),
             classes=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=rf"{path}: offsets must increase"):
        datasets_module.read_cifar10_npz(path)


def test_truncated_idx_gz_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.arange(100, dtype=np.uint8) % 10)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt"):
        datasets_module.read_idx(path)


# ---------------------------------------------------------------------------------------------
# Labels out of range in training
# ---------------------------------------------------------------------------------------------

def tiny_classifier(num_classes: int = 4) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, num_classes=num_classes,
                           img_size=8, in_chans=3, label_smoothing=0.0)


@pytest.mark.parametrize("bad", [4, 99, -1, -100])  # -100 is cross-entropy's ignore_index: dropped silently
def test_out_of_range_labels_stop_training_with_a_clear_error(bad):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, bad, 3])
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), labels), batch_size=4)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"class label\(s\) \[{bad}\] out of range for num_classes=4: labels "
                                         rf"must be integers in \[0, 3\]") as err:
        trainer.fit(model, loader)
    # caught while the batch is still on the CPU: on a GPU no kernel (and no device assert) would run
    assert any(entry.name == "on_before_batch_transfer" for entry in err.traceback)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken
    with pytest.raises(ValueError, match="out of range for num_classes=4"):
        trainer.validate(model, loader)
    with pytest.raises(ValueError, match="out of range for num_classes=4"):
        model.training_step((torch.randn(4, 3, 8, 8), labels), 0)  # a step called by hand: checked too


def test_in_range_labels_and_soft_targets_pass():
    from diffvision.lightning.classifier import check_labels

    check_labels(torch.tensor([0, 3, 2]), 4)
    check_labels(torch.softmax(torch.randn(3, 4), -1), 4)  # probabilities: cross-entropy's other target kind
    with pytest.raises(ValueError, match=r"\[-3, 7\]"):
        check_labels(torch.tensor([7, 0, -3, 7]), 4)


# ---------------------------------------------------------------------------------------------
# Unknown config keys and model names
# ---------------------------------------------------------------------------------------------

def run_parse(args, capsys) -> tuple[int, str]:
    # a missing data root: should a bad key ever be accepted, the run stops at once instead of training
    with pytest.raises(SystemExit) as exit_info:
        DiffvisionCLI(args=["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", "/nonexistent",
                            *args])
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_cli_keys_are_usage_errors_naming_the_key(capsys):
    code, err = run_parse(["--model.init_args.nonsense", "1"], capsys)
    assert code == 2 and "Option 'nonsense' is not accepted" in err
    code, err = run_parse(["--data.nonsense_key", "1"], capsys)
    assert code == 2 and "nonsense_key" in err
    code, err = run_parse(["--trainer.max_epoch", "3"], capsys)  # a prefix of max_epochs: not expanded silently
    assert code == 2 and "unrecognized arguments: --trainer.max_epoch 3" in err


def test_unknown_keys_inside_a_yaml_config_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    warmup_epoch: 3\n")  # a typo of warmup_epochs
    code, err = run_parse(["--config", str(bad)], capsys)
    assert code == 2 and "warmup_epoch" in err
    bad.write_text("data:\n  data_fractoin: 0.1\n")
    code, err = run_parse(["--config", str(bad)], capsys)
    assert code == 2 and "data_fractoin" in err


def test_unknown_model_name_suggests_close_registered_names():
    with pytest.raises(ValueError, match=r"unknown model_name 'diff_vit_tiny_patch4_23': did you mean "
                                         r"diff_vit_tiny_patch4_32"):
        ImageClassifier("diff_vit_tiny_patch4_23", num_classes=10, img_size=32)
    with pytest.raises(ValueError, match=r"'rezsnet18': did you mean .*\bresnet18\b"):
        ImageClassifier("rezsnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"unknown model_name 'qqqqqqqqq': no registered name is close"):
        ImageClassifier("qqqqqqqqq", num_classes=10)
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'a1_in1k_typo' of 'resnet18'.*resnet18.a1_in1k"):
        ImageClassifier("resnet18.a1_in1k_typo", num_classes=10)
    assert ImageClassifier("resnet10t.c3_in1k", num_classes=3, img_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_model_name_through_the_cli(cifar, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        DiffvisionCLI(args=["--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(cifar),
                            "--model.init_args.model_name", "diff_vit_tiny_patch4_23"], run=False)
    text = str(info.value) + capsys.readouterr().err
    assert "unknown model_name 'diff_vit_tiny_patch4_23': did you mean diff_vit_tiny_patch4_32" in text
