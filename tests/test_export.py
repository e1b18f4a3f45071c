"""Deployment export of the DIFF, GDA and DIFF V2 models: ONNX (both exporters, run by onnxruntime against
PyTorch), torch.jit.script / trace, and the clear error where a path cannot exist (jit.script of the DiT).

Tiny models (width 48, one block, 16x16 images / 8x8 DiT inputs) with every parameter moved off its init, so
each output depends on every weight, λ and norm scale included. The dynamo exporter costs seconds per model
(twice that with a dynamic batch), so it runs each ViT at a fixed batch and the DiT once, at a dynamic batch;
the legacy exporter runs everything at a dynamic batch.
"""
import io

import pytest
import torch

import timm
from diffvision import DiffDiTTransformer2DModel  # importing diffvision registers the timm models
from diffvision.attention import create_attention

KINDS = ["diff", "gda", "diffv2"]
ATOL = 1e-4  # float32: onnxruntime's kernels against PyTorch's

# Expected notices: torch.jit and the legacy exporter are deprecated, the legacy exporter traces Python shape
# checks (TracerWarnings), and torch.jit.trace reads every property of a module, the DiT's deprecated alias too.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning", r"ignore:`torch\.jit\..*` is deprecated",
    "ignore:attention_heads is deprecated")


def perturb(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def tiny_vit(kind, **kw):
    """DIFF 3 heads of q/k 8 / v 16; GDA 2:1; DIFF V2 4 heads of 12 on 2 key/value heads."""
    return perturb(timm.create_model(f"{kind}_vit_tiny_patch4_32", depth=1, embed_dim=48, img_size=16, **kw))


def tiny_dit(kind):
    """6 standard heads of 8 (width 48), as tests/test_diffusers_dit.py builds them."""
    return perturb(DiffDiTTransformer2DModel(
        num_attention_heads=6, attention_head_dim=8, in_channels=3, num_layers=1, sample_size=8, patch_size=2,
        num_classes=10, attn_kind=kind))


def images(batch, size=16, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def dit_inputs(batch, seed=1):
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([1, 250, 999, 500])[:batch], torch.tensor([0, 4, 9, 10])[:batch]  # 10: the null class


def run_onnx(model, args, names, dynamo, dynamic_batch=True, constants=()):
    """Export ``model(*args, *constants)`` (with ``dynamic_batch``, the batch dim of ``args`` dynamic) and
    return an onnxruntime session on it; ``constants`` are non-tensor arguments, fixed in the graph."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")  # the dynamo exporter builds its graph with it
        shapes = tuple({0: torch.export.Dim.DYNAMIC} if dynamic_batch else None for _ in args)
        program = torch.onnx.export(model, args + constants, dynamo=True, opset_version=18, input_names=names,
                                    dynamic_shapes=shapes + (None,) * len(constants), verbose=False)
        proto = program.model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, args + constants, buffer, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None)
        proto = buffer.getvalue()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"])


def max_diff(session, names, args, reference):
    out = session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
    assert out.shape == tuple(reference.shape)
    return (torch.from_numpy(out) - reference).abs().max().item()


# ------------------------------------------------------------------------------------------------
# ONNX: both exporters, onnxruntime against PyTorch, at another batch size than the export's
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("kind", KINDS)
def test_vit_onnx_matches_pytorch(kind, dynamo):
    model = tiny_vit(kind)
    session = run_onnx(model, (images(2),), ["images"], dynamo, dynamic_batch=not dynamo)
    x = images(2 if dynamo else 3, seed=2)
    with torch.no_grad():
        reference = model(x)
    assert max_diff(session, ["images"], (x,), reference) < ATOL


@pytest.mark.parametrize("kind, dynamo", [("diff", False), ("gda", False), ("diffv2", False), ("diff", True)],
                         ids=["diff-legacy", "gda-legacy", "diffv2-legacy", "diff-dynamo"])
def test_dit_onnx_matches_pytorch(kind, dynamo):
    model = tiny_dit(kind)
    names = ["hidden_states", "timestep", "class_labels"]
    session = run_onnx(model, dit_inputs(2), names, dynamo, constants=(False,))  # return_dict=False
    args = dit_inputs(4, seed=2)
    with torch.no_grad():
        reference = model(*args).sample
    assert reference.abs().max() > 0.1  # not the zero output of DiT's init
    assert max_diff(session, names, args, reference) < ATOL


def test_math_backend_and_masks_export():
    """The math backend's maps and the masked-row rule (a query that sees no key gives zeros) in ONNX, with
    the exporter that lacked ``isneginf``."""
    layer = perturb(create_attention("gda", 48, signal_heads=4, noise_heads=2, backend="math"))
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[:, :, 1] = False  # query 1 sees no key
    session = run_onnx(layer, (x, mask), ["x", "mask"], dynamo=False, dynamic_batch=False)
    with torch.no_grad():
        reference = layer(x, mask)
    torch.testing.assert_close(reference[:, 1], layer.proj.bias.detach().expand(2, -1))  # zeros, projected
    assert max_diff(session, ["x", "mask"], (x, mask), reference) < ATOL


def test_triton_backend_exports_as_sdpa():
    """A model set to the CUDA-only Triton kernel still exports on the CPU: exporting takes SDPA, the same
    function, while the eager forward on CPU refuses Triton."""
    model = tiny_vit("diff", attn_backend="triton")
    x = images(2)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        model(x)
    session = run_onnx(model, (x,), ["images"], dynamo=False)
    model.set_attention_backend("sdpa")
    with torch.no_grad():
        reference = model(x)
    assert max_diff(session, ["images"], (x,), reference) < ATOL


# ------------------------------------------------------------------------------------------------
# TorchScript and tracing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_vit_jit_script_matches_eager_and_saves(kind):
    model = tiny_vit(kind)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input has 1 channels"):  # scripting left our model, checks included, as it was
        model(torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("lambda_mode, head_norm", [("reparam", True), ("scalar", False), ("fixed", True)])
def test_attention_layers_script_in_every_mode(lambda_mode, head_norm):
    layer = perturb(create_attention("diff", 48, num_heads=3, lambda_mode=lambda_mode, head_norm=head_norm))
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 5, 48)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, mask), layer(x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_traced_vit_is_the_eager_function_in_float64(kind):
    """Tracing takes the export path (RMSNorm written out, GQA heads expanded, no Triton, no Python op): in
    float64 it is the eager function to 1e-12. Traced with autograd on, as a user would: torch.jit.trace
    then re-traces and checks that both graphs agree."""
    vit = tiny_vit(kind).double()
    traced = torch.jit.trace(vit, (images(2).double(),))
    x = images(3, seed=5).double()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), vit(x), rtol=0, atol=1e-12)


def test_traced_dit_is_the_eager_function_in_float64():
    """What the jit.script error below recommends: torch.jit.trace of the DiT (its output is a dict)."""
    dit = tiny_dit("diff").double()
    x, t, y = dit_inputs(3)
    traced = torch.jit.trace(dit, (x.double(), t, y), strict=False)
    x, t, y = dit_inputs(4, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(traced(x.double(), t, y)["sample"], dit(x.double(), t, y).sample,
                                   rtol=0, atol=1e-12)


def test_dit_jit_script_says_why_not_and_what_works():
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile DiffDiTTransformer2DModel: "
                                           r"diffusers' .* not TorchScript.*torch.jit.trace.*torch.onnx.export"):
        torch.jit.script(tiny_dit("diff"))
