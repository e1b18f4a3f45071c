"""A CSV logger that keeps ``metrics.csv`` when a run resumes into its own log directory, and the
TensorBoard event-file ordering a resumed run needs."""
from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["ResumableCSVLogger", "read_epoch_metrics", "wait_past_event_files"]

EVENT_FILE_PREFIX = "events.out.tfevents."


def wait_past_event_files(log_dir, max_wait_s: float = 2.0) -> float:
    """Sleep until the clock's whole second is past that of every TensorBoard event file in ``log_dir``;
    returns the seconds slept.

    TensorBoard reads a run's event files in name order, and a name is ``events.out.tfevents.<second>.
    <host>.<pid>...``. A resumed run whose file is created in the same second as the killed run's can
    sort first (a smaller pid), and TensorBoard then replays the killed run's events after the resumed
    ones, undoing ``purge_step``. A file dated later than ``max_wait_s`` from now (a clock change) is
    not waited for."""
    seconds = []
    for path in Path(log_dir).glob(EVENT_FILE_PREFIX + "*"):
        stamp = path.name[len(EVENT_FILE_PREFIX):].split(".", 1)[0]
        if stamp.isdigit():
            seconds.append(int(stamp))
    delay = (max(seconds) + 1 - time.time()) if seconds else 0.0
    if 0 < delay <= max_wait_s:
        time.sleep(delay)
        return delay
    return 0.0


def read_epoch_metrics(log_dir) -> dict[int, dict[str, float]]:
    """A run's ``metrics.csv`` as ``{epoch: {metric: value}}``, merging the logger's sparse rows (the
    last value of an epoch wins); ``"step"`` is the epoch's last logged step. {} when there is no file."""
    per_epoch: dict[int, dict[str, float]] = {}
    path = os.path.join(log_dir, "metrics.csv")
    if not os.path.isfile(path):
        return per_epoch
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            metrics = per_epoch.setdefault(int(float(row["epoch"])), {})
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    metrics[key] = float(value)
            if row.get("step"):
                metrics["step"] = max(metrics.get("step", 0.0), float(row["step"]))
    return per_epoch


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one appends to it (rewriting the
    header when new columns appear), so ``--ckpt_path last`` keeps the run's earlier rows.

    With ``resume_step`` (the checkpoint's step count) the rows a killed run logged after its last
    checkpoint (``step >= resume_step``) are dropped: the resumed run logs those steps again, so each
    step and each epoch's validation appear once. A row cut short by the kill is dropped too. Every
    rewrite goes to a temporary file that then replaces ``metrics.csv``."""

    def __init__(self, log_dir: str, resume_step: Optional[int] = None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            text = f.read()
        complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]  # a row cut by a kill
        reader = csv.DictReader(io.StringIO(complete))
        rows = list(reader)
        header = list(reader.fieldnames or [])
        kept = rows
        if self._resume_step is not None:
            kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < self._resume_step]
        if complete != text or len(kept) != len(rows):
            self._write_atomically(header, kept)
        self.metrics_keys = sorted(header)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            metrics = list(csv.DictReader(file))
        self._write_atomically(fieldnames, metrics)

    def _write_atomically(self, fieldnames: list[str], rows: list[dict]) -> None:
        local = _is_local_file_protocol(self.metrics_file_path)
        target = f"{self.metrics_file_path}.tmp" if local else self.metrics_file_path  # remote: one upload
        with self._fs.open(target, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        if local:
            os.replace(target, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same ``version_N`` directory.

    Args:
        resume_step: the resumed checkpoint's step count (``_batches_that_stepped``, the step the
            CSV rows carry); rows of a killed run from that step on are dropped, as they are
            logged again (TensorBoard's ``purge_step`` for the CSV file).
    """

    def __init__(self, *args, resume_step: Optional[int] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment
