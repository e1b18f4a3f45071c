"""Sweep specs: a YAML file -> jobs (arm x fraction x seed) -> the command lines that run them.

A job's seed seeds the run and, by default, picks its training subset (``--data.fraction_seed``); a spec's
optional ``fraction_seed`` fixes the subset instead, the same for every seed (ESPFormer's protocol, issue 17).

A spec names a ``diffvision fit`` config and what to vary; see ``configs/sweeps/``. Its ``arms`` are the
named models compared: a timm model name (classification) or an ``attn_kind`` (generation), each with
optional per-arm keywords (an arm is an attention kind plus settings, e.g. DIFF with λinit 0.8). Every
job goes through the same CLI and configs users have, into ``<root>/<arm>_f<fraction>_s<seed>/``.

A spec's optional ``recipe`` names a training-recipe overlay (``configs/recipes/deit.yaml``) stacked over its
config in every job; overlays after ``--`` (``-- --config configs/recipes/deit.yaml``) stack the same way.
A sweep runs one recipe: compare recipes with one spec (or root) per recipe.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .results import RESULT_FILE, TASKS

__all__ = ["REPO", "Job", "arm_entry", "recipe_name", "build_jobs", "extra_value", "fid_command", "fit_command", "fraction_tag",
           "load_spec", "merged_model_kwargs", "model_kwargs_key", "read_config", "validation_interval"]

# The checkout: specs name their configs relative to it, runs start in it, and train/ holds the scripts.
REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {"task", "config", "arms", "epochs", "seeds"}
OPTIONAL_KEYS = {"validations", "fid", "fraction_seed", "recipe"}


@dataclass
class Job:
    arm: str
    model: str                 # timm model name (classification) or attn_kind (generation)
    model_kwargs: dict         # per-arm model keywords, merged over the config's (e.g. head counts)
    fraction: float
    seed: int
    epochs: int
    val_every: int
    root: Path
    cost: float                # images seen in training: fraction x epochs (relative)
    extra: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.arm}_f{fraction_tag(self.fraction)}_s{self.seed}"

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def done(self) -> bool:
        return (self.dir / RESULT_FILE).is_file()


def fraction_tag(fraction: float) -> str:
    """0.01 -> '001', 0.1 -> '010', 0.25 -> '025', 1.0 -> '100' (percent, 3 digits; more if needed)."""
    pct = fraction * 100
    return f"{pct:03.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:07.3f}".replace(".", "p")


def load_spec(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep spec is a YAML mapping, got {type(spec).__name__}")
    if "kinds" in spec and "arms" not in spec:  # the key's name before it was told apart from attn_kind
        spec["arms"] = spec.pop("kinds")
    missing = REQUIRED_KEYS - set(spec)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}; a spec needs {sorted(REQUIRED_KEYS)}")
    unknown = set(spec) - REQUIRED_KEYS - OPTIONAL_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; accepted: {sorted(REQUIRED_KEYS | OPTIONAL_KEYS)}")
    if spec["task"] not in TASKS:
        raise ValueError(f"{path}: task must be one of {TASKS}, got {spec['task']!r}")
    if "recipe" in spec and not (REPO / spec["recipe"]).is_file() and not Path(spec["recipe"]).is_file():
        raise ValueError(f"{path}: recipe {spec['recipe']!r} is not a file; the recipes are configs/recipes/*.yaml")
    spec["epochs"] = {float(f): int(e) for f, e in spec["epochs"].items()}
    for fraction, epochs in spec["epochs"].items():
        if not 0 < fraction <= 1 or epochs < 1:
            raise ValueError(f"{path}: epochs maps a fraction in (0, 1] to epochs >= 1, got {fraction}: {epochs}")
    fixed = spec.get("fraction_seed")
    if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int) or fixed < 0):
        raise ValueError(f"{path}: fraction_seed must be a non-negative int (the subset of every run), got {fixed!r}")
    return spec


def arm_entry(task: str, arm: str, entry: Any) -> tuple[str, dict]:
    """A spec's ``arms`` value: a model name (classification) or an ``attn_kind`` (generation), or a mapping
    ``{model: name, model_kwargs: {...}}`` / ``{attn_kind: kind, model_kwargs: {...}}``."""
    key = "model" if task == "classification" else "attn_kind"
    if isinstance(entry, str):
        entry = {key: entry}
    if not (isinstance(entry, dict) and isinstance(entry.get(key), str) and set(entry) <= {key, "model_kwargs"}):
        raise ValueError(f"arms.{arm}: expected a {key} or {{{key}: ..., model_kwargs: {{...}}}}, got {entry!r}")
    if task == "generation":
        from diffvision.attention import get_attn_kind

        get_attn_kind(entry[key])  # an unknown kind fails here, not in the middle of a sweep
    return entry[key], dict(entry.get("model_kwargs") or {})


def read_config(spec: dict) -> dict:
    """The ``diffvision fit`` config the spec names (a relative path is relative to the checkout)."""
    path = Path(spec["config"])
    return yaml.safe_load((path if path.is_absolute() else REPO / path).read_text())


def validation_interval(epochs: int, validations: int) -> int:
    """The largest interval <= epochs / validations that divides ``epochs``: the last epoch is validated."""
    target = max(1, epochs // max(1, validations))
    return max(d for d in range(1, target + 1) if epochs % d == 0)


def build_jobs(spec: dict, root: Path, arms: Optional[list[str]], fractions: Optional[list[float]],
               seeds: Optional[list[int]], extra: list[str]) -> list[Job]:
    for name, chosen, known in (("arm", arms, list(spec["arms"])), ("fraction", fractions, list(spec["epochs"])),
                                ("seed", seeds, list(spec["seeds"]))):
        bad = [c for c in (chosen or []) if c not in known]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; the spec has {known}")
    jobs = []
    forced_epochs = extra_value(extra, "--trainer.max_epochs")  # an override after -- wins over the spec
    for fraction, epochs in spec["epochs"].items():
        epochs = int(forced_epochs) if forced_epochs else epochs
        if fractions and fraction not in fractions:
            continue
        for arm, entry in spec["arms"].items():
            if arms and arm not in arms:
                continue
            model, model_kwargs = arm_entry(spec["task"], arm, entry)
            for seed in spec["seeds"]:
                if seeds and seed not in seeds:
                    continue
                jobs.append(Job(arm, model, model_kwargs, fraction, int(seed), epochs,
                                validation_interval(epochs, spec.get("validations", 10)), root,
                                cost=fraction * epochs, extra=list(extra)))
    return sorted(jobs, key=lambda j: -j.cost)  # longest first: the short ones fill the gaps at the end


def model_kwargs_key(task: str) -> str:
    """The model's keyword argument of the task's LightningModule that per-arm keywords go into."""
    return "model_kwargs" if task == "classification" else "transformer_kwargs"


def merged_model_kwargs(spec: dict, job: Job) -> dict:
    """The config's model keywords with the arm's over them: what the run's model is built with."""
    config_kwargs = read_config(spec)["model"]["init_args"].get(model_kwargs_key(spec["task"])) or {}
    return {**config_kwargs, **job.model_kwargs}


def fit_command(spec: dict, job: Job) -> list[str]:
    recipe = ["--config", str(spec["recipe"])] if spec.get("recipe") else []
    cmd = [sys.executable, "-m", "diffvision.cli", "fit", "--config", str(spec["config"]), *recipe,
           "--experiment", job.name, "--trainer.default_root_dir", str(job.root),
           "--seed_everything", str(job.seed), "--data.data_fraction", str(job.fraction),
           "--data.fraction_seed", str(spec.get("fraction_seed", job.seed)), "--trainer.max_epochs", str(job.epochs),
           "--trainer.check_val_every_n_epoch", str(job.val_every)]
    if spec["task"] == "classification":
        cmd += ["--model.init_args.model_name", job.model]
    else:
        cmd += ["--model.init_args.attn_kind", job.model]
    if job.model_kwargs:
        cmd += [f"--model.init_args.{model_kwargs_key(spec['task'])}", json.dumps(merged_model_kwargs(spec, job))]
    return cmd + job.extra + ["--ckpt_path", "last"]


def recipe_name(spec: dict, job: Job) -> str:
    """The training recipe of a job: the recipe overlays (``configs/recipes/<name>.yaml``) of the spec's
    ``recipe`` and of the ``--config`` arguments after ``--``, joined by ``+``; ``light`` (the configs'
    own recipe) when there is none."""
    from diffvision.cli import is_recipe_overlay  # where the CLI names runs by the same rule

    configs = ([spec["recipe"]] if spec.get("recipe") else []) + \
        [value for key, value in zip(job.extra, job.extra[1:]) if key == "--config"] + \
        [arg.split("=", 1)[1] for arg in job.extra if arg.startswith("--config=")]
    names = [Path(str(c)).stem for c in configs if is_recipe_overlay(c)]
    return "+".join(names) or "light"


def fid_command(spec: dict, job: Job, log_dir: Path) -> list[str]:
    """FID of the finished run's last checkpoint, through ``train/fid_eval.py`` with the spec's ``fid`` options."""
    cmd = [sys.executable, str(REPO / "train" / "fid_eval.py"), str(log_dir / "checkpoints" / "last.ckpt"),
           "--out", str(job.dir / "fid.json"), "--seed", str(job.seed)]
    for key, value in dict(spec.get("fid") or {}).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    data_root = extra_value(job.extra, "--data.root")
    if data_root and "--data-root" not in cmd:
        cmd += ["--data-root", data_root]
    return cmd


def extra_value(extra: list[str], key: str) -> Optional[str]:
    """The value of ``key`` among the CLI arguments after ``--`` (``key value`` or ``key=value``), or None."""
    for i, arg in enumerate(extra):
        if arg == key and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return None
