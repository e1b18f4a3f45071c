"""Main job: train DIFF-ViT and its standard twin on 10% of Fashion-MNIST, on CPU, in a few minutes.

    .venv/bin/python train/main_job.py [--fraction 0.1] [--epochs 5] [--out runs/main_job]

1. Makes sure Debian's ``dataset-fashion-mnist`` is installed (real data, no internet needed beyond
   the package index): installs it with apt-get when ``/usr/share/datasets/fashion-mnist`` is missing.
2. Trains ``diff_vit_tiny_patch4_32`` and ``vit_tiny_patch4_32`` through the ``diffvision`` CLI with
   the repository's recipe ``configs/fashion_mnist_vit.yaml`` (``--attn_kind diff`` for DIFF-ViT) on the same stratified
   subset, with CPU-sized overrides: width 96 and depth 4 instead of ViT-Ti's 192 x 12, average-pooled
   tokens, 28x28x1 inputs at patch 4 (49 tokens), batch 64, AdamW lr 2e-3 with half an epoch of warmup
   then cosine, no augmentation, fp32. Validation is the full 10,000-image test split, every epoch.
3. Prints a table of accuracies and writes it (``results.md``, ``results.csv``) with a plot of the
   learning curves (``results.png``) into the output folder.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
RECIPE = "fashion_mnist_vit"
MODELS = (  # (label, attention kind, experiment name)
    ("DIFF-ViT", "diff", "fashion_mnist_diff_vit"),
    ("ViT (standard twin)", "standard", "fashion_mnist_vit"),
)


def ensure_fashion_mnist() -> None:
    if all((DEBIAN_DIR / f).is_file() for f in DEBIAN_FILES):
        print(f"Fashion-MNIST: found Debian's dataset-fashion-mnist in {DEBIAN_DIR}")
        return
    print(f"Fashion-MNIST: {DEBIAN_DIR} is missing; installing Debian's package dataset-fashion-mnist "
          f"(apt-get update && apt-get install -y dataset-fashion-mnist) ...", flush=True)
    if shutil.which("apt-get") is None:
        sys.exit("apt-get not found: install dataset-fashion-mnist by hand, or copy its idx .gz files "
                 f"into {DEBIAN_DIR}")
    sudo = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
    if sudo is None:
        sys.exit("installing dataset-fashion-mnist needs root: run `sudo apt-get install -y dataset-fashion-mnist`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True, env=env)
    missing = [f for f in DEBIAN_FILES if not (DEBIAN_DIR / f).is_file()]
    if missing:
        sys.exit(f"dataset-fashion-mnist installed but {DEBIAN_DIR} lacks {missing}")
    print(f"Fashion-MNIST: installed into {DEBIAN_DIR}")


def train(label: str, attn_kind: str, experiment: str, args, out: Path) -> dict:
    from diffvision.cli import DiffvisionCLI
    from diffvision.lightning import read_epoch_metrics

    argv = [
        "fit", "--config", str(REPO / "configs" / f"{RECIPE}.yaml"), "--attn_kind", attn_kind,
        "--data.data_fraction", str(args.fraction),
        "--data.fraction_seed", "0",
        "--data.num_workers", "0",
        "--data.batch_size", "64",
        "--data.eval_batch_size", "500",
        "--data.augment", "none",  # a few epochs: augmentation would only slow the fit down
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "10",
        "--model.init_args.model_kwargs", "{depth: 4, embed_dim: 96, global_pool: avg, drop_path_rate: 0.0}",
        "--model.init_args.optimizer.init_args.lr", "2e-3",
        "--model.init_args.warmup_epochs", "0.5",
        "--experiment", experiment,
    ]
    print(f"\n[{label}] diffvision " + " ".join(argv), flush=True)
    start = time.perf_counter()
    cli = DiffvisionCLI(args=argv)
    seconds = time.perf_counter() - start
    log_dir = Path(cli.trainer.log_dir)
    metrics = read_epoch_metrics(log_dir)
    last = max(metrics)
    best = max(metrics, key=lambda e: metrics[e].get("val/acc1", -1))
    params = sum(p.numel() for p in cli.model.model.parameters())
    return {
        "model": label, "timm_name": cli.model.hparams.model_name, "params": params,
        "train_images": len(cli.datamodule.subset_indices), "epochs": last + 1,
        "top1": metrics[last]["val/acc1"], "top5": metrics[last]["val/acc5"],
        "best_top1": metrics[best]["val/acc1"], "best_epoch": best + 1,
        "seconds": seconds, "log_dir": str(log_dir), "curve": metrics,
    }


def write_results(results: list[dict], args, out: Path) -> tuple[Path, Path, Path]:
    header = ("| model | timm name | params | train images | epochs | test top-1 | test top-5 | "
              "best top-1 (epoch) | train time |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['timm_name']} | {r['params'] / 1e6:.2f}M | {r['train_images']} | "
                     f"{r['epochs']} | {100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | "
                     f"{100 * r['best_top1']:.2f}% ({r['best_epoch']}) | {r['seconds']:.0f} s |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    md = out / "results.md"
    md.write_text(
        f"# Main job: Fashion-MNIST, {100 * args.fraction:g}% of the training set (stratified, seed 0), "
        f"{args.epochs} epochs, CPU\n\n"
        "Models: width 96, depth 4, patch 4 on 28x28x1 (49 tokens), average pooling; DIFF-ViT has 3 "
        "differential heads (q/k sub-heads of 16, v heads of 32), its standard twin 3 heads of 32. "
        "Test = the full 10,000-image Fashion-MNIST test split.\n\n"
        + table + "\n")
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        keys = ["model", "timm_name", "params", "train_images", "epochs", "top1", "top5", "best_top1",
                "best_epoch", "seconds", "log_dir"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    png = out / "results.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = sorted(r["curve"])
        ax_acc.plot([e + 1 for e in epochs], [100 * r["curve"][e]["val/acc1"] for e in epochs], "o-", label=r["model"])
        ax_loss.plot([e + 1 for e in epochs], [r["curve"][e].get("train/loss_epoch", float("nan")) for e in epochs],
                     "o-", label=r["model"])
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="Fashion-MNIST test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss (label-smoothed CE)", title="training loss")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DIFF-ViT vs ViT, {100 * args.fraction:g}% of Fashion-MNIST, {args.epochs} epochs")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return md, csv_path, png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.1, help="training data fraction (default 0.1)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per model (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "main_job", help="output folder")
    args = parser.parse_args()
    start = time.perf_counter()
    ensure_fashion_mnist()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [train(label, kind, experiment, args, args.out) for label, kind, experiment in MODELS]
    md, csv_path, png = write_results(results, args, args.out)
    print(f"table: {md}\ntable (CSV): {csv_path}\nplot: {png}")
    for r in results:
        print(f"run of {r['model']}: {r['log_dir']}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
