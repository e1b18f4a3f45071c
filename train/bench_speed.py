"""Every speed target of issue 18 in one run, each as measured ratio / goal / met.

    PYTHONPATH=. python train/bench_speed.py --json speed.json --markdown speed.md      # on a CUDA GPU
    PYTHONPATH=. python train/bench_speed.py --only training,sampling                   # some parts only
    PYTHONPATH=. python train/bench_speed.py --device cpu --smoke                       # code paths, tiny sizes

Four parts, in one process (the Lightning runs of ``small`` in child processes, as
``bench_step_overhead.py`` runs them); each prints its table, a failing part or row prints its error and
the rest goes on; a last "Targets" table puts every ratio side by side.

* ``training``: training images/s of timm's ``vit_{small,base}_patch16_224`` against diffvision's
  ``diff_vit_*`` (default backend, and ``attn_backend="sdpa"`` for reference) and ``diffv2_vit_*``,
  eager and ``torch.compile`` (``--compile-mode``), bf16 autocast, AdamW, random data at 224 px, batch
  ``--train-batch`` (256); CUDA-event time of ``--train-steps`` steps, median of three windows after warm-up.
  Goals: DIFF >= 0.90x timm, DIFF V2 >= 0.95x timm, both eager and compiled.
* ``sampling``: one denoiser call per sampling step as the pipelines make it with classifier-free guidance
  (``torch.cat([x, x])``, the transformer on 2 x batch with the class labels and the null class, the guidance
  combination; the scheduler step, the same for every model, is left out), bf16 weights, no grad, latents
  32x32x4, 1000 classes, learned sigma (8 output channels). diffusers' ``DiTTransformer2DModel`` against
  ``DiffDiTTransformer2DModel.from_preset(..., attn_kind=...)`` at the same preset; images/s = batch / step
  time (CUDA events, median of windows after warm-up). Goals: ``standard`` >= 1.00x diffusers, ``diff`` >= 0.90x.
* ``kernel``: ``bench_attention.bench_attention`` at ``bench_attention.SHAPES`` (GPU busy time from the CUDA
  profiler and eager wall time per call, forward and forward+backward). Goal: ours (Triton) forward+backward
  GPU time <= 1.5x SDPA at the shapes with N >= 1024 or head dim 72 (DiT-XL); the wall-time ratio is shown
  beside it for reference.
* ``small``: the data-fraction sweep's model (``configs/cifar10_vit_fractions.yaml``: ViT-Ti/4 depth 6, 32 px,
  batch 256, bf16) through ``bench_step_overhead``: ms/step of the bare loop (``time_bare``) and of a
  ``diffvision fit`` run (``child_lightning``), and the GPU busy fraction of a Lightning run (sum of the CUDA
  kernel times / wall time over the timed steps, ``torch.profiler``). Goals: images/s >= 2 x 3.1k,
  GPU busy > 80 %.

``--markdown FILE`` writes a header (device, versions, command, date) and every table, for
``docs/benchmarks.md``. Without CUDA the script stops, unless ``--device cpu --smoke`` (tiny models and
shapes, 2-3 steps, ``torch.compile`` with the ``eager`` backend): that only checks the code paths; its numbers
mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))  # bench_attention, bench_step_overhead: reused, not copied

PARTS = ("training", "sampling", "kernel", "small")
NAN = float("nan")

# the ViT sizes of the training part: label -> timm's size name (vit_<size>_patch16_224)
TRAIN_SIZES = {
    "ViT-S/16": "small",
    "ViT-B/16": "base",
}
SAMPLE_BATCHES = "DiT-S/2=256,DiT-B/2=128,DiT-XL/2=64"
SAMPLE_KINDS = (("ours standard", "standard", 1.00), ("ours diff", "diff", 0.90), ("ours diffv2", "diffv2", None))
SMALL_REFERENCE_IMG_S = 3100.0  # the sweep's measured rate before issue 18; goal 2x
SMALL_GOAL_BUSY = 0.80
KERNEL_GOAL = 1.5


# ---------------------------------------------------------------------------------------------
# Tables: one object, printed as text and written as markdown
# ---------------------------------------------------------------------------------------------

class Table:
    def __init__(self, title: str, columns: list[str], note: str = ""):
        self.title, self.columns, self.note, self.rows = title, columns, note, []

    def add(self, *cells) -> None:
        self.rows.append([_fmt(c) for c in cells])
        print("  " + "  ".join(self.rows[-1]), flush=True)

    def text(self) -> str:
        widths = [max([len(c)] + [len(r[i]) for r in self.rows]) for i, c in enumerate(self.columns)]
        lines = [f"\n=== {self.title} ==="] + ([self.note] if self.note else [])
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        for r in self.rows:
            lines.append("  ".join(c.ljust(w) if i == 0 or not _numeric(c) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))))
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [f"### {self.title}", ""] + ([self.note, ""] if self.note else [])
        out.append("| " + " | ".join(self.columns) + " |")
        right = [i and all(_numeric(r[i]) or r[i] in ("—", "nan") for r in self.rows) for i in range(len(self.columns))]
        out.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def _fmt(c) -> str:
    if c is None:
        return "—"
    if isinstance(c, float):
        if math.isnan(c):
            return "nan"
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.0f}"
    return str(c)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class Targets:
    """Every goal: what, measured value, goal (op, value), met."""

    def __init__(self):
        self.rows = []

    def add(self, part: str, what: str, value: float, op: str | None, goal: float | None, fmt: str = "{:.2f}x",
            error: str | None = None) -> None:
        ok = None
        if op is not None and not math.isnan(value) and not error:
            ok = {">=": value >= goal, "<=": value <= goal, ">": value > goal}[op]
        self.rows.append(dict(part=part, target=what, value=value, op=op, goal=goal, met=ok, error=error,
                              measured=(error and f"ERROR {error}") or ("nan" if math.isnan(value) else fmt.format(value)),
                              goal_text="ref." if op is None else f"{op} {fmt.format(goal)}"))

    def table(self) -> Table:
        t = Table("Targets (issue 18): measured / goal / met", ["part", "target", "measured", "goal", "met"])
        with contextlib.redirect_stdout(io.StringIO()):
            for r in self.rows:
                t.add(r["part"], r["target"], r["measured"], r["goal_text"],
                      "—" if r["met"] is None else ("yes" if r["met"] else "NO"))
        return t


# ---------------------------------------------------------------------------------------------
# Timing: CUDA events on the GPU, perf_counter on the CPU (smoke only)
# ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(fn, device: torch.device, warmup: int, steps: int, windows: int) -> float:
    """Median over ``windows`` of the seconds per call of ``fn`` (``steps`` calls per window)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else NAN


# ---------------------------------------------------------------------------------------------
# Part 1: ViT training, eager and compiled
# ---------------------------------------------------------------------------------------------

def train_models(size: str, smoke: bool):
    """(label, timm name, kwargs, goal vs the baseline or None): the baseline first."""
    import timm

    import diffvision  # noqa: F401  (registers diffvision's timm models)

    kw = dict(img_size=32, depth=1, num_classes=10) if smoke else {}
    rows = [(f"timm vit_{size}_patch16_224", f"vit_{size}_patch16_224", kw, None),
            (f"diff_vit_{size}_patch16_224", f"diff_vit_{size}_patch16_224", kw, 0.90),
            (f"diff_vit_{size}_patch16_224 [sdpa]", f"diff_vit_{size}_patch16_224", {**kw, "attn_backend": "sdpa"},
             None),
            (f"diffv2_vit_{size}_patch16_224", f"diffv2_vit_{size}_patch16_224", kw, 0.95)]
    return [r for r in rows if r[1] in timm.list_models(r[1])]


def training_rate(model, batch: int, img_size: int, classes: int, device: torch.device, warmup: int, steps: int,
                  windows: int, compile_kwargs: Optional[dict] = None) -> tuple[float, float]:
    """Images/s of ``model``'s training steps (bf16 autocast, cross-entropy, AdamW, random data already on the
    device; ``torch.compile(**compile_kwargs)`` first when given) by :func:`timed_windows`, and peak GiB."""
    if compile_kwargs is not None:
        model = torch.compile(model, **compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[:] = [loss.detach()]

    t = timed_windows(step, device, warmup, steps, windows)
    if not torch.isfinite(losses[-1]).item():
        raise RuntimeError("non-finite loss")
    return batch / t, peak_gib(device)


def train_images_per_s(name, kwargs, args, device, compile_: bool) -> tuple[float, float]:
    import timm

    torch.manual_seed(0)
    free(device)  # the next measurement frees this one's memory
    model = timm.create_model(name, **kwargs).to(device).train()
    size = model.default_cfg.get("input_size", (3, 224, 224))[-1] if not args.smoke else 32
    compile_kwargs = dict(mode=args.compile_mode, backend=args.compile_backend) if compile_ else None
    return training_rate(model, args.train_batch, size, model.num_classes, device, args.train_warmup,
                         args.train_steps, args.windows, compile_kwargs)


def part_training(args, device, targets: Targets, results: dict) -> list[Table]:
    mode = f"torch.compile(mode={args.compile_mode!r}, backend={args.compile_backend!r})"
    t = Table(f"training, batch {args.train_batch}, bf16 autocast, AdamW: images/s",
              ["model", "compile", "img/s", "x timm", "goal", "peak GiB"],
              note=f"compiled: {mode}; CUDA-event time of {args.train_steps} steps, median of {args.windows} windows "
                   f"after {args.train_warmup} warm-up steps"
                   + (" (smoke: depth 1, 32 px, perf_counter on the CPU)" if args.smoke else ""))
    print(f"\n--- training ({mode} for the compiled rows)")
    rows = []
    for label, size in TRAIN_SIZES.items():
        models = train_models(size, args.smoke)
        for compile_ in ((False, True) if args.compile_backend != "none" else (False,)):
            base = NAN
            for name, model_name, kwargs, goal in models:
                try:
                    ips, peak = train_images_per_s(model_name, kwargs, args, device, compile_)
                    err = None
                except Exception as e:  # report in the row, go on
                    ips, peak, err = NAN, NAN, _err(e)
                if name.startswith("timm"):
                    base = ips
                ratio = ips / base
                rows.append(dict(size=label, model=name, compile=compile_, img_s=ips, ratio=ratio, peak_gib=peak,
                                 error=err))
                t.add(name, "yes" if compile_ else "no", err and f"ERROR {err}" or ips, ratio,
                      f">= {goal:.2f}" if goal else ("ref." if not name.startswith("timm") else "1.00"), peak)
                if not name.startswith("timm"):
                    what = f"{label} training, {'compiled' if compile_ else 'eager'}: {name} / timm"
                    targets.add("training", what, ratio, ">=" if goal else None, goal or NAN, error=err)
    results["training"] = rows
    return [t]


# ---------------------------------------------------------------------------------------------
# Part 2: sampling, one guided denoiser call per step
# ---------------------------------------------------------------------------------------------

def sampling_models(preset: str, smoke: bool):
    from diffusers import DiTTransformer2DModel

    from diffvision.diffusion import DiffDiTTransformer2DModel
    from diffvision.diffusion.config import DIT_PRESETS

    cfg = dict(DIT_PRESETS[preset])
    common = dict(in_channels=4, out_channels=8, sample_size=32)
    if smoke:
        cfg["num_layers"] = 1
        common["sample_size"] = 8

    def diffusers_dit():
        return DiTTransformer2DModel(num_embeds_ada_norm=1000, **cfg, **common)

    def ours(kind):
        return lambda: DiffDiTTransformer2DModel.from_preset(preset, attn_kind=kind, num_classes=1000, **common,
                                                             **({"num_layers": 1} if smoke else {}))

    return [("diffusers DiTTransformer2DModel", diffusers_dit, None)] + [
        (label, ours(kind), goal) for label, kind, goal in SAMPLE_KINDS]


def sampling_images_per_s(make, batch: int, args, device) -> tuple[float, float]:
    free(device)
    torch.manual_seed(0)
    model = make().to(device=device, dtype=torch.bfloat16).eval()
    cfg = model.config
    channels, size = cfg.in_channels, cfg.sample_size
    latents = torch.randn(batch, channels, size, size, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.cat([labels, torch.full_like(labels, 1000)])  # conditional half, null-class half
    t = torch.tensor(500, device=device)
    guidance = 4.0

    @torch.no_grad()
    def step():
        model_input = torch.cat([latents, latents])
        timesteps = t.reshape(1).expand(model_input.shape[0])
        noise_pred = model(model_input, timestep=timesteps, class_labels=labels).sample
        eps = noise_pred[:, :channels]
        cond, uncond = eps.chunk(2)
        return uncond + guidance * (cond - uncond)

    s = timed_windows(step, device, args.sample_warmup, args.sample_steps, args.windows)
    return batch / s, peak_gib(device)


def part_sampling(args, device, targets: Targets, results: dict) -> list[Table]:
    t = Table("sampling, one classifier-free-guided denoiser call per step, bf16, no grad: images/s",
              ["preset", "batch", "model", "img/s", "x diffusers", "goal", "peak GiB"],
              note=f"latents {'8x8x4 (smoke: 1 layer, perf_counter on the CPU)' if args.smoke else '32x32x4'}, 1000 classes, learned sigma; "
                   f"model input 2 x batch; images/s = batch / step time; CUDA events, {args.sample_steps} steps "
                   f"per window, median of {args.windows} windows after {args.sample_warmup} warm-up steps")
    print("\n--- sampling")
    rows = []
    for item in args.sample_batches.split(","):
        preset, batch = item.split("=")
        batch = int(batch)
        try:
            models = sampling_models(preset, args.smoke)
        except Exception as e:
            t.add(preset, batch, "(building the models)", f"ERROR {_err(e)}", None, None, None)
            targets.add("sampling", f"{preset} (batch {batch}) sampling", NAN, None, NAN, error=_err(e))
            continue
        base = NAN
        for label, make, goal in models:
            try:
                ips, peak = sampling_images_per_s(make, batch, args, device)
                err = None
            except Exception as e:
                ips, peak, err = NAN, NAN, _err(e)
            if label.startswith("diffusers"):
                base = ips
            ratio = ips / base
            rows.append(dict(preset=preset, batch=batch, model=label, img_s=ips, ratio=ratio, peak_gib=peak, error=err))
            t.add(preset, batch, label, err and f"ERROR {err}" or ips, ratio,
                  f">= {goal:.2f}" if goal else ("1.00" if label.startswith("diffusers") else "ref."), peak)
            if not label.startswith("diffusers"):
                targets.add("sampling", f"{preset} (batch {batch}) sampling: {label} / diffusers DiT", ratio,
                            ">=" if goal else None, goal or NAN, error=err)
    results["sampling"] = rows
    return [t]


# ---------------------------------------------------------------------------------------------
# Part 3: the attention kernel (bench_attention's measurement, reused)
# ---------------------------------------------------------------------------------------------

SMOKE_SHAPES = [("smoke N=1024", 1, 1024, 64, 2), ("smoke d=72", 2, 64, 144, 2)]


def cpu_attention_rows(shapes):
    """Smoke stand-in for ``bench_attention.bench_attention`` (CUDA only): the same inputs, functions and row
    keys, timed with perf_counter on the CPU; the Triton method gets an error row."""
    import bench_attention as ba

    rows = []
    for name, B, N, D, H in shapes:
        for method in ba.METHODS:
            try:
                if method == "ours triton":
                    raise RuntimeError("needs CUDA")
                inputs = ba.make_inputs(method, B, N, D, H, torch.device("cpu"), dtype=torch.float32)
                fn = ba.make_fn(method)

                def step():
                    for x in inputs:
                        x.grad = None
                    fn(*inputs).sum().backward()
                fwd = timed_windows(lambda: fn(*inputs), torch.device("cpu"), 1, 2, 1) * 1e3
                both = timed_windows(step, torch.device("cpu"), 1, 2, 1) * 1e3
                err = None
            except Exception as e:
                fwd = both = NAN
                err = _err(e)
            rows.append(dict(shape=name, B=B, N=N, D=D, H=H, method=method, fwd_ms=fwd, fwdbwd_ms=both,
                             gpu_fwd_ms=fwd, gpu_fwdbwd_ms=both, fwd_tflops=NAN, fwdbwd_tflops=NAN, peak_mib=NAN,
                             error=err))
    return rows


def part_kernel(args, device, targets: Targets, results: dict) -> list[Table]:
    import bench_attention as ba

    print("\n--- kernel (bench_attention.bench_attention)")
    if args.smoke:
        shapes = SMOKE_SHAPES
    else:
        shapes = [s for s in ba.SHAPES if args.kernel_shapes is None or s[0] in args.kernel_shapes.split(",")]
    if device.type == "cuda":
        if args.precompile:
            ba.precompile(shapes)
        rows = ba.bench_attention(shapes, device)
    else:
        rows = cpu_attention_rows(shapes)
    results["kernel"] = rows
    ba.print_attention_table(rows)  # the familiar two tables, as bench_attention.py prints them
    by = {(r["shape"], r["method"]): r for r in rows}
    t = Table("attention kernel, bf16: ms per call and ratio to standard SDPA",
              ["shape (B,N,D,H)", "method", "GPU fwd", "x", "GPU fwd+bwd", "x", "wall fwd", "x", "wall fwd+bwd", "x",
               "peak MiB"],
              note="GPU = sum of kernel times per call (CUDA profiler); wall = triton.testing.do_bench median, eager, "
                   "L2 flushed" + (" (smoke: CPU perf_counter, float32, both columns the same)" if args.smoke else ""))
    with contextlib.redirect_stdout(io.StringIO()):
        for name, B, N, D, H in shapes:
            std = by.get((name, "standard"))
            for method in ba.METHODS:
                r = by.get((name, method))
                if r is None or std is None:
                    continue
                ratios = [r[k] / std[k] for k in ("gpu_fwd_ms", "gpu_fwdbwd_ms", "fwd_ms", "fwdbwd_ms")]
                t.add(f"{name} ({B},{N},{D},{H})" if method == "standard" else "", method,
                      *(v for pair in zip((r["gpu_fwd_ms"], r["gpu_fwdbwd_ms"], r["fwd_ms"], r["fwdbwd_ms"]), ratios)
                        for v in pair), r["peak_mib"] if not r.get("error") else f"ERROR {r['error']}")
    ours_method = "ours triton" if device.type == "cuda" else "ours sdpa"  # smoke on the CPU: no Triton
    for name, B, N, D, H in shapes:
        if not (N >= 1024 or D // H == 72):
            continue
        std, ours = by.get((name, "standard")), by.get((name, ours_method))
        err = (ours or {}).get("error") or (std or {}).get("error") or (None if ours and std else "missing row")
        gpu = ours["gpu_fwdbwd_ms"] / std["gpu_fwdbwd_ms"] if ours and std else NAN
        wall = ours["fwdbwd_ms"] / std["fwdbwd_ms"] if ours and std else NAN
        targets.add("kernel", f"{name} (N={N}, d={D // H}) fwd+bwd GPU time: {ours_method} / SDPA", gpu, "<=",
                    KERNEL_GOAL, error=err)
        targets.add("kernel", f"{name} (N={N}, d={D // H}) fwd+bwd wall time, eager: {ours_method} / SDPA", wall,
                    None, NAN, error=err)
    return [t]


# ---------------------------------------------------------------------------------------------
# Part 4: the sweep's small model (bench_step_overhead's measurement, reused)
# ---------------------------------------------------------------------------------------------

def small_args(args) -> argparse.Namespace:
    cuda = args.device == "cuda"
    return argparse.Namespace(
        device=args.device, size="tiny" if args.smoke else "config", batch_size=16 if args.smoke else 256,
        steps=args.small_steps, warmup=args.small_warmup, precision="bf16-mixed" if cuda else "32-true",
        num_workers=1, threads=1, repeats=1, data_root=None, cache_dir=None, baseline_src=None)


def busy_child(sargs) -> dict:
    """In a child process: one Lightning run of the sweep's model with the CUDA profiler over the timed steps."""
    import lightning.pytorch as pl
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import bench_step_overhead as bso

    device = torch.device(sargs.device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    state = {}

    class Window(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == sargs.warmup - 1:
                sync(device)
                state["prof"] = profile(activities=activities)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif batch_idx == sargs.warmup + sargs.steps - 1:
                sync(device)
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        cli = bso.build_cli(sargs, "vit", Path(tmp))
        cli.trainer.callbacks.append(Window())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if "wall" not in state:
        raise RuntimeError("the run stopped before the timed window ended")
    kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in state["prof"].key_averages()
                    if e.device_type == DeviceType.CUDA)
    return dict(busy=kernel_us / 1e6 / state["wall"], kernel_s=kernel_us / 1e6, wall_s=state["wall"],
                ms_per_step=1e3 * state["wall"] / sargs.steps)


def part_small(args, device, targets: Targets, results: dict) -> list[Table]:
    import logging

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: quieten them after)

    import bench_step_overhead as bso

    logging.disable(logging.WARNING)  # Lightning's start-up notes, per run, as bench_step_overhead does
    sargs = small_args(args)
    t = Table(f"sweep model (configs/cifar10_vit_fractions.yaml{', tiny' if args.smoke else ''}), batch "
              f"{sargs.batch_size}, {sargs.precision}", ["row", "ms/step", "img/s", "GPU busy"],
              note=f"{sargs.steps} timed steps after {sargs.warmup}; random JPEGs in the cifar10_npz layout; "
                   "each Lightning run in a fresh process")
    print("\n--- small (bench_step_overhead: time_bare, child_lightning; profiled Lightning run)")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        sargs.data_root = bso.write_fake_cifar(Path(tmp) / "data", sargs.batch_size * (sargs.warmup + sargs.steps + 1))
        sargs.cache_dir = Path(tmp) / "cache"
        for name, run in (("bare", lambda: bso.measure(sargs, "vit", "bare")),
                          ("lightning", lambda: bso.child_lightning(sargs, "vit", str(REPO))),
                          ("lightning, profiled", lambda: run_busy_child(sargs))):
            try:
                out = run()
                ms, busy = (out, NAN) if not isinstance(out, dict) else (out["ms_per_step"], out["busy"])
                err = None
            except Exception as e:
                ms, busy, err = NAN, NAN, _err(e)
            rows[name] = dict(ms_per_step=ms, img_s=1e3 * sargs.batch_size / ms, busy=busy, error=err)
            t.add(name, err and f"ERROR {err}" or ms, 1e3 * sargs.batch_size / ms,
                  "—" if math.isnan(busy) else f"{100 * busy:.0f} %")
    results["small"] = rows
    lt, pr = rows["lightning"], rows["lightning, profiled"]
    targets.add("small", f"sweep model, one Lightning run: img/s ({lt['img_s']:.0f}) / {SMALL_REFERENCE_IMG_S:.0f}",
                lt["img_s"] / SMALL_REFERENCE_IMG_S, ">=", 2.0, error=lt["error"])
    targets.add("small", "sweep model, Lightning run: GPU busy (kernel time / wall time)", pr["busy"], ">",
                SMALL_GOAL_BUSY, fmt="{:.0%}",
                error=pr["error"] or (None if device.type == "cuda" else "no CUDA kernels on the CPU"))
    return [t]


def run_busy_child(sargs) -> dict:
    argv = [sys.executable, __file__, "--busy-child", json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(sargs).items()})]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"profiled run failed: {res.stderr.strip().splitlines()[-1:] or res.stdout[-300:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def versions(device: torch.device) -> dict:
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                python=sys.version.split()[0], torch=torch.__version__)
    for mod in ("triton", "timm", "diffusers", "lightning"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny models and shapes, 2-3 steps: checks the code paths")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled training rows "
                                                        "(default: the default mode)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager with --smoke); 'none' skips the compiled rows")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 256)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per window (default 20)")
    p.add_argument("--train-warmup", type=int, default=None, help="default 6")
    p.add_argument("--sample-batches", default=None, help=f"preset=batch,... (default {SAMPLE_BATCHES})")
    p.add_argument("--sample-steps", type=int, default=None, help="denoiser calls per window (default 10)")
    p.add_argument("--sample-warmup", type=int, default=None, help="default 3")
    p.add_argument("--windows", type=int, default=None, help="timed windows, the median is reported (default 3)")
    p.add_argument("--kernel-shapes", default=None, help="comma-separated bench_attention.SHAPES names (default all)")
    p.add_argument("--precompile", action="store_true", help="compile the Triton candidates in parallel first")
    p.add_argument("--small-steps", type=int, default=None, help="timed steps of the sweep model (default 100)")
    p.add_argument("--small-warmup", type=int, default=None, help="default 10")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--markdown", default=None, help="write the header and tables to this markdown file")
    p.add_argument("--busy-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    if args.busy_child:
        import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: quieten them after)

        logging.disable(logging.WARNING)
        sargs = argparse.Namespace(**json.loads(args.busy_child))
        if sargs.device == "cpu":
            torch.set_num_threads(1)
        print(json.dumps(busy_child(sargs)))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_speed.py needs a CUDA GPU (no CUDA device here). To check the code paths on the CPU at tiny "
              "sizes (numbers meaningless): --device cpu --smoke")
        return 2
    if args.device == "cpu" and not args.smoke:
        print("bench_speed.py measures GPU targets; on the CPU only --smoke (code paths at tiny sizes) runs")
        return 2
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {PARTS}")
    smoke = args.smoke
    defaults = dict(compile_backend="eager" if smoke else "inductor", train_batch=4 if smoke else 256,
                    train_steps=2 if smoke else 20, train_warmup=1 if smoke else 6,
                    sample_batches="DiT-S/2=2,DiT-B/2=2,DiT-XL/2=1" if smoke else SAMPLE_BATCHES,
                    sample_steps=2 if smoke else 10, sample_warmup=1 if smoke else 3, windows=2 if smoke else 3,
                    small_steps=3 if smoke else 100, small_warmup=2 if smoke else 10)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:])
    info = versions(device)
    info.update(command=command, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                smoke=smoke)
    print(json.dumps(info))
    results: dict = dict(info=info)
    targets = Targets()
    tables: list[Table] = []
    funcs = dict(training=part_training, sampling=part_sampling, kernel=part_kernel, small=part_small)
    t_all = time.time()
    for part in parts:
        t0 = time.time()
        try:
            tables += funcs[part](args, device, targets, results)
        except Exception as e:  # a whole part failed: its error goes in the targets table, the rest runs
            traceback.print_exc()
            results[part] = dict(error=_err(e))
            targets.add(part, f"{part} (whole part)", NAN, None, NAN, error=_err(e))
        print(f"  [{part}: {time.time() - t0:.0f} s]", flush=True)
        # after every part, so a run stopped by a time limit keeps the parts it finished
        write_outputs(args, info, results, targets, tables, smoke, quiet=part != parts[-1])
    summary = targets.table()
    print(f"\ndevice: {info['device']}; " + ", ".join(f"{k} {info[k]}" for k in
                                                        ("torch", "triton", "timm", "diffusers", "lightning")))
    for tab in tables + [summary]:
        print(tab.text())
    print(f"\n(total {time.time() - t_all:.0f} s)")
    return 0


def write_outputs(args, info: dict, results: dict, targets: Targets, tables: list[Table], smoke: bool,
                  quiet: bool) -> None:
    """``--json`` and ``--markdown`` with every part measured so far."""
    summary = targets.table()
    results["targets"] = targets.rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.markdown:
        head = [f"## Issue 18 targets, one run{' (SMOKE: tiny sizes on the CPU, numbers meaningless)' if smoke else ''}",
                "",
                f"Measured {info['date']} on **{info['device']}** with torch {info['torch']}"
                + (f" (CUDA {info['cuda']})" if info.get("cuda") else "")
                + f", triton {info['triton']}, timm {info['timm']}, diffusers {info['diffusers']}, "
                  f"lightning {info['lightning']}, Python {info['python']}. Command (repository root):", "",
                "```bash", info["command"], "```", ""]
        with open(args.markdown, "w") as f:
            f.write("\n".join(head) + "\n" + summary.markdown() + "\n" + "\n".join(tab.markdown() for tab in tables))
        if not quiet:
            print(f"wrote {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
