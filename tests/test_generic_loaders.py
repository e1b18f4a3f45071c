"""diffvision's saved models through the libraries' generic loaders (what README's tables say).

diffusers resolves a component library other than its own from the modules already imported, but a
pipeline's or a standalone model's ``_class_name`` only inside the diffusers package; timm resolves a saved
config's ``architecture`` only in its registry. The fresh-process checks run in a subprocess, so that
nothing this test session imported helps.
"""
import json
import subprocess
import sys

import pytest
import timm
import torch
from diffusers import AutoModel, DDIMScheduler, DiTTransformer2DModel
from timm.models import save_for_hf

from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def tiny_pipeline(path):
    model = DiffDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, num_layers=1,
                                      sample_size=4, num_classes=3)
    DiffDiTPipeline(transformer=model, scheduler=DDIMScheduler()).save_pretrained(path)
    return model


def test_diffusers_automodel(tmp_path):
    model = tiny_pipeline(tmp_path / "pipe")
    # a model folder alone names only its class, which diffusers looks up in diffusers
    with pytest.raises(ValueError, match="`diffusers` has no class `DiffDiTTransformer2DModel`"):
        AutoModel.from_pretrained(tmp_path / "pipe" / "transformer")
    # through the pipeline folder, model_index.json names the module; diffusers takes it from sys.modules
    # (a str path: diffusers 0.42.1's AutoModel fails on a pathlib.Path after loading, building its load id)
    loaded = AutoModel.from_pretrained(str(tmp_path / "pipe"), subfolder="transformer")
    assert isinstance(loaded, DiffDiTTransformer2DModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # a fresh process: `import diffvision` (lazy) is not enough, diffusers names the module to import
    out = run_python(
        "import diffvision\nfrom diffusers import AutoModel\n"
        f"try:\n    AutoModel.from_pretrained({str(tmp_path / 'pipe')!r}, subfolder='transformer')\n"
        "except ValueError as err:\n    print('import diffvision.diffusion.transformer_diff_dit before' in str(err))\n"
        "import diffvision.diffusion\n"
        f"print(type(AutoModel.from_pretrained({str(tmp_path / 'pipe')!r}, subfolder='transformer')).__name__)")
    assert out[-2:] == ["True", "DiffDiTTransformer2DModel"]


def test_our_loader_names_a_folder_that_holds_something_else(tmp_path):
    tiny_pipeline(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"is a pipeline folder .*subfolder='transformer'"):
        DiffDiTTransformer2DModel.from_pretrained(tmp_path / "pipe")
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, num_layers=1, sample_size=4,
                          num_embeds_ada_norm=3).save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"holds diffusers' DiTTransformer2DModel: convert it with .*convert_dit_to_diff_dit"):
        DiffDiTTransformer2DModel.from_pretrained(tmp_path / "dit")


def test_timm_local_dir_reload_needs_import_diffvision(tmp_path):
    save_for_hf(timm.create_model("diff_vit_tiny_patch4_32", depth=1), tmp_path)
    notes = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["notes"]
    assert any("import diffvision" in note for note in notes)  # the saved config says what to import
    out = run_python(
        "import timm\n"
        f"try:\n    timm.create_model('local-dir:{tmp_path}', pretrained=True)\n"
        "except RuntimeError as err:\n    print('Unknown' in str(err))\n"
        "import diffvision\n"
        f"print(type(timm.create_model('local-dir:{tmp_path}', pretrained=True)).__name__)")
    assert out[-2:] == ["True", "DiffVisionTransformer"]
