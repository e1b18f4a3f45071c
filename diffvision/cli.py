"""The ``diffvision`` console script: LightningCLI for fit / validate / test / predict.

    diffvision fit --config configs/cifar10_vit.yaml --attn_kind diff
    diffvision fit --config configs/cifar10_vit.yaml --config configs/kinds/diff.yaml --data.data_fraction 0.1 --ckpt_path last
    diffvision test --config configs/cifar10_vit.yaml --attn_kind diff --ckpt_path last
    diffvision fit --config configs/cifar10_vit.yaml --attn_kind diff --print_config

What it adds to a plain ``LightningCLI``:

* ``--attn_kind`` (or an overlay ``configs/kinds/<kind>.yaml``) puts an attention kind on a recipe:
  a classifier's ``model_name`` becomes that kind's equal-parameter twin, a diffusion model's
  ``attn_kind`` is set (:func:`apply_attn_kind`);
* the data module is :class:`~diffvision.data.ImageDataModule` (``data:`` holds its arguments) and
  its ``num_classes``, ``img_size``, ``in_chans`` and ``class_names`` are linked into the model, so
  configs never repeat them;
* runs are laid out as ``<trainer.default_root_dir>/<experiment>/version_N/`` (default root
  ``runs``, experiment = the last ``--config`` file's name, plus ``_<attn_kind>`` when one is set) with TensorBoard and CSV logs side by
  side, ``config.yaml``, ``subset_indices.json`` and ``checkpoints/``: the best ones by the
  ``checkpoint:`` group (a ``ModelCheckpoint``: set ``monitor`` / ``mode``) and ``last.ckpt``,
  rewritten at every epoch (every ``--checkpoint.every_n_epochs``, and at the last) by
  :class:`~diffvision.lightning.LastCheckpoint`;
* ``--ckpt_path last`` resumes the most recent ``last.ckpt`` of the experiment, in the same
  ``version_N`` directory (a run killed before its first ``last.ckpt`` goes on in its own directory;
  with a warning and a fresh start when there is none; an error for validate / test / predict);
* ``--ckpt_path`` never changes the model: the config builds it, and a checkpoint of another model
  (or naming a class that is not diffvision's own) is refused; nothing a checkpoint names is imported;
* one writer per run directory (:mod:`diffvision.run_lock`); every checkpoint written in place and
  atomically (:class:`~diffvision.lightning.AtomicCheckpointIO`, never staged in ``$TMPDIR``) and its zip
  CRCs checked when read back; a diverged run stopped (:class:`~diffvision.lightning.DivergenceGuard`);
* a Rich progress bar and a learning-rate monitor unless configured otherwise;
* fail fast: before any data is decoded, the run and checkpoint directories must be creatable and
  writable (a probe file is written and fsynced, which also catches a full disk), and before
  ``fit`` starts there must be room for ``checkpoint.save_top_k`` + 2 checkpoints of the model (the
  kept ones, ``last.ckpt``, and the next one, written beside them before it replaces one); a resumed
  run drops the ``metrics.csv`` rows (and TensorBoard events) logged after its checkpoint, as it logs
  those steps again.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .attention import get_attn_kind
from .data import ImageDataModule
from .lightning.callbacks import DivergenceGuard, LastCheckpoint
from .lightning.checkpoint_io import PARTIAL_SUFFIX, AtomicCheckpointIO
from .lightning.loggers import ResumableCSVLogger, wait_past_event_files
from .checkpoints import UnsafeCheckpointError, load_checkpoint_file
from .models import twin_model
from .run_lock import RunDirLock, was_interrupted

__all__ = ["DiffvisionCLI", "apply_attn_kind", "check_lightning_checkpoint", "check_writable_dir", "checkpoint_size_estimate",
           "claim_new_version", "find_last_checkpoint", "interrupted_version", "main"]

DEFAULT_ROOT_DIR = "runs"
LINKED = ("num_classes", "img_size", "in_chans", "class_names")


def module_classes() -> dict[str, type]:
    """The classes a checkpoint's ``hyper_parameters["_class_path"]`` may name, by every name they are saved
    under. Nothing a checkpoint names is imported: another name is refused, this only tells which of ours."""
    from .lightning import DiffusionModule, ImageClassifier

    return {f"{prefix}.{cls.__qualname__}": cls for cls in (ImageClassifier, DiffusionModule)
            for prefix in (cls.__module__, "diffvision.lightning")}


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


def _versions(experiment_dir: Path) -> list[int]:
    found = [re.fullmatch(r"version_(\d+)", p.name) for p in Path(experiment_dir).glob("version_*") if p.is_dir()]
    return sorted(int(m.group(1)) for m in found if m)


def interrupted_version(experiment_dir: Path) -> Optional[tuple[int, Optional[Path]]]:
    """The experiment's latest ``version_N`` when its writer died before its first ``last.ckpt`` (its lock
    file says it was running and nobody holds it now), with its newest other checkpoint (``epoch=*.ckpt``,
    written just before a kill that hit the first ``last.ckpt``) or None; None when there is no such run."""
    versions = _versions(experiment_dir)
    if not versions:
        return None
    run_dir = Path(experiment_dir) / f"version_{versions[-1]}"
    if (run_dir / "checkpoints" / "last.ckpt").exists() or not was_interrupted(run_dir):
        return None
    saved = sorted(run_dir.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    return versions[-1], (saved[-1] if saved else None)


def claim_new_version(experiment_dir: Path) -> int:
    """Create the next ``version_N`` directory and return N; ``mkdir`` is atomic, so two runs starting
    at once get two directories (Lightning's loggers would both pick the same N)."""
    experiment_dir = Path(experiment_dir)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    version = max(_versions(experiment_dir), default=-1) + 1
    while True:
        try:
            (experiment_dir / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def check_writable_dir(path, what: str = "directory") -> Path:
    """Create ``path`` if needed and write + fsync a probe file in it: an ``OSError`` (its errno kept:
    ``PermissionError``, ``NotADirectoryError``, ENOSPC, ...) naming ``path`` and ``what`` it is for
    comes now, not after hours of training."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} {path} cannot be created: {existing} is a file, "
                                                f"not a directory", str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".diffvision-write-check-", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"{what} {path} is not writable ({err.strerror or err}); logs and "
                                 f"checkpoints could not be saved: choose another directory", str(path)) from err
    return path


def check_lightning_checkpoint(path, checkpoint) -> None:
    """``--ckpt_path`` must be a Lightning checkpoint (a training state: weights, optimizer, loops) whose
    ``hyper_parameters`` name no class but diffvision's own LightningModules."""
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(checkpoint):
        got = (f"a dict with keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, dict)
               else f"a {type(checkpoint).__name__}")
        raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint (no 'state_dict' and "
                         f"'pytorch-lightning_version'; it holds {got}): --ckpt_path takes a last.ckpt or epoch=*.ckpt "
                         f"written by `diffvision fit`. To start from plain weights, give them to the model "
                         f"(ImageClassifier: --model.init_args.pretrained true --model.init_args.model_kwargs "
                         f"'{{pretrained_cfg_overlay: {{file: {path}}}}}')")
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if class_path is not None and class_path not in module_classes():
        raise UnsafeCheckpointError(
            f"refused --ckpt_path {path}: its hyper_parameters name the class {class_path!r}, and resolving it would "
            f"import (and run) that module; a diffvision checkpoint names one of {sorted(module_classes())}")


def checkpoint_size_estimate(module: torch.nn.Module) -> int:
    """Bytes of a checkpoint of ``module``: its state dict plus two fp32 optimizer moments (Adam)
    per trainable parameter. Pickle overhead and small states are left out."""
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    moments = sum(2 * p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return state + moments


def apply_attn_kind(cfg) -> None:
    """Make the parsed config's model of ``cfg.attn_kind`` (when set): a classifier's ``model_name`` (and
    head counts) become that kind's twin (``twin_model``), a diffusion model's ``attn_kind`` is set."""
    kind = cfg.get("attn_kind")
    model = cfg.get("model")
    if not kind or model is None:
        return
    kind = get_attn_kind(kind).name
    init = model.get("init_args")
    if init is not None and "model_name" in init:
        init["model_name"], init["model_kwargs"] = twin_model(init["model_name"], kind, init.get("model_kwargs"))
    elif init is not None and "attn_kind" in init:
        init["attn_kind"] = kind
    else:
        raise ValueError(f"--attn_kind {kind}: the model {model.get('class_path')} takes neither model_name "
                         f"(ImageClassifier) nor attn_kind (DiffusionModule)")
    cfg["attn_kind"] = kind


def _is_kind_overlay(path) -> bool:
    """A config file that only sets ``attn_kind`` (configs/kinds/*.yaml): it does not name the run."""
    try:
        content = yaml.safe_load(Path(str(path)).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and set(content) == {"attn_kind"}


class DiffvisionCLI(LightningCLI):
    """LightningCLI with diffvision's data module, links, run layout and resume."""

    def __init__(self, args=None, run: bool = True, **kwargs: Any) -> None:
        self._resume_version: Optional[int] = None
        self._restart_version = False  # the resumed version died before its first checkpoint: start it over
        self._held_ckpt_path: Optional[str] = None
        self._run_locks: list[RunDirLock] = []
        self._checkpoints: dict[str, dict] = {}  # --ckpt_path, read once (memory-mapped) for every check
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites its config.yaml
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        kwargs.setdefault("auto_configure_optimizers", False)  # the modules configure their own
        # allow_abbrev=False: a prefix (--trainer.max_epoch) is an unknown key, not silently another one
        kwargs.setdefault("parser_kwargs", {"description": "diffvision: train and evaluate DIFF-ViT classifiers "
                                                           "and DIFF-DiT generators (LightningCLI).",
                                            "allow_abbrev": False})
        try:
            super().__init__(model_class=None, datamodule_class=ImageDataModule, args=args, run=run, **kwargs)
        except BaseException:
            self._release_run_dirs(finished=False)  # the lock file then says this run was interrupted
            raise
        self._release_run_dirs(finished=True)

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
        parser.add_argument(
            "--attn_kind", type=Optional[str], default=None,
            help="Attention kind of the model (diffvision.attention.ATTN_KINDS: standard, diff, gda, diffv2), "
                 "applied over the recipe: a classifier's model_name becomes that kind's equal-parameter twin "
                 "(vit_tiny_patch4_32 -> diff_vit_tiny_patch4_32), a diffusion model's attn_kind is set. "
                 "The overlays configs/kinds/<kind>.yaml set it too.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        for name in LINKED:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            self._resolve_last_checkpoint(subcommand)
        apply_attn_kind(self.config[subcommand] if subcommand else self.config)
        if subcommand:
            cfg = self.config[subcommand]
            if "weights_only" in cfg and cfg.get("weights_only") is None:
                cfg["weights_only"] = True  # Lightning fully unpickles http(s) checkpoints otherwise
            if cfg.get("ckpt_path") and Path(cfg["ckpt_path"]).is_file():
                # names a truncated / corrupt / bit-flipped / unsafe / foreign file now
                check_lightning_checkpoint(cfg["ckpt_path"], self._read_checkpoint(cfg["ckpt_path"]))
                # LightningCLI would next merge the checkpoint's hyper_parameters into the config: that imports
                # every class they name (``_class_path``, an optimizer's ``class_path``: any module on sys.path,
                # the current directory included) and silently swaps the config's model for the checkpoint's.
                # Here the config builds the model and the checkpoint is checked against it (before_<subcommand>):
                # the path is held back from that step and put back before anything is instantiated.
                self._held_ckpt_path, cfg["ckpt_path"] = cfg["ckpt_path"], None

    # ---- run layout ----------------------------------------------------------------------------------

    def _experiment_name(self, cfg) -> str:
        if cfg.get("experiment"):
            return str(cfg["experiment"])
        configs = [c for c in cfg.get("config") or [] if not _is_kind_overlay(c)]
        if configs:
            name = Path(str(configs[-1])).stem
            return f"{name}_{cfg['attn_kind']}" if cfg.get("attn_kind") else name
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
            cfg["ckpt_path"] = None
            interrupted = None if dirpath else interrupted_version(experiment_dir)
            if interrupted is not None:  # killed before its first last.ckpt: go on in the same version_N
                self._resume_version, saved = interrupted
                if saved is not None:
                    cfg["ckpt_path"] = str(saved)
                    print(f"resuming from {saved} (the run was interrupted before its first last.ckpt)")
                else:
                    self._restart_version = True
                    print(f"--ckpt_path last: {experiment_dir / f'version_{self._resume_version}'} was interrupted "
                          f"before its first checkpoint; training starts from scratch in it")
                return
            rank_zero_warn(f"--ckpt_path last: no checkpoint at {where} yet; training starts from scratch")
            return
        path, version = found
        cfg["ckpt_path"] = str(path)
        if subcommand == "fit" and version is not None:
            self._resume_version = version  # continue logging in the same version_N directory
        print(f"resuming from {path}" if subcommand == "fit" else f"{subcommand}: weights from {path}")

    def _read_checkpoint(self, path) -> dict:
        """``path`` read safely (``load_checkpoint_file``), once: the validity check, the resume step
        and the subset check share it."""
        key = str(path)
        if key not in self._checkpoints:
            self._checkpoints[key] = load_checkpoint_file(path, mmap=True)
        return self._checkpoints[key]

    def _output_dirs(self) -> list[tuple[Path, str]]:
        """The local directories this subcommand writes to, and what for."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer_cfg = cfg.get("trainer") or {}
        checkpointing = self.subcommand in (None, "fit") and trainer_cfg.get("enable_checkpointing") is not False
        dirs = []
        if trainer_cfg.get("logger") is not False or checkpointing:
            dirs.append((self._root_dir(cfg), "log directory (trainer.default_root_dir)"))
        dirpath = (cfg.get("checkpoint") or {}).get("dirpath")
        if checkpointing and dirpath:
            dirs.append((Path(dirpath), "checkpoint directory (checkpoint.dirpath)"))
        return [(path, what) for path, what in dirs if get_protocol(str(path)) == "file"]

    def _check_disk_space(self) -> None:
        trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
        if trainer_cfg.get("enable_checkpointing") is False or self.model is None:
            return
        outputs = self._output_dirs()
        if not outputs:
            return
        where, what = outputs[-1]  # the checkpoint directory when set, else the run's root
        estimate = checkpoint_size_estimate(self.model)
        # At the peak: the top-k files plus the next one written beside them before the worst is removed, and
        # last.ckpt; or the top-k files, last.ckpt and its replacement being written. Either way top-k + 2.
        top_k = getattr(self._get(self.config_init, "checkpoint"), "save_top_k", 1)
        if top_k < 0:  # every epoch kept
            top_k = max(1, trainer_cfg.get("max_epochs") or 1)
        files = top_k + 2
        free = shutil.disk_usage(where).free
        if free < files * estimate:
            raise OSError(errno.ENOSPC, f"not enough disk space for checkpoints in {what} {where}: "
                                        f"{free / 2**20:.1f} MiB free, a checkpoint of this model takes about "
                                        f"{estimate / 2**20:.1f} MiB and up to {files} are on disk at once "
                                        f"({top_k} kept by checkpoint.save_top_k, last.ckpt, and the next one, "
                                        f"written beside them before it replaces one): {files * estimate / 2**20:.1f} "
                                        f"MiB; free some space or choose another directory", str(where))

    def _check_checkpoint_fits(self) -> Optional[dict]:
        """--ckpt_path must hold the network the config builds (LightningCLI would instead have swapped the
        config's model for the checkpoint's); returns the checkpoint read, None without one."""
        ckpt_path = self._get(self.config_init, "ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return None
        checkpoint = self._read_checkpoint(ckpt_path)
        saved = module_classes().get((checkpoint.get("hyper_parameters") or {}).get("_class_path"))
        problems = []
        if saved is not None and not isinstance(self.model, saved):
            problems.append(f"it holds a {saved.__name__}, the config builds a {type(self.model).__name__}")
        elif hasattr(self.model, "checkpoint_mismatch"):
            problems = self.model.checkpoint_mismatch(checkpoint)
        if problems:
            raise ValueError(f"--ckpt_path {ckpt_path} does not fit the model the config builds: "
                             + "; ".join(problems) + ". Pass the config (and --attn_kind / model arguments) it was "
                                                     "trained with, or a checkpoint of this model")
        return checkpoint

    def before_fit(self) -> None:
        self._check_disk_space()
        checkpoint = self._check_checkpoint_fits()
        # refuse a resume on another data subset before the run's directory is written to
        if checkpoint is not None and self.datamodule is not None:
            self.datamodule.load_state_dict(checkpoint.get(type(self.datamodule).__qualname__, {}))
        self._checkpoints.clear()  # Lightning reads the checkpoint itself to restore it

    def before_validate(self) -> None:
        self._check_checkpoint_fits()
        self._checkpoints.clear()

    before_test = before_predict = before_validate

    def _resume_step(self, cfg) -> Optional[int]:
        """The step count (``_batches_that_stepped``, what logged rows carry) of the checkpoint this
        run resumes in its own log directory (0 when it starts that directory over); None for a fresh run
        or an unreadable checkpoint."""
        if self._restart_version:
            return 0
        ckpt_path = cfg.get("ckpt_path")
        if self._resume_version is None or not ckpt_path or not Path(ckpt_path).is_file():
            return None
        try:
            checkpoint = self._read_checkpoint(ckpt_path)
        except Exception as err:  # noqa: BLE001 - the checkpoint's own loading reports real problems
            rank_zero_warn(f"could not read the step of {ckpt_path} ({err}); metrics.csv keeps every row")
            return None
        loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        step = (loop.get("epoch_loop.state_dict") or {}).get("_batches_that_stepped", checkpoint.get("global_step"))
        return int(step) if step is not None else None

    def _default_loggers(self, trainer_cfg: dict) -> list:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root, name = self._root_dir(cfg), self._experiment_name(cfg)
        resume_step = self._resume_step(cfg) if self.subcommand == "fit" else None
        purge = {"purge_step": resume_step} if resume_step is not None else {}
        version = self._resume_version
        # DDP: rank 0 writes the run; fast_dev_run: Lightning swaps the loggers out, nothing is written
        writer = self.subcommand is not None and rank_zero_only.rank == 0 and not trainer_cfg.get("fast_dev_run")
        if version is None and writer:
            version = claim_new_version(root / name)
        tensorboard = TensorBoardLogger(save_dir=str(root), name=name, version=version,
                                        default_hp_metric=False, **purge)
        if writer:
            self._take_run_dir(Path(tensorboard.log_dir))
        if purge:  # the resumed run's event file must sort after the killed run's
            wait_past_event_files(tensorboard.log_dir)
        csv = ResumableCSVLogger(save_dir=str(root), name=name, version=tensorboard.version,
                                 resume_step=resume_step)
        return [tensorboard, csv]

    def _take_run_dir(self, run_dir: Path) -> None:
        """Lock ``run_dir`` (and a separate checkpoint.dirpath) for this process, then remove what a killed
        writer left half-written there: partial checkpoints and partial log files."""
        dirs = [run_dir]
        dirpath = (self._get(self.config, "checkpoint") or {}).get("dirpath")
        if self.subcommand == "fit" and dirpath and get_protocol(str(dirpath)) == "file":
            dirs.append(Path(dirpath))
        for path in dirs:
            self._run_locks.append(RunDirLock(path).acquire())
        for path in dirs:
            for leftover in [*path.glob(f".*{PARTIAL_SUFFIX}"), *path.glob(f"checkpoints/.*{PARTIAL_SUFFIX}"),
                             *path.glob("*.csv.tmp")]:
                leftover.unlink(missing_ok=True)

    def _release_run_dirs(self, finished: bool) -> None:
        for lock in self._run_locks:
            lock.release(finished)
        self._run_locks.clear()

    def before_instantiate_classes(self) -> None:
        if self._held_ckpt_path is not None:  # see parse_arguments
            self.config[self.config["subcommand"]]["ckpt_path"] = self._held_ckpt_path
        for path, what in self._output_dirs():
            check_writable_dir(path, what)
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
            checkpoint = self._get(self.config, "checkpoint")
            callbacks.append(LastCheckpoint(dirpath=getattr(checkpoint, "dirpath", None),
                                            every_n_epochs=getattr(checkpoint, "every_n_epochs", None) or 1))
        if not any(isinstance(cb, DivergenceGuard) for cb in callbacks):
            callbacks.append(DivergenceGuard())
        kwargs.setdefault("callbacks", callbacks)
        # every checkpoint written in place and atomically, never staged in $TMPDIR (AtomicCheckpointIO)
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if "plugins" not in kwargs and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
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
