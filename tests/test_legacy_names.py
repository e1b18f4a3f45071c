"""Artefacts saved before the attention vocabulary was unified still load and give the same outputs.

``tests/data/legacy/`` holds a run config, Lightning checkpoints and a saved pipeline written by commit
d999583 (DiT kind ``attention_type``, backend ``diff_attention_backend``), with the outputs that code gave;
``make_legacy_fixtures.py`` there says how they were made. Their names now read as ``attn_kind`` /
``attn_backend``.
"""
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _training_data import QUIET, make_cifar_npz
from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel
from diffvision.cli import DiffvisionCLI
from diffvision.lightning import DiffusionModule, ImageClassifier

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture(scope="module")
def outputs():
    return load_file(str(LEGACY / "outputs.safetensors"))


def test_the_fixtures_use_the_old_names():
    """Guard against regenerating them with today's code: they must hold the names under test."""
    transformer = (LEGACY / "pipeline" / "transformer" / "config.json").read_text()
    assert '"attention_type": "gda"' in transformer and '"diff_attention_backend": "sdpa"' in transformer
    config = yaml.safe_load((LEGACY / "diffusion_config.yaml").read_text())
    assert config["model"]["init_args"]["attention_type"] == "gda"
    assert config["model"]["init_args"]["transformer_kwargs"]["diff_attention_backend"] == "sdpa"


def test_saved_pipeline_loads_with_todays_names_and_samples_the_same(outputs):
    pipe = DiffDiTPipeline.from_pretrained(LEGACY / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    assert (cfg.attn_kind, cfg.attn_backend) == ("gda", "sdpa") and "attention_type" not in cfg
    assert pipe.transformer.attn_layout["signal_heads"] == 4
    samples = pipe(class_labels=[0, 7], guidance_scale=2.0, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(2), output_type="pt").images
    torch.testing.assert_close(samples, outputs["pipeline_samples"], rtol=0, atol=1e-6)
    # the transformer folder on its own, and a re-save that writes today's names only
    alone = DiffDiTTransformer2DModel.from_pretrained(LEGACY / "pipeline" / "transformer")
    assert alone.config.attn_kind == "gda"


def test_resaved_pipeline_writes_only_todays_names(tmp_path):
    DiffDiTPipeline.from_pretrained(LEGACY / "pipeline").save_pretrained(tmp_path)
    text = (tmp_path / "transformer" / "config.json").read_text()
    assert '"attn_kind": "gda"' in text and '"attn_backend": "sdpa"' in text
    assert "attention_type" not in text and "diff_attention_backend" not in text


def test_diffusion_checkpoint_loads_and_gives_the_same_outputs(outputs):
    with pytest.warns(FutureWarning, match="attention_type is the old name of attn_kind"):
        module = DiffusionModule.load_from_checkpoint(LEGACY / "diffusion.ckpt", map_location="cpu")
    module.eval()
    assert module.hparams.attn_kind == "gda" and "attention_type" not in module.hparams
    assert module.transformer.config.attn_backend == "sdpa"
    x, t, y = outputs["dit_input"], outputs["dit_timesteps"], outputs["dit_labels"]
    with torch.no_grad():
        torch.testing.assert_close(module.transformer(x, t, class_labels=y).sample, outputs["dit_output"],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(module.ema_transformer(x, t, class_labels=y).sample, outputs["dit_output_ema"],
                                   rtol=0, atol=1e-6)


def test_classifier_checkpoint_loads_and_gives_the_same_outputs(outputs):
    module = ImageClassifier.load_from_checkpoint(LEGACY / "classifier.ckpt", map_location="cpu").eval()
    assert module.hparams.model_kwargs["lambda_init"] == "schedule"  # saved as None, the old spelling
    with torch.no_grad():
        torch.testing.assert_close(module(outputs["classifier_images"]), outputs["classifier_logits"],
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["classifier", "diffusion"])
def test_saved_run_config_and_checkpoint_validate_through_the_cli(name, tmp_path):
    data = make_cifar_npz(tmp_path / "cifar10", per_class_train=1, per_class_test=1)
    cli = DiffvisionCLI(args=[
        "validate", "--config", str(LEGACY / f"{name}_config.yaml"), "--ckpt_path", str(LEGACY / f"{name}.ckpt"),
        "--data.root", str(data), "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.limit_val_batches", "1", *QUIET])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    if name == "diffusion":
        assert cli.model.hparams.attn_kind == "gda" and cli.model.transformer.config.attn_backend == "sdpa"


def test_old_keywords_in_python_set_todays_config():
    kw = dict(num_attention_heads=6, attention_head_dim=8, in_channels=3, num_layers=1, sample_size=8,
              patch_size=4, num_classes=10)
    model = DiffDiTTransformer2DModel(**kw, attention_type="gda", diff_attention_backend="math")
    assert (model.config.attn_kind, model.config.attn_backend) == ("gda", "math")
    assert model.transformer_blocks[0].attn.backend == "math"
    again = DiffDiTTransformer2DModel.from_config(model.config)  # the in-memory config round trip
    assert (again.config.attn_kind, again.attn_layout) == ("gda", model.attn_layout)
    with pytest.raises(ValueError, match="sets both attention_type='gda' .* and attn_kind='diffv2'"):
        DiffDiTTransformer2DModel(**kw, attention_type="gda", attn_kind="diffv2")
    with pytest.raises(ValueError, match="attn_kind='diffv2' and its old name attention_type='gda' disagree"):
        DiffusionModule(attention_type="gda", attn_kind="diffv2", img_size=8, num_classes=4,
                        transformer_kwargs=dict(num_layers=1))
