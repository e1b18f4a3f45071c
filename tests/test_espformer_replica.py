"""The experiment replica of ESPFormer's ViT and "DiffTransformer" attention (issue 17).

References are written here from the description in diffvision/experiments/espformer.py (float64, explicit
index arithmetic for the ``.view`` split), not from the module's code.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch

from diffvision.attention import DifferentialAttention
from diffvision.experiments.espformer import (
    ESPFORMER_SWITCHES,
    ESPFormerDifAttention,
    ReplicaLambdaMonitor,
    WideDifferentialAttention,
    view_split_source,
)
from diffvision.lightning import ImageClassifier

NAME = "espformer_vit_patch4_32"


# ---------------------------------------------------------------------------------------------
# parameter counts from the architecture
# ---------------------------------------------------------------------------------------------

def vit_parameters(attention: int, img: int, patch: int, dim: int = 128, depth: int = 6, mlp: int = 128,
                   classes: int = 2) -> int:
    """ESPFormer's ViT: patch linear, position embedding, CLS, pre-norm blocks, LayerNorm + linear head."""
    tokens = (img // patch) ** 2 + 1
    embed = (3 * patch * patch * dim + dim) + tokens * dim + dim
    block = 2 * (2 * dim) + attention + (dim * mlp + mlp) + (mlp * dim + dim)
    return embed + depth * block + (2 * dim + dim * classes + classes)


def standard_attention(inner: int, dim: int = 128) -> int:
    return dim * 3 * inner + (inner * dim + dim)  # q/k/v without bias, out with bias


def replica_attention(dim: int = 128, heads: int = 8) -> int:
    """q/k: dim -> 2·H·dim, v: dim -> H·dim (all with bias), out: H·dim -> dim, λ, GroupNorm(H, H)."""
    return 2 * (dim * 2 * heads * dim + 2 * heads * dim) + (dim * heads * dim + heads * dim) \
        + (heads * dim * dim + dim) + 1 + 2 * heads


def parameters(**kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(NAME, num_classes=2, **kwargs).parameters())


def test_parameter_counts_follow_the_architecture():
    baseline = vit_parameters(standard_attention(8 * 64), 32, 4)
    replica = vit_parameters(replica_attention(), 32, 4)
    assert parameters() == baseline == 1_790_082
    assert parameters(attention="replica") == replica
    # the 2.67x is ESPFormer's 224 px / patch 16; at 32 px / patch 4 (fewer position embeddings) 2.77x
    at_224 = dict(img_size=224, patch_size=16)
    assert parameters(**at_224) == vit_parameters(standard_attention(512), 224, 16)
    assert parameters(attention="replica", **at_224) == vit_parameters(replica_attention(), 224, 16)
    assert round(vit_parameters(replica_attention(), 224, 16) / vit_parameters(standard_attention(512), 224, 16), 2) == 2.67
    assert round(replica / baseline, 2) == 2.77
    # parameter-matched replica: the baseline's projections + q/k/v biases, λ and the GroupNorm
    assert parameters(attention="replica", replica={"widen": False}) == baseline + 6 * (3 * 512 + 1 + 16)
    # diffvision's DIFF at the baseline's projections: + a 2·64 RMSNorm scale per layer
    assert parameters(attention="diff") == baseline + 6 * 128
    # standard attention at ESPFormer's budget: 8 heads of 192 come within 1 %
    wide = parameters(dim_head=192)
    assert wide == vit_parameters(standard_attention(8 * 192), 32, 4) and abs(wide / replica - 1) < 0.01


# ---------------------------------------------------------------------------------------------
# the attention against float64 references
# ---------------------------------------------------------------------------------------------

def small(**switches) -> ESPFormerDifAttention:
    torch.manual_seed(0)
    kwargs = {**ESPFORMER_SWITCHES, "attn_drop": 0.0, **switches}
    module = ESPFormerDifAttention(16, num_heads=4, dim_head=8, **kwargs).double().eval()
    with torch.no_grad():  # a norm with non-trivial affine parameters
        if module.norm is not None:
            module.norm.weight.uniform_(0.5, 1.5)
            if getattr(module.norm, "bias", None) is not None:
                module.norm.bias.uniform_(-0.5, 0.5)
    return module


def reference(module: ESPFormerDifAttention, x: torch.Tensor) -> torch.Tensor:
    """One sample ``x`` (N, dim), float64, head by head with explicit indices."""
    H, w, wv, N = module.num_heads, module.width, module.value_width, x.shape[0]
    Q, K, V = (lin(x) for lin in (module.q_proj, module.k_proj, module.v_proj))

    def rows(P: torch.Tensor, width: int, h: int) -> torch.Tensor:
        if not module.view_split:
            return P[:, h * width:(h + 1) * width]
        # ESPFormer's .view: (head h, position m) is chunk (h·N + m) % H of token (h·N + m) // H
        return torch.stack([P[(h * N + m) // H, ((h * N + m) % H) * width:((h * N + m) % H + 1) * width]
                            for m in range(N)])

    lam, lam0 = module.lam.detach().double(), float(module.lambda_init)
    outputs = torch.zeros(H, N, wv, dtype=torch.float64)
    for h in range(H):
        q, k, v = rows(Q, 2 * w, h), rows(K, 2 * w, h), rows(V, wv, h)
        signal = torch.softmax(q[:, :w] @ k[:, :w].T * module.scale, dim=-1)
        noise = torch.softmax(q[:, w:] @ k[:, w:].T * module.scale, dim=-1)
        outputs[h] = (signal - lam * noise) @ v
    if module.view_split:  # transpose to (N, H) order, then read back as (H, N): slot p = m·H + h
        placed = torch.zeros_like(outputs)
        for h in range(H):
            for m in range(N):
                p = m * H + h
                placed[p // N, p % N] = outputs[h, m]
        outputs = placed
    if module.head_norm == "group":  # each head over all of its tokens and features
        mean = outputs.mean(dim=(1, 2), keepdim=True)
        var = outputs.var(dim=(1, 2), unbiased=False, keepdim=True)
        gamma, beta = module.norm.weight.detach().view(H, 1, 1), module.norm.bias.detach().view(H, 1, 1)
        outputs = ((outputs - mean) / torch.sqrt(var + 1e-5) * gamma + beta) * (1 - lam0)
    elif module.head_norm == "rms":  # each head and token over its features
        rms = torch.sqrt(outputs.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
        outputs = outputs / rms * module.norm.weight.detach() * (1 - lam0)
    merged = torch.cat([outputs[h] for h in range(H)], dim=-1)  # token t: head 0's row t, head 1's, ...
    return module.out_proj(merged)


@pytest.mark.parametrize("switches", [
    {},                                                     # ESPFormer's
    {"view_split": False},                                  # the head split fixed
    {"widen": False},                                       # parameter-matched
    {"head_norm": "rms", "scale": "width", "view_split": False},
    {"head_norm": "none", "qkv_bias": False, "lambda_init": 0.8},
])
def test_attention_matches_the_float64_reference(switches):
    module = small(**switches)
    x = torch.randn(3, 9, 16, dtype=torch.float64)  # 9 tokens: not a multiple of the 4 heads
    with torch.no_grad():
        out = module(x)
        expected = torch.stack([reference(module, xi) for xi in x])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_the_view_split_is_not_token_permutation_equivariant():
    """Attention without position information commutes with permuting the tokens; the `.view` split ties
    heads to token positions, so it does not."""
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fixed, viewed = small(view_split=False), small()
        torch.testing.assert_close(fixed(x[:, perm]), fixed(x)[:, perm], rtol=1e-10, atol=1e-10)
        assert (viewed(x[:, perm]) - viewed(x)[:, perm]).abs().max() > 1e-3


def test_each_view_split_head_sees_one_group_of_tokens():
    """Changing one token moves the keys of every head with the usual split, but with the `.view` split
    only those of the heads whose group holds the token (from the memory layout)."""
    N, H = 9, 4
    x = torch.randn(1, N, 16, dtype=torch.float64)
    for view_split in (True, False):
        module = small(view_split=view_split)
        for token in range(N):
            bumped = x.clone()
            bumped[0, token] += 1.0
            with torch.no_grad():
                change = (module.split_heads(module.k_proj(bumped)) - module.split_heads(module.k_proj(x))).abs()
            heads = {h for h in range(H) if change[0, h].max() > 1e-9}
            if view_split:
                expected = {h for h in range(H) for m in range(N) if view_split_source(N, H, h, m)[0] == token}
                assert heads == expected and len(expected) <= 2
            else:
                assert heads == set(range(H))
    # at 32 px / patch 4 (65 tokens, 8 heads) a head sees 8 or 9 consecutive tokens
    groups = [{view_split_source(65, 8, h, m)[0] for m in range(65)} for h in range(8)]
    assert all(len(g) in (9, 10) and max(g) - min(g) + 1 == len(g) for g in groups)


# ---------------------------------------------------------------------------------------------
# each switch does what it says
# ---------------------------------------------------------------------------------------------

def test_widen_sets_the_projection_widths():
    wide = ESPFormerDifAttention(128, num_heads=8, dim_head=64)
    matched = ESPFormerDifAttention(128, num_heads=8, dim_head=64, widen=False)
    assert [tuple(m.weight.shape) for m in (wide.q_proj, wide.k_proj, wide.v_proj, wide.out_proj)] == \
        [(2048, 128), (2048, 128), (1024, 128), (128, 1024)]
    assert [tuple(m.weight.shape) for m in (matched.q_proj, matched.k_proj, matched.v_proj, matched.out_proj)] == \
        [(512, 128), (512, 128), (512, 128), (128, 512)]
    assert wide.scale == matched.scale == 64 ** -0.5  # ESPFormer's 1/sqrt(d_k) whatever the width
    assert ESPFormerDifAttention(128, scale="width").scale == 128 ** -0.5


def test_lambda_is_one_uniform_draw_and_lambda_init_is_not_saved():
    draws = []
    for seed in range(5):
        torch.manual_seed(seed)
        module = ESPFormerDifAttention(16, num_heads=4, dim_head=8)
        assert module.lam.shape == (1,) and float(module.lam.detach()) == module.lambda_init
        draws.append(module.lambda_init)
    assert all(0 <= d < 1 for d in draws) and len(set(draws)) == 5
    assert ESPFormerDifAttention(16, num_heads=4, dim_head=8, lambda_init=0.8).lambda_init == 0.8
    # a plain attribute: a reload into a module built from another seed keeps that module's (1 − λinit)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    for in_state in (False, True):
        trained, fresh = small(lambda_init_in_state=in_state), small(lambda_init_in_state=in_state)
        torch.manual_seed(123)
        fresh = ESPFormerDifAttention(16, num_heads=4, dim_head=8, attn_drop=0.0,
                                      lambda_init_in_state=in_state).double().eval()
        assert ("lambda_init" in trained.state_dict()) is in_state
        fresh.load_state_dict(trained.state_dict())
        with torch.no_grad():
            same = torch.allclose(fresh(x), trained(x), rtol=1e-12, atol=1e-12)
        assert same is in_state


def test_attention_dropout_and_biases():
    x = torch.randn(2, 9, 16)
    for p, differs in ((0.1, True), (0.0, False)):
        module = ESPFormerDifAttention(16, num_heads=4, dim_head=8, attn_drop=p).train()
        assert (not torch.equal(module(x), module(x))) is differs
        module.eval()
        assert torch.equal(module(x), module(x))
    with_bias, without = ESPFormerDifAttention(16, 4, 8), ESPFormerDifAttention(16, 4, 8, qkv_bias=False)
    assert all(m.bias is not None for m in (with_bias.q_proj, with_bias.k_proj, with_bias.v_proj))
    assert all(m.bias is None for m in (without.q_proj, without.k_proj, without.v_proj))
    assert without.out_proj.bias is not None


def test_wide_diff_is_diffvisions_diff_on_a_wider_attention():
    """WideDifferentialAttention(dim, inner) == DifferentialAttention(inner) on the tokens zero-padded to
    ``inner``, with the q/k/v weights placed on the first ``dim`` inputs and the output cut to ``dim``."""
    torch.manual_seed(0)
    dim, inner = 16, 32
    wide = WideDifferentialAttention(dim, inner, num_heads=2, lambda_init=0.8, lambda_mode="fixed",
                                     backend="math").double()
    full = DifferentialAttention(inner, num_heads=2, lambda_init=0.8, lambda_mode="fixed", backend="math").double()
    with torch.no_grad():
        full.qkv.weight.zero_()
        full.qkv.weight[:, :dim] = wide.qkv.weight
        full.proj.weight.zero_()
        full.proj.weight[:dim] = wide.proj.weight
        full.proj.bias.zero_()
        full.proj.bias[:dim] = wide.proj.bias
        x = torch.randn(2, 7, dim, dtype=torch.float64)
        padded = torch.cat([x, torch.zeros(2, 7, inner - dim, dtype=torch.float64)], dim=-1)
        torch.testing.assert_close(wide(x), full(padded)[..., :dim], rtol=1e-10, atol=1e-10)
    assert wide.layout["num_heads"] == 2 and wide.layout["head_dim"] == 8 and wide.layout["value_head_dim"] == 16


# ---------------------------------------------------------------------------------------------
# the model, as configs build it
# ---------------------------------------------------------------------------------------------

def test_the_classifier_builds_every_arm_by_name():
    for kwargs in ({}, {"attention": "replica", "replica": {"view_split": False}}, {"attention": "diff"},
                   {"dim_head": 192}):
        module = ImageClassifier(model_name=NAME, model_kwargs=kwargs, num_classes=2, img_size=32)
        assert module(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    torch.manual_seed(0)
    model = ImageClassifier(model_name=NAME, num_classes=2, img_size=32).model
    with torch.no_grad():  # ~N(0, 1): 8,320 and 128 draws
        assert 0.95 < float(model.pos_embed.std()) < 1.05 and 0.7 < float(model.cls_token.std()) < 1.3
    timm_init = timm.create_model(NAME, num_classes=2, init="timm")
    assert float(timm_init.pos_embed.detach().std()) < 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"attention": "replica", "replica": {"widen_qk": True}}, "unknown replica switch"),
    ({"attention": "replica", "replica": {"head_norm": "layer"}}, "unknown head_norm 'layer'"),
    ({"attention": "standard", "replica": {"widen": False}}, "are for attention='replica'"),
    ({"attention": "sparse"}, "unknown attention 'sparse'"),
    ({"attention": "replica", "lambda_mode": "fixed"}, "options of attention='diff'"),
    ({"attention": "replica", "replica": {"lambda_init": "normal"}}, "lambda_init must be 'uniform'"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(NAME, **kwargs)


def test_the_lambda_monitor_logs_each_replica_layer():
    class Module(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.model = timm.create_model(NAME, num_classes=2, depth=2, **kwargs)
            self.logged = {}

        def log_dict(self, values, **kwargs):
            self.logged.update(values)

    monitor = ReplicaLambdaMonitor(every_n_epochs=10)
    replica = Module(attention="replica")
    with torch.no_grad():
        replica.model.blocks[1].attn.lam.fill_(0.25)
    monitor.on_train_epoch_end(SimpleNamespace(current_epoch=4, max_epochs=300), replica)
    assert replica.logged == {}  # epoch 5: not a 10th
    monitor.on_train_epoch_end(SimpleNamespace(current_epoch=9, max_epochs=300), replica)
    layers = [b.attn for b in replica.model.blocks]
    assert replica.logged == {"lambda/layer_0": pytest.approx(float(layers[0].lam.detach())),
                              "lambda/layer_1": 0.25, "lambda_init/layer_0": layers[0].lambda_init,
                              "lambda_init/layer_1": layers[1].lambda_init}
    standard = Module()
    monitor.on_train_epoch_end(SimpleNamespace(current_epoch=299, max_epochs=300), standard)
    assert standard.logged == {}
