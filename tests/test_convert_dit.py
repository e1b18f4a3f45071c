"""A standard DiT -> DiffDiTTransformer2DModel of every attention kind.

Sources: diffusers' DiTTransformer2DModel (built, saved and reloaded) and the original facebookresearch/DiT
layout. References: diffusers' own outputs and projections, and exact equality of mapped tensors. Tiny
configs: 6 heads of 8 (width 48), 2 blocks, 8x8 inputs, patch 2, learned sigma, 10 classes.
"""
import copy

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffvision import DiffDiTTransformer2DModel
from diffvision.diffusion import convert_dit_to_diff_dit, load_standard_dit_weights

CFG = dict(num_attention_heads=6, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
           sample_size=8, patch_size=2)
EMB = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias", "timestep_embedder.linear_2.weight",
       "timestep_embedder.linear_2.bias", "class_embedder.embedding_table.weight")
FRESH = {"diff": ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "sub_norm.weight"),
         "gda": ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "sub_norm.weight"),
         "diffv2": ("lambda_proj.weight",)}


def diffusers_dit(tied=True, seed=0, **kw):
    """A freshly built diffusers DiT (its init leaves nothing zero). ``tied``: every block's timestep/label
    embedding is block 0's, as in checkpoints converted from the official DiT."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(**{**CFG, **kw}, num_embeds_ada_norm=10)
    if tied:
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    return dit.eval()


def ours(kind, **kw):
    return DiffDiTTransformer2DModel(**{**CFG, "num_classes": 10, "attn_kind": kind, **kw})


def inputs(dtype=torch.float32):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x, torch.tensor([1, 400, 999]), torch.tensor([0, 5, 10])  # 10: the null class


def heads(t, n):
    """(B, N, n·d) -> (B, n, N, d)."""
    return t.view(*t.shape[:2], n, -1).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# diffusers' DiT, standard attention: the same function
# ------------------------------------------------------------------------------------------------

def test_standard_conversion_reproduces_a_saved_diffusers_dit(tmp_path):
    diffusers_dit().save_pretrained(tmp_path / "dit")
    dit = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()
    x, t, y = inputs(torch.float64)
    dit64 = copy.deepcopy(dit).double()
    expected = dit64(x, t, y).sample
    assert expected.abs().max() > 0.1
    model = convert_dit_to_diff_dit(dit64).eval()
    assert model.dtype == torch.float64 and model.config.attn_kind == "standard"
    torch.testing.assert_close(model(x, t, y).sample, expected, rtol=1e-12, atol=1e-12)
    tf = torch.tensor([0.5, 17.3, 998.2])  # fractional (Euler-style) timesteps too
    torch.testing.assert_close(model(x, tf, y).sample, dit64(x, tf, y).sample, rtol=1e-12, atol=1e-12)

    # a state dict, or the saved weights file, records neither the head count nor the sample size
    with pytest.raises(ValueError, match="pass num_attention_heads"):
        convert_dit_to_diff_dit(dit.state_dict(), sample_size=8)
    with pytest.raises(ValueError, match="does not record its sample_size"):
        convert_dit_to_diff_dit(dit.state_dict(), num_attention_heads=6)
    from_file, report = convert_dit_to_diff_dit(tmp_path / "dit" / "diffusion_pytorch_model.safetensors",
                                                num_attention_heads=6, sample_size=8, output_loading_info=True)
    assert report.kept_init == [] and report.dropped == [] and len(report.copied) == len(from_file.state_dict())
    torch.testing.assert_close(from_file.eval()(x.float(), t, y).sample, dit(x.float(), t, y).sample,
                               rtol=1e-5, atol=1e-5)


def test_a_freshly_built_diffusers_dit_has_per_block_embeddings():
    """diffusers builds an independent timestep/label embedding per block; this model shares one."""
    dit = diffusers_dit(tied=False)
    with pytest.raises(ValueError, match=r"transformer_blocks 1 differ.*per-block conditioning embeddings.*no exact"):
        convert_dit_to_diff_dit(dit)
    model = ours("standard")
    report = load_standard_dit_weights(model, dit)
    assert sorted(report.dropped) == sorted(f"transformer_blocks.1.norm1.emb.{n}" for n in EMB)
    assert "does not compute what the DiT computes" in str(report)
    # block 0's embedding was loaded: the model is the DiT with block 1's embedding replaced by block 0's ...
    reference = copy.deepcopy(dit)
    reference.transformer_blocks[1].norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    x, t, y = inputs()
    out = model.eval()(x, t, y).sample
    torch.testing.assert_close(out, reference(x, t, y).sample, rtol=1e-5, atol=1e-5)
    assert (out - dit(x, t, y).sample).abs().max() > 1e-3  # ... which is a real difference, hence reported


# ------------------------------------------------------------------------------------------------
# Onto DIFF / GDA / DIFF V2: every mappable weight, the rest reported
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["diff", "gda", "diffv2"])
def test_standard_dit_onto_each_kind_loads_every_mappable_weight(kind):
    dit = diffusers_dit()
    model = ours(kind)
    tokens = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q_init = [block.attn.split_qkv(tokens)[0] for block in model.transformer_blocks] if kind == "diffv2" else None
    report = load_standard_dit_weights(model, dit)
    sd = model.state_dict()

    fresh = [f"transformer_blocks.{i}.attn.{n}" for i in range(2) for n in FRESH[kind]]
    assert sorted(report.kept_init) == sorted(fresh) and report.dropped == []
    assert all(torch.equal(sd[k], before[k]) for k in fresh)
    assert sorted(report.mapped + report.kept_init) == sorted(sd)
    assert report.rules

    emb = dit.transformer_blocks[0].norm1.emb
    same = {"pos_embed.proj.weight": dit.pos_embed.proj.weight, "pos_embed.proj.bias": dit.pos_embed.proj.bias,
            "timestep_embedder.linear_1.weight": emb.timestep_embedder.linear_1.weight,
            "timestep_embedder.linear_2.bias": emb.timestep_embedder.linear_2.bias,
            "class_embedder.embedding_table.weight": emb.class_embedder.embedding_table.weight,
            "proj_out_1.weight": dit.proj_out_1.weight, "proj_out_2.bias": dit.proj_out_2.bias}
    for i, block in enumerate(dit.transformer_blocks):
        pre = f"transformer_blocks.{i}."
        same.update({pre + "adaLN_modulation.1.weight": block.norm1.linear.weight,
                     pre + "ff.net.0.proj.weight": block.ff.net[0].proj.weight,
                     pre + "ff.net.2.bias": block.ff.net[2].bias,
                     pre + "attn.proj.weight": block.attn1.to_out[0].weight,
                     pre + "attn.proj.bias": block.attn1.to_out[0].bias})
    for key, tensor in same.items():
        assert torch.equal(sd[key], tensor), key

    with torch.no_grad():
        for i, block in enumerate(dit.transformer_blocks):
            q, k, v = (heads(getattr(block.attn1, f"to_{n}")(tokens), 6) for n in "qkv")  # 6 heads of 8
            attn = model.transformer_blocks[i].attn
            if kind == "diff":  # standard heads 2i, 2i+1: signal / noise of differential head i
                q1, k1, q2, k2, dv = attn.split_qkv(tokens)
                for h in range(3):
                    for ours_t, std in ((q1, q), (k1, k)):
                        torch.testing.assert_close(ours_t[:, h], std[:, 2 * h], rtol=0, atol=1e-6)
                    for ours_t, std in ((q2, q), (k2, k)):
                        torch.testing.assert_close(ours_t[:, h], std[:, 2 * h + 1], rtol=0, atol=1e-6)
                    torch.testing.assert_close(dv[:, h], torch.cat([v[:, 2 * h], v[:, 2 * h + 1]], -1),
                                               rtol=0, atol=1e-6)
            elif kind == "gda":  # 4:2, groups [s, s, n]: standard head j = 3g + r -> signal 2g + r, or noise g
                q1, k1, q2, k2, dv = attn.split_qkv(tokens)
                for j in range(6):
                    g, r = divmod(j, 3)
                    got = (q1[:, 2 * g + r], k1[:, 2 * g + r]) if r < 2 else (q2[:, g], k2[:, g])
                    torch.testing.assert_close(got[0], q[:, j], rtol=0, atol=1e-6)
                    torch.testing.assert_close(got[1], k[:, j], rtol=0, atol=1e-6)
                torch.testing.assert_close(dv, heads(block.attn1.to_v(tokens), 4), rtol=0, atol=1e-6)
            else:  # query 2i = standard i, query 2i+1 keeps its init, key/value head g = mean of heads 2g, 2g+1
                q2, k2, v2 = attn.split_qkv(tokens)
                torch.testing.assert_close(q2[:, 0::2], q, rtol=0, atol=1e-6)
                assert torch.equal(q2[:, 1::2], q_init[i][:, 1::2])
                for g in range(3):
                    torch.testing.assert_close(k2[:, g], (k[:, 2 * g] + k[:, 2 * g + 1]) / 2, rtol=0, atol=1e-6)
                    torch.testing.assert_close(v2[:, g], (v[:, 2 * g] + v[:, 2 * g + 1]) / 2, rtol=0, atol=1e-6)
    if kind == "diffv2":
        assert sorted(report.converted) == sorted(f"transformer_blocks.{i}.attn.qkv.{w}" for i in range(2)
                                                  for w in ("weight", "bias"))
        weight = sd["transformer_blocks.0.attn.qkv.weight"][:96].view(12, 8, 48)
        assert torch.equal(weight[0::2], dit.transformer_blocks[0].attn1.to_q.weight.view(6, 8, 48))
    else:
        a = dit.transformer_blocks[1].attn1
        assert torch.equal(sd["transformer_blocks.1.attn.qkv.weight"], torch.cat([a.to_q.weight, a.to_k.weight,
                                                                                   a.to_v.weight]))

    # the converter builds the same model from the DiT's config
    built = convert_dit_to_diff_dit(dit, attn_kind=kind)
    assert built.config.attn_kind == kind and built.config.num_attention_heads == 6
    for key in same:
        assert torch.equal(built.state_dict()[key], sd[key]), key
    x, t, y = inputs()
    assert torch.isfinite(built(x, t, y).sample).all()


def test_the_old_keyword_name_converts_too():
    """The issue's call: ``attention_type`` is the name ``attn_kind`` had before the vocabulary was unified."""
    assert convert_dit_to_diff_dit(diffusers_dit(), attention_type="diff").config.attn_kind == "diff"


# ------------------------------------------------------------------------------------------------
# The original facebookresearch/DiT layout
# ------------------------------------------------------------------------------------------------

def dit_sincos_table(dim, grid):
    """DiT's fixed position table (MAE's 2-D sin-cos), written from its definition: the first half of the
    channels encodes a patch's column, the second half its row, each as [sin(p·ω), cos(p·ω)] with
    ω_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()[None]


def original_dit_state_dict(dit):
    """A (tied) diffusers DiT's weights under the names of facebookresearch/DiT's ``DiT`` module (x_embedder,
    t_embedder.mlp, y_embedder, blocks.N.{attn, mlp, adaLN_modulation}, final_layer, pos_embed)."""
    emb = dit.transformer_blocks[0].norm1.emb
    sd = {"x_embedder.proj.weight": dit.pos_embed.proj.weight, "x_embedder.proj.bias": dit.pos_embed.proj.bias,
          "t_embedder.mlp.0.weight": emb.timestep_embedder.linear_1.weight,
          "t_embedder.mlp.0.bias": emb.timestep_embedder.linear_1.bias,
          "t_embedder.mlp.2.weight": emb.timestep_embedder.linear_2.weight,
          "t_embedder.mlp.2.bias": emb.timestep_embedder.linear_2.bias,
          "y_embedder.embedding_table.weight": emb.class_embedder.embedding_table.weight,
          "final_layer.adaLN_modulation.1.weight": dit.proj_out_1.weight,
          "final_layer.adaLN_modulation.1.bias": dit.proj_out_1.bias,
          "final_layer.linear.weight": dit.proj_out_2.weight, "final_layer.linear.bias": dit.proj_out_2.bias,
          "pos_embed": dit_sincos_table(48, 4)}
    for i, block in enumerate(dit.transformer_blocks):
        a = block.attn1
        sd.update({f"blocks.{i}.attn.qkv.weight": torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]),
                   f"blocks.{i}.attn.qkv.bias": torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]),
                   f"blocks.{i}.attn.proj.weight": a.to_out[0].weight, f"blocks.{i}.attn.proj.bias": a.to_out[0].bias,
                   f"blocks.{i}.mlp.fc1.weight": block.ff.net[0].proj.weight,
                   f"blocks.{i}.mlp.fc1.bias": block.ff.net[0].proj.bias,
                   f"blocks.{i}.mlp.fc2.weight": block.ff.net[2].weight, f"blocks.{i}.mlp.fc2.bias": block.ff.net[2].bias,
                   f"blocks.{i}.adaLN_modulation.1.weight": block.norm1.linear.weight,
                   f"blocks.{i}.adaLN_modulation.1.bias": block.norm1.linear.bias})
    return {k: v.detach().clone() for k, v in sd.items()}


def test_original_dit_layout(tmp_path):
    dit = diffusers_dit()
    sd = original_dit_state_dict(dit)
    with pytest.raises(ValueError, match="not a DiT preset.*pass num_attention_heads"):
        convert_dit_to_diff_dit(sd)
    model, report = convert_dit_to_diff_dit(sd, num_attention_heads=6, output_loading_info=True)
    cfg = model.config  # the original DiT's conventions; sizes from the tensors
    assert (cfg.timestep_freq_shift, cfg.norm_eps, cfg.activation_fn) == (0, 1e-6, "gelu-approximate")
    assert (cfg.sample_size, cfg.out_channels, cfg.num_classes, cfg.mlp_ratio) == (8, 8, 10, 4.0)
    assert "pos_embed: equal to the model's own fixed sin-cos table" in report.notes
    assert report.kept_init == [] and report.dropped == []
    # under diffusers' timestep features and LayerNorm eps the renamed weights give diffusers' outputs
    x, t, y = inputs()
    same = convert_dit_to_diff_dit(sd, num_attention_heads=6, timestep_freq_shift=1, norm_eps=1e-5).eval()
    torch.testing.assert_close(same(x, t, y).sample, dit(x, t, y).sample, rtol=1e-5, atol=1e-5)

    # a DiT training checkpoint file ({"model", "ema"}): its EMA weights, as DiT's sample.py takes
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd}, tmp_path / "ckpt.pt")
    diff = ours("diff")
    report = load_standard_dit_weights(diff, tmp_path / "ckpt.pt")
    assert torch.equal(diff.transformer_blocks[1].ff.net[2].weight, dit.transformer_blocks[1].ff.net[2].weight)
    assert "timestep_freq_shift: the checkpoint's DiT used 0, this model 1.0" in report.notes
    assert any("does not record its head count" in note for note in report.notes)
    with pytest.raises(ValueError, match="not DiT's fixed 2-D sin-cos table"):
        load_standard_dit_weights(ours("standard"), dict(sd, pos_embed=sd["pos_embed"] + 0.1))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(tmp_path):
    dit = diffusers_dit()
    cases = [
        (lambda: load_standard_dit_weights(ours("diff", attention_head_dim=4), dit),
         ValueError, "hidden size 48 does not match the model's 24"),
        (lambda: load_standard_dit_weights(ours("diff", num_layers=3), dit),
         ValueError, "checkpoint has 2 blocks, the model has num_layers=3"),
        (lambda: load_standard_dit_weights(ours("gda", num_classes=7), dit),
         ValueError, r"class_embedder.embedding_table.weight: checkpoint \(11, 48\), model \(8, 48\) \(check num_classes"),
        (lambda: load_standard_dit_weights(ours("diff", num_attention_heads=3, attention_head_dim=16), dit),
         ValueError, "the checkpoint has 6 attention heads.*num_attention_heads=6"),
        (lambda: convert_dit_to_diff_dit(dit, attn_kind="difff"),
         ValueError, r"unknown attn_kind 'difff' \(did you mean 'diff'"),
        (lambda: convert_dit_to_diff_dit(diffusers_dit(num_attention_heads=3, attention_head_dim=16), attn_kind="diffv2"),
         ValueError, "no sound mapping from a standard DiT with 3 heads of 16 onto DIFF V2's 4 output heads of 12"),
        (lambda: load_standard_dit_weights(ours("diff"), {"foo.weight": torch.zeros(1)}),
         ValueError, "not a DiT state dict"),
        (lambda: load_standard_dit_weights(ours("diff"), ours("gda")),
         ValueError, "attn_kind='gda', not a standard DiT"),
        (lambda: load_standard_dit_weights(ours("diff"), ours("gda").state_dict()),
         ValueError, "differential-attention parameters"),
        (lambda: load_standard_dit_weights(ours("diff"), 3), TypeError, "checkpoint must be a DiT module"),
        (lambda: load_standard_dit_weights(ours("diff"), tmp_path), ValueError, "is a folder: load a saved"),
        (lambda: load_standard_dit_weights(ours("diff"), tmp_path / "missing.pt"), FileNotFoundError, "does not exist"),
        (lambda: load_standard_dit_weights(dit, dit), TypeError, "model must be a DiffDiTTransformer2DModel"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
