"""Faults during training: a SIGKILLed run resumes and finishes with nothing lost or repeated, an
unwritable or full disk fails before any training time is spent, ``last.ckpt`` survives a failed
write, and a failing sample / FID step in validation leaves the training state untouched."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
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

TINY_VIT = ["--model.init_args.model_name", "vit_tiny_patch4_32",
            "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"]
TINY_DIT = ["--model.init_args.transformer_kwargs",
            "{num_layers: 1, num_attention_heads: 2, attention_head_dim: 8, patch_size: 4}",
            "--model.init_args.sample_steps", "3", "--model.init_args.num_sample_images", "2"]

KILLER = '''
import os, signal
import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process once training has made `step` optimizer steps: no handler, no cleanup."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


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

    # the resume runs in this process (a fresh process would do the same: all state comes from disk)
    DiffvisionCLI(args=["fit", *common, "--ckpt_path", "last"])
    assert f"resuming from {run_dir / 'checkpoints/last.ckpt'}" in capsys.readouterr().out
    assert not (tmp_path / "killed" / "version_1").exists()  # the same run directory goes on
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
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    real_save = TorchCheckpointIO.save_checkpoint
    writes = []

    def disk_fills_on_the_second_last_ckpt(self, checkpoint, path, storage_options=None):
        path = Path(path)
        if "last.ckpt" in path.name:
            writes.append(path)
        if len(writes) == 2 and writes[-1] == path:  # write half a file, then the disk is full
            real_save(self, checkpoint, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(self, checkpoint, path)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_fills_on_the_second_last_ckpt)
    with pytest.raises(OSError, match=r"writing checkpoint .*/checkpoints/last.ckpt failed \(No space left on "
                                      r"device; \d+ bytes free there\); the previous one is intact") as err:
        run_cli("cifar10_vit", data, tmp_path, *TINY_VIT, "--trainer.max_epochs", "3",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--experiment", "full")
    assert err.value.errno == errno.ENOSPC
    ckpt_dir = tmp_path / "full" / "version_0" / "checkpoints"
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
