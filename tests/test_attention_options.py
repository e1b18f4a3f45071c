"""λ and head-norm options of DIFF / GDA (lambda_init, lambda_mode, head_norm) against the formulas written
out here in float64, on every CPU backend, in the timm and DiT models, and through the CLI."""
import math
from types import SimpleNamespace

import pytest
import timm
import torch

import diffvision  # noqa: F401  (registers the timm models)
from _configs import config_args
from _training_data import QUIET, make_cifar_npz
from diffvision import DiffDiTTransformer2DModel
from diffvision.attention import DifferentialAttention, GroupedDifferentialAttention, lambda_init_schedule
from diffvision.cli import DiffvisionCLI

BACKENDS = ["math", "sdpa"]


def make(kind, **options):
    if kind == "diff":
        return DifferentialAttention(48, num_heads=3, depth=4, qkv_bias=True, **options)
    return GroupedDifferentialAttention(48, signal_heads=2, noise_heads=1, depth=4, qkv_bias=True, **options)


def randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "lambda_scalar":  # keep λ's own value: the tests set it
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (p.dim() == 1) * 0.2)
    return m.double()


def reference(m, x, lam, head_norm):
    """(softmax(q1 k1ᵀ/√d) − λ_i softmax(q2_g k2_gᵀ/√d)) v_i per signal head i, then (head_norm) RMSNorm with
    the learned scale × (1 − λinit), merge, proj. Sub-heads laid out [s.., n] per group (see the module)."""
    B, N, C = x.shape
    Hs, Hn, d, dv = m.signal_heads, m.noise_heads, m.head_dim, m.value_head_dim
    G = Hs // Hn
    q, k, v = torch.nn.functional.linear(x, m.qkv.weight, m.qkv.bias).split(C, dim=-1)
    q, k, v = q.view(B, N, Hn, G + 1, d), k.view(B, N, Hn, G + 1, d), v.view(B, N, Hs, dv)
    lam = lam.expand(Hs)
    outs = []
    for i in range(Hs):
        g, j = divmod(i, G)
        a1 = torch.softmax(q[:, :, g, j] @ k[:, :, g, j].transpose(-1, -2) / math.sqrt(d), -1)
        a2 = torch.softmax(q[:, :, g, G] @ k[:, :, g, G].transpose(-1, -2) / math.sqrt(d), -1)
        o = (a1 - lam[i] * a2) @ v[:, :, i]
        if head_norm:
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.sub_norm.weight * (1 - m.lambda_init)
        outs.append(o)
    return torch.nn.functional.linear(torch.cat(outs, -1), m.proj.weight, m.proj.bias)


def lambda_names(m):
    return [n for n, _ in m.named_parameters() if "lambda" in n]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["diff", "gda"])
def test_fixed_lambda_has_no_parameter_and_is_lambda_init_exactly(kind, backend):
    m = randomise(make(kind, lambda_init=0.8, lambda_mode="fixed", backend=backend))
    assert lambda_names(m) == [] and "lambda" not in str(list(m.state_dict()))
    assert m.lam().dtype == torch.float64 and m.lam().item() == 0.8  # exactly, in the module's float64
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(m, x, torch.tensor(0.8, dtype=torch.float64), True),
                               rtol=1e-10, atol=1e-12)
    assert m.layout["lambda_mode"] == "fixed" and m.layout["lambda_init"] == 0.8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["diff", "gda"])
def test_scalar_lambda_is_one_learnable_value_per_head(kind, backend):
    m = make(kind, lambda_mode="scalar", backend=backend)  # λinit from the depth-4 schedule
    heads = m.signal_heads
    assert lambda_names(m) == ["lambda_scalar"] and m.lambda_scalar.shape == (heads,)
    assert m.lambda_scalar.dtype == torch.float32
    torch.testing.assert_close(m.lambda_scalar, torch.full((heads,), lambda_init_schedule(4)))
    m = randomise(m)
    with torch.no_grad():
        m.lambda_scalar.copy_(torch.linspace(0.1, 0.9, heads))  # distinct per head
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(m, x, m.lambda_scalar.detach(), True), rtol=1e-10, atol=1e-12)
    m(x).sum().backward()
    assert m.lambda_scalar.grad is not None and (m.lambda_scalar.grad != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["diff", "gda"])
def test_without_head_norm_there_is_no_norm_and_no_scale_factor(kind, backend):
    m = randomise(make(kind, head_norm=False, backend=backend))
    assert m.sub_norm is None and not any("sub_norm" in n for n, _ in m.named_parameters())
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(m, x, m.lam(), False), rtol=1e-10, atol=1e-12)
    assert m.layout["head_norm"] is False


def test_lambda_init_forms():
    assert make("diff").lambda_init == make("diff", lambda_init="schedule").lambda_init == lambda_init_schedule(4)
    assert make("diff", lambda_init=None).lambda_init == lambda_init_schedule(4)  # the old spelling of "schedule"
    assert make("diff", lambda_init=0.8).lambda_init == 0.8
    for bad in ("paper", float("nan"), True, [0.8]):
        with pytest.raises(ValueError, match="lambda_init must be a finite number or 'schedule'"):
            make("diff", lambda_init=bad)
    with pytest.raises(ValueError, match=r"unknown lambda_mode 'learned'; accepted: \['reparam', 'fixed', 'scalar'\]"):
        make("gda", lambda_mode="learned")
    with pytest.raises(ValueError, match="head_norm must be True or False"):
        make("gda", head_norm="no")


def test_options_reach_every_block_of_the_timm_and_dit_models(tmp_path):
    vit = timm.create_model("gda_vit_tiny_patch4_32", depth=2, lambda_init=0.8, lambda_mode="scalar", head_norm=False)
    assert all(b.attn.layout["lambda_mode"] == "scalar" and b.attn.sub_norm is None for b in vit.blocks)
    assert all(torch.equal(b.attn.lambda_scalar, torch.full((2,), 0.8)) for b in vit.blocks)  # timm's init kept it
    assert {f"blocks.{i}.attn.lambda_scalar" for i in range(2)} <= vit.no_weight_decay()
    fixed = timm.create_model("diff_vit_tiny_patch4_32", depth=2, lambda_init="schedule", lambda_mode="fixed")
    assert lambda_names(fixed) == [] and fixed.blocks[1].attn.lambda_init == lambda_init_schedule(1)

    dit = DiffDiTTransformer2DModel(num_attention_heads=6, attention_head_dim=8, in_channels=3, num_layers=2,
                                    sample_size=8, patch_size=2, num_classes=10, attn_kind="diff",
                                    lambda_init=0.8, lambda_mode="fixed", head_norm=False)
    assert all(b.attn.lam().item() == pytest.approx(0.8) and b.attn.sub_norm is None for b in dit.transformer_blocks)
    dit.save_pretrained(tmp_path)
    loaded = DiffDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.attn_layout == dit.attn_layout and loaded.config.lambda_mode == "fixed"


# ------------------------------------------------------------------------------------------------
# Every option trains one step through the CLI
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return SimpleNamespace(cifar=make_cifar_npz(base / "cifar10", per_class_train=2, per_class_test=1),
                           cache=base / "cache")


def fit_one_step(config, data, root, *extra):
    return DiffvisionCLI(args=[
        "fit", *config_args(config), "--data.root", str(data.cifar), "--data.cache_dir",
        str(data.cache), "--data.num_workers", "0", "--data.batch_size", "10", "--data.eval_batch_size", "10",
        "--trainer.default_root_dir", str(root), "--trainer.fast_dev_run", "true", *QUIET, *extra])


CLASSIFIER_OPTIONS = {  # model_kwargs -> what the built attention layout must say
    "lambda_init": ("lambda_init: 0.5", {"lambda_init": 0.5}),
    "fixed": ("lambda_init: 0.5, lambda_mode: fixed", {"lambda_mode": "fixed", "lambda_init": 0.5}),
    "reparam": ("lambda_mode: reparam", {"lambda_mode": "reparam"}),
    "scalar": ("lambda_mode: scalar", {"lambda_mode": "scalar"}),
    "head_norm": ("head_norm: false", {"head_norm": False}),
    "backend": ("attn_backend: math", {"backend": "math"}),
}


@pytest.mark.parametrize("option", list(CLASSIFIER_OPTIONS))
def test_each_option_trains_a_classifier_through_the_cli(option, data, tmp_path):
    kwargs, expected = CLASSIFIER_OPTIONS[option]
    cli = fit_one_step("cifar10_vit+gda", data, tmp_path, "--model.init_args.model_kwargs",
                       f"{{depth: 1, embed_dim: 48, {kwargs}}}")
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])
    layout = cli.model.model.attn_layout
    assert {k: layout[k] for k in expected} == expected


TINY_DIT = "num_layers: 1, num_attention_heads: 6, attention_head_dim: 8, patch_size: 4"


@pytest.mark.parametrize("config,extra,expected", [
    ("cifar10_vit", ["--model.init_args.model_name", "diffv2_vit_tiny_patch4_32",
                     "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}"], {"attn_kind": "diffv2"}),
    ("cifar10_dit", ["--model.init_args.attn_kind", "diffv2",
                          "--model.init_args.transformer_kwargs", f"{{{TINY_DIT}}}"], {"attn_kind": "diffv2"}),
    ("cifar10_dit+gda", ["--model.init_args.transformer_kwargs",
                         f"{{{TINY_DIT}, lambda_mode: scalar, head_norm: false, lambda_init: 0.8}}"],
     {"attn_kind": "gda", "lambda_mode": "scalar", "head_norm": False, "lambda_init": 0.8}),
])
def test_diffv2_and_dit_options_train_through_the_cli(config, extra, expected, data, tmp_path):
    if "dit" in config:
        extra = ["--model.init_args.sample_steps", "2", "--model.init_args.num_sample_images", "0",
                 "--model.init_args.fid_num_samples", "0", *extra]
    cli = fit_one_step(config, data, tmp_path, *extra)
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])
    model = cli.model.model if hasattr(cli.model, "model") else cli.model.transformer
    assert {k: model.attn_layout[k] for k in expected} == expected
