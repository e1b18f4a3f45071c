"""timm contract suite for the DIFF-ViT / GDA-ViT models (in the spirit of timm's tests/test_models.py).

Every registered name is exercised through ``timm.create_model``. To keep CI fast on 2 CPU cores,
the functional tests build each name with ``depth=3`` and small images (patch16 at 32x32 = 2x2
patches, patch4 at 16x16 = 4x4 patches), as timm's tests shrink inputs; the full-size models are
checked on the meta device (configs, head layout, λinit per depth, parameter counts), and one
full-size model runs at its native input size.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import timm
import timm.optim
import diffvision  # registers the models
from diffvision.attention import PAPER_OPTIONS, VISION_OPTIONS, lambda_init_schedule
from diffvision.models import DiffVisionTransformer, load_standard_vit_weights
from timm.models import save_for_hf

DIFF_NAMES = [f'diff_vit_{s}' for s in ('tiny_patch16_224', 'small_patch16_224', 'base_patch16_224',
                                        'tiny_patch4_32', 'small_patch4_32')]
GDA_NAMES = [n.replace('diff_', 'gda_') for n in DIFF_NAMES]
DIFFV2_NAMES = [n.replace('diff_', 'diffv2_') for n in DIFF_NAMES]
TWIN_NAMES = ['vit_tiny_patch4_32', 'vit_small_patch4_32']
ALL_NAMES = DIFF_NAMES + GDA_NAMES + DIFFV2_NAMES + TWIN_NAMES

WIDTH = {'tiny': 192, 'small': 384, 'base': 768}
# Head layouts written out by hand from the design (not read back from the code):
# (signal heads, noise heads, q/k sub-head dim, value head dim)
LAYOUT = {
    'diff_tiny': (3, 3, 32, 64), 'diff_small': (3, 3, 64, 128), 'diff_base': (6, 6, 64, 128),
    'gda_tiny': (2, 1, 64, 96), 'gda_small': (4, 2, 64, 96), 'gda_base': (8, 4, 64, 96),
}
# DIFF V2: (output heads h, key/value heads, head dim); 2h query heads. ViT-Ti's 3 heads are odd: 4 of 48.
V2_LAYOUT = {'diffv2_tiny': (4, 2, 48), 'diffv2_small': (6, 3, 64), 'diffv2_base': (12, 6, 64)}
NUM_CLASSES = 7


def size_of(name):
    return next(s for s in WIDTH if f'_{s}_' in name)


def twin_of(name):
    return 'vit_' + name.split('_vit_')[1] if '_vit_' in name else name


DEPTH = 3


def patch_of(name):
    return 16 if 'patch16' in name else 4


def small_kwargs(name):
    kwargs = dict(img_size=2 * patch_of(name) if 'patch16' in name else 4 * patch_of(name), depth=DEPTH)
    if kind_of(name) in ('diff', 'gda'):
        # the paper's learned λ: the most machinery (λ vectors, their init, decay and grouping) under test; the
        # models' own defaults are tested in test_vision_defaults.py
        kwargs.update(PAPER_OPTIONS)
    return kwargs


def grid_of(name):
    return small_kwargs(name)['img_size'] // patch_of(name)


def num_tokens(name):
    return grid_of(name) ** 2


_CACHE = {}


def cached(name):
    """One eval-mode build per name (timm's init dominates runtime); tests deep-copy to mutate."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = timm.create_model(name, num_classes=NUM_CLASSES, **small_kwargs(name)).eval()
    return _CACHE[name]


def images(name, batch=2, seed=0):
    size = small_kwargs(name)['img_size']
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def diff_only_names(model):
    """λ (vectors, per-head scalars or DIFF V2's W_λ) and the per-head RMSNorm scale."""
    return [n for n, _ in model.named_parameters() if '.attn.lambda_' in n or '.attn.sub_norm.' in n]


def kind_of(name):
    return name.split('_vit_')[0]


# ------------------------------------------------------------------------------------------------
# registry, configs, parameter parity
# ------------------------------------------------------------------------------------------------

def test_registered_names_exist_and_do_not_shadow_timm():
    assert sorted(timm.list_models('diff_vit*')) == sorted(DIFF_NAMES)
    assert sorted(timm.list_models('gda_vit*')) == sorted(GDA_NAMES)
    assert sorted(timm.list_models('diffv2_vit*')) == sorted(DIFFV2_NAMES)
    modules = {n: timm.models.model_entrypoint(n).__module__ for n in timm.list_models()}
    ours = [n for n, module in modules.items() if module.startswith('diffvision.models')]
    linear = timm.list_models('linear_vit*') + timm.list_models('dydila_vit*')  # tests/test_linear_attention.py
    assert sorted(ours) == sorted(ALL_NAMES + linear) and len(linear) == 10
    # experiment replicas (issue 17) register outside diffvision.models, under a prefix that says so
    others = [n for n, module in modules.items() if module.startswith('diffvision') and n not in ours]
    assert all(n.startswith('espformer_') for n in others), others
    for name in ('vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224'):
        assert timm.models.model_entrypoint(name).__module__ == 'timm.models.vision_transformer'


@pytest.mark.parametrize('name', ALL_NAMES)
def test_default_cfg_and_full_size_layout(name):
    m = timm.create_model(name, device='meta')  # full size, default kwargs, no memory
    cfg = m.pretrained_cfg
    is_32 = name.endswith('_32')
    assert cfg['architecture'] == name
    assert not (cfg.get('url') or cfg.get('hf_hub_id') or cfg.get('file'))  # no released weights
    assert cfg['input_size'] == ((3, 32, 32) if is_32 else (3, 224, 224))
    assert cfg['num_classes'] == m.num_classes == (10 if is_32 else 1000)
    assert len(cfg['mean']) == len(cfg['std']) == 3 and cfg['fixed_input_size']
    state_keys = set(m.state_dict())
    assert cfg['first_conv'] + '.weight' in state_keys and cfg['classifier'] + '.weight' in state_keys
    assert m.embed_dim == m.num_features == m.head_hidden_size == WIDTH[size_of(name)]
    assert len(m.blocks) == 12
    assert m.patch_embed.grid_size == ((8, 8) if is_32 else (14, 14))
    data_cfg = timm.data.resolve_data_config(model=m)
    assert data_cfg['input_size'] == cfg['input_size'] and data_cfg['mean'] == cfg['mean']

    if name in TWIN_NAMES:
        assert type(m) is timm.models.VisionTransformer
        assert m.blocks[0].attn.num_heads == WIDTH[size_of(name)] // 64
        return
    kind = kind_of(name)
    assert isinstance(m, DiffVisionTransformer) and m.attn_kind == kind
    layout = m.attn_layout
    if kind == 'diffv2':
        h, hkv, d = V2_LAYOUT[f'{kind}_{size_of(name)}']
        assert (layout['num_heads'], layout['query_heads'], layout['num_kv_heads'], layout['head_dim']) == \
            (h, 2 * h, hkv, d)
        assert 'DIFF V2' in cfg['description'] and 'Diff-Transformer-V2' in cfg['origin_url']
        return
    hs, hn, d, dv = LAYOUT[f'{kind}_{size_of(name)}']
    assert (layout['signal_heads'], layout['noise_heads'], layout['head_dim'], layout['value_head_dim']) \
        == (hs, hn, d, dv)
    assert ('DIFF' if kind == 'diff' else 'grouped differential') in cfg['description']
    for blk in m.blocks:  # the vision defaults (docs/variant_study.md): λ = 0.8 fixed, head norm
        assert (blk.attn.lambda_init, blk.attn.lambda_mode, blk.attn.head_norm_enabled) == \
            (VISION_OPTIONS['lambda_init'], VISION_OPTIONS['lambda_mode'], VISION_OPTIONS['head_norm'])
    paper = timm.create_model(name, device='meta', **PAPER_OPTIONS)
    for i, blk in enumerate(paper.blocks):
        assert blk.attn.lambda_init == pytest.approx(lambda_init_schedule(i))  # the paper's λinit follows depth


@pytest.mark.parametrize('name', DIFF_NAMES + GDA_NAMES + DIFFV2_NAMES)
def test_parameter_count_within_one_percent_of_standard_twin(name):
    m, twin = timm.create_model(name, device='meta'), timm.create_model(twin_of(name), device='meta')
    n, n_twin = (sum(p.numel() for p in x.parameters()) for x in (m, twin))
    if kind_of(name) == 'diffv2':
        h, _, _ = V2_LAYOUT[f'diffv2_{size_of(name)}']
        assert n - n_twin == 12 * WIDTH[size_of(name)] * h  # the only extra: W_λ (dim -> h) per block
    else:
        hs, hn, d, dv = LAYOUT[f"{kind_of(name)}_{size_of(name)}"]
        # the only extra parameters: one RMSNorm scale of dv per block (λ fixed by default) ...
        assert n - n_twin == 12 * dv
        # ... and 4 λ vectors of d with the paper's learned λ
        paper = timm.create_model(name, device='meta', **PAPER_OPTIONS)
        assert sum(p.numel() for p in paper.parameters()) - n_twin == 12 * (4 * d + dv)
    assert abs(n - n_twin) / n_twin < 0.01
    # and the projections have exactly the twin's shapes, so weights can map one to one
    assert m.blocks[0].attn.qkv.weight.shape == twin.blocks[0].attn.qkv.weight.shape
    assert m.blocks[0].attn.proj.weight.shape == twin.blocks[0].attn.proj.weight.shape


@pytest.mark.parametrize('name', ['diff_vit_tiny_patch4_32', 'vit_tiny_patch4_32'])
def test_pretrained_true_without_weights_fails_with_timms_error(name):
    with pytest.raises(RuntimeError, match='No pretrained weights exist'):
        timm.create_model(name, pretrained=True, depth=1)


# ------------------------------------------------------------------------------------------------
# forward / backward / heads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ALL_NAMES)
def test_forward_backward_and_grad_checkpointing(name):
    m = copy.deepcopy(cached(name)).train()
    x = images(name)
    runs = []
    for checkpointing in (False, True):  # checkpointing recomputes blocks: same outputs and gradients
        m.zero_grad()
        m.set_grad_checkpointing(checkpointing)
        out = m(x)
        assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (out0, g0), (out1, g1) = runs
    for n, p in m.named_parameters():
        assert n in g0 and torch.isfinite(g0[n]).all(), f'no or bad gradient for {n}'
    for n in diff_only_names(m):  # λ (or W_λ) and the per-head RMSNorm learn
        assert g0[n].abs().sum() > 0, n
    assert torch.allclose(out0, out1, rtol=1e-4, atol=1e-5)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize('name', ALL_NAMES)
def test_features_head_and_classifier_api(name):
    m = copy.deepcopy(cached(name))
    x = images(name)
    dim, n_tok = m.embed_dim, num_tokens(name)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, n_tok + 1, dim)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, dim)
        assert torch.allclose(pre, feats[:, 0])  # token pooling, no fc_norm
        logits = m(x)
        assert torch.allclose(logits, m.get_classifier()(pre), atol=1e-6)
        assert m.get_classifier().out_features == NUM_CLASSES
        m.reset_classifier(0)
        assert m.num_classes == 0 and torch.allclose(m(x), pre)
        m.reset_classifier(5, 'avg')
        assert m.get_classifier().out_features == 5
        assert torch.allclose(m.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1), atol=1e-6)
        assert m.forward_head(feats).shape == (2, 5)
        m.reset_classifier(0, '')
        assert torch.equal(m.forward_head(feats), feats)  # no pooling, no head: tokens pass through


@pytest.mark.parametrize('name', ALL_NAMES)
def test_features_only_with_out_indices(name):
    torch.manual_seed(0)
    m = timm.create_model(name, features_only=True, out_indices=(0, -1), **small_kwargs(name)).eval()
    dim, grid = WIDTH[size_of(name)], grid_of(name)
    assert m.feature_info.channels() == [dim, dim]
    assert m.feature_info.reduction() == [patch_of(name)] * 2
    assert [info['module'] for info in m.feature_info.get_dicts()] == ['blocks.0', f'blocks.{DEPTH - 1}']
    with torch.no_grad():
        outs = m(images(name))
    assert [tuple(o.shape) for o in outs] == [(2, dim, grid, grid)] * 2
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_forward_intermediates(name):
    m = cached(name)
    x = images(name)
    grid, dim = grid_of(name), m.embed_dim
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert len(inter) == DEPTH and all(t.shape == (2, dim, grid, grid) for t in inter)
        assert torch.allclose(final, m.forward_features(x))
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt='NLC')
        assert len(last2) == 2 and last2[-1].shape == (2, grid * grid, dim)
        assert torch.allclose(last2[-1].transpose(1, 2).reshape(2, dim, grid, grid), inter[-1])


@pytest.mark.parametrize('name', ALL_NAMES)
def test_save_for_hf_local_dir_round_trip(name, tmp_path):
    m = cached(name)
    save_for_hf(m, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(m) and loaded.num_classes == NUM_CLASSES and len(loaded.blocks) == DEPTH
    assert getattr(loaded, 'attn_kind', None) == getattr(m, 'attn_kind', None)
    with torch.no_grad():
        assert torch.equal(loaded(images(name)), m(images(name)))


def test_full_size_model_at_native_input_size():
    torch.manual_seed(0)
    m = timm.create_model('diff_vit_tiny_patch4_32').eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# kwargs, init, optimizer integration
# ------------------------------------------------------------------------------------------------

def test_model_kwargs():
    torch.manual_seed(0)
    m = timm.create_model('gda_vit_tiny_patch16_224', img_size=48, in_chans=1, num_classes=3,
                          global_pool='avg', drop_path_rate=0.1, depth=2)
    assert m.patch_embed.proj.in_channels == 1 and m.patch_embed.grid_size == (3, 3)
    assert isinstance(m.blocks[1].drop_path1, timm.layers.DropPath)
    assert m(torch.randn(2, 1, 48, 48)).shape == (2, 3)
    with pytest.raises(ValueError, match='attn_backend'):
        timm.create_model('diff_vit_tiny_patch4_32', attn_backend='flash', depth=1)
    with pytest.raises(ValueError, match='noise_heads'):
        timm.create_model('diff_vit_tiny_patch4_32', noise_heads=1, depth=1)
    with pytest.raises(ValueError, match='attn_kind'):
        timm.create_model('diff_vit_tiny_patch4_32', block_fn=timm.models.vision_transformer.Block, depth=1)
    with pytest.raises(ValueError, match="num_kv_heads=1 only applies to attn_kind='diffv2'"):
        timm.create_model('gda_vit_tiny_patch4_32', num_kv_heads=1, depth=1)
    with pytest.raises(ValueError, match="attn_kind='diffv2' does not run on attn_backend='triton'"):
        timm.create_model('diffv2_vit_tiny_patch4_32', attn_backend='triton', depth=1)
    with pytest.raises(ValueError, match="attn_kind='diffv2' takes no lambda_mode"):
        timm.create_model('diffv2_vit_tiny_patch4_32', lambda_mode='scalar', depth=1)
    free = timm.create_model('diffv2_vit_small_patch4_32', num_kv_heads=1, depth=1)  # MQA, as the official code allows
    assert free.attn_layout['num_kv_heads'] == 1 and free.blocks[0].attn.qkv.out_features == (12 + 2) * 64


@pytest.mark.parametrize('name', ['diff_vit_tiny_patch4_32', 'gda_vit_small_patch16_224', 'diffv2_vit_small_patch4_32'])
def test_attn_backend_kwarg_selects_kernel_with_equal_outputs(name):
    torch.manual_seed(0)
    m = timm.create_model(name, attn_backend='math', **small_kwargs(name)).eval()
    assert {b.attn.backend for b in m.blocks} == {'math'}
    assert m.attn_layout['backend'] == 'math'
    x = images(name)
    with torch.no_grad():
        ref = m(x)
        m.set_attention_backend('sdpa')
        assert {b.attn.backend for b in m.blocks} == {'sdpa'}
        assert torch.allclose(m(x), ref, rtol=1e-4, atol=1e-5)
        with pytest.warns(FutureWarning, match='use set_attention_backend'):  # the old name still works
            m.set_attn_backend('math')  # noqa: the deprecated name, on purpose
        assert {b.attn.backend for b in m.blocks} == {'math'}
    with pytest.raises(ValueError, match='accepted'):
        m.set_attention_backend('nope')
    with pytest.raises(ValueError, match='has no attention layer with a kernel backend'):
        diffvision.set_attention_backend(timm.create_model('diff_vit_tiny_patch4_32', attn_kind='standard', depth=1),
                                         'sdpa')


@pytest.mark.parametrize('name', ['diff_vit_small_patch16_224', 'gda_vit_base_patch16_224'])
def test_timm_init_keeps_lambda_and_sub_norm_init(name):
    m = cached(name)
    for mode in ('', 'jax'):
        if mode:
            m = copy.deepcopy(m)
            m.init_weights(mode)  # timm's other init scheme must not clobber λ either
        lam = torch.cat([getattr(b.attn, f'lambda_{w}').detach() for b in m.blocks for w in ('q1', 'k1', 'q2', 'k2')])
        assert 0.085 < lam.std().item() < 0.115 and abs(lam.mean().item()) < 0.02  # N(0, 0.1), not trunc_normal(0.02)
        assert all(torch.equal(b.attn.sub_norm.weight, torch.ones_like(b.attn.sub_norm.weight)) for b in m.blocks)
        w = m.blocks[0].attn.qkv.weight
        expected = math.sqrt(2 / sum(w.shape)) if mode == 'jax' else 0.02  # xavier / trunc_normal(.02)
        assert w.std().item() == pytest.approx(expected, rel=0.05)  # timm's init did run on the Linears


def test_timm_init_keeps_the_official_lambda_projection_init():
    """DIFF V2's W_λ starts as the official code's nn.Linear (U(±1/√dim), std 1/√(3·dim)) under either timm
    init, so λ = σ(W_λ x) starts spread around 0.5 whatever the model's own init does."""
    m = cached('diffv2_vit_base_patch16_224')
    for mode in ('', 'jax'):
        if mode:
            m = copy.deepcopy(m)
            m.init_weights(mode)
        w = torch.cat([b.attn.lambda_proj.weight.detach().flatten() for b in m.blocks])
        assert w.std().item() == pytest.approx(1 / math.sqrt(3 * 768), rel=0.05)
        assert w.abs().max().item() <= 1 / math.sqrt(768)


@pytest.mark.parametrize('name', ['diff_vit_tiny_patch4_32', 'gda_vit_tiny_patch16_224'])
def test_no_weight_decay_and_group_matcher(name):
    m = cached(name)
    lam_names = diff_only_names(m)
    assert len(lam_names) == 5 * len(m.blocks)
    nwd = m.no_weight_decay()
    assert set(lam_names) <= nwd and {'pos_embed', 'cls_token'} <= nwd
    assert 'blocks.0.attn.qkv.weight' not in nwd

    opt = timm.optim.create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert not any(id(m.get_parameter(n)) in decay for n in lam_names)
    assert id(m.blocks[0].attn.qkv.weight) in decay

    groups = timm.models.group_parameters(m, m.group_matcher())
    grouped = [n for names in groups.values() for n in names]
    assert sorted(grouped) == sorted(n for n, _ in m.named_parameters())
    group_of = {n: gid for gid, names in groups.items() for n in names}
    assert group_of['blocks.1.attn.lambda_q1'] == group_of['blocks.1.attn.qkv.weight']
    assert group_of['blocks.1.attn.lambda_q1'] != group_of['blocks.2.attn.lambda_q1']


def test_diffv2_lambda_projection_is_decayed_and_stays_with_its_block():
    """W_λ is a projection of the tokens, decayed like q/k/v (decay pulls λ towards σ(0) = 0.5); layer-wise
    LR decay keeps it with its block."""
    m = cached('diffv2_vit_tiny_patch4_32')
    nwd = m.no_weight_decay()
    assert not any('lambda' in n for n in nwd) and {'pos_embed', 'cls_token'} <= nwd
    opt = timm.optim.create_optimizer_v2(m, 'adamw', lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert all(id(b.attn.lambda_proj.weight) in decay for b in m.blocks)
    group_of = {n: gid for gid, names in timm.models.group_parameters(m, m.group_matcher()).items() for n in names}
    assert group_of['blocks.1.attn.lambda_proj.weight'] == group_of['blocks.1.attn.qkv.weight']
    assert group_of['blocks.1.attn.lambda_proj.weight'] != group_of['blocks.2.attn.lambda_proj.weight']


# ------------------------------------------------------------------------------------------------
# initialising from a standard ViT checkpoint
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def vit_small_file(tmp_path_factory):
    """A timm vit_small_patch16_224 checkpoint file (random weights; depth 2 for speed)."""
    torch.manual_seed(1)
    src = timm.create_model('vit_small_patch16_224', img_size=32, depth=2).eval()
    path = tmp_path_factory.mktemp('ckpt') / 'vit_small.pth'
    torch.save({'state_dict': src.state_dict()}, path)
    return src, path


def timm_heads(attn, x):
    """q, k, v per head exactly as timm's standard Attention splits them."""
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    return q, k, v


@pytest.mark.parametrize('name', ['diff_vit_small_patch16_224', 'gda_vit_small_patch16_224'])
def test_standard_checkpoint_maps_via_pretrained_cfg_overlay(name, vit_small_file):
    src, path = vit_small_file
    m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          img_size=32, depth=2, **PAPER_OPTIONS).eval()  # with λ vectors to keep at init
    src_sd, sd = src.state_dict(), m.state_dict()
    for k, v in src_sd.items():  # every standard tensor, q/k/v/proj included, lands verbatim
        assert torch.equal(sd[k], v), k
    assert sorted(set(sd) - set(src_sd)) == sorted(diff_only_names(m))
    lam = torch.cat([getattr(b.attn, f'lambda_{w}').detach() for b in m.blocks for w in ('q1', 'k1', 'q2', 'k2')])
    assert 0.07 < lam.std().item() < 0.13  # kept the N(0, 0.1) init
    with torch.no_grad():
        assert torch.isfinite(m(images(name))).all()


def test_head_mapping_semantics(vit_small_file):
    """The documented mapping, checked against how timm's Attention splits heads."""
    src, path = vit_small_file
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        q, k, v = timm_heads(src.blocks[1].attn, x)  # (B, 6, N, 64)

        diff = timm.create_model('diff_vit_small_patch16_224', img_size=32, depth=2)
        load_standard_vit_weights(diff, path)
        q1, k1, q2, k2, dv = diff.blocks[1].attn.split_qkv(x)
        for i in range(3):  # standard head 2i -> signal i, 2i+1 -> noise i, v heads 2i,2i+1 -> v head i
            assert torch.equal(q1[:, i], q[:, 2 * i]) and torch.equal(k1[:, i], k[:, 2 * i])
            assert torch.equal(q2[:, i], q[:, 2 * i + 1]) and torch.equal(k2[:, i], k[:, 2 * i + 1])
            assert torch.equal(dv[:, i], torch.cat([v[:, 2 * i], v[:, 2 * i + 1]], -1))

        gda = timm.create_model('gda_vit_small_patch16_224', img_size=32, depth=2)
        load_standard_vit_weights(gda, src)
        q1, k1, q2, k2, gv = gda.blocks[1].attn.split_qkv(x)
        # 4:2, groups of 3 standard heads [s, s, n]: heads 0,1 -> signal 0,1; 2 -> noise 0; 3,4 -> signal 2,3; 5 -> noise 1
        for j, (role, idx) in enumerate([('s', 0), ('s', 1), ('n', 0), ('s', 2), ('s', 3), ('n', 1)]):
            qq, kk = (q1, k1) if role == 's' else (q2, k2)
            assert torch.equal(qq[:, idx], q[:, j]) and torch.equal(kk[:, idx], k[:, j])
        v_channels = v.transpose(1, 2).reshape(2, 5, 384)  # value channels keep their order
        assert torch.equal(gv.transpose(1, 2).reshape(2, 5, 384), v_channels)


def test_tiny_diff_mapping_splits_each_standard_head():
    """ViT-Ti has 3 heads (odd): DIFF-ViT-Ti's signal j / noise j are the two 32-dim halves of
    standard head j's q/k, and its value head j is standard value head j."""
    torch.manual_seed(2)
    src = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1)
    m = timm.create_model('diff_vit_tiny_patch16_224', img_size=32, depth=1)
    load_standard_vit_weights(m, src.state_dict())
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        q, k, v = timm_heads(src.blocks[0].attn, x)
        q1, k1, q2, k2, dv = m.blocks[0].attn.split_qkv(x)
    for j in range(3):
        assert torch.equal(q1[:, j], q[:, j, :, :32]) and torch.equal(q2[:, j], q[:, j, :, 32:])
        assert torch.equal(k1[:, j], k[:, j, :, :32]) and torch.equal(k2[:, j], k[:, j, :, 32:])
        assert torch.equal(dv[:, j], v[:, j])


def test_diffv2_mapping_is_the_gqa_mean_of_standard_heads(vit_small_file):
    """Standard ViT-S onto DIFF V2-S: query head 2i is standard head i, the noise query 2i+1 keeps its init, and
    key/value head g is the mean of standard heads 2g and 2g+1 (which output heads 2g, 2g+1 replace)."""
    src, path = vit_small_file
    x = torch.randn(2, 5, 384)
    m = timm.create_model('diffv2_vit_small_patch16_224', img_size=32, depth=2)
    with torch.no_grad():
        q_init = m.blocks[1].attn.split_qkv(x)[0]
        report = load_standard_vit_weights(m, path)  # a file: timm's heads of 64 are assumed
        q, k, v = timm_heads(src.blocks[1].attn, x)  # (B, 6, N, 64)
        q2, k2, v2 = m.blocks[1].attn.split_qkv(x)   # (B, 12, N, 64), (B, 3, N, 64) x 2
    for i in range(6):
        assert torch.equal(q2[:, 2 * i], q[:, i]) and torch.equal(q2[:, 2 * i + 1], q_init[:, 2 * i + 1])
    for g in range(3):
        torch.testing.assert_close(k2[:, g], (k[:, 2 * g] + k[:, 2 * g + 1]) / 2)
        torch.testing.assert_close(v2[:, g], (v[:, 2 * g] + v[:, 2 * g + 1]) / 2)
    assert torch.equal(m.blocks[1].attn.proj.weight, src.blocks[1].attn.proj.weight)  # h·d = dim: copied
    assert sorted(report.converted) == sorted(f'blocks.{i}.attn.qkv.{w}' for i in range(2) for w in ('weight', 'bias'))
    assert sorted(report.kept_init) == sorted(f'blocks.{i}.attn.lambda_proj.weight' for i in range(2))
    assert 'key/value heads <- mean of 2 standard heads' in str(report)
    # timm's pretrained path maps the same way
    via_timm = timm.create_model('diffv2_vit_small_patch16_224', pretrained=True, img_size=32, depth=2,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        q3, k3, v3 = via_timm.blocks[1].attn.split_qkv(x)
    assert torch.equal(q3[:, 0::2], q2[:, 0::2]) and torch.equal(k3, k2) and torch.equal(v3, v2)
    # ViT-Ti's 3 heads of 64 have no output head per standard head in DIFF V2-Ti (4 heads of 48)
    with pytest.raises(ValueError, match=r'no sound mapping from a standard ViT with 3 heads of 64 .*4 output heads of 48'):
        load_standard_vit_weights(timm.create_model('diffv2_vit_tiny_patch16_224', img_size=32, depth=1),
                                  timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1))


def test_block_wiring_matches_timm_vit_with_standard_attention():
    """With attn_kind='standard' the model must be timm's ViT exactly: same keys, same outputs."""
    torch.manual_seed(5)
    src = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, drop_path_rate=0.0).eval()
    m = timm.create_model('diff_vit_tiny_patch16_224', attn_kind='standard', num_heads=3, img_size=32, depth=2).eval()
    report = load_standard_vit_weights(m, src)
    assert report.kept_init == [] and report.dropped == [] and len(report.copied) == len(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), src(x), rtol=1e-5, atol=1e-6)


def test_load_report_with_resampling_and_other_head(vit_small_file):
    src, path = vit_small_file
    m = timm.create_model('diff_vit_small_patch4_32', depth=2)  # patch 4, 8x8 grid, 10 classes
    head_before = m.head.weight.clone()
    report = load_standard_vit_weights(m, src)
    assert sorted(report.resampled) == ['patch_embed.proj.weight', 'pos_embed']
    assert sorted(report.dropped) == ['head.bias', 'head.weight']
    assert sorted(report.kept_init) == sorted(diff_only_names(m) + ['head.bias', 'head.weight'])
    assert sorted(report.mapped) == sorted(k for k in src.state_dict() if not k.startswith('head.'))
    assert torch.equal(m.head.weight, head_before)
    assert m.pos_embed.shape == (1, 65, 384)
    assert torch.isfinite(m(torch.randn(2, 3, 32, 32))).all()

    headless = timm.create_model('gda_vit_small_patch16_224', num_classes=0, img_size=32, depth=2)
    assert load_standard_vit_weights(headless, src).dropped == ['head.bias', 'head.weight']
    backbone = timm.create_model('gda_vit_small_patch16_224', features_only=True, out_indices=(-1,), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), img_size=32, depth=2)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 32, 32))[0].shape == (1, 384, 2, 2)


def test_wrong_width_or_depth_checkpoint_fails_clearly(vit_small_file):
    _, path = vit_small_file
    with pytest.raises(ValueError, match=r'width 384 .*\(384, 3, 16, 16\).* embed_dim 192 .*\(192, 3, 16, 16\)'):
        timm.create_model('diff_vit_tiny_patch16_224', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), img_size=32, depth=2)
    with pytest.raises(ValueError, match='checkpoint has 2 blocks, the model has 3'):
        load_standard_vit_weights(timm.create_model('gda_vit_small_patch16_224', img_size=32, depth=3), path)
    wide_mlp = timm.create_model('diff_vit_small_patch16_224', img_size=32, depth=2, mlp_ratio=2.0)
    with pytest.raises(ValueError, match=r'blocks\.0\.mlp\.fc1\.weight: checkpoint \(1536, 384\), model \(768, 384\)'):
        load_standard_vit_weights(wide_mlp, path)
    with pytest.raises(TypeError, match='path, a state dict or an nn.Module'):
        load_standard_vit_weights(wide_mlp, 3)


def test_mapped_model_is_much_closer_to_its_source_than_a_fresh_one():
    """Honest closeness check at timm's random init (no trained weights offline): pre-logit
    cosine similarity to the source, mapped vs. freshly initialised. The formulation cannot
    reproduce standard attention exactly (see README), so only 'closer' is asserted."""
    torch.manual_seed(3)
    src = timm.create_model('vit_small_patch16_224', img_size=48, depth=4).eval()
    x = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = src.forward_head(src.forward_features(x), pre_logits=True)
        for name in ('diff_vit_small_patch16_224', 'gda_vit_small_patch16_224', 'diffv2_vit_small_patch16_224'):
            fresh = timm.create_model(name, img_size=48, depth=4).eval()
            mapped = copy.deepcopy(fresh)
            load_standard_vit_weights(mapped, src)
            cos = lambda mm: F.cosine_similarity(mm.forward_head(mm.forward_features(x), pre_logits=True), ref).mean()
            assert cos(mapped) > 0.3 and cos(mapped) > cos(fresh) + 0.25, (name, cos(mapped), cos(fresh))
