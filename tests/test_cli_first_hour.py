"""A researcher's first hour with the ``diffvision`` command (issue 19): bad input is an error naming the
value, errors are one message, evaluations write into their run, failed starts leave nothing behind,
predict keeps its output, short runs log steps, exports say whether they were trained, and FID on a CPU
says what it does and how long it takes."""
from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _training_data import CONFIGS, QUIET, REPO, make_cifar_npz, make_fashion_idx
from diffvision.cli import DiffvisionCLI, main
from diffvision.lightning import ImageClassifier

TINY_VIT = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}"]
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    make_cifar_npz(base / "cifar10", per_class_train=10, per_class_test=2)  # 100 train (5 batches), 20 test
    make_fashion_idx(base / "fashion", n_train=40, n_test=20)
    return SimpleNamespace(cifar=base / "cifar10", fashion=base / "fashion", cache=base / "cache")


def cli_args(data, root, *extra, subcommand="fit", recipe="cifar10_vit"):
    source = data.fashion if recipe.startswith("fashion") else data.cifar
    return [subcommand, "--config", str(CONFIGS / f"{recipe}.yaml"), "--data.root", str(source),
            "--data.cache_dir", str(data.cache), "--data.num_workers", "0", "--data.batch_size", "20",
            "--trainer.default_root_dir", str(root), *QUIET, *TINY_VIT, *extra]


def run_cli(data, root, *extra, subcommand="fit", recipe="cifar10_vit"):
    return DiffvisionCLI(args=cli_args(data, root, *extra, subcommand=subcommand, recipe=recipe))


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# 4. Bad input is an error naming the value and what is accepted
# ---------------------------------------------------------------------------------------------

def test_an_image_size_the_patch_does_not_divide_is_an_error(data, tmp_path):
    with pytest.raises(ValueError, match=r"img_size 30 is not a multiple of vit_tiny_patch4_32's patch size 4: .*"
                                         r"drop the last 2 px .*\(28 or 32\).*dynamic_img_pad"):
        run_cli(data, tmp_path, "--data.img_size", "30", subcommand="validate")
    # the documented way out: timm's padding, which keeps every pixel (8 x 8 patches of the padded 32 x 32)
    model = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48, "dynamic_img_size": True,
                                                   "dynamic_img_pad": True}, img_size=30)
    tokens = model.model.patch_embed(torch.randn(1, 3, 30, 30))
    assert tokens.shape[1:3] == (8, 8) and model(torch.randn(2, 3, 30, 30)).shape == (2, 10)
    with pytest.raises(ValueError, match="dynamic_img_pad needs dynamic_img_size"):
        ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48, "dynamic_img_pad": True}, img_size=30)


@pytest.mark.parametrize("recipe,name,value,data_value", [
    ("cifar10_vit", "num_classes", 100, 10),
    ("cifar10_vit", "in_chans", 1, 3),
    ("cifar10_vit", "img_size", 64, 32),
    ("fashion_mnist_vit", "in_chans", 3, 1),  # the model's default, but given: still not the data's
])
def test_model_values_that_disagree_with_the_data_are_errors(recipe, name, value, data_value, data, tmp_path):
    with pytest.raises(ValueError, match=rf"model.init_args.{name}={value} disagrees with the data's "
                                         rf"{name}={data_value}"):
        run_cli(data, tmp_path, f"--model.init_args.{name}", str(value), recipe=recipe, subcommand="validate")
    assert not (tmp_path / recipe).exists()


def test_model_values_that_agree_with_the_data_are_accepted(data, tmp_path):
    cli = DiffvisionCLI(args=cli_args(data, tmp_path, "--model.init_args.num_classes", "10", "--model.init_args.in_chans",
                                      "1", "--model.init_args.img_size", "28", recipe="fashion_mnist_vit")[1:], run=False)
    assert (cli.model.hparams.num_classes, cli.model.hparams.in_chans, cli.model.hparams.img_size) == (10, 1, 28)


def test_linked_values_in_model_kwargs_are_checked_not_doubled():
    tiny = {"depth": 1, "embed_dim": 48}
    with pytest.raises(ValueError, match=r"model_kwargs num_classes=100 disagrees with num_classes=10"):
        ImageClassifier("vit_tiny_patch4_32", {**tiny, "num_classes": 100}, num_classes=10, img_size=32)
    model = ImageClassifier("vit_tiny_patch4_32", {**tiny, "num_classes": 10, "in_chans": 3}, num_classes=10,
                            img_size=32)  # the same values: accepted (they used to clash as doubled arguments)
    assert model.model.num_classes == 10


def test_linked_values_in_transformer_kwargs_are_checked():
    from diffvision.lightning import DiffusionModule

    with pytest.raises(ValueError, match=r"transformer_kwargs sample_size=64 disagrees with img_size=32"):
        DiffusionModule(transformer_kwargs={"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                            "patch_size": 4, "sample_size": 64}, img_size=32, num_sample_images=0,
                        fid_num_samples=0)


# ---------------------------------------------------------------------------------------------
# 5. Errors print the one message that matters
# ---------------------------------------------------------------------------------------------

def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,message,hint", [
    (["--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch 3", "--trainer.max_epochs"),
    (["--data.datset", "cifar10"], "unrecognized arguments: --data.datset", "--data.dataset"),
    (["--model.init_args.modl_name", "x"], "Option 'modl_name' is not accepted", "--model.init_args.model_name"),
])
def test_a_mistyped_key_is_one_message_with_a_suggestion(extra, message, hint, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(cli_args(data, tmp_path, *extra))
    lines = error_lines(capsys)
    assert stop.value.code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("error: ") and message in lines[0] and lines[0].endswith(f"did you mean {hint}?")
    assert "diffvision fit --help" in lines[1] and "DIFFVISION_DEBUG=1" in lines[1]


def test_a_mistyped_key_in_a_config_file_gets_a_suggestion_too(data, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        main(cli_args(data, tmp_path, "--config", str(config)))
    lines = error_lines(capsys)
    assert len(lines) == 2 and "'trainer.max_epoch'" in lines[0] and "did you mean --trainer.max_epochs?" in lines[0]


def test_a_bad_value_names_the_key_and_the_value(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(cli_args(data, tmp_path, "--trainer.max_epochs", "abc"))
    lines = error_lines(capsys)
    assert len(lines) == 2 and '"trainer.max_epochs"' in lines[0] and "int" in lines[0] and "abc" in lines[0]


@pytest.mark.parametrize("extra,expected", [
    (["--model.init_args.model_name", "vit_tiny_ptch4_32"],
     "error: unknown model_name 'vit_tiny_ptch4_32': did you mean vit_tiny_patch4_32,"),
    (["--data.root", "/nonexistent/cifar"], "error: cifar10_npz: /nonexistent/cifar/test.npz not found"),
    (["--model.init_args.num_classes", "100"], "error: model.init_args.num_classes=100 disagrees with the data's"),
])
def test_a_start_up_error_is_its_message_without_a_traceback(extra, expected, data, tmp_path, capsys):
    assert main(cli_args(data, tmp_path, *extra)) == 1
    lines = error_lines(capsys)
    assert len(lines) == 2 and lines[0].startswith(expected), lines
    assert lines[1] == "(DIFFVISION_DEBUG=1 shows the traceback)"
    assert not list(tmp_path.glob("cifar10_vit*"))  # and nothing was left behind


def test_diffvision_debug_shows_the_traceback(data, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFVISION_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model_name"):  # the exception itself, traceback and all
        main(cli_args(data, tmp_path, "--model.init_args.model_name", "vit_tiny_ptch4_32"))


# ---------------------------------------------------------------------------------------------
# 6. Runs: evaluations write into their run, failed starts leave nothing, predict keeps its output,
#    short runs log steps, exports say whether they were trained, no repeated third-party notices
# ---------------------------------------------------------------------------------------------

def test_evaluations_write_into_the_run_they_evaluate(data, tmp_path, recwarn):
    fit = run_cli(data, tmp_path, *SHORT, "--experiment", "exp")
    run = tmp_path / "exp" / "version_0"
    assert Path(fit.trainer.log_dir) == run
    config = (run / "config.yaml").read_text()
    for subcommand in ("validate", "test", "predict"):
        cli = run_cli(data, tmp_path, "--experiment", "exp", "--ckpt_path", "last", subcommand=subcommand)
        assert Path(cli.trainer.log_dir) == run
        assert (run / f"config_{subcommand}.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["version_0"]  # no version_1..3
    assert (run / "config.yaml").read_text() == config  # still the training config
    logged = rows(run / "metrics.csv")
    assert [r for r in logged if r.get("test/acc1")] and len([r for r in logged if r.get("val/acc1")]) == 2
    # predict wrote its predictions without being asked to
    predictions = rows(run / "predictions.csv")
    assert len(predictions) == 20 and {"index", "label", "prediction"} <= set(predictions[0])
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    # a checkpoint from outside any run is evaluated into one evaluation folder, reused
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    for _ in range(2):
        cli = run_cli(data, tmp_path, "--experiment", "exp", "--ckpt_path", str(loose), subcommand="test")
        assert Path(cli.trainer.log_dir) == tmp_path / "exp" / "eval"
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["eval", "version_0"]


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_failed_start_leaves_nothing_behind(subcommand, data, tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        run_cli(data, root, "--experiment", "exp", "--ckpt_path", str(tmp_path / "missing.ckpt"), subcommand=subcommand)
    assert not root.exists()
    (root / "exp" / "version_0").mkdir(parents=True)  # an earlier run stays as it was
    with pytest.raises(FileNotFoundError):
        run_cli(data, root, "--experiment", "exp", "--ckpt_path", str(tmp_path / "missing.ckpt"), subcommand=subcommand)
    assert sorted(p.name for p in (root / "exp").iterdir()) == ["version_0"]


def test_a_failed_resume_keeps_its_run(data, tmp_path):
    # a failed start removes only what it created: a resumed version_N (issue 20's run lock and --ckpt_path last
    # rely on it) stays whole
    run_cli(data, tmp_path, *SHORT, "--experiment", "exp")
    run = tmp_path / "exp" / "version_0"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(Exception, match="/nonexistent/cifar"):
        run_cli(data, tmp_path, *SHORT, "--experiment", "exp", "--ckpt_path", "last", "--trainer.max_epochs", "2",
                "--data.root", "/nonexistent/cifar")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["version_0"]


def test_short_runs_log_every_step_unless_told_otherwise(data, tmp_path):
    run_cli(data, tmp_path, *SHORT, "--experiment", "short")  # one epoch of 5 batches < log_every_n_steps=50
    steps = [r for r in rows(tmp_path / "short/version_0/metrics.csv") if r.get("train/loss_step")]
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3, 4]
    run_cli(data, tmp_path, *SHORT, "--experiment", "told", "--trainer.log_every_n_steps", "50")
    assert not [r for r in rows(tmp_path / "told/version_0/metrics.csv") if r.get("train/loss_step")]


def test_an_export_says_whether_it_was_trained(data, tmp_path):
    cli = run_cli(data, tmp_path, *SHORT, "--experiment", "exp", "--trainer.callbacks+=diffvision.lightning.ExportOnFitEnd")
    trained = json.loads((Path(cli.trainer.log_dir) / "export" / "config.json").read_text())
    description = trained["pretrained_cfg"]["description"]
    assert "untrained" not in description and description.endswith("; trained for 5 steps with diffvision")
    fresh = ImageClassifier("vit_tiny_patch4_32", {"depth": 1, "embed_dim": 48}, img_size=32)
    fresh.export(tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["pretrained_cfg"]["description"].endswith(
        "; untrained")
    reloaded = ImageClassifier.load_from_checkpoint(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert reloaded.trained_steps == 5  # weights from a checkpoint know how long they were trained


def test_a_run_prints_no_repeated_third_party_notices(data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffvision.cli", *cli_args(data, tmp_path, "--trainer.fast_dev_run",
                                                                            "true")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for notice in ("💡 Tip", "litlogger", "LeafSpec", "smaller than the logging interval"):
        assert notice not in text, notice


def test_loading_a_pipeline_does_not_warn_about_accelerate(tmp_path, capfd, caplog):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler
    from diffusers.utils import is_accelerate_available

    from diffvision.diffusion import DiffDiTPipeline, DiffDiTTransformer2DModel

    if is_accelerate_available():
        pytest.skip("accelerate is installed: diffusers has nothing to warn about")
    transformer = DiffDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=4,
                                            sample_size=8, in_channels=3, out_channels=6, num_classes=4)
    DiffDiTPipeline(transformer=transformer, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        DiffDiTPipeline.from_pretrained(tmp_path / "pipe")
        DiffDiTTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer")
    captured = capfd.readouterr()
    assert "accelerate" not in captured.out + captured.err + caplog.text


# ---------------------------------------------------------------------------------------------
# 7. FID on a CPU says what it does and how long it takes
# ---------------------------------------------------------------------------------------------

def test_fid_on_a_cpu_reports_progress_and_time(caplog):
    from diffvision.lightning import FIDDuringValidation

    calls = []

    class Sampler:  # what FIDDuringValidation asks of a module: generate(), its device and classes, log()
        device = torch.device("cpu")
        hparams = {"num_classes": 2}

        def generate(self, labels, guidance_scale, seed, batch_size):
            calls.append(list(labels))
            return torch.rand(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(seed))

        def log(self, name, value, **kwargs):
            self.logged = (name, value.item())

    class Metric:  # the Inception network is not what this test is about (tests/test_fid.py)
        def to(self, device):
            return self

        def update(self, images, real):
            assert images.shape[1:] == (3, 16, 16) and not real

        def compute(self):
            return torch.tensor(12.345)

        def reset(self):
            pass

    fid, module = FIDDuringValidation(num_samples=4, batch_size=2), Sampler()
    fid._metric = Metric()
    trainer = SimpleNamespace(global_rank=0, world_size=1)
    with caplog.at_level(logging.INFO):
        fid._compute(trainer, module, "val")
    messages = [r.getMessage() for r in caplog.records if "val/fid" in r.getMessage()]
    assert calls == [[0, 1], [0, 1]]  # one call per batch, classes balanced
    assert messages[0].startswith("val/fid: sampling 4 images in 2 batch(es)") and "fid_num_samples 0" in messages[0]
    assert "batch 1 of 2 took" in messages[1] and "s to go" in messages[1]
    assert module.logged == ("val/fid", pytest.approx(12.345))
    assert messages[2] == f"val/fid = 12.35 ({fid.last_duration_s:.0f} s)"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fid._compute(trainer, module, "val")
    assert "the last one took" in caplog.records[0].getMessage()
    caplog.clear()
    module.device = torch.device("cuda")  # on a GPU an FID takes seconds: nothing to say
    with caplog.at_level(logging.INFO):
        fid._compute(trainer, module, "val")
    assert not [r for r in caplog.records if "val/fid" in r.getMessage()]
