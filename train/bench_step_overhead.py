"""Host overhead of a training step: a bare PyTorch loop against ``diffvision fit`` (Lightning).

    .venv/bin/python train/bench_step_overhead.py                          # CPU, tiny ViT + tiny DiT
    .venv/bin/python train/bench_step_overhead.py --baseline-src /tmp/old  # + the same with another copy
                                                                           #   of the package (before/after)
    python train/bench_step_overhead.py --device cuda --size config        # GPU, the configs' real models

Rows, each in ms per optimizer step (steady state: ``--steps`` steps after ``--warmup``, the device
synchronised only at both ends), for each model (``configs/cifar10_vit_fractions.yaml``'s ViT,
``configs/cifar10_dit_fractions.yaml``'s DiT):

* ``bare``: the floor. The same timm / diffusers model, a fixed batch already on the device, the
  loss, backward, gradient clipping, AdamW, the LR schedule (DiT: + the EMA update as one
  ``_foreach_lerp_``); nothing else.
* ``bare + data``: ``bare`` fed by the data module's own loader (uint8 batches, pinned, copied
  ``non_blocking``) and its on-device augmentation (``BatchImageTransform``).
* ``lightning``: ``DiffvisionCLI`` on the config (its callbacks, loggers, checkpointing, metrics,
  per-step RNG), validation off, each run in a fresh process; ``lightning (baseline)`` the same with
  ``--baseline-src`` (a folder holding another ``diffvision`` package, e.g. a copy from before a
  change) first on ``PYTHONPATH``. The two take turns ``--repeats`` times; medians are shown.

``overhead`` is a row's time minus ``bare``. ``--size tiny`` (the CPU default) shrinks the models
until compute is small (ViT depth 1 width 32; DiT 1 layer of width 32), so what is left is mostly
host work; ``--size config`` (the CUDA default) uses the configs' models. ``--count-ops`` counts,
over the timed Lightning steps, the aten ops per step and the host reads per step by call site
(``.item()``, ``bool()``, ``.tolist()``, ``unique``, ...: free on the CPU, a device synchronisation
when the tensor is on the GPU; copies from pageable host memory, the other kind, are not seen on
the CPU). ``--profile`` prints a cProfile of a Lightning run and, on CUDA, every synchronising call
by call site (``torch.cuda.set_sync_debug_mode``). On the CPU, torch runs on ``--threads`` threads
(default 1: OpenMP threads on a busy machine distort small ops).
Data is random JPEGs in the ``cifar10_npz`` layout, written to a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"vit": REPO / "configs" / "cifar10_vit_fractions.yaml", "dit": REPO / "configs" / "cifar10_dit_fractions.yaml"}
TINY = {"vit": ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"],
        "dit": ["--model.init_args.transformer_kwargs", "{num_layers: 1, num_attention_heads: 2, attention_head_dim: 16}"]}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root: Path, n_train: int, n_test: int = 100) -> Path:
    """``root/{train,test}.npz`` of random 32x32 JPEGs in the ``cifar10_npz`` layout."""
    from PIL import Image

    from diffvision.data.datasets import write_cifar10_npz

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            blobs.append(buf.getvalue())
        write_cifar10_npz(root / f"{split}.npz", blobs, np.arange(n) % 10, CLASSES)
    return root


def cli_args(args, model: str, out_dir: Path) -> list[str]:
    steps = args.warmup + args.steps
    argv = ["--config", str(CONFIGS[model]), "--data.root", str(args.data_root), "--data.cache_dir", str(args.cache_dir),
            "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
            "--trainer.precision", args.precision, "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out_dir / "runs"),
            "--trainer.accelerator", args.device, "--trainer.devices", "1"]
    return argv + (TINY[model] if args.size == "tiny" else [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_cli(args, model: str, out_dir: Path):
    from diffvision.cli import DiffvisionCLI

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return DiffvisionCLI(args=cli_args(args, model, out_dir), run=False)


# ---- Lightning ----------------------------------------------------------------------------------------

def time_lightning(args, model: str, out_dir: Path) -> float:
    """ms per step of ``trainer.fit`` between the end of step ``warmup - 1`` and of step ``warmup + steps - 1``."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        marks: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx in (args.warmup - 1, args.warmup + args.steps - 1):
                sync(pl_module.device)
                self.marks[batch_idx] = time.perf_counter()

    cli = build_cli(args, model, out_dir)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if len(timer.marks) != 2:
        raise RuntimeError(f"the run stopped early (step marks {timer.marks}); more training data needed")
    return 1e3 * (timer.marks[args.warmup + args.steps - 1] - timer.marks[args.warmup - 1]) / args.steps


# ops that hand a device value to the host (a synchronisation on CUDA; free on the CPU, so counted here)
HOST_READS = {"_local_scalar_dense", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "nonzero",
              "is_nonzero", "equal", "masked_select", "bincount", "repeat_interleave"}
SITE_HINTS = ("diffvision", "lightning", "torchmetrics", "swa_utils", "diffusers", "timm", "bench_step_overhead")


def count_ops(args, model: str, out_dir: Path) -> None:
    """aten ops per step and host reads (``.item()``, ``bool()``, ``.tolist()``, ``unique``, ...) per step
    by call site, over the same steps as :func:`time_lightning`."""
    import traceback

    import lightning.pytorch as pl
    from torch.utils._python_dispatch import TorchDispatchMode

    def record(what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if any(h in f.filename for h in SITE_HINTS)]
        site = f"{what} <- " + (f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].line})"
                                if frames else "?")
        counter.reads[site] = counter.reads.get(site, 0) + 1

    class Counter(TorchDispatchMode):
        ops = 0
        reads: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            self.ops += 1
            if func._schema.name.split("::")[-1] in HOST_READS:
                record(func._schema.name)
            return func(*args_, **(kwargs or {}))

    counter = Counter()
    tolist = torch.Tensor.tolist  # no aten op on the CPU: watched in Python

    def watched_tolist(self):
        record("Tensor.tolist")
        return tolist(self)

    class Window(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == args.warmup - 1:
                counter.__enter__()
                torch.Tensor.tolist = watched_tolist
            elif batch_idx == args.warmup + args.steps - 1:
                counter.__exit__(None, None, None)
                torch.Tensor.tolist = tolist

    cli = build_cli(args, model, out_dir / "count")
    cli.trainer.callbacks.append(Window())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(f"\n{model}: {counter.ops / args.steps:.0f} aten ops per step in the main process; host reads per step "
          f"(each a device synchronisation when its tensor is on the GPU):")
    for site, n in sorted(counter.reads.items(), key=lambda kv: -kv[1]):
        print(f"  {n / args.steps:5.2f}  {site}")


def profile_lightning(args, model: str, out_dir: Path) -> None:
    import cProfile
    import pstats
    import warnings

    cli = build_cli(args, model, out_dir / "profile")
    prof = cProfile.Profile()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")  # every synchronising call warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prof.enable()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        prof.disable()
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
        syncs: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                key = f"{w.filename}:{w.lineno}"
                syncs[key] = syncs.get(key, 0) + 1
        print(f"\n{model}: device synchronisations in {args.warmup + args.steps} steps (call site: count)")
        for key, n in sorted(syncs.items(), key=lambda kv: -kv[1]):
            print(f"  {key}: {n}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(r"lightning|diffvision|torchmetrics|optim", 30)
    print(f"\n{model}: cProfile of {args.warmup + args.steps} Lightning steps (cumulative)\n" + buf.getvalue())


# ---- bare loops ------------------------------------------------------------------------------------------

def time_bare(args, model: str, out_dir: Path, with_data: bool) -> float:
    """The floor: the config's model, optimizer, clipping and schedule in a plain loop."""
    from diffvision.lightning.optim import lr_factor, param_groups

    cli = build_cli(args, model, out_dir / "bare")
    module, dm = cli.model, cli.datamodule
    device = torch.device(args.device)
    module.to(device).train()
    dm.setup("fit")
    net = module.model if model == "vit" else module.transformer
    optimizer = module.optimizer_factory(param_groups(net))  # the config's AdamW(lr, weight_decay)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 5, total))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    from diffvision.data.transforms import BatchImageTransform

    pre = dm.train_transform
    transform = BatchImageTransform(pre.preset, True, dm.mean, dm.std, seed=0, padding=pre.padding)
    loader = dm.train_dataloader()
    first = next(iter(loader))
    fixed = (transform(first[0].to(device), first[2].to(device)), first[1].to(device))
    ema_params = [p.detach().clone() for p in net.parameters()] if model == "dit" else None

    def step(x, y):
        with autocast:
            if model == "vit":
                loss = torch.nn.functional.cross_entropy(net(x), y, label_smoothing=0.1)
            else:
                noise = torch.randn_like(x)
                t = torch.randint(0, 1000, (x.shape[0],), device=device)
                loss = module.diffusion_loss(net, x, y, noise, t)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        if ema_params is not None:
            torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1 - 0.999)

    def batches():
        while True:
            if not with_data:
                yield fixed
                continue
            for images, labels, keys in loader:
                images = images.to(device, non_blocking=True)
                keys = keys.to(device, non_blocking=True)
                yield transform(images, keys), labels.to(device, non_blocking=True)

    it = batches()
    for _ in range(args.warmup):
        step(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*next(it))
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / args.steps


# ---- driver ----------------------------------------------------------------------------------------------

def measure(args, model: str, what: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        runs = []
        for _ in range(args.repeats):
            if what == "lightning":
                runs.append(time_lightning(args, model, out))
            else:
                runs.append(time_bare(args, model, out, with_data=what == "bare + data"))
        return statistics.median(runs)


def child_lightning(args, model: str, src: str) -> float:
    """``lightning`` (one run) with the package from ``src`` (a folder holding ``diffvision/``) in a fresh process."""
    argv = [sys.executable, __file__, "--child", model, "--device", args.device, "--size", args.size,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--precision", args.precision, "--num-workers", str(args.num_workers), "--threads", str(args.threads),
            "--repeats", "1", "--data-root", str(args.data_root), "--cache-dir", str(args.cache_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"baseline run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    out = json.loads(lines[-1])
    if not out["package"].startswith(str(Path(src).resolve())):
        raise RuntimeError(f"baseline imported diffvision from {out['package']}, not {src}")
    return out["ms"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=["vit", "dit"], choices=["vit", "dit"])
    p.add_argument("--size", choices=["tiny", "config"], default=None, help="default: tiny on cpu, config on cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on cpu, 256 (the configs') on cuda")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100 on cpu, 200 on cuda)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the median is shown")
    p.add_argument("--precision", default=None, help="default: 32-true on cpu, bf16-mixed on cuda")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--baseline-src", default=None, help="folder holding another diffvision package to compare")
    p.add_argument("--data-root", default=None, help="a cifar10_npz folder (default: random JPEGs)")
    p.add_argument("--count-ops", action="store_true", help="aten ops and host reads per Lightning step")
    p.add_argument("--profile", action="store_true", help="cProfile of a Lightning run (+ its syncs on CUDA)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.size = args.size or ("config" if cuda else "tiny")
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.steps = args.steps or (200 if cuda else 100)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    if not cuda:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: quieten them after)

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # Lightning's start-up notes, per run

    if args.child:
        import diffvision

        print(json.dumps({"ms": measure(args, args.child, "lightning"), "package": diffvision.__file__}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root is None:
            args.data_root = write_fake_cifar(Path(tmp) / "data", args.batch_size * (args.warmup + args.steps + 1))
        args.cache_dir = Path(tmp) / "cache"  # decoded once, shared by every run
        dev = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
        print(f"device: {dev}; size {args.size}, batch {args.batch_size}, {args.precision}, "
              f"{args.steps} timed steps after {args.warmup}, {args.num_workers} loader worker(s)")
        print(f"{'model':<5} {'row':<22} {'ms/step':>9} {'overhead':>9} {'images/s':>10}")
        for model in args.models:
            rows = [("bare", measure(args, model, "bare")), ("bare + data", measure(args, model, "bare + data"))]
            # each Lightning run in a fresh process, baseline and this tree taking turns (a busy machine drifts)
            sources = ([("lightning (baseline)", args.baseline_src)] if args.baseline_src else []) + [("lightning", REPO)]
            runs = {name: [] for name, _ in sources}
            for _ in range(args.repeats):
                for name, src in sources:
                    runs[name].append(child_lightning(args, model, src))
            rows += [(name, statistics.median(ms)) for name, ms in runs.items()]
            floor = rows[0][1]
            for name, ms in rows:
                print(f"{model:<5} {name:<22} {ms:9.2f} {ms - floor:9.2f} {1e3 * args.batch_size / ms:10.0f}", flush=True)
            if args.count_ops:
                with tempfile.TemporaryDirectory() as ptmp:
                    count_ops(args, model, Path(ptmp))
            if args.profile:
                with tempfile.TemporaryDirectory() as ptmp:
                    profile_lightning(args, model, Path(ptmp))


if __name__ == "__main__":
    main()
