"""Linear attention (issue 23): LiT's ``linear`` and the DyDiLA reconstruction ``dydila``.

The references are written out independently in float64: the explicit N×N form of the same kernelised
attention, argmax routing by indexing, the power map by its formula, the depthwise conv by shifted sums."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import diffvision  # noqa: F401  (registers the timm models)
from diffvision.attention import (
    ATTN_KINDS,
    DYDILA_OPTIONS,
    DynamicDifferentialLinearAttention,
    LinearAttention,
    MultiHeadAttention,
    create_attention,
    layer_heads,
    twin_heads,
)
from diffvision.attention.linear import linear_attention, power_kernel, route

DIM, HEADS = 16, 2


def make(kind="dydila", dim=DIM, heads=HEADS, seed=0, dtype=torch.float64, prefix=0, **options):
    torch.manual_seed(seed)
    m = create_attention(kind, dim, num_heads=heads, qkv_bias=True, linear_options=options or None)
    m.num_prefix_tokens = prefix
    with torch.no_grad():  # spread γ / λ further than their init, so routing choices show in the output
        if getattr(m, "gammas", None) is not None:
            m.gammas.copy_(1 + 2.5 * torch.rand_like(m.gammas))
        if getattr(m, "lambda_bank", None) is not None:
            m.lambda_bank.copy_(torch.rand_like(m.lambda_bank))
    return m.to(dtype)


def tokens(batch=2, n=16, dim=DIM, seed=1, dtype=torch.float64):
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------

def ref_power(z, gamma):
    """‖r‖·r^γ/‖r^γ‖ over the last dim, written out."""
    p = z ** gamma
    return z.norm(dim=-1, keepdim=True) * p / p.norm(dim=-1, keepdim=True)


def ref_conv(v, weight, bias, prefix):
    """Depthwise conv over the square patch grid of ``v (B, h, N, d)``, as shifted sums; prefix tokens get 0."""
    B, h, N, d = v.shape
    side = math.isqrt(N - prefix)
    k = weight.shape[-1]
    grid = F.pad(v[:, :, prefix:].reshape(B, h, side, side, d), (0, 0, k // 2, k // 2, k // 2, k // 2))
    out = bias.expand(B, h, side, side, d).clone()
    for i in range(k):
        for j in range(k):
            out = out + grid[:, :, i:i + side, j:j + side] * weight[:, 0, i, j]
    return torch.cat([torch.zeros(B, h, prefix, d, dtype=v.dtype), out.reshape(B, h, side * side, d)], dim=2)


def reference(m, x):
    """The layer's formula with an explicit N×N map, argmax routing by indexing (float64)."""
    o = m.options
    B, N, D = x.shape
    h, dh, eps = m.num_heads, D // m.num_heads, o["eps"]
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(D, dim=-1)
    kind = m.attn_kind
    n_p = o.get("projectors", 0) if kind == "dydila" else 0
    n_m = o.get("kernels", 0) if kind == "dydila" else 0
    per_tensor = o.get("kernel_routing") == "per_tensor"

    def pick(router, inp):
        return (inp @ router.weight.T).argmax(-1)

    def gamma(index, inp):
        if n_m == 0:
            return None
        bank = m.gammas[index if per_tensor else 0]
        if n_m == 1:
            return bank[0].clamp(min=1).expand(B, N)
        router = m.kernel_routers[index if per_tensor else 0]
        return bank[pick(router, inp if per_tensor else x)].clamp(min=1)

    def phi(z, g):
        r = F.relu(z) + eps
        if g is None:
            return r
        if o["kernel_norm"] == "head":
            return ref_power(r.view(B, N, h, dh), g[..., None, None]).reshape(B, N, D)
        return ref_power(r, g[..., None])

    pq, pk = phi(q, gamma(0, q)), phi(k, gamma(1, k))
    qh, kh = pq, pk
    if kind == "dydila" and o["differential"]:
        def redundancy(bank, router_name):
            if n_p == 1:
                return x @ bank[0]
            return torch.einsum("bnd,bnde->bne", x, bank[pick(getattr(m, router_name), x)])
        qr, kr = redundancy(m.q_bank, "q_router"), redundancy(m.k_bank, "k_router")
        pqr, pkr = phi(qr, gamma(2, qr)), phi(kr, gamma(3, kr))
        if o["lambdas"] == 1:
            lq = lk = m.lambda_bank[0].expand(B, N)
        elif o["lambda_routing"] == "token":
            lq, lk = (m.lambda_bank[pick(r, x)] for r in m.lambda_routers)
        else:
            lq = m.lambda_bank[pick(m.lambda_routers[0], torch.cat([pq, pqr], -1))]
            lk = m.lambda_bank[pick(m.lambda_routers[1], torch.cat([pk, pkr], -1))]
        qh, kh = pq - lq[..., None] * pqr, pk - lk[..., None] * pkr
    split = lambda t: t.view(B, N, h, dh).transpose(1, 2)  # noqa: E731
    scores = split(qh) @ split(kh).transpose(-2, -1)  # (B, h, N, N): the explicit map
    vh = split(v)
    normaliser = o.get("normaliser", "positive")
    if normaliser == "positive":
        out = (scores @ vh) / (split(pq) @ split(pk).transpose(-2, -1)).sum(-1, keepdim=True)
    else:
        out = scores @ vh / N
        if normaliser == "rmsnorm":
            out = out / (out.pow(2).mean(-1, keepdim=True) + torch.finfo(out.dtype).eps).sqrt() * m.out_norm.weight
    if o["conv_size"]:
        out = out + ref_conv(vh, m.dwc.weight, m.dwc.bias, m.num_prefix_tokens)
    return out.transpose(1, 2).reshape(B, N, D) @ m.proj.weight.T + m.proj.bias


# ---------------------------------------------------------------------------------------------
# Formula
# ---------------------------------------------------------------------------------------------

def test_linear_form_equals_the_explicit_n_by_n_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(2, 3, 20, 8, generator=g, dtype=torch.float64), torch.rand(2, 3, 20, 8, generator=g,
                                                                                  dtype=torch.float64)
    v = torch.randn(2, 3, 20, 5, generator=g, dtype=torch.float64)
    scores = q @ k.transpose(-2, -1)
    torch.testing.assert_close(linear_attention(q, k, v), scores @ v / scores.sum(-1, keepdim=True))
    torch.testing.assert_close(linear_attention(q - 0.3 * k, k, v, normaliser="none"),
                               ((q - 0.3 * k) @ k.transpose(-2, -1)) @ v / 20)
    # "positive" divides by the mass of the masses given, not of the (signed) difference
    torch.testing.assert_close(linear_attention(q - 0.3 * k, k, v, q, k),
                               ((q - 0.3 * k) @ k.transpose(-2, -1)) @ v / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize("kind,prefix,options", [
    ("linear", 0, {}),
    ("linear", 1, {}),                                   # a ViT's class token: no conv term for it
    ("linear", 0, {"conv_size": 3, "eps": 1e-3}),
    ("dydila", 0, {}),
    ("dydila", 1, {"normaliser": "none", "kernel_norm": "channel"}),
    ("dydila", 0, {"normaliser": "rmsnorm", "kernel_routing": "per_tensor", "lambda_routing": "per_tensor"}),
    ("dydila", 0, {"projectors": 1, "kernels": 1, "lambdas": 1, "conv_size": 0}),
])
def test_layer_equals_its_written_out_formula(kind, prefix, options):
    m = make(kind, prefix=prefix, **options).eval()
    x = tokens(n=16 + prefix)
    torch.testing.assert_close(m(x), reference(m, x), rtol=1e-10, atol=1e-10)


def test_power_map_keeps_the_norm_and_sharpens():
    z = torch.rand(50, 8, dtype=torch.float64) + 1e-3
    for gamma in (1.0, 2.0, 3.5):
        out = power_kernel(z, torch.tensor(gamma, dtype=torch.float64), eps=0.0)
        torch.testing.assert_close(out.norm(dim=-1), z.norm(dim=-1))  # the norm is kept
        torch.testing.assert_close(out, ref_power(z, gamma))
    # a larger γ concentrates the vector on its largest entries (what softmax's exponential does)
    peak = lambda g: (power_kernel(z, torch.tensor(g), 0.0).amax(-1) / z.norm(dim=-1)).mean()  # noqa: E731
    assert peak(1.0) < peak(2.0) < peak(3.0)
    # huge activations in bf16: s^γ is taken on r / max(r), so nothing overflows
    big = (torch.rand(4, 8) * 3e4).bfloat16()
    assert torch.isfinite(power_kernel(big, torch.tensor(3.0), 1e-6)).all()


# ---------------------------------------------------------------------------------------------
# Routing and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", ["ste", "gumbel"])
def test_router_is_one_hot_forward_and_softmax_backward(grad):
    logits = torch.randn(64, 5, requires_grad=True)
    weights = route(logits, grad)
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0} and (weights.detach().sum(-1) == 1).all()
    if grad == "ste":
        assert torch.equal(weights.detach().argmax(-1), logits.argmax(-1))
    assert torch.equal(route(logits, grad, training=False).detach().argmax(-1), logits.argmax(-1))
    (weights * torch.arange(5.0)).sum().backward()
    soft = logits.detach().softmax(-1)
    if grad == "ste":  # the gradient of Σ softmax·c
        expected = soft * (torch.arange(5.0) - (soft * torch.arange(5.0)).sum(-1, keepdim=True))
        torch.testing.assert_close(logits.grad, expected)
    assert logits.grad.abs().sum() > 0


def test_each_routed_choice_is_one_bank_entry_per_token():
    m = make(lambda_routing="token").eval()
    x = tokens()
    gamma = m.gamma_for(0, x).squeeze(-1)
    torch.testing.assert_close(gamma, m.gammas[0][m.kernel_routers[0](x).argmax(-1)].clamp(min=1))
    lam_q, lam_k = m.token_lambdas(x, *[None] * 4)
    torch.testing.assert_close(lam_q.squeeze(-1), m.lambda_bank[m.lambda_routers[0](x).argmax(-1)])
    torch.testing.assert_close(lam_k.squeeze(-1), m.lambda_bank[m.lambda_routers[1](x).argmax(-1)])
    chosen = m.q_bank[m.q_router(x).argmax(-1)]                   # (B, N, d, d): one projector per token
    torch.testing.assert_close(m.redundancy(x, m.q_bank, m.q_router), torch.einsum("bnd,bnde->bne", x, chosen))
    assert len(set(m.routing(x)["q_router"].flatten().tolist())) > 1  # the tokens do not all pick one


@pytest.mark.parametrize("options", [
    {"router_grad": "ste"},
    {"router_grad": "gumbel", "normaliser": "rmsnorm"},
    {"kernel_routing": "per_tensor", "lambda_routing": "per_tensor"},
])
def test_every_parameter_gets_a_gradient(options):
    m = make(dtype=torch.float32, **options).train()
    x = tokens(batch=4, n=64, dtype=torch.float32).requires_grad_()
    (m(x) * torch.randn(4, 64, DIM)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Options off reduce to the simpler kind
# ---------------------------------------------------------------------------------------------

ALL_OFF = {"projectors": 0, "kernels": 0, "differential": False}


def test_all_parts_off_is_linear_with_the_same_parameters():
    linear = make("linear")
    dydila = make("dydila", **ALL_OFF)
    assert set(dydila.state_dict()) == set(linear.state_dict())
    dydila.load_state_dict(linear.state_dict())
    x = tokens()
    assert torch.equal(dydila(x), linear(x))


def shared(target, source):
    """``target`` with every parameter ``source`` has under the same name."""
    own = target.state_dict()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if k in own and v.shape == own[k].shape},
                           strict=False)
    return target


def test_kernel_off_equals_power_maps_of_gamma_one():
    on = make(kernels=4)
    with torch.no_grad():
        on.gammas.fill_(1.0)  # φ_1 = ReLU + ε: the kernel bank is then the plain kernel
    off = shared(make(kernels=0), on)
    x = tokens()
    torch.testing.assert_close(on(x), off(x), rtol=1e-12, atol=1e-12)
    # and one fixed kernel equals a routed bank whose entries all have its γ
    single = make(kernels=1)
    bank = shared(make(kernels=4), single)
    with torch.no_grad():
        bank.gammas.fill_(float(single.gammas[0, 0]))
    torch.testing.assert_close(bank(x), shared(single, bank)(x), rtol=1e-12, atol=1e-12)


def test_differential_off_equals_lambda_zero():
    on = make()
    with torch.no_grad():
        on.lambda_bank.zero_()
    off = shared(make(differential=False, projectors=0), on)
    x = tokens()
    torch.testing.assert_close(on(x), off(x), rtol=1e-12, atol=1e-12)


def test_one_projector_equals_a_bank_of_copies_and_one_lambda_a_bank_of_equal_values():
    static = make(projectors=1, lambdas=1)
    routed = shared(make(projectors=3, lambdas=5), static)
    with torch.no_grad():
        routed.q_bank.copy_(static.q_bank.expand_as(routed.q_bank))
        routed.k_bank.copy_(static.k_bank.expand_as(routed.k_bank))
        routed.lambda_bank.fill_(float(static.lambda_bank[0]))
    x = tokens()
    torch.testing.assert_close(routed(x), static(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Precision, memory, errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "dydila"])
def test_bf16_stays_finite_and_close_at_large_activations(kind):
    m = make(kind, dim=32, dtype=torch.float32)
    x = tokens(n=64, dim=32, dtype=torch.float32) * 3e3
    exact = m.double()(x.double())
    low = copy.deepcopy(m).bfloat16()(x.bfloat16()).double()
    assert torch.isfinite(low).all()
    assert (low - exact).norm() <= 0.05 * exact.norm()
    # the unscaled state Σ φ(k) vᵀ would not survive fp16 at these activations (what the scaling avoids)
    q, k, v = m.qkv(x.double()).chunk(3, -1)
    assert not torch.isfinite((F.relu(k).half().transpose(-2, -1) @ v.half())).all()


def test_fp16_stays_finite_at_large_activations():
    m = make("dydila", dim=32, dtype=torch.float16)
    x = (tokens(n=64, dim=32, dtype=torch.float32) * 300).half()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("kind", ["linear", "dydila"])
def test_no_n_by_n_tensor_at_16384_tokens(kind):
    """The largest allocation of any op in forward + backward stays a few N·d: an N×N map would be 512×."""
    m = create_attention(kind, 32, num_heads=2)
    n = 128 * 128
    x = torch.randn(1, n, 32, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m(x).sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    token_bytes = n * 32 * 4
    assert largest <= 16 * token_bytes  # one N×N float32 map per head would be n / 32 = 512 token_bytes
    # the check sees an N×N tensor when there is one
    q = torch.randn(1, 2048, 8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q @ q.transpose(1, 2)
    assert max(e.cpu_memory_usage for e in prof.events()) >= 2048 * 2048 * 4


def test_bad_options_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"unknown dydila option 'projector' \(did you mean 'projectors'"):
        make(projector=2)
    with pytest.raises(ValueError, match=r"unknown linear option 'projectors'.*accepted: \['conv_size', 'eps'\]"):
        make("linear", projectors=2)
    with pytest.raises(ValueError, match="projectors must be an int >= 0, got -1"):
        make(projectors=-1)
    with pytest.raises(ValueError, match="conv_size must be an odd int >= 1.*got 4"):
        make(conv_size=4)
    with pytest.raises(ValueError, match=r"unknown normaliser 'positiv' \(did you mean 'positive'"):
        make(normaliser="positiv")
    with pytest.raises(ValueError, match="projectors=0 needs differential=False"):
        make(projectors=0)
    with pytest.raises(ValueError, match="differential=False needs projectors=0"):
        make(differential=False)
    with pytest.raises(ValueError, match="gamma_init must be 'spread' or a number >= 1, got 0.5"):
        make(gamma_init=0.5)
    with pytest.raises(ValueError, match="lambdas must be an int >= 1"):
        make(lambdas=0)
    with pytest.raises(ValueError, match="attn_kind='diff' takes no linear_options"):
        create_attention("diff", 16, num_heads=2, linear_options={"conv_size": 3})
    with pytest.raises(ValueError, match="linear_heads=2 only applies to attn_kind='linear' or attn_kind='dydila'"):
        twin_heads("diff", 16, 2, linear_heads=2)
    m = make("linear")
    with pytest.raises(ValueError, match="15 tokens minus 0 prefix tokens = 15 form no square grid"):
        m(tokens(n=15))
    with pytest.raises(ValueError, match="takes no attn_mask or is_causal"):
        m(tokens(), is_causal=True)
    make("linear", conv_size=0)(tokens(n=15))  # without the conv no grid is needed


def test_registry_entries_and_twin_rule():
    assert ATTN_KINDS["linear"].layer is LinearAttention and ATTN_KINDS["dydila"].layer is \
        DynamicDifferentialLinearAttention
    assert twin_heads("linear", 384, 6) == twin_heads("dydila", 768, 12) == {"num_heads": 2}
    assert twin_heads("dydila", 384, 6, linear_heads=4) == {"num_heads": 4}
    std = MultiHeadAttention(384, 6, qkv_bias=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lin = create_attention("linear", 384, qkv_bias=True, **layer_heads("linear", **twin_heads("linear", 384, 6)))
    assert count(lin) == count(std) + 25 * 192 + 192  # + the depthwise conv on heads of 192
    dyd = create_attention("dydila", 384, qkv_bias=True, num_heads=2)
    n_p, n_m, n_d = DYDILA_OPTIONS["projectors"], DYDILA_OPTIONS["kernels"], DYDILA_OPTIONS["lambdas"]
    assert count(dyd) == count(lin) + 2 * n_p * 384 ** 2 + 2 * 384 * n_p + (n_m + 384 * n_m) + (n_d + 2 * 384 * n_d)


# ---------------------------------------------------------------------------------------------
# Model families
# ---------------------------------------------------------------------------------------------

LINEAR_VITS = [f"{kind}_vit_{size}" for kind in ("linear", "dydila")
               for size in ("tiny_patch16_224", "small_patch16_224", "base_patch16_224", "tiny_patch4_32",
                            "small_patch4_32")]


def test_timm_names_configs_and_full_size_layouts():
    assert sorted(timm.list_models("linear_vit*") + timm.list_models("dydila_vit*")) == sorted(LINEAR_VITS)
    for name in LINEAR_VITS:
        m = timm.create_model(name, device="meta")
        cfg = m.pretrained_cfg
        assert cfg["architecture"] == name and not cfg.get("url")
        assert cfg["paper_ids"] == ("arXiv:2601.13683" if name.startswith("dydila") else "arXiv:2501.12976")
        assert "reconstruction" in cfg["description"] or name.startswith("linear")
        attn = m.blocks[0].attn
        assert attn.attn_kind == name.split("_vit_")[0] and attn.num_heads == 2
        assert attn.num_prefix_tokens == 1 and attn.grid_size == tuple(m.patch_embed.grid_size)


@pytest.mark.parametrize("kind", ["linear", "dydila"])
def test_timm_model_forward_features_and_standard_weights(kind):
    name = f"{kind}_vit_tiny_patch4_32"
    model = timm.create_model(name, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    features = timm.create_model(name, depth=2, features_only=True, out_indices=(0, 1))
    assert [f.shape for f in features(x)] == [(2, 192, 8, 8)] * 2
    final, inter = model.forward_intermediates(x, indices=1)
    assert final.shape == (2, 65, 192) and inter[0].shape == (2, 192, 8, 8)
    # a standard ViT's weights load (LiT's weight inheritance): the linear kinds' own tensors keep their init
    standard = timm.create_model("vit_tiny_patch4_32", depth=2, num_classes=5)
    report = diffvision.models.load_standard_vit_weights(model, standard)
    assert "blocks.0.attn.dwc.weight" in report.kept_init and "blocks.0.attn.qkv.weight" in report.copied
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, standard.blocks[1].attn.qkv.weight)
    decay_free = model.no_weight_decay()
    assert ("blocks.0.attn.gammas" in decay_free) is (kind == "dydila")
    assert "blocks.0.attn.q_bank" not in decay_free


@pytest.mark.parametrize("kind", ["linear", "dydila"])
def test_dit_model_pipeline_and_lightning_module(kind, tmp_path):
    from diffusers import DDIMScheduler

    from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel
    from diffvision.lightning import DiffusionModule

    options = {"normaliser": "rmsnorm"} if kind == "dydila" else {"conv_size": 3}
    model = DiffDiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, num_layers=2, sample_size=8,
                                      patch_size=2, in_channels=3, num_classes=4, attn_kind=kind,
                                      linear_options=options).eval()  # eval: no label dropout
    assert model.attn_layout["num_heads"] == 2 and model.attn_layout["attn_kind"] == kind
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    out = model(x, t, y).sample
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = DiffDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.linear_options == options
    torch.testing.assert_close(loaded(x, t, y).sample, out)
    pipe = DiffDiTPipeline(transformer=model.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    # LiT's weight inheritance: a standard DiT's weights convert; the linear kinds' own tensors keep their init
    from diffvision.diffusion import convert_dit_to_diff_dit

    standard = DiffDiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, num_layers=2, sample_size=8,
                                         patch_size=2, in_channels=3, num_classes=4, attn_kind="standard")
    converted, info = convert_dit_to_diff_dit(standard.to_dit(), attn_kind=kind, output_loading_info=True)
    assert "transformer_blocks.1.attn.dwc.weight" in info.kept_init
    torch.testing.assert_close(converted.transformer_blocks[1].attn.qkv.weight, standard.transformer_blocks[1].attn.qkv.weight)
    module = DiffusionModule(preset="DiT-S/4", attn_kind=kind, img_size=8, num_classes=4, num_sample_images=0,
                             fid_num_samples=0, transformer_kwargs=dict(num_layers=1, num_attention_heads=2,
                                                                        attention_head_dim=8, patch_size=2))
    losses = module.diffusion_loss(module.transformer, torch.rand(2, 3, 8, 8) * 2 - 1, y, torch.randn(2, 3, 8, 8), t)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and module.transformer.transformer_blocks[0].attn.attn_kind == kind
