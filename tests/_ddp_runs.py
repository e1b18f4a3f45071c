"""Two-process CPU DDP runs for test_ddp_cpu.py: ``DDP_RUNS="OUT|CIFAR_ROOT|CACHE" python _ddp_runs.py`` runs
several ``diffvision fit`` commands one after the other in the same two processes (Lightning's ``ddp`` strategy over
gloo launches rank 1 by running this script again), so the import and start-up costs are paid once.

The :class:`RecordRanks` callback (``--trainer.callbacks+=_ddp_runs.RecordRanks``) writes what each rank did to
``<out>/rank<r>.json``: the training-set indices its loader drew each epoch, the labels of the batches it
trained on, and (``rank<r>.pt``) the weights it started from and, for a ``DiffusionModule``, its EMA and online
weights, the images FID generated and the held-out images it validated on."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class RecordRanks(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record = {"indices": {}, "labels": {}}
        self.tensors = {"fake": [], "real": []}
        self._wrapped = False

    def setup(self, trainer, pl_module, stage) -> None:
        if getattr(pl_module, "fid_callback", None) is None or self._wrapped:
            return
        self._wrapped = True
        generate, fake = pl_module.generate, self.tensors["fake"]

        def recorded_generate(*args, **kwargs):  # what FID samples (nothing else generates: no sample grid)
            images = generate(*args, **kwargs)
            fake.append(images.detach().cpu())
            return images

        pl_module.generate = recorded_generate

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._wrapped and not trainer.sanity_checking:  # the held-out images this rank saw, in [0, 1]
            self.tensors["real"].append(((batch[0] + 1.0) / 2.0).detach().cpu())

    def on_train_start(self, trainer, pl_module) -> None:
        self.tensors["start"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        dataset = trainer.datamodule.train_dataset
        keys = [i for _, i in sampler]  # (epoch, position in the training subset)
        rows = [int(dataset.indices[i]) if dataset.indices is not None else int(i) for i in keys]
        self.record["indices"][str(trainer.current_epoch)] = rows
        self.record["labels"][str(trainer.current_epoch)] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["labels"][str(trainer.current_epoch)].extend(batch[1].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.record.update(rank=trainer.global_rank, world_size=trainer.world_size, metrics=metrics)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
        ema = getattr(pl_module, "ema", None)
        saved = dict(self.tensors)
        if ema is not None:
            saved["ema"] = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
            saved["online"] = {k: v.detach().clone() for k, v in pl_module.transformer.state_dict().items()}
        torch.save(saved, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, cifar: str, cache: str) -> None:
    from diffvision.cli import DiffvisionCLI

    repo = Path(__file__).resolve().parents[1]
    common = ["--data.root", cifar, "--data.cache_dir", cache, "--data.num_workers", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.strategy", "ddp"]
    # the classifier without randomness in the step (no drop-path, no augmentation), on half the data
    vit = ["--config", str(repo / "configs/cifar10_vit.yaml"), *common,
           "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48, drop_path_rate: 0.0}",
           "--data.augment", "none", "--data.data_fraction", "0.5", "--data.batch_size", "5"]
    runs = {
        "straight": [*vit, "--trainer.max_epochs", "2"],
        # stopped after epoch 1 of 2 (the LR schedule still planned for 2), then resumed from its last.ckpt
        "first_half": [*vit, "--trainer.max_epochs", "2", "--trainer.callbacks+=diffvision.lightning.StopAfterEpochs",
                       "--trainer.callbacks.epochs", "1"],
        "resumed": [*vit, "--trainer.max_epochs", "2", "--ckpt_path", "last"],
        "dit": ["--config", str(repo / "configs/cifar10_dit.yaml"), *common, "--trainer.max_epochs", "1",
                "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "1",
                "--model.init_args.transformer_kwargs",
                "{num_layers: 1, num_attention_heads: 2, attention_head_dim: 8, patch_size: 8}",
                "--model.init_args.sample_steps", "2", "--model.init_args.num_sample_images", "0",
                "--model.init_args.fid_num_samples", "7", "--model.init_args.fid_batch_size", "2",
                "--model.init_args.ema_decay", "0.5", "--data.data_fraction", "0.2", "--data.batch_size", "5",
                "--data.eval_batch_size", "10"],
    }
    for name, args in runs.items():
        experiment = "resume" if name in ("first_half", "resumed") else name
        DiffvisionCLI(args=["fit", *args, "--trainer.default_root_dir", str(out), "--experiment", experiment,
                            "--trainer.callbacks+=_ddp_runs.RecordRanks",
                            "--trainer.callbacks.out", str(out / "record" / name)])


if __name__ == "__main__":  # arguments by environment: the CLI gets only its own, and rank 1 the same ones
    os.environ.setdefault("PL_TORCH_DISTRIBUTED_BACKEND", "gloo")
    out, cifar, cache = os.environ["DDP_RUNS"].split("|")
    main(Path(out), cifar, cache)
