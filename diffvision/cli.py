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
* validate / test / predict log into the run their checkpoint belongs to (``config_<subcommand>.yaml``
  beside its ``config.yaml``; predict writes ``predictions.csv`` there by default), or into
  ``<experiment>/eval/`` for a checkpoint from elsewhere, under the run directory's lock (refused while
  the run is still training; the run's own record, finished or interrupted, is left as it was); a run
  that fails to start leaves no directory; epochs shorter than ``log_every_n_steps`` log every step;
* bad input is an error: a model ``num_classes`` / ``img_size`` / ``in_chans`` other than the data's,
  an image size the patch does not divide; errors of the console script print one message (with
  "did you mean" for a mistyped key; ``DIFFVISION_DEBUG=1``: usage and traceback);
* a Rich progress bar and a learning-rate monitor unless configured otherwise;
* fail fast: before any data is decoded, the run and checkpoint directories must be creatable and
  writable (a probe file is written and fsynced, which also catches a full disk; directories made for
  the probe are removed again), and before ``fit`` starts there must be room for
  ``checkpoint.save_top_k`` + 2 checkpoints of the model (the kept ones, ``last.ckpt``, and the next
  one, written beside them before it replaces one); a resumed run drops the ``metrics.csv`` rows (and
  TensorBoard events) logged after its checkpoint, as it logs those steps again.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from fsspec.utils import get_protocol
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .attention import get_attn_kind
from .data import ImageDataModule
from .lightning.callbacks import DivergenceGuard, LastCheckpoint, LogShortEpochs, PredictionWriter, RemoveFailedStart
from .lightning.checkpoint_io import PARTIAL_SUFFIX, AtomicCheckpointIO
from .lightning.loggers import ResumableCSVLogger, wait_past_event_files
from .checkpoints import UnsafeCheckpointError, load_checkpoint_file
from .cli_errors import DEBUG_ENV, DiffvisionArgumentParser, debug_requested, report_error
from .models import twin_model
from .run_lock import RunDirLock, RunDirLockedError, lock_holder, was_interrupted

__all__ = ["DiffvisionCLI", "apply_attn_kind", "check_lightning_checkpoint", "check_writable_dir", "checkpoint_size_estimate",
           "claim_new_version", "find_last_checkpoint", "interrupted_version", "main", "run_dir_of"]

DEFAULT_ROOT_DIR = "runs"
LINKED = ("num_classes", "img_size", "in_chans", "class_names")
EVAL_SUBCOMMANDS = ("validate", "test", "predict")
EVAL_DIR = "eval"  # <root>/<experiment>/eval/: evaluations of a checkpoint that belongs to no run directory


class _NoInstallTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels", at every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_third_party_notices() -> None:
    """Drop notices that every run would repeat and no diffvision user can act on."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoInstallTips) for f in logger.filters):
            logger.addFilter(_NoInstallTips())
    # Lightning 2.6's own pytree helper builds LeafSpec, deprecated in torch 2.10+: not ours to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


def run_dir_of(ckpt_path) -> Optional[Path]:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/<name>.ckpt`` beside the run's
    ``hparams.yaml`` (the layout this CLI writes); None for a checkpoint anywhere else."""
    if not ckpt_path or get_protocol(str(ckpt_path)) != "file":
        return None
    path = Path(ckpt_path)
    run = path.parent.parent
    return run if path.parent.name == "checkpoints" and (run / "hparams.yaml").is_file() else None


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


# diffvision's LightningModules by the module that defines them: named, not imported (DiffusionModule loads
# diffusers, which a classifier run never needs; diffvision.lightning imports it lazily for the same reason)
_MODULE_CLASSES = {"ImageClassifier": "diffvision.lightning.classifier", "DiffusionModule": "diffvision.lightning.diffusion"}


def module_classes() -> dict[str, str]:
    """The class paths a checkpoint's ``hyper_parameters["_class_path"]`` may name (every name they are saved
    under), to the class's own ``module.qualname``. Nothing a checkpoint names is imported: another name is
    refused, this only tells which of ours."""
    return {f"{prefix}.{name}": f"{module}.{name}" for name, module in _MODULE_CLASSES.items()
            for prefix in (module, "diffvision.lightning")}


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


def is_recipe_overlay(path) -> bool:
    """A training-recipe overlay (configs/recipes/<recipe>.yaml): it adds ``_<recipe>`` to the run's name
    (and a sweep records ``<recipe>`` as its runs' recipe)."""
    return Path(str(path)).parent.name == "recipes"


class DiffvisionCLI(LightningCLI):
    """LightningCLI with diffvision's data module, links, run layout and resume."""

    def __init__(self, args=None, run: bool = True, **kwargs: Any) -> None:
        self._resume_version: Optional[int] = None
        self._restart_version = False  # the resumed version died before its first checkpoint: start it over
        self._held_ckpt_path: Optional[str] = None
        self._run_locks: list[RunDirLock] = []
        self._failed_start: Optional[RemoveFailedStart] = None  # the directories this run created, until it trains
        self._given = Namespace()  # settings given explicitly (parse_arguments)
        _quiet_third_party_notices()
        self._checkpoints: dict[str, dict] = {}  # --ckpt_path, read once (memory-mapped) for every check
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a resumed run rewrites its config.yaml
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        kwargs.setdefault("auto_configure_optimizers", False)  # the modules configure their own
        # allow_abbrev=False: a prefix (--trainer.max_epoch) is an unknown key, not silently another one
        kwargs.setdefault("parser_kwargs", {"description": "diffvision: train and evaluate DIFF-ViT classifiers "
                                                           "and DIFF-DiT generators (LightningCLI). Errors print "
                                                           f"one message; {DEBUG_ENV}=1 shows the traceback.",
                                            "allow_abbrev": False, "prog": "diffvision"})
        kwargs.setdefault("parser_class", DiffvisionArgumentParser)  # errors: one message, "did you mean"
        try:
            super().__init__(model_class=None, datamodule_class=ImageDataModule, args=args, run=run, **kwargs)
        except BaseException:
            # a failure before the first training step outside trainer.fit (before_fit's checks) leaves nothing
            # either; removed while the lock is still held, so no other writer can have taken the directory
            if self._failed_start is not None:
                self._failed_start.remove()
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
            help="Attention kind of the model (diffvision.attention.ATTN_KINDS: standard, diff, gda, diffv2, linear, "
                 "dydila), "
                 "applied over the recipe: a classifier's model_name becomes that kind's equal-parameter twin "
                 "(vit_tiny_patch4_32 -> diff_vit_tiny_patch4_32), a diffusion model's attn_kind is set. "
                 "The overlays configs/kinds/<kind>.yaml set it too.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        for name in LINKED:
            check = partial(self._check_linked_value, name) if name != "class_names" else None
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", compute_fn=check, apply_on="instantiate")

    def _check_linked_value(self, name: str, data_value):
        """The data's ``name`` for the model, unless the model was given another one explicitly: the link would
        replace it without a word (a model for 100 classes trained on 10), so that is an error."""
        given = self._given.get(f"model.init_args.{name}")
        if given is not None and given != data_value:
            fix = (f"or set --data.img_size {given} to resize the images" if name == "img_size" else
                   "the data module sets it from the dataset")
            raise ValueError(f"model.init_args.{name}={given!r} disagrees with the data's {name}={data_value!r}: "
                             f"drop model.init_args.{name} ({fix})")
        return data_value

    def _given_values(self, parser: LightningArgumentParser, args):
        """The settings given explicitly (config files, command line, no defaults) of the subcommand:
        the same arguments parsed again without defaults (cheap: no class is imported twice)."""
        exit_on_error, parser.exit_on_error = parser.exit_on_error, False  # a failure here is no user error
        try:
            given = (parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace))
                     else parser.parse_args(args, defaults=False))
        except (ArgumentError, ValueError, TypeError, KeyError):
            return Namespace()
        finally:
            parser.exit_on_error = exit_on_error
        subcommand = given.get("subcommand")
        return (given.get(subcommand) if subcommand else given) or Namespace()

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        self._given = self._given_values(parser, args)
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
        recipes = "".join(f"_{Path(str(c)).stem}" for c in configs if is_recipe_overlay(c))
        configs = [c for c in configs if not is_recipe_overlay(c)]
        if configs:
            name = Path(str(configs[-1])).stem + recipes
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
        missing = _missing_dirs(where)  # created when the run first writes
        free = shutil.disk_usage(missing[-1].parent if missing else where).free
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
        if saved is not None and saved not in {f"{c.__module__}.{c.__qualname__}" for c in type(self.model).__mro__}:
            problems.append(f"it holds a {saved.rsplit('.', 1)[-1]}, the config builds a {type(self.model).__name__}")
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
        root, name, version = self._root_dir(cfg), self._experiment_name(cfg), self._resume_version
        if self.subcommand in EVAL_SUBCOMMANDS:
            # an evaluation logs into the run its checkpoint comes from (metrics.csv gains the test rows,
            # predictions.csv lands beside it), else into one evaluation folder: never a new version_N
            run = run_dir_of(cfg.get("ckpt_path"))
            root, name, version = (run.parent.parent, run.parent.name, run.name) if run else (root, name, EVAL_DIR)
        resume_step = self._resume_step(cfg) if self.subcommand == "fit" else None
        purge = {"purge_step": resume_step} if resume_step is not None else {}
        # DDP: rank 0 writes the run; fast_dev_run: Lightning swaps the loggers out, nothing is written
        writer = self.subcommand is not None and rank_zero_only.rank == 0 and not trainer_cfg.get("fast_dev_run")
        created: list[Path] = []  # the directories this run makes, deepest first
        if writer and version is None:
            parents = _missing_dirs(root / name)
            version = claim_new_version(root / name)
            created = [root / name / f"version_{version}", *parents]
        elif writer:
            created = _missing_dirs(root / name / (version if isinstance(version, str) else f"version_{version}"))
        if created:
            # a failed start removes them again (RemoveFailedStart, and __init__ for failures outside trainer.fit).
            # Only ever what this process made: a resumed, interrupted or evaluated version_N already existed, so
            # neither its lock record nor an interrupted run's --ckpt_path last resume is ever lost
            self._failed_start = RemoveFailedStart(created[0], created[1:])
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
        # An evaluation writes into the run of its checkpoint (or eval/), so it takes the same lock: a run still
        # being trained is refused (their metrics.csv rows would interleave), a finished or crashed one is fine.
        # It locks as a visitor: the run's record (finished, or interrupted before its first last.ckpt and so
        # resumable in place) stays as it was, even if the evaluation is killed.
        evaluation = self.subcommand in EVAL_SUBCOMMANDS
        for path in dirs:
            try:
                self._run_locks.append(RunDirLock(path, visitor=evaluation).acquire())
            except RunDirLockedError as err:
                if not evaluation:
                    raise
                holder = lock_holder(path) or "another process"
                raise RunDirLockedError(
                    f"{self.subcommand} logs into the run its checkpoint belongs to, {path}, and {holder} is writing "
                    f"it (a training still running, or another evaluation): wait for it to end, evaluate a copy of "
                    f"the checkpoint from outside the run (logged into <experiment>/{EVAL_DIR}/), or pass "
                    f"--trainer.logger false") from err
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
            new = _missing_dirs(path)
            try:
                check_writable_dir(path, what)
            finally:
                for directory in new:  # made for the probe only: a run that fails to start leaves nothing behind
                    with contextlib.suppress(OSError):
                        directory.rmdir()
        if self.subcommand in EVAL_SUBCOMMANDS:  # the run's config.yaml stays the one it was trained with
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{self.subcommand}.yaml"}
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
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            callbacks.append(PredictionWriter())  # predictions.csv in the run: predict's output is kept
        if self._given.get("trainer.log_every_n_steps") is None:
            callbacks.append(LogShortEpochs())
            warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the "
                                                      "logging interval")  # LogShortEpochs sees to it
        if self._failed_start is not None:
            callbacks.append(self._failed_start)
        kwargs.setdefault("callbacks", callbacks)
        if self.subcommand in EVAL_SUBCOMMANDS:  # evaluations write no checkpoint: where they would is moot
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
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
    """Entry point of the ``diffvision`` console script (``argv`` defaults to ``sys.argv[1:]``): an error
    prints its message alone (``DIFFVISION_DEBUG=1``: the traceback) and returns 1."""
    if debug_requested():
        DiffvisionCLI(args=argv)
        return 0
    try:
        DiffvisionCLI(args=argv)
    except Exception as err:  # noqa: BLE001 - the console script's one place that turns errors into messages
        report_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
