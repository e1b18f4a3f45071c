"""DiT sampling speed: ours (``DiffDiTTransformer2DModel``, standard and DIFF) against diffusers' ``DiTTransformer2DModel``.

    PYTHONPATH=. python train/bench_dit_sampling.py --ops                          # CPU: what one forward dispatches
    PYTHONPATH=. python train/bench_dit_sampling.py --ops --baseline-src /tmp/old  # + the same for another copy of
                                                                                   #   the package (before / after)
    PYTHONPATH=. python train/bench_dit_sampling.py                                # CUDA: img/s per denoising forward

``--ops`` (runs anywhere; no timing) builds each preset (``--presets``, latent 32x32x4, patch 2, learned sigma)
as ours ``standard``, ours ``diff`` and diffusers' DiT with the standard model's weights, in ``--dtype`` (bf16:
weights cast, as in sampling), eval, no grad, and counts over one forward (batch 2, one class and the null
class) with a ``TorchDispatchMode``:

* ``ops``: aten ops dispatched (the CPU's decomposition: CUDA's SDPA is one op where the CPU's may differ);
* ``copies``: ``copy_``, ``_to_copy``, ``clone`` (``.contiguous()`` / ``reshape`` of a strided tensor), i.e.
  memory moved for layout or dtype;
* ``syncs``: host reads of tensor values (``_local_scalar_dense`` = ``.item()`` / ``bool()`` / indexing with a
  0-d tensor, ``is_nonzero``, ``nonzero``, ``equal``, and ``Tensor.tolist``, which dispatches nothing on the
  CPU): free here, a device synchronisation when the tensor is on the GPU;
* ``f32``: ops whose first output is float32 although the model is bf16 (the timestep's sin-cos features
  are float32 by design in both models);
* ``/block``: ops inside one transformer block; diffusers' blocks each recompute the timestep + label
  embedding (``norm1.emb``), which is counted under ``cond`` (conditioning), as ours computes it once.

Then the same for the pipelines' denoising loop (``DiffDiTPipeline`` against diffusers' ``DiTPipeline``, DDIM,
``--steps`` steps, guidance 4): host reads per step, where the timesteps the scheduler indexes live matters.

Without ``--ops`` (CUDA): img/s of one denoising forward (no grad, bf16 weights, ``--batch`` images as a
classifier-free-guidance batch of 2 × batch, int timesteps on the device), medians of 3 windows of ``--iters``
forwards timed with CUDA events, for each preset and model, and the ratio to diffusers. Nothing asserts a speed.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import subprocess
import sys

import torch

PRESETS = ("DiT-S/2", "DiT-B/2", "DiT-XL/2")
MODELS = ("ours standard", "ours diff", "diffusers")
COPY_OPS = {"copy_", "_to_copy", "clone"}
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item"}
BATCH = {"DiT-S/2": 256, "DiT-B/2": 128, "DiT-XL/2": 64}


def build(preset: str, dtype: torch.dtype, device) -> dict:
    """The three models with the same weights (ours standard converted to diffusers; DIFF initialised from it)."""
    from diffvision.diffusion import DiffDiTTransformer2DModel

    torch.manual_seed(0)
    std = DiffDiTTransformer2DModel.from_preset(preset, attn_kind="standard", sample_size=32, in_channels=4,
                                                out_channels=8, num_classes=1000)
    with torch.no_grad():  # off the zero init, so every layer computes something
        for p in std.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    models = {"ours standard": std, "diffusers": std.to_dit(),
              "ours diff": DiffDiTTransformer2DModel.from_dit(std, attn_kind="diff")}
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


def inputs(batch: int, dtype: torch.dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 4, 32, 32, generator=g).to(device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500, device=device)
    y = torch.cat([torch.randint(0, 1000, (batch,), generator=g), torch.full((batch,), 1000)]).to(device)
    return x, t, y


# ---- op counts (any device) -----------------------------------------------------------------------------

def _counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        """aten ops by (stage, name); float32-output ops; host reads (``tolist`` is watched in Python)."""

        def __init__(self):
            super().__init__()
            self.ops, self.f32, self.stage = collections.Counter(), collections.Counter(), ["model"]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name.split("::")[-1]
            self.ops[(self.stage[-1], name)] += 1
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, torch.Tensor) and first.dtype == torch.float32:
                self.f32[(self.stage[-1], name)] += 1
            return out

        def __enter__(self):
            self._tolist = torch.Tensor.tolist
            counter = self

            def watched_tolist(t):
                counter.ops[(counter.stage[-1], "tolist")] += 1
                return counter._tolist(t)

            torch.Tensor.tolist = watched_tolist
            return super().__enter__()

        def __exit__(self, *exc):
            torch.Tensor.tolist = self._tolist
            return super().__exit__(*exc)

    return Counter()


def _stage_hooks(model, counter) -> list:
    """Attribute ops to ``cond`` (timestep / label embedding: ours once, diffusers' ``norm1.emb`` in every
    block), ``block`` (the rest of each block) and ``model`` (input checks, patch embedding, final layer)."""
    handles = []

    def push(name):
        return lambda *a: counter.stage.append(name)

    def pop(*a):
        counter.stage.pop()

    cond = [m for n, m in model.named_modules() if n in ("time_proj", "timestep_embedder", "class_embedder")
            or n.endswith("norm1.emb")]
    for m in cond:
        handles += [m.register_forward_pre_hook(push("cond")), m.register_forward_hook(pop)]
    for b in model.transformer_blocks:
        handles += [b.register_forward_pre_hook(push("block")), b.register_forward_hook(pop)]
    return handles


def count_model(model, x, t, y) -> dict:
    counter = _counter()
    handles = _stage_hooks(model, counter)
    with torch.no_grad(), counter:
        model(x, timestep=t, class_labels=y)
    for h in handles:
        h.remove()
    ops = counter.ops
    n_blocks = len(model.transformer_blocks)
    by_stage = collections.Counter()
    for (stage, _), k in ops.items():
        by_stage[stage] += k
    block_ops = collections.Counter({name: k / n_blocks for (stage, name), k in ops.items() if stage == "block"})
    return dict(ops=sum(ops.values()), copies=sum(k for (_, n), k in ops.items() if n in COPY_OPS),
                syncs=sum(k for (_, n), k in ops.items() if n in SYNC_OPS or n == "tolist"),
                f32=sum(counter.f32.values()), per_block=by_stage["block"] / n_blocks, cond=by_stage["cond"],
                rest=by_stage["model"], block_ops=dict(block_ops),
                sync_ops=sorted({n for (_, n) in ops if n in SYNC_OPS or n == "tolist"}),
                copy_ops={f"{s}:{n}": k for (s, n), k in ops.items() if n in COPY_OPS})


def count_pipeline(transformer, steps: int) -> dict:
    """Host reads per denoising step of our pipeline and, for a diffusers DiT, of diffusers' ``DiTPipeline``."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from diffvision.diffusion import DiffDiTPipeline

    counter = _counter()
    scheduler = DDIMScheduler()
    if isinstance(transformer, DiTTransformer2DModel):
        pipe = _dit_pipeline(transformer, scheduler)
        call = dict(class_labels=[1, 2], num_inference_steps=steps, output_type="pt")
    else:
        pipe = DiffDiTPipeline(transformer=transformer, scheduler=scheduler)
        call = dict(class_labels=[1, 2], num_inference_steps=steps, output_type="latent")
    pipe.set_progress_bar_config(disable=True)
    where = {}

    def staged(fn, stage):
        def call_(*a, **kw):
            counter.stage.append(stage)
            try:
                return fn(*a, **kw)
            finally:
                counter.stage.pop()
        return call_

    set_timesteps = scheduler.set_timesteps

    def watched_set_timesteps(*a, **kw):  # where the scheduler's timesteps (what step() reads) are put
        where["timesteps"] = "device" if (kw.get("device") or (a[1:2] or [None])[0]) is not None else "host"
        return set_timesteps(*a, **kw)

    scheduler.set_timesteps = watched_set_timesteps
    scheduler.step = staged(scheduler.step, "scheduler")
    scheduler.scale_model_input = staged(scheduler.scale_model_input, "scheduler")
    with counter:
        pipe(generator=torch.manual_seed(0), **call)
    reads = collections.Counter()
    for (stage, n), k in counter.ops.items():
        if n in SYNC_OPS or n == "tolist":
            reads[stage] += k / steps
    return dict(scheduler_reads=reads["scheduler"], other_reads=sum(reads.values()) - reads["scheduler"],
                timesteps=where.get("timesteps", "?"), ops_per_step=sum(counter.ops.values()) / steps)


def device_reads(model, x, t, y) -> str:
    """Whether a forward on tensors off the CPU reads values back: run on the meta device, where a read raises."""
    meta = copy.deepcopy(model).to("meta")
    try:
        with torch.no_grad():
            meta(x.to("meta"), timestep=t.to("meta"), class_labels=y.to("meta"))
    except (NotImplementedError, RuntimeError):
        return ">=1"
    return "0"


def _dit_pipeline(transformer, scheduler):
    """diffusers' ``DiTPipeline`` with an identity decoder in place of the VAE (the loop is what is counted)."""
    from diffusers import AutoencoderKL, DiTPipeline

    vae = AutoencoderKL(in_channels=4, out_channels=4, latent_channels=4, block_out_channels=(8,),
                        norm_num_groups=8, layers_per_block=1).to(transformer.device, transformer.dtype)
    vae.decode = lambda z: type("O", (), {"sample": z})()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def ops_rows(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows = []
    for preset in args.presets:
        models = build(preset, dtype, "cpu")
        x, t, y = inputs(1, dtype, "cpu")
        for name, model in models.items():
            row = dict(preset=preset, model=name, dev_reads=device_reads(model, x, t, y), **count_model(model, x, t, y))
            if name != "ours diff":
                row["pipeline"] = count_pipeline(model, args.steps)
            rows.append(row)
    return rows


def print_ops(rows: list[dict], label: str) -> None:
    print(f"\n=== {label}: one forward, batch 2 ({rows[0].get('dtype', '')}) ===")
    print(f"{'preset':9} {'model':14} {'ops':>5} {'/block':>6} {'cond':>4} {'rest':>4} {'copies':>6} {'reads':>5} "
          f"{'on GPU':>6} {'f32':>4}  | pipeline: {'timesteps':>9} {'sched reads':>11} {'other':>5} {'ops':>5} per step")
    for r in rows:
        p = r.get("pipeline")
        pipe = (f"{p['timesteps']:>9} {p['scheduler_reads']:11.1f} {p['other_reads']:5.1f} {p['ops_per_step']:5.0f}"
                if p else "")
        print(f"{r['preset']:9} {r['model']:14} {r['ops']:5d} {r['per_block']:6.1f} {r['cond']:4d} {r['rest']:4d} "
              f"{r['copies']:6d} {r['syncs']:5d} {r['dev_reads']:>6} {r['f32']:4d}  |           {pipe}")
    print("reads: host reads on the CPU; on GPU: reads left with the tensors off the CPU (a forward on the meta "
          "device); pipeline timesteps: where step() finds them (on the device, each of its reads syncs)")


def print_block_diff(rows: list[dict]) -> None:
    """The ops of one block, ours standard against diffusers (minus its per-block conditioning)."""
    preset = rows[0]["preset"]
    ours = next(r for r in rows if r["preset"] == preset and r["model"] == "ours standard")["block_ops"]
    ref = next(r for r in rows if r["preset"] == preset and r["model"] == "diffusers")["block_ops"]
    print(f"\n{preset}, one block's ops (ours standard / diffusers, its norm1.emb left out):")
    for name in sorted(set(ours) | set(ref)):
        a, b = ours.get(name, 0), ref.get(name, 0)
        print(f"  {name:45} {a:5.0f} {b:5.0f}" + ("" if a == b else "   *"))


def child_ops(args, src: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--ops", "--child", "--dtype", args.dtype, "--steps", str(args.steps),
           "--presets", *args.presets]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- CUDA timing -----------------------------------------------------------------------------------------

def time_forward(model, x, t, y, iters: int) -> float:
    """img/s of one forward on ``len(x) / 2`` images (a guidance batch): bench_speed's timing (median of
    3 CUDA-event windows after 3 warm-up calls)."""
    from bench_speed import timed_windows  # train/ is on sys.path when this script runs

    with torch.no_grad():
        seconds = timed_windows(lambda: model(x, timestep=t, class_labels=y), torch.device("cuda"),
                                warmup=3, steps=iters, windows=3)
    return (len(x) // 2) / seconds


def cuda_syncs(fn) -> list[str]:
    """The synchronising calls ``fn()`` makes on the GPU (``torch.cuda.set_sync_debug_mode``), by call site."""
    import warnings

    sites = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        sites = [f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
                 if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sites


def time_pipeline(transformer, batch: int, steps: int) -> float:
    """img/s of DDIM sampling (``steps`` steps, guidance 4, latents out): ours or diffusers' pipeline."""
    import time

    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from diffvision.diffusion import DiffDiTPipeline

    if isinstance(transformer, DiTTransformer2DModel):
        pipe, out = _dit_pipeline(transformer, DDIMScheduler()), "pt"
    else:
        pipe, out = DiffDiTPipeline(transformer=transformer, scheduler=DDIMScheduler()), "latent"
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(batch))
    pipe(class_labels=labels, num_inference_steps=2, output_type=out)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(class_labels=labels, num_inference_steps=steps, output_type=out)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)  # images x steps per second, comparable to a forward


def gpu_rows(args) -> list[dict]:
    rows = []
    for preset in args.presets:
        batch = args.batch or BATCH[preset]
        models = build(preset, torch.bfloat16, "cuda")
        x, t, y = inputs(batch, torch.bfloat16, "cuda")
        for name in MODELS:
            ips = time_forward(models[name], x, t, y, args.iters)
            with torch.no_grad():
                syncs = cuda_syncs(lambda m=models[name]: m(x, timestep=t, class_labels=y))
            rows.append(dict(preset=preset, model=name, batch=batch, img_s=ips, syncs=syncs))
        if args.pipeline_steps:
            for name in ("ours standard", "diffusers"):
                syncs = cuda_syncs(lambda m=models[name]: time_pipeline(m, 2, 2))
                rows.append(dict(preset=preset, model=f"{name} pipeline", batch=batch, syncs=syncs,
                                 img_s=time_pipeline(models[name], batch, args.pipeline_steps)))
        ref = next(r["img_s"] for r in rows if r["preset"] == preset and r["model"] == "diffusers")
        for r in rows:
            if r["preset"] != preset:
                continue
            r["x_diffusers"] = r["img_s"] / ref
            print(f"{preset:9} {r['model']:23} batch {batch:4d} {r['img_s']:9.0f} img/s {r['x_diffusers']:5.2f}x  "
                  f"syncs: {len(r['syncs'])} {collections.Counter(r['syncs']).most_common(4)}", flush=True)
        del models
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", action="store_true", help="op / copy / sync counts per forward (any device)")
    p.add_argument("--presets", nargs="+", default=["DiT-S/2", "DiT-B/2"], choices=PRESETS)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=4, help="--ops: denoising steps of the pipelines' loop")
    p.add_argument("--baseline-src", default=None, help="--ops: a folder holding another diffvision package")
    p.add_argument("--batch", type=int, default=None, help=f"CUDA: images per forward (default {BATCH})")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--pipeline-steps", type=int, default=0,
                   help="CUDA: also time each pipeline's DDIM loop of this many steps (image-steps/s)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ops:
        torch.set_num_threads(min(4, torch.get_num_threads()))
        rows = ops_rows(args)
        for r in rows:
            r["dtype"] = args.dtype
        if args.child:
            print(json.dumps(rows))
            return 0
        results = {"current": rows}
        if args.baseline_src:
            results["baseline"] = child_ops(args, args.baseline_src)
            print_ops(results["baseline"], f"baseline ({args.baseline_src})")
        print_ops(rows, "current")
        print_block_diff(rows)
    else:
        if not torch.cuda.is_available():
            print("timing needs a CUDA GPU; --ops counts ops on any device")
            return 2
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": gpu_rows(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
