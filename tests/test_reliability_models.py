"""Bad-input battery for the models, the kernel and checkpoint loading (issue 8).

Each case asserts the exception type and a message that names the bad value and what is accepted, or a
documented safe behaviour (NaN in gives NaN out, for that sample only). Cases already covered elsewhere
are not repeated: kernel shapes / masks / dtypes in tests/test_attention_kernel.py, NaN queries / keys /
values / λ in tests/test_kernel_properties.py, DiT image shape / label range / timestep (2,) / config
values in tests/test_diffusers_dit.py::test_bad_model_inputs_raise_clear_errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import diffvision  # noqa: F401  (registers the timm models)
from diffvision import DiffDiTTransformer2DModel, differential_attention
from diffvision.attention import differential_attention_v2
from diffvision.attention import twin_heads
from diffvision.lightning import DiffusionModule, ImageClassifier
from diffvision.models import CorruptCheckpointError, load_checkpoint_file, load_standard_vit_weights
from _training_data import CONFIGS, QUIET, make_cifar_npz
from reference_attention import make_inputs, reference, reference_v2, rel_err

VIT_KW = dict(depth=1, embed_dim=48, img_size=16, num_classes=10)
DIT_KW = dict(num_attention_heads=2, attention_head_dim=16, in_channels=3, num_layers=1, sample_size=8,
              patch_size=2, num_classes=10)
DIFFUSION_KW = dict(preset="DiT-S/2", img_size=8, num_classes=4, num_sample_images=0, fid_num_samples=0,
                    transformer_kwargs=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, patch_size=4))


def vit(name="diff_vit_tiny_patch4_32", **kw):
    return timm.create_model(name, **{**VIT_KW, **kw}).eval()


def perturbed(model, seed=0):
    """Move every parameter off its (partly zero) init so every input reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# DIFF-ViT / GDA-ViT images
# ------------------------------------------------------------------------------------------------

VIT_BAD_IMAGES = {
    "height 32 for a 16x16 model": (lambda: torch.randn(2, 3, 32, 16), AssertionError,
                                    r"Input height \(32\) doesn't match model \(16\)"),
    "width 12 for a 16x16 model": (lambda: torch.randn(2, 3, 16, 12), AssertionError,
                                   r"Input width \(12\) doesn't match model \(16\)"),
    "1 channel for an RGB model": (lambda: torch.randn(2, 1, 16, 16), ValueError,
                                   r"input has 1 channels \(shape \(2, 1, 16, 16\)\), the model takes in_chans=3"),
    "4 channels (latents) for an RGB model": (lambda: torch.randn(2, 4, 16, 16), ValueError,
                                              r"input has 4 channels .* in_chans=3"),
    "no batch dimension": (lambda: torch.randn(3, 16, 16), ValueError,
                           r"\(batch, channels, height, width\) image tensor, got \(3, 16, 16\)"),
    "uint8 pixels": (lambda: torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ValueError,
                     r"floating-point \(normalised\) image tensor, got dtype torch.uint8"),
    "numpy array": (lambda: np.zeros((2, 3, 16, 16), np.float32), ValueError, r"image tensor, got ndarray"),
}


@pytest.mark.parametrize("name", ["diff_vit_tiny_patch4_32", "gda_vit_tiny_patch4_32"])
@pytest.mark.parametrize("case", list(VIT_BAD_IMAGES))
def test_vit_rejects_bad_images(name, case):
    make, exc, match = VIT_BAD_IMAGES[case]
    with pytest.raises(exc, match=match):
        vit(name)(make())


def test_vit_channel_and_size_errors_on_every_entry_point():
    model = vit(in_chans=1)  # a Fashion-MNIST model
    rgb = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"input has 3 channels .* in_chans=1; .*in_chans=3"):
        model(rgb)
    with pytest.raises(ValueError, match=r"input has 3 channels"):
        model.forward_intermediates(rgb)
    with pytest.raises(ValueError, match=r"input has 3 channels"):
        model.forward_features(rgb)
    dynamic = vit(dynamic_img_size=True)  # any size, but whole patches
    assert dynamic(torch.randn(1, 3, 24, 20)).shape == (1, 10)
    with pytest.raises(AssertionError, match=r"Input height \(18\) should be divisible by patch size \(4\)"):
        dynamic(torch.randn(1, 3, 18, 16))


@pytest.mark.parametrize("name", ["diff_vit_tiny_patch4_32", "gda_vit_tiny_patch4_32"])
def test_vit_nan_pixel_poisons_only_its_own_image(name):
    model = vit(name)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    clean = model(x)
    x[1, 0, 5, 7] = float("nan")
    out = model(x)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], clean[[0, 2]])  # no leak across the batch


# ------------------------------------------------------------------------------------------------
# DIFF-DiT inputs (beyond tests/test_diffusers_dit.py)
# ------------------------------------------------------------------------------------------------

def _dit_batch():
    return torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])


DIT_BAD_INPUTS = {
    "uint8 images": (lambda x, t, y: ((x * 50).to(torch.uint8), t, y),
                     r"hidden_states must be a floating-point tensor, got dtype torch.uint8"),
    "bool labels (a mask, not classes)": (lambda x, t, y: (x, t, y > 3),
                                          r"class_labels must be an integer tensor, got torch.bool"),
    "numpy labels": (lambda x, t, y: (x, t, y.numpy()), r"class_labels must be an integer tensor, got ndarray"),
    "labels of shape (B, 1)": (lambda x, t, y: (x, t, y[:, None]),
                               r"class_labels has shape \(3, 1\), expected \(3,\) = \(batch,\)"),
    "label 1000 for 10 classes": (lambda x, t, y: (x, t, torch.tensor([0, 1000, 2])),
                                  r"class_labels must lie in \[0, 10\]; 10 is the null class, got values in \[0, 1000\]"),
    "timesteps of shape (B, 1)": (lambda x, t, y: (x, t[:, None], y),
                                  r"timestep has shape \(3, 1\), expected \(\), \(1,\) or \(3,\)"),
    "timesteps of shape (2, 3)": (lambda x, t, y: (x, t.expand(2, 3), y), r"timestep has shape \(2, 3\)"),
    "timestep as a string": (lambda x, t, y: (x, "10", y), r"timestep must be a number or a tensor .* got '10'"),
    "bool timesteps": (lambda x, t, y: (x, t > 100, y), r"timestep must hold real numbers .* torch.bool"),
}


@pytest.mark.parametrize("case", list(DIT_BAD_INPUTS))
def test_dit_rejects_bad_inputs(case):
    transform, match = DIT_BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        DiffDiTTransformer2DModel(**DIT_KW)(*transform(*_dit_batch()))


def test_dit_latent_model_rejects_rgb_and_rgb_model_rejects_latents():
    x, t, y = _dit_batch()
    with pytest.raises(ValueError, match=r"shape \(3, 3, 8, 8\), expected \(batch, 4, 8, 8\) = \(batch, in_channels"):
        DiffDiTTransformer2DModel(**{**DIT_KW, "in_channels": 4})(x, t, y)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 8, 8\), expected \(batch, 3, 8, 8\)"):
        DiffDiTTransformer2DModel(**DIT_KW)(torch.randn(3, 4, 8, 8), t, y)


def test_dit_nan_image_or_timestep_poisons_only_its_own_sample():
    model = perturbed(DiffDiTTransformer2DModel(**DIT_KW))
    x, t, y = _dit_batch()
    with torch.no_grad():
        clean = model(x, t, y).sample
        x_nan = x.clone()
        x_nan[1, 2, 3, 4] = float("nan")
        out = model(x_nan, t, y).sample
        t_nan = model(x, torch.tensor([1.0, float("nan"), 999.0]), y).sample
    for poisoned in (out, t_nan):
        assert torch.isnan(poisoned[1]).any()
        torch.testing.assert_close(poisoned[[0, 2]], clean[[0, 2]])


# ------------------------------------------------------------------------------------------------
# Kernel: what tests/test_attention_kernel.py and tests/test_kernel_properties.py do not cover
# ------------------------------------------------------------------------------------------------

KERNEL_INPUTS = ["q1", "k1", "q2", "k2", "v"]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
@pytest.mark.parametrize("which", range(5), ids=KERNEL_INPUTS)
def test_kernel_infinite_input_is_never_hidden(backend, value, which):
    """±inf in any input: the output is non-finite exactly where the float64 reference is (never a
    finite value where IEEE math gives inf/NaN), and equal to it elsewhere."""
    inputs = list(make_inputs(1, 2, 1, 6, 6, 8, 16, torch.float32))
    poisoned = inputs[which].clone()
    poisoned[0, 0, 2, 3] = value
    inputs[which] = poisoned
    out = differential_attention(*inputs, backend=backend)
    ref = reference(*inputs)
    assert not torch.isfinite(out).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_kernel_non_finite_float_mask(backend, value):
    """An additive mask entry of NaN or +inf poisons that query row (as in float64); -inf masks the key."""
    inputs = make_inputs(1, 2, 1, 6, 6, 8, 16, torch.float32)
    mask = torch.zeros(6, 6)
    mask[2, 3] = value
    out = differential_attention(*inputs, attn_mask=mask, backend=backend)
    bad_rows = (~torch.isfinite(out)).any(-1)[0]
    if value == -float("inf"):
        assert torch.isfinite(out).all()
        bool_mask = torch.ones(6, 6, dtype=torch.bool)
        bool_mask[2, 3] = False
        torch.testing.assert_close(out, differential_attention(*inputs, attn_mask=bool_mask, backend=backend))
    else:
        assert bad_rows[:, 2].all() and not bad_rows[:, [0, 1, 3, 4, 5]].any()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kernel_infinite_lambda_gives_non_finite_output(backend):
    inputs = list(make_inputs(1, 2, 1, 4, 4, 8, 16))
    inputs[5] = torch.tensor(float("inf"))
    assert not torch.isfinite(differential_attention(*inputs, backend=backend)).any()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kernel_float64_lambda_and_mask_with_float32_inputs_are_safe(backend):
    """Documented: λ and an additive mask may be another float dtype; the output keeps the inputs' dtype
    and is correct."""
    q1, k1, q2, k2, v, lam = make_inputs(1, 2, 1, 5, 6, 8, 16, torch.float32)
    mask = torch.randn(5, 6, dtype=torch.float64)
    out = differential_attention(q1, k1, q2, k2, v, lam.double(), attn_mask=mask, backend=backend)
    assert out.dtype == torch.float32
    assert rel_err(out, reference(q1, k1, q2, k2, v, lam, mask=mask)) < 5e-6


KERNEL_BAD_DTYPES = {
    "bool q1": (0, lambda t: t.bool(), r"q1 must be a floating-point tensor, got dtype torch.bool"),
    "complex k2": (3, lambda t: t.to(torch.complex64), r"k2 must be a floating-point tensor, got dtype torch.complex64"),
    "int v": (4, lambda t: t.long(), r"v must be a floating-point tensor, got dtype torch.int64"),
    "float16 q1 with bfloat16 k1": (1, lambda t: t.bfloat16(), r"must share one dtype, got .*'k1': torch.bfloat16"),
    "int lambda": (5, lambda t: torch.tensor(1), r"lam must be a floating-point tensor, got dtype torch.int64"),
}


@pytest.mark.parametrize("case", list(KERNEL_BAD_DTYPES))
def test_kernel_rejects_non_float_and_mixed_dtypes(case):
    index, change, match = KERNEL_BAD_DTYPES[case]
    inputs = list(make_inputs(1, 2, 1, 4, 4, 8, 16, torch.float16 if "float16" in case else torch.float32))
    inputs[index] = change(inputs[index])
    with pytest.raises(ValueError, match=match):
        differential_attention(*inputs)


LOW_RANK_MASKS = {  # shapes the validation accepts (they broadcast to (B, H, N, M)); issue 20, item 7
    "bool (M,)": lambda: torch.tensor([True, False, True, True, False, True]),
    "float (M,)": lambda: torch.tensor([0.0, -1.5, float("-inf"), 2.0, 0.0, 0.5]),
    "bool ()": lambda: torch.tensor(True),
    "float ()": lambda: torch.tensor(-0.7),
}


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@pytest.mark.parametrize("case", list(LOW_RANK_MASKS))
def test_kernel_0d_and_1d_masks_work_on_every_backend(backend, case):
    """A mask of shape (M,) or () broadcasts like any other; SDPA itself indexes a mask's last two dims
    (IndexError on these), so every backend must give the float64 reference, not a crash."""
    mask = LOW_RANK_MASKS[case]()
    inputs = make_inputs(1, 2, 1, 5, 6, 8, 16, torch.float32)
    out = differential_attention(*inputs, attn_mask=mask, backend=backend)
    assert rel_err(out, reference(*inputs, mask=mask)) < 1e-5
    q, k, v = (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    lam = torch.rand(1, 2, 5)
    out = differential_attention_v2(q, k, v, lam, attn_mask=mask, backend=backend)
    assert rel_err(out, reference_v2(q, k, v, lam, mask=mask)) < 1e-5


HALF_PRECISION = {  # finite inputs whose logits overflow float16 or lose digits in bfloat16 (item 8)
    "float16, q x 1e4": (torch.float16, 1e4, 1e-3),
    "bfloat16, logits of several hundred": (torch.bfloat16, 30.0, 2e-2),
}


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("case", list(HALF_PRECISION))
def test_kernel_half_precision_large_logits_stay_finite_and_close(backend, case):
    """The reference backend is at least as robust as SDPA: finite inputs give a finite output, within the
    half-precision rounding of the inputs of the float64 reference on the same (rounded) inputs."""
    dtype, q_scale, tol = HALF_PRECISION[case]
    q1, k1, q2, k2, v, lam = make_inputs(2, 2, 1, 16, 16, 8, 16, torch.float64, seed=3)
    inputs = [(t * q_scale if i in (0, 2) else t).to(dtype) for i, t in enumerate((q1, k1, q2, k2, v, lam))]
    assert all(torch.isfinite(t).all() for t in inputs)
    out = differential_attention(*inputs, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = reference(*inputs)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol
    q = torch.cat([q1, q1.flip(2)], 1) * q_scale  # 2h = 4 query heads on the 2 key/value heads
    out = differential_attention_v2(q.to(dtype), k1.to(dtype), v.to(dtype), lam.to(dtype).expand(2, 2, 16),
                                    backend=backend)
    ref = reference_v2(q.to(dtype), k1.to(dtype), v.to(dtype), lam.to(dtype))
    assert torch.isfinite(out).all() and ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol


# ------------------------------------------------------------------------------------------------
# Unknown names: the error lists what is accepted and suggests the closest
# ------------------------------------------------------------------------------------------------

UNKNOWN_NAMES = {
    "DiT preset DiT-S2": (lambda: DiffDiTTransformer2DModel.from_preset("DiT-S2"),
                          r"unknown preset 'DiT-S2' \(did you mean 'DiT-S/2'.*accepted: \['DiT-S/2'"),
    "DiT preset in lower case": (lambda: DiffDiTTransformer2DModel.from_preset("dit-b/4"),
                                 r"unknown preset 'dit-b/4' \(did you mean 'DiT-B/4'"),
    "DiT attn_kind": (lambda: DiffDiTTransformer2DModel(**{**DIT_KW, "attn_kind": "dif"}),
                      r"unknown attn_kind 'dif' \(did you mean 'diff'.*accepted"),
    "DiT attn_kind, old name": (lambda: DiffDiTTransformer2DModel(**{**DIT_KW, "attention_type": "dif"}),
                                r"unknown attn_kind 'dif' \(did you mean 'diff'.*accepted"),
    "twin_heads kind": (lambda: twin_heads("Standard", 48, 6), r"unknown attn_kind 'Standard' \(did you mean 'standard'"),
    "DiT backend in config": (lambda: DiffDiTTransformer2DModel(**{**DIT_KW, "attn_backend": "sdp"}),
                              r"unknown attn_backend 'sdp' \(did you mean 'sdpa'.*accepted"),
    "DiT backend, old name": (lambda: DiffDiTTransformer2DModel(**{**DIT_KW, "diff_attention_backend": "sdp"}),
                              r"unknown attn_backend 'sdp' \(did you mean 'sdpa'.*accepted"),
    "DiT backend switch": (lambda: DiffDiTTransformer2DModel(**DIT_KW).set_attention_backend("trition"),
                           r"unknown attn_backend 'trition' \(did you mean 'triton'"),
    "ViT attn_kind": (lambda: vit(attn_kind="dif"), r"unknown attn_kind 'dif' \(did you mean 'diff'.*accepted"),
    "ViT attn_backend": (lambda: vit(attn_backend="mat"), r"unknown attn_backend 'mat' \(did you mean 'math'"),
    "ViT backend switch": (lambda: vit().set_attention_backend("SDPA"), r"'SDPA' \(did you mean 'sdpa'"),
    "ViT lambda_mode": (lambda: vit(lambda_mode="reparm"), r"unknown lambda_mode 'reparm' \(did you mean 'reparam'"),
    "DiffusionModule preset": (lambda: DiffusionModule(**{**DIFFUSION_KW, "preset": "DiT-XS/2"}),
                               r"unknown preset 'DiT-XS/2' \(did you mean .*'DiT-S/2'"),
    "DiffusionModule sampler": (lambda: DiffusionModule(**{**DIFFUSION_KW, "sampler": "dpm-solver"}),
                                r"unknown sampler 'dpm-solver' \(did you mean 'dpmsolver'.*accepted"),
    "nothing close": (lambda: DiffusionModule(**{**DIFFUSION_KW, "attn_kind": "performer"}),
                      r"^unknown attn_kind 'performer'; accepted: \['standard', 'diff', 'gda', 'diffv2', 'linear', "
                      r"'dydila'\]$"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_NAMES))
def test_unknown_names_suggest_close_ones(case):
    build, match = UNKNOWN_NAMES[case]
    with pytest.raises(ValueError, match=match):
        build()


# ------------------------------------------------------------------------------------------------
# Checkpoints of another architecture, through the public loading paths
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    """A DIFF-ViT checkpoint as .pth and .safetensors, and a real Lightning .ckpt of a tiny classifier."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    d = tmp_path_factory.mktemp("vit_files")
    sd = vit().state_dict()
    torch.save(sd, d / "diff.pth")
    save_file(sd, d / "diff.safetensors")
    module = ImageClassifier(model_name="diff_vit_tiny_patch4_32", model_kwargs=dict(depth=1, embed_dim=48),
                             img_size=16, num_classes=10)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=d, accelerator="cpu")
    data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))), batch_size=4)
    trainer.fit(module, data)
    trainer.save_checkpoint(d / "classifier.ckpt")
    return d


def test_diff_checkpoint_into_standard_vit_via_timm_pretrained_file(vit_files):
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*blocks\.0\.attn\.sub_norm\.weight"):
        vit("vit_tiny_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(vit_files / "diff.safetensors")))


def test_diff_checkpoint_into_standard_vit_via_load_standard_vit_weights(vit_files):
    with pytest.raises(ValueError, match=r"does not fit the model.*:\n  blocks\.0\.attn\.sub_norm\.weight: not in the model"):
        load_standard_vit_weights(vit("vit_tiny_patch4_32"), vit_files / "diff.pth")


def test_tiny_checkpoint_into_wider_model(vit_files):
    with pytest.raises(ValueError, match=r"checkpoint width 48 \(patch_embed.proj.weight \(48, 3, 4, 4\)\) does not "
                                         r"match the model's embed_dim 96"):
        vit(embed_dim=96, pretrained=True, pretrained_cfg_overlay=dict(file=str(vit_files / "diff.pth")))


DIT_SWAPS = {  # saved kind -> loaded kind: (exception, what the message says)
    ("standard", "diff"): (ValueError, r"missing from the checkpoint: \['transformer_blocks\.0\.attn\.lambda_k1'"),
    ("diff", "standard"): (ValueError, r"in the checkpoint but not in the model: \['transformer_blocks\.0\.attn\.lambda_k1'"),
    ("diff", "gda"): (RuntimeError, r"size mismatch for transformer_blocks\.0\.attn\.lambda_q1"),  # λ of another size
    ("standard", "diffv2"): (ValueError, r"missing from the checkpoint: \['transformer_blocks\.0\.attn\.lambda_proj\.weight'\]"),
    ("diffv2", "diff"): (ValueError, r"missing from the checkpoint: \['transformer_blocks\.0\.attn\.lambda_k1'.*\n"
                                     r"  in the checkpoint but not in the model: \['transformer_blocks\.0\.attn\.lambda_proj"),
}


@pytest.mark.parametrize("saved, loaded", list(DIT_SWAPS))
def test_dit_checkpoint_of_another_attention_type(tmp_path, saved, loaded):
    """q/k/v/proj shapes agree across attention kinds (width 36: DIFF V2 has 4 heads of 9 on 2 key/value
    heads, qkv 36 -> 108 as the others), so diffusers alone would load the weights (missing λ parameters as
    uninitialised memory) and only warn: from_pretrained refuses, naming the keys."""
    gda = dict(signal_heads=2, noise_heads=1)
    kw = {**DIT_KW, "num_attention_heads": 3, "attention_head_dim": 12}
    DiffDiTTransformer2DModel(**kw, attn_kind=saved, **(gda if saved == "gda" else {})).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(attn_kind=loaded, **(gda if loaded == "gda" else dict(signal_heads=None, noise_heads=None)))
    (tmp_path / "config.json").write_text(json.dumps(config))
    exc, match = DIT_SWAPS[(saved, loaded)]
    if exc is ValueError:
        match = rf"do not fit DiffDiTTransformer2DModel\(attn_kind='{loaded}'.*\n  " + match
    with pytest.raises(exc, match=match):
        DiffDiTTransformer2DModel.from_pretrained(tmp_path)


def test_dit_checkpoint_of_another_width(tmp_path):
    DiffDiTTransformer2DModel(**DIT_KW).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch for pos_embed\.proj\.weight: .*\[32, 3, 2, 2\].*\[16, 3, 2, 2\]"):
        DiffDiTTransformer2DModel.from_pretrained(tmp_path, attention_head_dim=8)


def test_lightning_checkpoint_into_another_architecture(vit_files):
    ckpt = vit_files / "classifier.ckpt"
    # the checkpoint records its DIFF model's λ choices, which a standard ViT does not take
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lambda_init'"):
        ImageClassifier.load_from_checkpoint(ckpt, model_name="vit_tiny_patch4_32")
    kwargs = {k: v for k, v in torch.load(ckpt, weights_only=True)["hyper_parameters"]["model_kwargs"].items()
              if not k.startswith(("lambda_", "head_norm"))}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*model\.blocks\.0\.attn\.sub_norm"):
        ImageClassifier.load_from_checkpoint(ckpt, model_name="vit_tiny_patch4_32", model_kwargs=kwargs)
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.patch_embed\.proj\.weight: .*\[48, 3, 4, 4\]"
                                           r".*\[96, 3, 4, 4\]"):
        ImageClassifier.load_from_checkpoint(ckpt, model_kwargs=dict(depth=1, embed_dim=96))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*transformer\.pos_embed"):
        DiffusionModule.load_from_checkpoint(ckpt, **DIFFUSION_KW)


# ------------------------------------------------------------------------------------------------
# Truncated checkpoint files: the error names the file and says it is truncated
# ------------------------------------------------------------------------------------------------

def _cut(src, dst, keep=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _dit_folder(tmp_path, safe):
    DiffDiTTransformer2DModel(**DIT_KW).save_pretrained(tmp_path / "dit", safe_serialization=safe)
    name = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    weights = tmp_path / "dit" / name
    _cut(weights, weights)
    return tmp_path / "dit", weights


TRUNCATED = {
    "timm pretrained file .pth": lambda d, t: (
        lambda f: vit(pretrained=True, pretrained_cfg_overlay=dict(file=str(f))), _cut(d / "diff.pth", t / "a.pth")),
    "timm pretrained file .safetensors": lambda d, t: (
        lambda f: vit(pretrained=True, pretrained_cfg_overlay=dict(file=str(f))),
        _cut(d / "diff.safetensors", t / "a.safetensors")),
    "load_standard_vit_weights .pth": lambda d, t: (
        lambda f: load_standard_vit_weights(vit(), f), _cut(d / "diff.pth", t / "a.pth")),
    "load_standard_vit_weights .safetensors, 90% kept": lambda d, t: (
        lambda f: load_standard_vit_weights(vit(), f), _cut(d / "diff.safetensors", t / "a.safetensors", 0.9)),
    "load_standard_vit_weights empty file": lambda d, t: (
        lambda f: load_standard_vit_weights(vit(), f), _cut(d / "diff.pth", t / "a.pth", 0.0)),
    "DiffDiT from_pretrained .safetensors": lambda d, t: (
        lambda f: DiffDiTTransformer2DModel.from_pretrained(f.parent), _dit_folder(t, True)[1]),
    "DiffDiT from_pretrained .bin": lambda d, t: (
        lambda f: DiffDiTTransformer2DModel.from_pretrained(f.parent), _dit_folder(t, False)[1]),
    "DiffusionModule.load_from_checkpoint .ckpt": lambda d, t: (
        lambda f: DiffusionModule.load_from_checkpoint(f), _cut(d / "classifier.ckpt", t / "a.ckpt")),
    "load_checkpoint_file .ckpt": lambda d, t: (
        lambda f: load_checkpoint_file(f), _cut(d / "classifier.ckpt", t / "a.ckpt", 0.97)),
    "ImageClassifier.load_from_checkpoint .ckpt": lambda d, t: (
        lambda f: ImageClassifier.load_from_checkpoint(f), _cut(d / "classifier.ckpt", t / "a.ckpt")),
}
@pytest.mark.parametrize("case", list(TRUNCATED))
def test_truncated_checkpoint_names_the_file(case, vit_files, tmp_path):
    load, path = TRUNCATED[case](vit_files, tmp_path)
    with pytest.raises(CorruptCheckpointError, match=rf"cannot load checkpoint {path}: .*truncated"):
        load(path)


def test_cli_ckpt_path_names_a_truncated_file(vit_files, tmp_path):
    from diffvision.cli import DiffvisionCLI

    path = _cut(vit_files / "classifier.ckpt", tmp_path / "last.ckpt")
    make_cifar_npz(tmp_path / "cifar", per_class_train=2, per_class_test=1)
    args = ["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--attn_kind", "diff", "--data.root", str(tmp_path / "cifar"),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0", "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}", "--ckpt_path",
            str(path), *QUIET]
    with pytest.raises(CorruptCheckpointError, match=rf"cannot load checkpoint {path}: .*truncated"):
        DiffvisionCLI(args=args)


# ------------------------------------------------------------------------------------------------
# Bit flips, foreign files and checkpoints of another model through the CLI (issue 20, items 2, 3, 9)
# ------------------------------------------------------------------------------------------------

def _flip(src, dst, n=64):
    """``src`` with ``n`` bytes inverted in the middle of its largest tensor: the zip stays well-formed and
    torch.load reads it without complaint; only the member's CRC-32 tells."""
    import zipfile

    with zipfile.ZipFile(src) as zf:
        member = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(src.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)  # local header
    middle = start + member.file_size // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    dst.write_bytes(bytes(data))
    assert torch.load(dst, map_location="cpu", weights_only=True)  # what every path did before: no error
    return dst, member.filename


def _cli_args(tmp_path, *extra):
    make_cifar_npz(tmp_path / "cifar", per_class_train=2, per_class_test=1)
    return ["--config", str(CONFIGS / "cifar10_vit.yaml"), "--attn_kind", "diff", "--data.root", str(tmp_path / "cifar"),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0", "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}", *QUIET, *extra]


def _trainer_resume(path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from diffvision.lightning import AtomicCheckpointIO

    module = ImageClassifier(model_name="diff_vit_tiny_patch4_32", model_kwargs=dict(depth=1, embed_dim=48),
                             img_size=16, num_classes=10)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))), batch_size=4)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", plugins=[AtomicCheckpointIO()])
    trainer.fit(module, data, ckpt_path=str(path))


BIT_FLIP_PATHS = {
    "load_checkpoint_file": lambda path, tmp: load_checkpoint_file(path),
    "ImageClassifier.load_from_checkpoint": lambda path, tmp: ImageClassifier.load_from_checkpoint(path),
    "Trainer.fit(ckpt_path=...) with AtomicCheckpointIO": lambda path, tmp: _trainer_resume(path),
    "diffvision fit --ckpt_path": lambda path, tmp: __import__("diffvision.cli").cli.DiffvisionCLI(
        args=["fit", *_cli_args(tmp, "--ckpt_path", str(path))]),
}


@pytest.mark.parametrize("case", list(BIT_FLIP_PATHS))
def test_bit_flipped_checkpoint_is_refused_naming_the_member(case, vit_files, tmp_path):
    path, member = _flip(vit_files / "classifier.ckpt", tmp_path / "flipped.ckpt")
    with pytest.raises(CorruptCheckpointError, match=rf"cannot load checkpoint {path}: corrupt: the archive member "
                                                     rf"'{member}' fails its CRC check"):
        BIT_FLIP_PATHS[case](path, tmp_path)


FOREIGN_FILES = {  # not checkpoints at all: called corrupt, never "would import or call (unknown)"
    "random bytes": (lambda rng: rng.bytes(5000), r"not a checkpoint: neither torch.save's zip format"),
    "random bytes after a pickle's first byte": (lambda rng: b"\x80" + rng.bytes(5000),
                                                 r"corrupt: its pickle stream is not readable"),
    "random bytes after a zip signature": (lambda rng: b"PK\x03\x04" + rng.bytes(5000),
                                           r"truncated or corrupt: torch.save's zip container is incomplete"),
}


@pytest.mark.parametrize("case", list(FOREIGN_FILES))
def test_a_file_of_random_bytes_is_called_corrupt_not_unsafe(case, tmp_path):
    make, match = FOREIGN_FILES[case]
    path = tmp_path / "random.ckpt"
    path.write_bytes(make(np.random.default_rng(7)))
    with pytest.raises(CorruptCheckpointError, match=rf"cannot load checkpoint {path}: {match}"):
        load_checkpoint_file(path)
    with pytest.raises(CorruptCheckpointError, match=rf"cannot load checkpoint {path}: {match}"):
        ImageClassifier.load_from_checkpoint(path)


def test_cli_ckpt_path_of_a_plain_state_dict_says_what_it_takes(vit_files, tmp_path):
    """A state dict is weights, not a training state: the error says so (before: KeyError 'pytorch-lightning_version')."""
    from diffvision.cli import DiffvisionCLI

    with pytest.raises(ValueError, match=rf"--ckpt_path {vit_files / 'diff.pth'} is not a Lightning checkpoint \(no "
                                         r"'state_dict' and 'pytorch-lightning_version'; it holds a dict with keys "
                                         r"\['blocks.0.attn.proj.bias'.*--ckpt_path takes a last.ckpt or epoch=\*.ckpt"):
        DiffvisionCLI(args=["fit", *_cli_args(tmp_path, "--ckpt_path", str(vit_files / "diff.pth"))])


@pytest.fixture(scope="module")
def standard_vit_run(tmp_path_factory):
    """A `diffvision fit` checkpoint of a 1-block standard ViT (2 heads), and the arguments that made it."""
    from diffvision.cli import DiffvisionCLI

    d = tmp_path_factory.mktemp("standard_run")
    make_cifar_npz(d / "cifar", per_class_train=2, per_class_test=1)
    args = ["--data.root", str(d / "cifar"), "--data.cache_dir", str(d / "cache"), "--data.num_workers", "0",
            "--trainer.default_root_dir", str(d / "runs"), "--trainer.limit_val_batches", "1", *QUIET]
    vit = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48, num_heads: 2}"]
    cli = DiffvisionCLI(args=["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), *args, *vit,
                              "--trainer.max_steps", "1", "--experiment", "standard"])
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", args


CLI_MISMATCHES = {  # config arguments over the standard ViT's checkpoint, and what the error names
    "DIFF config": (["--config", str(CONFIGS / "cifar10_vit.yaml"), "--config", str(CONFIGS / "kinds" / "diff.yaml"),
                     "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}"],
                    r"model_name: checkpoint 'vit_tiny_patch4_32', config 'diff_vit_tiny_patch4_32'.*weights missing "
                    r"from the checkpoint \(model.blocks.0.attn.lambda_q1"),
    "other head count, same weight shapes": (
        ["--config", str(CONFIGS / "cifar10_vit.yaml"), "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48, "
                                                                                         "num_heads: 4}"],
        r"model_kwargs: checkpoint \{'depth': 1, 'embed_dim': 48, 'num_heads': 2\}, config \{'depth': 1, "
        r"'embed_dim': 48, 'num_heads': 4\}\. Pass the config"),
    "a diffusion config": (["--config", str(CONFIGS / "cifar10_dit.yaml"), "--model.init_args.transformer_kwargs",
                            "{num_layers: 1}"], r"it holds a ImageClassifier, the config builds a DiffusionModule"),
}


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("case", list(CLI_MISMATCHES))
def test_cli_refuses_a_checkpoint_of_another_model_than_the_config(case, subcommand, standard_vit_run):
    """Before: LightningCLI merged the checkpoint's hyper_parameters over the config, so `fit --config <DIFF>
    --ckpt_path <ViT>` trained a standard ViT and wrote `model_name: vit_tiny_patch4_32` into config.yaml."""
    from diffvision.cli import DiffvisionCLI

    ckpt, args = standard_vit_run
    config, match = CLI_MISMATCHES[case]
    root = Path(args[args.index("--trainer.default_root_dir") + 1])
    before = sorted(root.rglob("*"))
    with pytest.raises(ValueError, match=rf"(?s)--ckpt_path {ckpt} does not fit the model the config builds: {match}"):
        DiffvisionCLI(args=[subcommand, *config, *args, "--ckpt_path", str(ckpt), "--experiment", "other"])
    assert not [p for p in sorted(root.rglob("*")) if p not in before and p.is_file() and p.name != ".writer.lock"]
