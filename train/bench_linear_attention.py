"""Linear attention speed (issue 23): DiT training step and sampling step, img/s, by attention kind and tokens.

    PYTHONPATH=. python train/bench_linear_attention.py                     # the H200 table (CUDA, bf16)
    PYTHONPATH=. python train/bench_linear_attention.py --json bench.json   # also every number as JSON
    PYTHONPATH=. python train/bench_linear_attention.py --smoke             # CPU: tiny sizes, checks it runs

For DiT-S/2 and DiT-B/2 (class-conditional, 4-channel latents, learned sigma, as DiT) and N = 256, 1024, 4096,
16384 tokens (latent side 2·√N: 32, 64, 128, 256), each kind is built with ``DiffDiTTransformer2DModel`` at its
defaults: ``standard`` (SDPA: flash / cuDNN on the H200), ``diff`` (DIFF, backend auto = Triton on CUDA, the
variant study's λ 0.8 fixed + head norm), ``linear`` (LiT) and ``dydila`` (the reconstruction, n_P = 3, n_M = 9,
n_D = 9, its 4x MLP: the speed of the attention as the paper describes it; the parameter-matched model of the
quality runs has a narrower MLP and is faster). Batch = 65536 / N images (256 at N = 256, 4 at N = 16384).

* train: forward + loss + backward + AdamW step under bf16 autocast (img/s = batch / median step time);
* sample: one denoising forward (no grad, bf16 autocast) on a classifier-free-guidance batch (2 × batch), img/s
  counts the batch's images per step.

A size that does not fit prints ``OOM`` (the table then says the largest N that fits). After the table: per
preset and mode, dydila's and linear's speed-up over standard at each N and the smallest N from which dydila
is faster than standard (the crossing). Times are medians of ``--iters`` timed steps after ``--warmup``.
Nothing here asserts a speed; it prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

KINDS = ("standard", "diff", "linear", "dydila")
TOKENS = (256, 1024, 4096, 16384)
PRESETS = ("DiT-S/2", "DiT-B/2")
KIND_KWARGS = {"diff": dict(lambda_init=0.8, lambda_mode="fixed", head_norm=True)}


def build(preset: str, kind: str, tokens: int, smoke: bool, device):
    from diffvision.diffusion import DiffDiTTransformer2DModel

    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square number (the latent grid is square)")
    common = dict(attn_kind=kind, sample_size=2 * side, in_channels=4, out_channels=8, num_classes=1000,
                  **KIND_KWARGS.get(kind, {}))
    if smoke:  # a tiny DiT with the preset's patch size
        model = DiffDiTTransformer2DModel(num_layers=2, num_attention_heads=4, attention_head_dim=16, patch_size=2,
                                          **common)
    else:
        model = DiffDiTTransformer2DModel.from_preset(preset, **common)
    return model.to(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of one ``fn()`` call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(preset: str, kind: str, tokens: int, batch: int, args, device) -> dict:
    """img/s of the training step and of the sampling step (None where out of memory)."""
    out = {"preset": preset, "kind": kind, "tokens": tokens, "batch": batch}
    try:
        model = build(preset, kind, tokens, args.smoke, device)
        out["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
        size = model.config.sample_size
        x = torch.randn(batch, 4, size, size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.fp32)

        def train_step():
            with autocast:
                loss = model(x, t, y).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        out["train_img_s"] = batch / timed(train_step, device, args.warmup, args.iters)
        opt.zero_grad(set_to_none=True)
        model.eval()
        x2, y2, t2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 1000)]), torch.cat([t, t])

        @torch.no_grad()
        def sample_step():
            with autocast:
                model(x2, t2, y2)

        out["sample_img_s"] = batch / timed(sample_step, device, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError:
        out.setdefault("train_img_s", None)
        out["sample_img_s"] = out.get("sample_img_s")
        out["oom"] = True
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def fmt(value) -> str:
    return "OOM" if value is None else f"{value:,.1f}"


def print_tables(rows: list[dict], presets, tokens) -> None:
    for mode in ("train", "sample"):
        print(f"\n{mode} step, img/s (batch = 65536 / N images{'' if mode == 'train' else ', CFG doubles it'})")
        print("| preset | N | batch | " + " | ".join(KINDS) + " | dydila / standard | linear / standard |")
        print("|---|---|---|" + "---|" * (len(KINDS) + 2))
        for preset in presets:
            for n in tokens:
                cell = {r["kind"]: r for r in rows if r["preset"] == preset and r["tokens"] == n}
                if not cell:
                    continue
                speed = {k: cell[k].get(f"{mode}_img_s") if k in cell else None for k in KINDS}
                ratio = lambda k: (f"{speed[k] / speed['standard']:.2f}x"  # noqa: E731
                                   if speed.get(k) and speed.get("standard") else "-")
                batch = next(iter(cell.values()))["batch"]
                print(f"| {preset} | {n} | {batch} | " + " | ".join(fmt(speed[k]) for k in KINDS)
                      + f" | {ratio('dydila')} | {ratio('linear')} |")
        for preset in presets:
            crossing = None  # the smallest N from which dydila stays faster (standard out of memory counts)
            for n in reversed(tokens):
                cell = {r["kind"]: r.get(f"{mode}_img_s") for r in rows if r["preset"] == preset and r["tokens"] == n}
                if not (cell.get("dydila") and (cell.get("standard") is None or cell["dydila"] >= cell["standard"])):
                    break
                crossing = n
            print(f"{preset} {mode}: dydila is faster than standard from N = "
                  f"{crossing if crossing else 'none of the measured N'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=None, help=f"default {list(TOKENS)}")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--tokens-per-batch", type=int, default=65536, help="batch = this / N images (at least 1)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: a 2-layer DiT of width 64, N = 16 and 64, one timed step")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        tokens = args.tokens or [16, 64]
        args.warmup, args.iters, args.tokens_per_batch = 1, 1, 128
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the speed table needs a CUDA GPU; --smoke runs a tiny CPU check")
        device = torch.device("cuda")
        tokens = args.tokens or list(TOKENS)
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for preset in args.presets:
        for n in tokens:
            batch = max(1, args.tokens_per_batch // n)
            for kind in args.kinds:
                row = measure(preset, kind, n, batch, args, device)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (smoke)'}, "
          f"torch {torch.__version__}, {'fp32' if args.fp32 else 'bf16 autocast'}")
    print_tables(rows, args.presets, tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
