"""Make the artefacts of ``tests/test_light_recipe.py``: a short classifier run trained by diffvision *before*
issue 24 (commit 454ae4f: hand-written parameter groups, no timm transforms / Mixup / EMA), so that the
code after it can be checked to train the same weights from the same config (the ``light`` recipe) and to
resume that run's checkpoint into the same weights.

Made once with that commit's code and kept as they came out; this script records how:

    git worktree add /tmp/diffvision-454ae4f 454ae4f
    PYTHONPATH=/tmp/diffvision-454ae4f python tests/data/light_recipe/make_light_fixtures.py tests/data/light_recipe

The run: configs/fashion_mnist_vit.yaml (crop + flip, label smoothing 0.1, AdamW 1e-3 / wd 0.05, warm-up
+ cosine), a depth-1 width-24 DIFF-ViT-Ti/4, 2 epochs of 3 batches of 10 random Debian-layout images
(``_training_data.make_fashion_idx``, no compression: the same bytes everywhere), one warm-up epoch.
Kept: the checkpoint after epoch 1 (``epoch1.ckpt``) and the final weights (``final.safetensors``).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for _training_data

from _training_data import QUIET, make_fashion_idx  # noqa: E402
from diffvision.cli import DiffvisionCLI  # noqa: E402

CONFIG = HERE.parents[2] / "configs" / "fashion_mnist_vit.yaml"
MODEL_KWARGS = "{depth: 1, embed_dim: 24, mlp_ratio: 1.0, attn_backend: sdpa}"


def fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    """The run's command line (the test uses the same)."""
    return ["fit", "--config", str(CONFIG), "--model.init_args.model_name", "diff_vit_tiny_patch4_32",
            "--model.init_args.model_kwargs", MODEL_KWARGS, "--model.init_args.warmup_epochs", "1",
            "--data.root", str(data), "--data.cache_dir", str(root / "cache"), "--data.num_workers", "0",
            "--data.batch_size", "10", "--data.eval_batch_size", "10", "--trainer.default_root_dir", str(root),
            "--experiment", "light", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1", "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1",
            "--checkpoint.filename", "epoch{epoch}", "--checkpoint.auto_insert_metric_name", "false", *QUIET, *extra]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_fashion_idx(tmp / "fashion", n_train=60, n_test=20)
        cli = DiffvisionCLI(args=fit_args(tmp / "fashion", tmp))
        checkpoints = tmp / "light" / "version_0" / "checkpoints"
        shutil.copy(checkpoints / "epoch0.ckpt", out / "epoch1.ckpt")
        state = {k: v.detach().contiguous() for k, v in cli.model.state_dict().items()}
        save_file(state, str(out / "final.safetensors"))
    (out / "made_by.json").write_text(json.dumps(
        {"commit": "454ae4f", "torch": torch.__version__, "script": "tests/data/light_recipe/make_light_fixtures.py"}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
