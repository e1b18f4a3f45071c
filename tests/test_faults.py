"""Faults during training: a SIGKILLed run resumes and finishes with nothing lost or repeated, an
unwritable or full disk fails before any training time is spent, ``last.ckpt`` survives a failed
write, and a failing sample / FID step in validation leaves the training state untouched."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _configs import config_args
from _training_data import QUIET, make_cifar_npz
from diffvision.cli import DiffvisionCLI, checkpoint_size_estimate
from diffvision.run_lock import RunDirLock, was_interrupted

TINY_VIT = ["--model.init_args.model_name", "vit_tiny_patch4_32",
            "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"]
TINY_DIT = ["--model.init_args.transformer_kwargs",
            "{num_layers: 1, num_attention_heads: 2, attention_head_dim: 8, patch_size: 4}",
            "--model.init_args.sample_steps", "3", "--model.init_args.num_sample_images", "2"]

KILLER = (Path(__file__).parent / "_fault_callbacks.py").read_text()  # written as killer.py beside a run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    make_cifar_npz(base / "cifar10", per_class_train=10, per_class_test=2)  # 100 train, 20 test
    return SimpleNamespace(cifar=base / "cifar10", cache=base / "cache")


def cli_args(config: str, data, root: Path, *extra: str, cache: Path = None) -> list[str]:
    return [*config_args(config), "--data.root", str(data.cifar),
            "--data.cache_dir", str(cache or data.cache), "--data.num_workers", "0", "--data.batch_size", "20",
            "--trainer.default_root_dir", str(root), *QUIET, *extra]


def run_cli(config, data, root, *extra, cache=None):
    return DiffvisionCLI(args=["fit", *cli_args(config, data, root, *extra, cache=cache)])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, then --ckpt_path last
# ---------------------------------------------------------------------------------------------

def test_sigkilled_run_resumes_with_the_same_subset_and_no_lost_or_repeated_epochs(data, tmp_path, capsys):
    (tmp_path / "killer.py").write_text(KILLER)
    script = shutil.which("diffvision", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "diffvision.cli"]
    common = cli_args("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3",
                      "--trainer.log_every_n_steps", "1", "--trainer.deterministic", "true",
                      "--data.data_fraction", "0.5", "--experiment", "killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # 50 images / 20 per batch = 3 steps per epoch: killed after step 5, in the middle of epoch 1
    first = subprocess.run(cmd + ["fit", *common, "--trainer.callbacks+=killer.KillAtStep",
                                  "--trainer.callbacks.step", "5"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    run_dir = tmp_path / "killed" / "version_0"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 3)  # the end of epoch 0: the last complete state
    subset_before = json.loads((run_dir / "subset_indices.json").read_text())
    logged_before = read_rows(run_dir / "metrics.csv")
    assert max(int(r["step"]) for r in logged_before) >= 3  # the killed run logged work the resume repeats
    assert not list(run_dir.glob("checkpoints/.*"))  # no partial checkpoint: the kill hit between saves
    killed_writer = json.loads((run_dir / ".writer.lock").read_text())
    assert killed_writer["state"] == "running" and killed_writer["pid"] != os.getpid()  # died holding the lock

    # the resume runs in this process (a fresh process would do the same: all state comes from disk)
    DiffvisionCLI(args=["fit", *common, "--ckpt_path", "last"])
    assert f"resuming from {run_dir / 'checkpoints/last.ckpt'}" in capsys.readouterr().out
    assert not (tmp_path / "killed" / "version_1").exists()  # the same run directory goes on
    # the dead writer's lock did not stand in the way; this process took it and released it, finished
    assert json.loads((run_dir / ".writer.lock").read_text()) | {"since": 0} == {
        "pid": os.getpid(), "host": killed_writer["host"], "since": 0, "state": "finished"}
    final = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 9)

    # the same training subset, on disk and in the checkpoint
    subset_after = json.loads((run_dir / "subset_indices.json").read_text())
    assert subset_after["sha1"] == subset_before["sha1"] and subset_after["indices"] == subset_before["indices"]
    sha1 = hashlib.sha1(torch.tensor(subset_after["indices"]).numpy().astype("<i8").tobytes()).hexdigest()
    assert final["ImageDataModule"]["subset_sha1"] == sha1 and subset_after["num_samples"] == 50

    # every epoch validated exactly once, every training step logged exactly once
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows if r.get("val/acc1")] == [0, 1, 2]
    steps = Counter(int(r["step"]) for r in rows if r.get("train/loss_step"))
    assert sorted(steps) == list(range(9)) and set(steps.values()) == {1}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()  # TensorBoard drops the killed run's later events
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(9))
    assert [e.step for e in events.Scalars("val/acc1")] == [2, 5, 8]

    # no lost work: the weights equal an uninterrupted run's
    straight = run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3",
                       "--trainer.deterministic", "true", "--data.data_fraction", "0.5", "--experiment", "straight")
    reference = torch.load(Path(straight.trainer.log_dir) / "checkpoints/last.ckpt", map_location="cpu",
                           weights_only=True)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # and the disk-space check's size estimate is right for this checkpoint
    size = (run_dir / "checkpoints/last.ckpt").stat().st_size
    assert 0.8 * size <= checkpoint_size_estimate(straight.model) <= 1.2 * size


# ---------------------------------------------------------------------------------------------
# Unwritable or full disks fail before any data is decoded or any step is trained
# ---------------------------------------------------------------------------------------------

def test_log_dir_below_a_regular_file_fails_before_any_work(data, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should go")
    cache = tmp_path / "cache"
    with pytest.raises(NotADirectoryError, match=rf"log directory \(trainer.default_root_dir\) {blocker}/runs "
                                                 rf"cannot be created: {blocker} is a file"):
        run_cli("cifar10_vit", data, blocker / "runs", *TINY_VIT, cache=cache)
    assert not cache.exists()  # nothing was decoded


def test_checkpoint_dir_below_a_regular_file_fails_before_any_work(data, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"checkpoint directory \(checkpoint.dirpath\)"):
        run_cli("cifar10_vit", data, tmp_path / "runs", *TINY_VIT, "--checkpoint.dirpath", str(blocker / "ckpt"),
                cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 0o500 directory anyway (see the regular-file test)")
def test_read_only_log_dir_fails_before_any_work(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=rf"{locked}/runs is not writable"):
            run_cli("cifar10_vit", data, locked / "runs", *TINY_VIT, cache=tmp_path / "cache")
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "cache").exists()


def test_full_disk_fails_before_any_work(data, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # what a full disk answers when the probe file is flushed
    with pytest.raises(OSError, match=rf"{tmp_path}/runs is not writable \(No space left on device\)") as err:
        run_cli("cifar10_vit", data, tmp_path / "runs", *TINY_VIT, cache=tmp_path / "cache")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "runs")
    assert not (tmp_path / "cache").exists()
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # the probe file is gone too


def test_too_little_space_for_a_checkpoint_fails_before_training(data, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    with pytest.raises(OSError, match=rf"not enough disk space for checkpoints in log directory "
                                      rf"\(trainer.default_root_dir\) {tmp_path}/runs: 0.0 MiB free, a checkpoint "
                                      rf"of this model takes about 0.\d MiB") as err:
        run_cli("cifar10_vit", data, tmp_path / "runs", *TINY_VIT, cache=tmp_path / "cache")
    assert err.value.errno == errno.ENOSPC
    assert not (tmp_path / "cache").exists()  # stopped before the data was decoded, let alone trained on
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------
# last.ckpt is replaced atomically
# ---------------------------------------------------------------------------------------------

def test_a_failed_checkpoint_write_leaves_the_previous_last_ckpt_whole(data, tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open
    writes = []

    class FullDisk(io.BufferedWriter):
        """A file on a disk that is full after half of the checkpoint's bytes."""

        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    def disk_fills_on_the_second_last_ckpt(file, mode="r", *args, **kwargs):
        path = Path(str(file))
        if "last.ckpt" in path.name and "w" in mode:
            writes.append(path)
            if len(writes) == 2:
                return FullDisk(io.FileIO(path, "w"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", disk_fills_on_the_second_last_ckpt)
    with pytest.raises(OSError, match=r"writing checkpoint .*/checkpoints/last.ckpt failed \(No space left on "
                                      r"device; \d+ bytes free there\); the previous one is intact") as err:
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--experiment", "full")
    assert err.value.errno == errno.ENOSPC
    ckpt_dir = tmp_path / "full" / "version_0" / "checkpoints"
    monkeypatch.undo()
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)  # whole, loadable
    assert (last["epoch"], last["global_step"]) == (0, 2)  # epoch 0's state; epoch 1's write failed
    assert not list(ckpt_dir.glob(".last.ckpt*"))  # the partial file is removed
    assert all(p.parent == ckpt_dir and p.name == ".last.ckpt.partial" for p in writes)


def _recorded_last_ckpt_writes(monkeypatch) -> list[tuple[int, int]]:
    """(epoch, global_step) of every last.ckpt write, as read back from the file just written."""
    from diffvision.lightning import LastCheckpoint

    real_save, writes = LastCheckpoint._save_checkpoint, []

    def save_and_record(self, trainer, filepath):
        real_save(self, trainer, filepath)
        ckpt = torch.load(filepath, map_location="cpu", weights_only=True)
        writes.append((ckpt["epoch"], ckpt["global_step"]))

    monkeypatch.setattr(LastCheckpoint, "_save_checkpoint", save_and_record)
    return writes


@pytest.mark.parametrize("stop", ["max_epochs", "max_steps", "callback"])
def test_last_ckpt_every_n_epochs_still_writes_the_final_epoch(data, tmp_path, monkeypatch, stop):
    writes = _recorded_last_ckpt_writes(monkeypatch)
    end = {"max_epochs": ["--trainer.max_epochs", "5"],  # 5 epochs of 2 steps
           "max_steps": ["--trainer.max_epochs", "9", "--trainer.max_steps", "10"],
           "callback": ["--trainer.max_epochs", "9", "--trainer.callbacks+=diffvision.lightning.StopAfterEpochs",
                        "--trainer.callbacks.epochs", "5"]}[stop]
    run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, *end, "--checkpoint.every_n_epochs", "2",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--experiment", "sparse")
    assert writes == [(1, 4), (3, 8), (4, 10)]  # epochs 2 and 4 by the interval, then the last one
    last = torch.load(tmp_path / "sparse/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (4, 10)


def test_last_ckpt_writes_every_epoch_by_default(data, tmp_path, monkeypatch):
    writes = _recorded_last_ckpt_writes(monkeypatch)
    run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1")
    assert writes == [(0, 2), (1, 4), (2, 6)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_last_ckpt_interval_must_be_a_positive_int(bad):
    from diffvision.lightning import LastCheckpoint

    with pytest.raises(ValueError, match=rf"every_n_epochs must be a positive int, got {bad!r}"):
        LastCheckpoint(every_n_epochs=bad)


# ---------------------------------------------------------------------------------------------
# A failing sample grid / FID at validation does not touch the training state
# ---------------------------------------------------------------------------------------------

def test_failing_samples_and_fid_leave_the_training_state_as_without_them(data, tmp_path, monkeypatch, caplog):
    from diffusers import DDIMScheduler

    common = [*TINY_DIT, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.num_sanity_val_steps", "0", "--trainer.deterministic", "true", "--data.batch_size", "4"]
    plain = run_cli("cifar10_dit+diff", data, tmp_path, *common, "--model.init_args.num_sample_images", "0",
                    "--model.init_args.fid_num_samples", "0", "--experiment", "plain")

    real_step, calls = DDIMScheduler.step, []

    def step_fails_midway(self, *args, **kwargs):  # the sampler breaks after one of its three steps
        calls.append(1)
        if len(calls) % 3 == 2:
            raise RuntimeError("sampler step exploded")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", step_fails_midway)
    with caplog.at_level("ERROR", logger="diffvision.lightning"):
        faulty = run_cli("cifar10_dit+diff", data, tmp_path, *common, "--model.init_args.fid_num_samples", "4",
                         "--model.init_args.fid_weights_path", str(tmp_path / "no_inception.pt"),
                         "--experiment", "faulty")
    assert faulty.trainer.state.finished and faulty.trainer.current_epoch == 2
    assert "sample grid failed" in caplog.text and "sampler step exploded" in caplog.text
    assert "no_inception.pt does not exist" in faulty.model.fid_callback.error  # FID's own failure: disabled, logged
    a = torch.load(Path(plain.trainer.log_dir) / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(Path(faulty.trainer.log_dir) / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]) == (1, 4)
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    for key in a["state_dict"]:  # weights, EMA weights and its counter: as if nothing had failed
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the interrupted sampler left no module in eval mode
    assert [m.training for m in faulty.model.modules()] == [m.training for m in plain.model.modules()]


def test_a_resumed_runs_event_file_sorts_after_the_killed_runs(tmp_path):
    """TensorBoard reads event files in name order (<second>.<host>.<pid>): a file made in the same second
    by a smaller pid sorts first, and the killed run's events are then replayed after the resumed ones
    (seen as [3, 4, 5, 6, 7, 8, 0, 1, 2, 3] in the SIGKILL test above). The CLI waits past that second."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from diffvision.lightning import wait_past_event_files

    def log(steps, **kw):
        writer = SummaryWriter(str(tmp_path), **kw)
        for step in steps:
            writer.add_scalar("loss", float(step), step)
        writer.close()

    log(range(6))  # the killed run
    killed = next(tmp_path.glob("events.out.tfevents.*"))
    # as if the killed run had a larger pid than the resuming process, in the current second
    now = int(time.time())
    killed.rename(tmp_path / f"events.out.tfevents.{now}.host.999999999.0")
    slept = wait_past_event_files(tmp_path)
    assert time.time() >= now + 1 and slept > 0
    log(range(3, 9), purge_step=3)  # the resumed run
    steps = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("loss")]
    assert steps == list(range(9))
    assert wait_past_event_files(tmp_path / "empty") == 0.0  # nothing to wait for


# ---------------------------------------------------------------------------------------------
# Issue 20: one writer per run, kills before the first checkpoint, disks and $TMPDIR, divergence
# ---------------------------------------------------------------------------------------------

def cli_command(tmp_path: Path) -> tuple[list[str], dict]:
    """``diffvision`` as a subprocess, with the fault-injecting callbacks (KILLER) importable."""
    (tmp_path / "killer.py").write_text(KILLER)
    script = shutil.which("diffvision", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return ([script] if script else [sys.executable, "-m", "diffvision.cli"]), env


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_first(data, tmp_path):
    """Two `--ckpt_path last` resumes of one run at once: the second fails before writing anything (before,
    both exited 0 and metrics.csv got duplicated rows and a `-v1` checkpoint)."""
    from diffvision.run_lock import RunDirLockedError

    cmd, env = cli_command(tmp_path)
    flags = tmp_path / "flags"
    flags.mkdir()
    common = cli_args("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "2", "--experiment", "busy",
                      "--trainer.log_every_n_steps", "1", "--checkpoint.monitor", "null")
    DiffvisionCLI(args=["fit", *common, "--trainer.max_epochs", "1"])  # epoch 0: last.ckpt to resume from
    first = subprocess.Popen(cmd + ["fit", *common, "--ckpt_path", "last", "--trainer.callbacks+=killer.PauseAtStep",
                                    "--trainer.callbacks.step", "7", "--trainer.callbacks.flags", str(flags)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        wait_for(flags / "ready", first)  # the first resume is mid-epoch 1, holding the run directory
        pid = (flags / "ready").read_text()
        run_dir = tmp_path / "busy" / "version_0"
        before = sorted(p.name for p in run_dir.rglob("*"))
        with pytest.raises(RunDirLockedError, match=rf"run directory {run_dir} is being written by pid {pid} on "):
            DiffvisionCLI(args=["fit", *common, "--ckpt_path", "last"])
        # an evaluation logs into the run of its checkpoint (issue 19): while that run trains, it is refused too
        with pytest.raises(RunDirLockedError, match=rf"validate logs into the run its checkpoint belongs to, {run_dir}, "
                                                    rf"and pid {pid} on .* is writing it"):
            DiffvisionCLI(args=["validate", *common, "--ckpt_path", "last"])
        assert sorted(p.name for p in run_dir.rglob("*")) == before  # the refused runs wrote nothing
    finally:
        (flags / "go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rows = read_rows(run_dir / "metrics.csv")
    steps = Counter(int(r["step"]) for r in rows if r.get("train/loss_step"))
    assert sorted(steps) == list(range(10)) and set(steps.values()) == {1}
    assert [int(r["epoch"]) for r in rows if r.get("val/acc1")] == [0, 1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    assert json.loads((run_dir / ".writer.lock").read_text())["state"] == "finished"


def test_a_run_killed_before_its_first_checkpoint_restarts_in_the_same_version(data, tmp_path):
    """A SIGKILL while subset_indices.json is being written (before any checkpoint): `--ckpt_path last`
    starts that run over in its own version_0, with no half-written file left (before: version_1 and an
    orphaned version_0 holding a 0-byte subset_indices.json)."""
    cmd, env = cli_command(tmp_path)
    common = cli_args("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "1", "--experiment", "early",
                      "--trainer.log_every_n_steps", "1")
    killed = subprocess.run(cmd + ["fit", *common, "--trainer.callbacks+=killer.KillWhileWriting",
                                   "--trainer.callbacks.name", "subset_indices"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "early" / "version_0"
    assert not list(run_dir.rglob("*.ckpt"))
    cli = DiffvisionCLI(args=["fit", *common, "--ckpt_path", "last"])
    assert Path(cli.trainer.log_dir) == run_dir and not (tmp_path / "early" / "version_1").exists()
    assert not [p for p in run_dir.rglob("*") if p.is_file() and (p.stat().st_size == 0 or ".partial" in p.name)]
    assert json.loads((run_dir / "subset_indices.json").read_text())["num_samples"] == 100
    steps = Counter(int(r["step"]) for r in read_rows(run_dir / "metrics.csv") if r.get("train/loss_step"))
    assert sorted(steps) == list(range(5)) and set(steps.values()) == {1}


def test_checkpoints_are_not_staged_in_tmpdir(data, tmp_path, monkeypatch):
    """A full (or unwritable) $TMPDIR: Lightning staged every checkpoint there (then moved it, a copy across
    filesystems), so an epoch trained and then failed with a bare `OSError: [Errno 28]` naming no file, and
    a kill left /tmp/tmpXXXX behind. Checkpoints are now written beside their final name."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def tmpdir_full(*args, **kwargs):
        if kwargs.get("dir") is None and (len(args) < 3 or args[2] is None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", tmpdir_full)
    cli = run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "2",
                  "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--experiment", "tmp")
    ckpt_dir = Path(cli.trainer.log_dir) / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert [p.name for p in ckpt_dir.glob("epoch=*.ckpt")] and not list(ckpt_dir.glob(".*"))


def test_disk_space_is_budgeted_for_top_k_last_and_the_one_being_written(data, tmp_path, monkeypatch):
    """best + last + the next one written beside them: 3 checkpoints at the peak (save_top_k=1). With room
    for 2.5 the run used to train an epoch and then fail with ENOSPC."""
    from diffvision.lightning import ImageClassifier

    estimate = checkpoint_size_estimate(ImageClassifier(model_name="vit_tiny_patch4_32", img_size=32,
                                                        model_kwargs=dict(depth=1, embed_dim=32, num_heads=2)))
    usage = namedtuple("usage", "total used free")
    free = int(2.5 * estimate)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - free, free))
    with pytest.raises(OSError, match=r"up to 3 are on disk at once \(1 kept by checkpoint.save_top_k, last.ckpt"):
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "cifar10_vit").exists()  # the version_N claimed for the run is gone again (issue 19)
    with pytest.raises(OSError, match=r"up to 5 are on disk at once \(3 kept"):
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--checkpoint.save_top_k", "3", cache=tmp_path / "cache")
    free = int(3.05 * estimate)  # room for 3: it trains
    cli = run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "1",
                  "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    assert cli.trainer.global_step == 1


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_disk_filling_up_mid_write_leaves_no_truncated_checkpoint(data, tmp_path):
    """A real full disk (a small tmpfs as checkpoint.dirpath, filled after the start-up check): the write
    fails naming the checkpoint and no truncated file stays under a checkpoint's name (before: a truncated
    `epoch=1-step=N.ckpt`, copied in from $TMPDIR until the disk was full, stayed beside the resumed run's
    `-v1`)."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, 8 * 2**20):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (tmp_path / "filler.py").write_text(
            "import os, shutil\nimport lightning.pytorch as pl\n\n\nclass FillDisk(pl.Callback):\n"
            "    def __init__(self, path: str, leave: int) -> None:\n        self.path, self.leave = path, leave\n\n"
            "    def on_train_epoch_start(self, trainer, *args) -> None:\n"
            "        if trainer.current_epoch == 1:\n"
            "            with open(os.path.join(self.path, 'filler'), 'wb') as f:\n"
            "                f.write(b'x' * (shutil.disk_usage(self.path).free - self.leave))\n")
        cmd, env = cli_command(tmp_path)
        common = cli_args("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3", "--experiment", "fill",
                          "--checkpoint.dirpath", str(small / "ckpt"), "--checkpoint.monitor", "null",
                          "--trainer.callbacks+=filler.FillDisk", "--trainer.callbacks.path", str(small),
                          "--trainer.callbacks.leave", "20000")
        run = subprocess.run(cmd + ["fit", *common], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert run.returncode != 0
        # the console script prints the error alone (issue 19: one message, no traceback)
        assert re.search(r"error: \[Errno 28\] writing checkpoint \S+/ckpt/epoch=1-step=10.ckpt failed \(No space "
                         r"left on device; \d+ bytes free there\)", run.stderr), run.stderr[-3000:]
        names = sorted(p.name for p in (small / "ckpt").glob("*.ckpt"))
        assert names == ["epoch=0-step=5.ckpt", "last.ckpt"]  # epoch 0's, whole; nothing of epoch 1
        assert not list((small / "ckpt").glob(".*.partial"))
        for name in names:
            torch.load(small / "ckpt" / name, map_location="cpu", weights_only=True)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_diverged_run_stops_and_keeps_the_last_finite_checkpoint(data, tmp_path, monkeypatch):
    """A NaN weight after step 7 (mid-epoch 1): fit stops with TrainingDivergedError and last.ckpt stays
    epoch 0's finite state (before: the run exited 0 and rewrote last.ckpt with every tensor NaN); resuming
    from a checkpoint of non-finite weights is refused; a NaN loss from the first step stops before any
    checkpoint is written."""
    from diffvision.lightning import TrainingDivergedError

    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    # log_every_n_steps given: the guard reads its accumulated check every 50 steps (here: at the epoch's end);
    # by default LogShortEpochs makes these 5-batch epochs log, and so check, every step (below)
    common = [*TINY_VIT, "--trainer.max_epochs", "3", "--experiment", "nan", "--checkpoint.monitor", "null",
              "--trainer.log_every_n_steps", "50"]
    with pytest.raises(TrainingDivergedError, match=r"training diverged: the training loss was not finite at 3 steps, "
                                                    r"the first at step 8 \(now at epoch 1, step 10\).*"
                                                    r"version_0/checkpoints/last.ckpt keeps the last finite state"):
        run_cli("cifar10_vit", data, tmp_path, *common, "--trainer.callbacks+=killer.PoisonAtStep",
                "--trainer.callbacks.step", "7")
    ckpt_dir = tmp_path / "nan" / "version_0" / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 5)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    with pytest.raises(TrainingDivergedError, match=r"not finite at 1 steps, the first at step 8 \(now at epoch 1, "
                                                    r"step 8\).*version_1/checkpoints/last.ckpt keeps"):
        run_cli("cifar10_vit", data, tmp_path, *common[:-2], "--trainer.callbacks+=killer.PoisonAtStep",
                "--trainer.callbacks.step", "7")

    poisoned = dict(last, state_dict={k: v.clone() for k, v in last["state_dict"].items()})
    next(iter(poisoned["state_dict"].values())).view(-1)[0] = float("nan")
    torch.save(poisoned, tmp_path / "nan.ckpt")
    with pytest.raises(TrainingDivergedError, match=r"weights are not finite before training starts \(1 parameter "
                                                    rf"tensors.*the checkpoint resumed \({tmp_path / 'nan.ckpt'}\)"):
        run_cli("cifar10_vit", data, tmp_path, *common, "--ckpt_path", str(tmp_path / "nan.ckpt"))

    with pytest.raises(TrainingDivergedError, match=r"the training loss was not finite at \d+ steps, the first at "
                                                    r"step \d.*no checkpoint had been written yet"):
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "2", "--experiment", "lr",
                "--model.init_args.optimizer.init_args.lr", "1e30")
    assert not list((tmp_path / "lr").rglob("*.ckpt"))


def test_a_run_killed_while_writing_its_first_last_ckpt_resumes_in_the_same_version(data, tmp_path):
    """Killed as the first last.ckpt was being written (epoch=0-step=5.ckpt already saved): `--ckpt_path last`
    resumes that checkpoint in version_0 (not a fresh version_1) and the half-written file is gone."""
    cmd, env = cli_command(tmp_path)
    common = cli_args("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "2", "--experiment", "first",
                      "--trainer.log_every_n_steps", "1", "--checkpoint.monitor", "null")
    killed = subprocess.run(cmd + ["fit", *common, "--trainer.callbacks+=killer.KillWhileWriting",
                                   "--trainer.callbacks.name", "last.ckpt"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "first" / "version_0"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [".last.ckpt.partial", "epoch=0-step=5.ckpt"]
    # evaluating its checkpoint meanwhile writes into the run (issue 19) and leaves it resumable in place
    record = (run_dir / ".writer.lock").read_text()
    evaluated = DiffvisionCLI(args=["test", *common, "--ckpt_path", str(run_dir / "checkpoints" / "epoch=0-step=5.ckpt")])
    assert Path(evaluated.trainer.log_dir) == run_dir and (run_dir / "config_test.yaml").is_file()
    assert (run_dir / ".writer.lock").read_text() == record and was_interrupted(run_dir)
    cli = DiffvisionCLI(args=["fit", *common, "--ckpt_path", "last"])
    assert Path(cli.trainer.log_dir) == run_dir and not (tmp_path / "first" / "version_1").exists()
    # Lightning keeps the checkpoint a run resumed from; the partial file is gone
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last.ckpt"]
    steps = Counter(int(r["step"]) for r in read_rows(run_dir / "metrics.csv") if r.get("train/loss_step"))
    assert sorted(steps) == list(range(10)) and set(steps.values()) == {1}


def test_an_evaluation_locks_its_run_as_a_visitor_and_puts_the_runs_record_back(tmp_path):
    """validate / test / predict write into a trained run under its lock; the run's own record (here: a training
    killed before its first last.ckpt) must survive the visit, also a visit that is itself killed."""
    import diffvision.run_lock

    run_dir = tmp_path / "version_0"
    RunDirLock(run_dir).acquire().release(finished=False)  # a writer that died: "running", and nobody holds it
    record = (run_dir / ".writer.lock").read_text()
    assert was_interrupted(run_dir)
    visit = RunDirLock(run_dir, visitor=True).acquire()
    assert json.loads((run_dir / ".writer.lock").read_text())["pid"] == os.getpid()
    assert not was_interrupted(run_dir)  # held now
    visit.release(finished=True)
    assert (run_dir / ".writer.lock").read_text() == record and was_interrupted(run_dir)
    # a visitor SIGKILLed mid-visit: its record stays, with the run's state, so the run still reads as interrupted
    killed = subprocess.run([sys.executable, "-c", (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('run_lock', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.RunDirLock(sys.argv[2], visitor=True).acquire(); os.kill(os.getpid(), signal.SIGKILL)"),
        diffvision.run_lock.__file__, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = json.loads((run_dir / ".writer.lock").read_text())
    assert left["pid"] != os.getpid() and left["visitor"] and left["state"] == "running"
    assert was_interrupted(run_dir)  # --ckpt_path last still resumes it in its own version_N
