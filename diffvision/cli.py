"""The ``diffvision`` console script: LightningCLI for fit / validate / test / predict.

    diffvision fit --config configs/cifar10_diff_vit.yaml
    diffvision fit --config configs/cifar10_diff_vit.yaml --data.data_fraction 0.1 --ckpt_path last
    diffvision test --config configs/cifar10_diff_vit.yaml --ckpt_path last
    diffvision fit --config configs/cifar10_diff_vit.yaml --print_config

What it adds to a plain ``LightningCLI``:

* the data module is :class:`~diffvision.data.ImageDataModule` (``data:`` holds its arguments) and
  its ``num_classes``, ``img_size``, ``in_chans`` and ``class_names`` are linked into the model, so
  configs never repeat them;
* runs are laid out as ``<trainer.default_root_dir>/<experiment>/version_N/`` (default root
  ``runs``, experiment = the last ``--config`` file's name) with TensorBoard and CSV logs side by
  side, ``config.yaml``, ``subset_indices.json`` and ``checkpoints/``: the best ones by the
  ``checkpoint:`` group (a ``ModelCheckpoint``: set ``monitor`` / ``mode``) and ``last.ckpt``,
  rewritten at every epoch by :class:`~diffvision.lightning.LastCheckpoint`;
* ``--ckpt_path last`` resumes the most recent ``last.ckpt`` of the experiment, in the same
  ``version_N`` directory (with a warning and a fresh start when there is none; an error for
  validate / test / predict);
* a Rich progress bar and a learning-rate monitor unless configured otherwise.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from .data import ImageDataModule
from .lightning.callbacks import LastCheckpoint
from .lightning.loggers import ResumableCSVLogger

__all__ = ["DiffvisionCLI", "main", "find_last_checkpoint"]

DEFAULT_ROOT_DIR = "runs"
LINKED = ("num_classes", "img_size", "in_chans", "class_names")


def find_last_checkpoint(experiment_dir: Path) -> Optional[tuple[Path, int]]:
    """The most recently written ``version_N/checkpoints/last.ckpt`` under ``experiment_dir``."""
    found = []
    for path in Path(experiment_dir).glob("version_*/checkpoints/last.ckpt"):
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        if match:
            found.append((path.stat().st_mtime, int(match.group(1)), path))
    if not found:
        return None
    _, version, path = max(found)
    return path, version


class DiffvisionCLI(LightningCLI):
    """LightningCLI with diffvision's data module, links, run layout and resume."""

    def __init__(self, args=None, run: bool = True, **kwargs: Any) -> None:
        self._resume_version: Optional[int] = None
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites its config.yaml
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        kwargs.setdefault("auto_configure_optimizers", False)  # the modules configure their own
        kwargs.setdefault("parser_kwargs", {"description": "diffvision: train and evaluate DIFF-ViT classifiers "
                                                           "and DIFF-DiT generators (LightningCLI)."})
        super().__init__(model_class=None, datamodule_class=ImageDataModule, args=args, run=run, **kwargs)

    # ---- parser ------------------------------------------------------------------------------------

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        from . import __version__

        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"diffvision {__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment", type=Optional[str], default=None,
            help="Run name: logs and checkpoints go to <trainer.default_root_dir>/<experiment>/version_N "
                 "(default: the name of the last --config file, else the model class).")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            self._resolve_last_checkpoint(subcommand)

    # ---- run layout ----------------------------------------------------------------------------------

    def _experiment_name(self, cfg) -> str:
        if cfg.get("experiment"):
            return str(cfg["experiment"])
        configs = cfg.get("config") or []
        if configs:
            return Path(str(configs[-1])).stem
        class_path = (cfg.get("model") or {}).get("class_path") or "model"
        return class_path.rsplit(".", 1)[-1].lower()

    def _root_dir(self, cfg) -> Path:
        return Path((cfg.get("trainer") or {}).get("default_root_dir") or DEFAULT_ROOT_DIR)

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        cfg = self.config[subcommand]
        dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
        if dirpath:
            candidate = Path(dirpath) / "last.ckpt"
            found = (candidate, None) if candidate.is_file() else None
            where = str(candidate)
        else:
            experiment_dir = self._root_dir(cfg) / self._experiment_name(cfg)
            found = find_last_checkpoint(experiment_dir)
            where = f"{experiment_dir}/version_*/checkpoints/last.ckpt"
        if found is None:
            if subcommand != "fit":
                raise FileNotFoundError(f"--ckpt_path last: no checkpoint at {where}; pass a checkpoint path")
            rank_zero_warn(f"--ckpt_path last: no checkpoint at {where} yet; training starts from scratch")
            cfg["ckpt_path"] = None
            return
        path, version = found
        cfg["ckpt_path"] = str(path)
        if subcommand == "fit" and version is not None:
            self._resume_version = version  # continue logging in the same version_N directory
        print(f"resuming from {path}" if subcommand == "fit" else f"{subcommand}: weights from {path}")

    def before_fit(self) -> None:
        # refuse a resume on another data subset before the run's directory is written to
        ckpt_path = self._get(self.config_init, "ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file() and self.datamodule is not None:
            checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
            self.datamodule.load_state_dict(checkpoint.get(type(self.datamodule).__qualname__, {}))

    def _default_loggers(self, trainer_cfg: dict) -> list:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root, name = self._root_dir(cfg), self._experiment_name(cfg)
        tensorboard = TensorBoardLogger(save_dir=str(root), name=name, version=self._resume_version,
                                        default_hp_metric=False)
        csv = ResumableCSVLogger(save_dir=str(root), name=name, version=tensorboard.version)
        return [tensorboard, csv]

    def before_instantiate_classes(self) -> None:
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (bf16-mixed covers the rest)

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = self._default_loggers(trainer_cfg)
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
                isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(RichProgressBar())
        has_logger = kwargs.get("logger", trainer_cfg.get("logger")) not in (False, None, [])
        if has_logger and not any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if trainer_cfg.get("enable_checkpointing") is not False and not any(
                isinstance(cb, LastCheckpoint) for cb in callbacks):
            dirpath = getattr(self._get(self.config_init, "checkpoint"), "dirpath", None)
            callbacks.append(LastCheckpoint(dirpath=dirpath))
        kwargs.setdefault("callbacks", callbacks)
        trainer = super().instantiate_trainer(**kwargs)
        # last.ckpt is written after every other checkpoint callback has updated its state (best scores)
        last = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, LastCheckpoint)] + last
        return trainer


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``diffvision`` console script (``argv`` defaults to ``sys.argv[1:]``)."""
    DiffvisionCLI(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
