"""Make the artefacts of ``tests/test_legacy_names.py``: a run config, Lightning checkpoints and a saved
pipeline written by diffvision *before* the attention vocabulary was unified (commit d999583, where the
DiT kind was ``attention_type`` and its backend ``diff_attention_backend``), with the outputs they gave.

They were made once with that commit's code and are kept as they came out; this script records how:

    git worktree add /tmp/diffvision-d999583 d999583
    PYTHONPATH=/tmp/diffvision-d999583 python tests/data/legacy/make_legacy_fixtures.py tests/data/legacy

(The code it imports must be that commit's: later code writes the new names.)
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for _training_data

from _training_data import QUIET, make_cifar_npz  # noqa: E402
from diffvision.cli import DiffvisionCLI  # noqa: E402
from diffvision.lightning import DiffusionModule, ImageClassifier  # noqa: E402

CONFIGS = HERE.parents[2] / "configs"


def fit(config: str, data: Path, root: Path, *extra: str) -> Path:
    DiffvisionCLI(args=[
        "fit", "--config", str(CONFIGS / f"{config}.yaml"), "--data.root", str(data),
        "--data.cache_dir", str(root / "cache"), "--data.num_workers", "0", "--data.batch_size", "10",
        "--data.eval_batch_size", "10", "--trainer.default_root_dir", str(root), "--experiment", config,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        *QUIET, *extra])
    return root / config / "version_0"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_cifar_npz(tmp / "cifar10", per_class_train=2, per_class_test=1)
        outputs = {}

        # DIFF-ViT classifier: a depth-1, width-24 DIFF-ViT-Ti/4 (3 differential heads of q/k 4, v 8)
        run = fit("cifar10_diff_vit", data, tmp, "--model.init_args.model_kwargs",
                  "{depth: 1, embed_dim: 24, mlp_ratio: 1.0, attn_backend: sdpa, lambda_init: null}")
        shutil.copy(run / "config.yaml", out / "classifier_config.yaml")
        shutil.copy(run / "checkpoints" / "last.ckpt", out / "classifier.ckpt")
        classifier = ImageClassifier.load_from_checkpoint(out / "classifier.ckpt", map_location="cpu").eval()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs["classifier_images"], outputs["classifier_logits"] = images, classifier(images)

        # GDA-DiT generator: 1 block, 6 standard heads of 4 (GDA 4:2), patch 4, sdpa backend
        run = fit("cifar10_gda_dit", data, tmp, "--model.init_args.transformer_kwargs",
                  "{num_layers: 1, num_attention_heads: 6, attention_head_dim: 4, patch_size: 4, "
                  "diff_attention_backend: sdpa}",
                  "--model.init_args.sample_steps", "2", "--model.init_args.num_sample_images", "0",
                  "--model.init_args.fid_num_samples", "0")
        shutil.copy(run / "config.yaml", out / "diffusion_config.yaml")
        shutil.copy(run / "checkpoints" / "last.ckpt", out / "diffusion.ckpt")
        module = DiffusionModule.load_from_checkpoint(out / "diffusion.ckpt", map_location="cpu").eval()
        g = torch.Generator().manual_seed(1)
        noisy, t, labels = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 900]), torch.tensor([3, 10])
        with torch.no_grad():
            outputs["dit_input"], outputs["dit_timesteps"], outputs["dit_labels"] = noisy, t, labels
            outputs["dit_output"] = module.transformer(noisy, t, class_labels=labels).sample
            outputs["dit_output_ema"] = module.ema_transformer(noisy, t, class_labels=labels).sample

        module.export_pipeline(out / "pipeline")
        from diffvision import DiffDiTPipeline

        pipe = DiffDiTPipeline.from_pretrained(out / "pipeline")
        assert isinstance(pipe.scheduler, DDIMScheduler)
        samples = pipe(class_labels=[0, 7], guidance_scale=2.0, num_inference_steps=3,
                       generator=torch.Generator().manual_seed(2), output_type="pt").images
        outputs["pipeline_samples"] = samples

    save_file({k: v.contiguous() for k, v in outputs.items()}, str(out / "outputs.safetensors"))
    (out / "made_by.json").write_text(json.dumps(
        {"commit": "d999583", "torch": torch.__version__, "script": "tests/data/legacy/make_legacy_fixtures.py"},
        indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
