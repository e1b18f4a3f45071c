"""The models' λ / head-norm defaults (VISION_OPTIONS, issue 16) against the paper's (PAPER_OPTIONS): what
the registered models build, what checkpoints and exports record, and old checkpoints (no record) loading
with the paper's choices they were trained under."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import timm
import torch

from diffvision.attention import PAPER_OPTIONS, VISION_OPTIONS
from diffvision.lightning import ImageClassifier

TINY = {"depth": 3, "embed_dim": 48, "num_heads": 2}


def lambda_inits(model) -> list[float]:
    return [block.attn.lambda_init for block in model.blocks]


def expected_inits(lambda_init, depth: int) -> list[float]:
    if lambda_init == "schedule":  # the paper's rule, written out
        return [0.8 - 0.6 * math.exp(-0.3 * d) for d in range(depth)]
    return [float(lambda_init)] * depth


def test_the_defaults_differ_from_the_paper():
    """Otherwise the tests below could not tell old checkpoints from new ones."""
    assert VISION_OPTIONS != PAPER_OPTIONS and set(VISION_OPTIONS) == set(PAPER_OPTIONS)


@pytest.mark.parametrize("name", ["diff_vit_tiny_patch4_32", "gda_vit_tiny_patch4_32"])
def test_registered_models_build_the_vision_defaults_and_the_paper_is_one_option_away(name):
    model = timm.create_model(name, depth=3)
    assert model.attn_options == VISION_OPTIONS
    assert lambda_inits(model) == pytest.approx(expected_inits(VISION_OPTIONS["lambda_init"], 3))
    assert model.blocks[0].attn.lambda_mode == VISION_OPTIONS["lambda_mode"]
    assert model.blocks[0].attn.head_norm_enabled == VISION_OPTIONS["head_norm"]
    paper = timm.create_model(name, depth=3, **PAPER_OPTIONS)
    assert lambda_inits(paper) == pytest.approx(expected_inits("schedule", 3))
    assert paper.blocks[0].attn.head_norm_enabled and paper.blocks[0].attn.lambda_mode == "reparam"


def test_kinds_without_lambda_record_no_options():
    assert timm.create_model("diffv2_vit_tiny_patch4_32", depth=1).attn_options == {}
    assert timm.create_model("diff_vit_tiny_patch4_32", depth=1, attn_kind="standard").attn_options == {}


def _save(module: ImageClassifier, path) -> None:
    trainer = pl.Trainer(max_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=False)


def test_new_checkpoints_record_the_choices_and_reload_them(tmp_path):
    module = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs=dict(TINY))
    assert {k: module.hparams.model_kwargs[k] for k in VISION_OPTIONS} == VISION_OPTIONS
    _save(module, tmp_path / "new.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "new.ckpt", map_location="cpu")
    assert loaded.model.attn_options == VISION_OPTIONS
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x), rtol=0, atol=0)


def test_a_checkpoint_without_the_record_loads_with_the_papers_choices(tmp_path):
    """What a checkpoint saved before the defaults changed looks like: no λ keys in its hparams. The model it
    trained is the paper's; loading it with today's defaults would change λinit silently."""
    trained = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs={**TINY, **PAPER_OPTIONS})
    with torch.no_grad():  # make λ matter: non-trivial λ vectors
        for block in trained.model.blocks:
            for p in (block.attn.lambda_q1, block.attn.lambda_k1, block.attn.lambda_q2, block.attn.lambda_k2):
                p.normal_(0, 0.3)
    _save(trained, tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=False)
    for key in PAPER_OPTIONS:
        del checkpoint["hyper_parameters"]["model_kwargs"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")

    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert loaded.model.attn_options == PAPER_OPTIONS
    assert lambda_inits(loaded.model) == pytest.approx(expected_inits("schedule", TINY["depth"]))
    assert {k: loaded.hparams.model_kwargs[k] for k in PAPER_OPTIONS} == PAPER_OPTIONS  # re-saves keep them
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_exports_record_the_choices_for_a_local_dir_reload(tmp_path):
    module = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs={**TINY, "lambda_init": "schedule"})
    module.export(tmp_path / "export")
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert reloaded.attn_options["lambda_init"] == "schedule"
    assert lambda_inits(reloaded) == pytest.approx(expected_inits("schedule", TINY["depth"]))


def test_explicit_choices_that_contradict_an_old_checkpoint_are_a_mismatch_not_a_silent_rebuild(tmp_path):
    trained = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs={**TINY, **PAPER_OPTIONS})
    _save(trained, tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=False)
    for key in PAPER_OPTIONS:
        del checkpoint["hyper_parameters"]["model_kwargs"][key]
    explicit = ImageClassifier("diff_vit_tiny_patch4_32",
                               model_kwargs={**TINY, "lambda_init": 0.8, "lambda_mode": "fixed"})
    problems = explicit.checkpoint_mismatch(checkpoint)
    assert any(p.startswith("model_kwargs:") and "'lambda_mode': 'reparam'" in p for p in problems)
    assert explicit.model.attn_options["lambda_mode"] == "fixed"          # kept what it was told
    implicit = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs=dict(TINY))
    assert implicit.checkpoint_mismatch(checkpoint) == []                 # adopted the paper's choices
    assert implicit.model.attn_options == PAPER_OPTIONS


def test_a_standard_or_diffv2_checkpoint_records_no_choices_and_fits_its_own_model(tmp_path):
    """No λ / head-norm keys in a standard (or DIFF V2) classifier's hparams means there are none, not an old
    checkpoint: its own config's model fits it (before: the paper's choices were filled in and every such
    checkpoint was a mismatch for validate / test / predict)."""
    for name in ("vit_tiny_patch4_32", "diffv2_vit_tiny_patch4_32"):
        module = ImageClassifier(name, model_kwargs=dict(TINY))
        _save(module, tmp_path / f"{name}.ckpt")
        checkpoint = torch.load(tmp_path / f"{name}.ckpt", weights_only=False)
        assert ImageClassifier(name, model_kwargs=dict(TINY)).checkpoint_mismatch(checkpoint) == []
    # and the rebuild that adopts an old DIFF checkpoint's choices goes through the img_size / patch checks too
    old = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs={**TINY, **PAPER_OPTIONS, "img_size": 32})
    _save(old, tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=False)
    for key in PAPER_OPTIONS:
        del checkpoint["hyper_parameters"]["model_kwargs"][key]
    fresh = ImageClassifier("diff_vit_tiny_patch4_32", model_kwargs={**TINY, "img_size": 32})
    assert fresh.checkpoint_mismatch(checkpoint) == [] and fresh.model.attn_options == PAPER_OPTIONS
    assert fresh.model.patch_embed.img_size == (32, 32)
