"""What a finished run's ``result.json`` holds, and a run's metrics from its Lightning CSV logs.

The sweep writes ``result.json`` when a run has finished (``run_record`` plus ``classification_result``
or ``generation_result``); the report counts a run only when ``result_problem`` finds nothing wrong
with it. Its keys:

* every run: ``task`` (one of ``TASKS``), ``kind`` (the sweep arm's name), ``fraction``, ``seed``,
  ``epochs``, ``steps``, ``params`` (the trained network's tensors, EMA copies left out), ``wall_s``
  (summed over every attempt), ``attempts``, ``device``, ``command``, ``log_dir``, ``lambda_per_layer``
  (λ of each differential attention layer at the last epoch, from ``LambdaMonitor``; None without one);
* classification: ``model_name``, ``model_kwargs``, ``final`` ``{"val/acc1", "val/loss", "val/acc5"}``
  (the last epoch's), ``best`` ``{"val/acc1", "epoch"}``;
* generation: ``preset``, ``attn_kind``, ``final`` ``{"val/loss", "val/loss_ema"}``, ``fid_vs_step``
  ``[[step, fid], ...]`` (the validation FIDs) and the FID summary of ``train/fid_eval.py``: ``fid``,
  ``fid_num_samples``, ``fid_reference``, ``scheduler``, ``num_inference_steps``, ``guidance_scale``,
  ``clip_denoised`` and its bookkeeping.

A run's CSV logs are ``<run>/version_*/metrics.csv``: a resumed run may add a version.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "RESULT_FILE", "TASKS", "classification_result", "finite_number", "fraction_key", "generation_result",
    "headline", "headline_text", "lambda_layers", "lambda_per_layer", "latest_version", "metric_by_epoch", "result_problem", "run_record",
    "save_result", "version_dirs",
]

RESULT_FILE = "result.json"
TASKS = ("classification", "generation")
LAMBDA_PREFIX = "lambda/layer_"
# the metrics of the last epoch that go into "final", per task
FINAL_METRICS = {"classification": ("val/acc1", "val/loss", "val/acc5"), "generation": ("val/loss", "val/loss_ema")}


def finite_number(value: Any) -> Optional[float]:
    """``value`` as a finite float, or None (booleans, text, NaN and infinities are not numbers here)."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fraction_key(value: Any) -> float:
    """A data fraction as a grouping key: 0.1 read back from JSON or CSV is the same cell as 0.1."""
    return round(float(value), 6)


# ---------------------------------------------------------------------------------------------
# Writing (the sweep)
# ---------------------------------------------------------------------------------------------

def run_record(task: str, metrics: dict[int, dict[str, float]], *, kind: str, fraction: float, seed: int,
               epochs: int, params: Optional[int], wall_s: float, attempts: int, device: str, command: str,
               log_dir: str) -> dict[str, Any]:
    """The keys every run's result has; ``metrics``: its ``{epoch: {metric: value}}`` (``read_epoch_metrics``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    final = metrics.get(epochs - 1, {})
    return {"task": task, "kind": kind, "fraction": fraction, "seed": seed, "epochs": epochs,
            "steps": int(final.get("step", 0)) + 1 if final else None, "params": params, "wall_s": wall_s,
            "attempts": attempts, "device": device, "command": command, "log_dir": log_dir,
            "lambda_per_layer": lambda_per_layer(final)}


def lambda_per_layer(epoch_metrics: dict[str, float]) -> Optional[list[float]]:
    """λ of each differential attention layer at that epoch (``LambdaMonitor``'s ``lambda/layer_<i>``), or
    None when nothing was logged (standard attention, or a run without the callback)."""
    layers = lambda_layers(epoch_metrics)
    return [layers[i] for i in sorted(layers)] if layers else None


def lambda_layers(epoch_metrics: dict[str, Any]) -> dict[int, Any]:
    """``{layer: value}`` of the ``lambda/layer_<i>`` entries among one epoch's metrics."""
    return {int(k[len(LAMBDA_PREFIX):]): v for k, v in epoch_metrics.items()
            if k.startswith(LAMBDA_PREFIX) and k[len(LAMBDA_PREFIX):].isdigit()}


def _final(record: dict, metrics: dict[int, dict[str, float]]) -> dict[str, float]:
    final = metrics.get(record["epochs"] - 1, {})
    return {k: final[k] for k in FINAL_METRICS[record["task"]] if k in final}


def classification_result(record: dict, metrics: dict[int, dict[str, float]], model_name: str,
                          model_kwargs: dict, name: str) -> dict[str, Any]:
    """``record`` completed for a classification run ``name``; it must have validated its last epoch."""
    accuracy = {e: m["val/acc1"] for e, m in metrics.items() if "val/acc1" in m}
    last = record["epochs"] - 1
    if last not in accuracy:
        raise RuntimeError(f"{name}: no val/acc1 at the final epoch {last} in {record['log_dir']}/metrics.csv")
    return {**record, "model_name": model_name, "model_kwargs": model_kwargs, "final": _final(record, metrics),
            "best": {"val/acc1": max(accuracy.values()), "epoch": max(accuracy, key=accuracy.get)}}


def generation_result(record: dict, metrics: dict[int, dict[str, float]], preset: str, attn_kind: str,
                      fid_summary: dict) -> dict[str, Any]:
    """``record`` completed for a generation run, with ``fid_summary`` (the FID evaluation's JSON)."""
    curve = [[int(m["step"]) + 1, m["val/fid"]] for e, m in sorted(metrics.items()) if "val/fid" in m]
    return {**record, "preset": preset, "attn_kind": attn_kind, "final": _final(record, metrics),
            "fid_vs_step": curve, **fid_summary}


def save_result(run_dir: Path, result: dict) -> Path:
    """Write ``run_dir/result.json``: from then on the run counts as finished."""
    path = Path(run_dir) / RESULT_FILE
    path.write_text(json.dumps(result, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Reading (the report)
# ---------------------------------------------------------------------------------------------

def result_problem(result: Any) -> Optional[str]:
    """Why a result.json cannot be counted, or None when it can."""
    if not isinstance(result, dict):
        return "result.json is not a JSON object"
    task = result.get("task")
    if task not in TASKS:
        return f"task {task!r} is not one of {TASKS}"
    missing = [k for k in ("kind", "fraction", "seed") if k not in result]
    if missing:
        return f"result.json lacks {missing}"
    fraction = finite_number(result["fraction"])
    if fraction is None or not 0 < fraction <= 1:
        return f"fraction {result['fraction']!r} is not in (0, 1]"
    try:
        int(result["seed"])
    except (TypeError, ValueError):
        return f"seed {result['seed']!r} is not an int"
    if task == "classification":
        final = result.get("final")
        acc = finite_number(final.get("val/acc1")) if isinstance(final, dict) else None
        if acc is None:
            return "no finite final val/acc1 (run unfinished?)"
        if not 0 <= acc <= 1:
            return f"final val/acc1 = {acc} is not a fraction in [0, 1]"
    elif finite_number(result.get("fid")) is None:
        return "no finite fid (run unfinished?)"
    return None


def headline(result: dict) -> float:
    """The number a run is compared by: final val/acc1 in % (classification) or FID (generation)."""
    if result["task"] == "classification":
        return 100.0 * float(result["final"]["val/acc1"])
    return float(result["fid"])


def headline_text(result: dict) -> str:
    value = headline(result)
    return f"acc1 {value:.2f}%" if result["task"] == "classification" else f"FID {value:.2f}"


# ---------------------------------------------------------------------------------------------
# CSV logs
# ---------------------------------------------------------------------------------------------

def version_dirs(run_dir: Path) -> list[Path]:
    """The run's Lightning log directories ``version_N``, oldest first."""
    def number(path: Path) -> int:
        tail = path.name.split("_")[-1]
        return int(tail) if tail.isdigit() else -1

    return sorted((p for p in Path(run_dir).glob("version_*") if p.is_dir()), key=number)


def latest_version(run_dir: Path) -> Optional[Path]:
    versions = version_dirs(run_dir)
    return versions[-1] if versions else None


def metric_by_epoch(run_dir: Path, metric: str = "val/acc1") -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` over the run's ``version_*/metrics.csv`` (a later version, e.g. of
    a resumed run, overrides an earlier one; the last value of an epoch wins); non-finite values are left
    out and an unreadable file is skipped, so a crashed run still shows how far it got."""
    from diffvision.lightning.loggers import read_epoch_metrics  # lazy: Lightning only when logs are read

    out: dict[int, float] = {}
    for version in version_dirs(run_dir):
        try:
            per_epoch = read_epoch_metrics(version)
        except (OSError, csv.Error, UnicodeDecodeError, ValueError):
            continue
        for epoch, metrics in per_epoch.items():
            value = finite_number(metrics.get(metric))
            if value is not None:
                out[epoch] = value
    return out
