"""Differential attention speed on a CUDA GPU: kernels against standard attention, and ViT-S training.

    PYTHONPATH=. python train/bench_attention.py                 # attention table + model table
    PYTHONPATH=. python train/bench_attention.py --skip-model    # attention table only
    PYTHONPATH=. python train/bench_attention.py --compile       # model table also with torch.compile

Attention level, bf16, for each shape (B, N, D, H) = (batch, tokens, width, standard heads):
  * ``standard``: F.scaled_dot_product_attention with H heads of D/H (the baseline, ratio 1.00);
  * ``timm diff``: timm ``DiffAttention``'s attention core as it is in timm (num_heads = H,
    head_dim = D/H/2, values D/H): two SDPA calls and ``a1 − λ·a2``;
  * ``ours sdpa`` / ``ours triton``: ``differential_attention(backend=...)`` in the DIFF layout of
    diffvision's modules (h = H/2 heads, d = D/H, dv = 2d);
  * ``ours diffv2``: ``differential_attention_v2`` (one SDPA call with ``enable_gqa``) in DIFF V2's
    parameter-matched layout (2H query heads on H/2 key/value heads of D/H, λ per token and head).
Times are medians of ``triton.testing.do_bench`` (which flushes L2 before every run), forward
and forward+backward (gradients of every input, λ included). TF/s counts the useful FLOPs of the
algorithm (standard: fwd 4·B·H·N²·(D/H), fwd+bwd 3.5× that; differential: fwd B·h·N²·(4d + 4dv),
fwd+bwd B·h·N²·(16d + 8dv), the same count for every DIFF variant; DIFF V2: the standard count for 2H
heads). Peak memory is the
increase of ``max_memory_allocated`` over the inputs during one forward+backward.

Model level: training images/s of ViT-S/16-224 (timm ``vit_small_patch16_224``), the same with
timm's ``attn_layer='diff'``, diffvision's ``diff_vit_small_patch16_224`` (backend auto, i.e.
Triton on CUDA, and backend sdpa) and ``diffv2_vit_small_patch16_224``, bf16 autocast, AdamW, random
data, same batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("ViT-S/16-224", 256, 197, 384, 6),
    ("ViT-B/16-224", 128, 197, 768, 12),
    ("DiT-S/2-32px", 256, 256, 384, 6),
    ("DiT-B/2", 64, 256, 768, 12),
    ("ViT-B/16-512", 16, 1025, 768, 12),
    ("DiT-XL/2-512", 8, 1024, 1152, 16),
    ("long", 4, 4096, 1024, 16),
]
METHODS = ("standard", "timm diff", "ours sdpa", "ours triton", "ours diffv2")


def flops(method: str, B: int, N: int, D: int, H: int, backward: bool) -> float:
    if method in ("standard", "ours diffv2"):
        f = 4.0 * B * H * N * N * (D // H) * (2 if method == "ours diffv2" else 1)
        return f * 3.5 if backward else f
    h, d = H // 2, D // H
    dv = 2 * d
    return B * h * N * N * ((16 * d + 8 * dv) if backward else (4 * d + 4 * dv))


def make_inputs(method: str, B: int, N: int, D: int, H: int, device, dtype=torch.bfloat16):
    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    if method == "standard":
        return [rnd(B, H, N, D // H) for _ in range(3)]
    if method == "ours diffv2":  # q (B, 2H, N, D/H), k and v (B, H/2, N, D/H), λ = σ(·) per head and token
        lam = torch.rand(B, H, N, device=device, dtype=dtype, requires_grad=True)
        return [rnd(B, 2 * H, N, D // H), rnd(B, H // 2, N, D // H), rnd(B, H // 2, N, D // H), lam]
    if method == "timm diff":  # timm DiffAttention: q, k (B, 2H, N, D/2H) interleaved; v (B, H, N, D/H)
        lam = torch.tensor(0.5, device=device, requires_grad=True)
        return [rnd(B, 2 * H, N, D // H // 2), rnd(B, 2 * H, N, D // H // 2), rnd(B, H, N, D // H), lam]
    h, d = H // 2, D // H
    lam = torch.tensor(0.5, device=device, requires_grad=True)
    return [rnd(B, h, N, d), rnd(B, h, N, d), rnd(B, h, N, d), rnd(B, h, N, d), rnd(B, h, N, 2 * d), lam]


def make_fn(method: str):
    from diffvision.attention import differential_attention, differential_attention_v2

    if method == "ours diffv2":
        return lambda q, k, v, lam: differential_attention_v2(q, k, v, lam)
    if method == "standard":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method == "timm diff":
        def timm_core(q, k, v, lam):  # timm.layers.DiffAttention.forward, fused_attn branch
            B, H2, N, hd = q.shape
            q = q.reshape(B, H2 // 2, 2, N, hd)
            k = k.reshape(B, H2 // 2, 2, N, hd)
            q1, q2 = q.unbind(2)
            k1, k2 = k.unbind(2)
            attn1 = F.scaled_dot_product_attention(q1, k1, v)
            attn2 = F.scaled_dot_product_attention(q2, k2, v)
            return attn1 - lam.type_as(q) * attn2
        return timm_core
    backend = method.split()[1]
    return lambda q1, k1, q2, k2, v, lam: differential_attention(q1, k1, q2, k2, v, lam, backend=backend)


def gpu_time_ms(fn, iters=20, grad_to_none=()):
    """Sum of the GPU kernel (and memset/copy) durations per call, from the CUDA profiler.

    Excludes host overhead and launch gaps: the time the GPU is busy for one call.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for t in grad_to_none:
                t.grad = None
            fn()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    total_us = 0.0
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA:
            total_us += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total_us / iters / 1e3


def bench_attention(shapes, device, warmup_ms=25, rep_ms=100):
    from triton.testing import do_bench

    rows = []
    for name, B, N, D, H in shapes:
        for method in METHODS:
            torch.cuda.empty_cache()
            inputs = make_inputs(method, B, N, D, H, device)
            fn = make_fn(method)
            try:
                out = fn(*inputs)
                dout = torch.randn_like(out)
                out.backward(dout)  # warm-up: compiles and autotunes the Triton kernels
                torch.cuda.synchronize()
                fwd = do_bench(lambda: fn(*inputs), warmup=warmup_ms, rep=rep_ms, return_mode="median")

                def step():
                    fn(*inputs).backward(dout)
                both = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=inputs,
                                return_mode="median")
                gpu_fwd = gpu_time_ms(lambda: fn(*inputs))
                gpu_both = gpu_time_ms(step, grad_to_none=inputs)
                for t in inputs:
                    t.grad = None
                del out
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                err = None
            except Exception as e:  # report, don't stop the table
                fwd = both = peak = gpu_fwd = gpu_both = float("nan")
                err = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(dict(shape=name, B=B, N=N, D=D, H=H, method=method, fwd_ms=fwd, fwdbwd_ms=both,
                             gpu_fwd_ms=gpu_fwd, gpu_fwdbwd_ms=gpu_both,
                             fwd_tflops=flops(method, B, N, D, H, False) / fwd / 1e9,
                             fwdbwd_tflops=flops(method, B, N, D, H, True) / both / 1e9,
                             peak_mib=peak, error=err))
            r = rows[-1]
            print(f"  {name:14} {method:12} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                  f"(GPU busy {gpu_fwd:8.3f} / {gpu_both:8.3f} ms)  peak {peak:8.1f} MiB"
                  + (f"  ERROR {err}" if err else ""), flush=True)
            del inputs
    return rows


def _compile_job(job):
    """Worker: run the Triton path once at one shape with the i-th candidate of every kernel."""
    name, B, N, D, H, i = job
    import diffvision.attention.triton_kernel as tk
    from diffvision.attention import differential_attention

    device = torch.device("cuda")
    ins = make_inputs("ours triton", B, N, D, H, device)
    h, d = H // 2, D // H
    for mode in ("fused", "split"):
        kinds = ["fwd"] + (["bwd_fused"] if mode == "fused" else ["bwd_dkdq", "bwd_dv"])
        cands = {k: tk._configs(k, d, 2 * d) for k in kinds}
        if all(i >= len(c) for c in cands.values()):
            continue
        for k, c in cands.items():
            os.environ[f"DIFFVISION_TRITON_{k.upper()}"] = ",".join(map(str, c[min(i, len(c) - 1)]))
        os.environ["DIFFVISION_TRITON_BWD"] = mode
        tk._BEST.clear()
        tk._BWD_MODE.clear()
        try:
            differential_attention(*ins, backend="triton").sum().backward()
        except Exception as e:  # a config that does not fit: the tuner skips it later
            print(f"  precompile {name} {mode} #{i}: {type(e).__name__}", flush=True)
    torch.cuda.synchronize()
    return name, i


def precompile(shapes, workers=12):
    """Compile every candidate configuration of the Triton kernels in parallel processes.

    The compiled kernels land in Triton's on-disk cache, so the (sequential) tuning in the
    benchmark itself only times them. Saves minutes of single-threaded compilation.
    """
    import multiprocessing as mp

    jobs = [(name, B, N, D, H, i) for name, B, N, D, H in shapes for i in range(4)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        for _ in pool.imap_unordered(_compile_job, jobs):
            pass
    print(f"  precompiled Triton kernels for {len(shapes)} shapes in {time.time() - t0:.0f} s", flush=True)


def check_triton_at_shapes(shapes, device):
    """At each benchmark shape (autotuned configs), triton vs sdpa backend on identical inputs."""
    from diffvision.attention import differential_attention

    res = {}
    for name, B, N, D, H in shapes:
        torch.manual_seed(0)
        ins = make_inputs("ours triton", B, N, D, H, device)
        outs, grads = [], []
        for backend in ("sdpa", "triton"):
            leaves = [t.detach().clone().requires_grad_(True) for t in ins]
            o = differential_attention(*leaves, backend=backend)
            o.backward(torch.ones_like(o) / math.sqrt(o.numel()))
            outs.append(o.float())
            grads.append([t.grad.float() for t in leaves])
        e_out = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        e_grad = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(grads[1], grads[0]))
        res[name] = (e_out, e_grad)
    return res


# ---------------------------------------------------------------------------------------------
# Model level
# ---------------------------------------------------------------------------------------------

def build_models():
    import timm

    models = {}
    models["timm vit_small_patch16_224"] = lambda: timm.create_model("vit_small_patch16_224")
    models["timm vit_small attn_layer='diff'"] = lambda: timm.create_model(
        "vit_small_patch16_224", attn_layer="diff")
    try:
        import diffvision  # noqa: F401  (registers diffvision's timm models)
        timm.create_model("diff_vit_small_patch16_224")

        def ours(backend):
            def make():
                return timm.create_model("diff_vit_small_patch16_224", attn_backend=backend)
            return make
        label = "diffvision diff_vit_small_patch16_224"
    except Exception as err:  # not registered yet: the same model from timm's ViT + our attention
        print(f"  (diff_vit_small_patch16_224 unavailable: {err}; building DIFF-ViT-S from timm's ViT)")
        from functools import partial

        from timm.models.vision_transformer import VisionTransformer

        from diffvision.attention import DifferentialAttention

        class _DiffAttn(DifferentialAttention):
            def __init__(self, dim, num_heads=6, **kw):
                super().__init__(dim, num_heads=num_heads // 2, **kw)

        def ours(backend):
            return lambda: VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                             attn_layer=partial(_DiffAttn, backend=backend))
        label = "DIFF-ViT-S (timm ViT + diffvision attention)"
    models[f"{label} [triton]"] = ours("auto")
    models[f"{label} [sdpa]"] = ours("sdpa")
    models["diffvision diffv2_vit_small_patch16_224"] = lambda: timm.create_model("diffv2_vit_small_patch16_224")
    return models


def train_throughput(make_model, batch, device, steps=20, warmup=6, compile_=False, compile_mode=None):
    """Training images/s and peak GiB at 224 px, 1000 classes: bench_speed's ``training_rate`` (median of
    three windows of ``steps`` steps after ``warmup``)."""
    from bench_speed import training_rate  # train/ is on sys.path when this script runs

    torch.manual_seed(0)
    model = make_model().to(device).train()
    result = training_rate(model, batch, 224, 1000, device, warmup, steps, windows=3,
                           compile_kwargs=dict(mode=compile_mode) if compile_ else None)
    del model
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------

def print_attention_table(rows):
    by = {(r["shape"], r["method"]): r for r in rows}
    shapes = [(r["shape"], r["B"], r["N"], r["D"], r["H"]) for r in rows if r["method"] == "standard"]
    for title, f_key, b_key in (
            ("GPU busy time per call (sum of kernel times, CUDA profiler)", "gpu_fwd_ms", "gpu_fwdbwd_ms"),
            ("wall time per call (triton.testing.do_bench median, eager, L2 flushed)", "fwd_ms", "fwdbwd_ms")):
        print(f"\n=== attention, bf16, {title}: ms, ratio to standard SDPA, TF/s ===")
        print(f"{'shape (B,N,D,H)':30} {'method':12} {'fwd ms':>8} {'x std':>6} {'TF/s':>6}   "
              f"{'fwd+bwd ms':>10} {'x std':>6} {'TF/s':>6} {'peak MiB':>9}")
        for name, B, N, D, H in shapes:
            std = by[(name, "standard")]
            for method in METHODS:
                r = by.get((name, method))
                if r is None:
                    continue
                label = f"{name} ({B},{N},{D},{H})" if method == "standard" else ""
                f_tf = flops(method, B, N, D, H, False) / r[f_key] / 1e9
                b_tf = flops(method, B, N, D, H, True) / r[b_key] / 1e9
                print(f"{label:30} {method:12} {r[f_key]:8.3f} {r[f_key] / std[f_key]:6.2f} {f_tf:6.0f}   "
                      f"{r[b_key]:10.3f} {r[b_key] / std[b_key]:6.2f} {b_tf:6.0f} {r['peak_mib']:9.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--compile", action="store_true", help="model table also with torch.compile")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compiled table, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--models", default=None,
                        help="comma-separated substrings: only model-table rows whose label contains one")
    parser.add_argument("--batch", type=int, default=256, help="model-level batch size")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--precompile", action="store_true",
                        help="compile the Triton kernels' candidate configurations in parallel first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    import timm
    import triton
    info = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                triton=triton.__version__, timm=timm.__version__,
                sdpa_backends=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                                   cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                                   mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled()))
    print(json.dumps(info))
    shapes = SHAPES if args.shapes is None else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    results = dict(info=info)
    if not args.skip_attention:
        t0 = time.time()
        if args.precompile:
            precompile(shapes)
        rows = bench_attention(shapes, device)
        results["attention"] = rows
        agree = check_triton_at_shapes(shapes, device)
        results["triton_vs_sdpa"] = agree
        print(f"  attention benchmark took {time.time() - t0:.0f} s")
    model_rows = []
    if not args.skip_model:
        for compile_ in ((False, True) if args.compile else (False,)):
            for label, make in build_models().items():
                if args.models and not any(m in label for m in args.models.split(",")):
                    continue
                try:
                    ips, peak = train_throughput(make, args.batch, device, compile_=compile_,
                                                 compile_mode=args.compile_mode)
                    err = None
                except Exception as e:
                    ips, peak, err = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:300]}"
                model_rows.append(dict(model=label, compile=compile_, img_s=ips, peak_gib=peak, error=err))
                print(f"  {label:55} compile={compile_!s:5} {ips:8.0f} img/s  peak {peak:5.1f} GiB"
                      + (f"  ERROR {err}" if err else ""), flush=True)
        results["model"] = model_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)

    print(f"\ndevice: {info['device']}, torch {info['torch']}, triton {info['triton']}, timm {info['timm']}")
    if not args.skip_attention:
        print_attention_table(rows)
        print("triton vs sdpa backend at these shapes (autotuned configs), rel. diff out / worst grad: "
              + ", ".join(f"{k} {v[0]:.1e}/{v[1]:.1e}" for k, v in agree.items()))
    if model_rows:
        print(f"\n=== ViT-S/16-224 training, batch {args.batch}, bf16 autocast, AdamW: images/s ===")
        for compile_ in sorted({r["compile"] for r in model_rows}):
            base = next(r["img_s"] for r in model_rows if r["compile"] == compile_)
            for r in model_rows:
                if r["compile"] == compile_:
                    print(f"{r['model']:55} compile={compile_!s:5} {r['img_s']:8.0f} img/s "
                          f"{r['img_s'] / base:5.2f}x  peak {r['peak_gib']:5.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
