"""The experiment runners: sweep specs -> CLI runs -> result.json (skip / resume), and FID of a checkpoint
(diffvision.experiments: specs, sweep, fid_eval)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _training_data import CONFIGS, QUIET, make_cifar_npz
from diffvision.experiments import specs, sweep
from diffvision.lightning import read_epoch_metrics
from diffvision.run_lock import RunDirLock, lock_holder


def write_spec(path: Path, **overrides) -> Path:
    spec = dict(task="classification", config=str(CONFIGS / "cifar10_vit_fractions.yaml"),
                arms={"standard": "vit_tiny_patch4_32",
                       "diff": {"model": "diff_vit_tiny_patch4_32", "model_kwargs": {"num_heads": 1}}},
                epochs={0.1: 4, 1.0: 1}, validations=2, seeds=[0, 1])
    spec.update(overrides)
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))  # None: leave the key out
    return path


def test_spec_jobs_and_commands(tmp_path):
    spec = specs.load_spec(write_spec(tmp_path / "s.yaml"))
    jobs = specs.build_jobs(spec, tmp_path / "runs", None, None, None, ["--data.root", "D"])
    assert len(jobs) == 2 * 2 * 2
    # longest first (cost = fraction x epochs): the short runs fill the gaps at the end
    assert [j.cost for j in jobs] == sorted((j.cost for j in jobs), reverse=True)
    assert {j.name for j in jobs} >= {"standard_f010_s0", "diff_f100_s1"}
    job = next(j for j in jobs if j.name == "diff_f010_s1")
    assert job.epochs == 4 and job.val_every == 2  # 2 validations, the last at the final epoch
    cmd = specs.fit_command(spec, job)
    assert cmd[cmd.index("--data.data_fraction") + 1] == "0.1" and cmd[cmd.index("--seed_everything") + 1] == "1"
    assert cmd[cmd.index("--data.fraction_seed") + 1] == "1"  # the seed picks the subset too: arms are paired
    kwargs = json.loads(cmd[cmd.index("--model.init_args.model_kwargs") + 1])
    assert kwargs == {"depth": 6, "drop_path_rate": 0.1, "num_heads": 1}  # per-arm keywords over the config's
    assert cmd[-4:] == ["--data.root", "D", "--ckpt_path", "last"]
    only = specs.build_jobs(spec, tmp_path, ["diff"], [1.0], [0], ["--trainer.max_epochs", "3"])
    assert [(j.name, j.epochs) for j in only] == [("diff_f100_s0", 3)]  # an override after -- wins


@pytest.mark.parametrize("epochs, validations, interval", [(20, 10, 2), (500, 10, 50), (7, 10, 1), (50, 10, 5),
                                                           (30, 4, 6), (9, 2, 3)])
def test_validation_interval_divides_the_epochs(epochs, validations, interval):
    assert specs.validation_interval(epochs, validations) == interval and epochs % interval == 0


@pytest.mark.parametrize("change, message", [
    (dict(task="segmentation"), "task must be one of"),
    (dict(colour="red"), "unknown keys"),
    (dict(epochs={1.5: 3}), "epochs maps a fraction"),
    (dict(arms={"diff": {"name": "x"}}), "arms.diff"),
    (dict(task="generation", config=str(CONFIGS / "cifar10_dit_fractions.yaml"), arms={"v2": "diffv3"}),
     r"unknown attn_kind 'diffv3' \(did you mean 'diffv2'"),
])
def test_bad_specs_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        spec = specs.load_spec(write_spec(tmp_path / "s.yaml", **change))
        specs.build_jobs(spec, tmp_path, None, None, None, [])
    assert specs.fraction_tag(0.01) == "001" and specs.fraction_tag(0.125) == "012p500"


def test_unknown_selection_is_refused(tmp_path):
    spec = specs.load_spec(write_spec(tmp_path / "s.yaml"))
    with pytest.raises(SystemExit, match="unknown arm"):
        specs.build_jobs(spec, tmp_path, ["gda"], None, None, [])


def test_generation_arms_name_an_attn_kind_and_old_specs_still_load(tmp_path):
    spec = specs.load_spec(write_spec(
        tmp_path / "s.yaml", task="generation", config=str(CONFIGS / "cifar10_dit_fractions.yaml"), arms=None,
        kinds={"standard": "standard", "v2_kv1": {"attn_kind": "diffv2", "model_kwargs": {"num_kv_heads": 1}}}))
    assert list(spec["arms"]) == ["standard", "v2_kv1"]  # the spec key's old name, "kinds", is read as "arms"
    job = next(j for j in specs.build_jobs(spec, tmp_path, ["v2_kv1"], [1.0], [0], []))
    cmd = specs.fit_command(spec, job)
    assert cmd[cmd.index("--model.init_args.attn_kind") + 1] == "diffv2"
    assert json.loads(cmd[cmd.index("--model.init_args.transformer_kwargs") + 1])["num_kv_heads"] == 1


def test_sweep_runs_writes_results_and_skips_finished_runs(tmp_path, capsys):
    data = make_cifar_npz(tmp_path / "cifar", per_class_train=4, per_class_test=2)
    spec_path = write_spec(tmp_path / "s.yaml", arms={"diff": "diff_vit_tiny_patch4_32"}, epochs={0.5: 2},
                           seeds=[3])
    extra = ["--data.root", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0",
             "--data.batch_size", "10", "--data.eval_batch_size", "10", "--trainer.precision", "32-true",
             "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 1}", *QUIET]
    root = tmp_path / "runs"
    argv = [str(spec_path), "--root", str(root), "--gpus", "--", *extra]
    assert sweep.main(argv) == 0
    result = json.loads((root / "diff_f050_s3" / "result.json").read_text())
    metrics = read_epoch_metrics(root / "diff_f050_s3" / "version_0")
    assert result["final"]["val/acc1"] == metrics[1]["val/acc1"] and result["epochs"] == 2
    assert result["fraction"] == 0.5 and result["seed"] == 3 and result["kind"] == "diff"
    model = torch.load(root / "diff_f050_s3" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert result["params"] == sum(v.numel() for k, v in model["state_dict"].items() if k.startswith("model."))
    subset = json.loads((root / "diff_f050_s3" / "version_0" / "subset_indices.json").read_text())
    assert subset["data_fraction"] == 0.5 and subset["fraction_seed"] == 3 and subset["num_samples"] == 20
    assert "--ckpt_path last" in result["command"]
    capsys.readouterr()
    assert sweep.main(argv) == 0  # everything done: nothing runs again
    assert "1 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "diff_f050_s3").glob("version_*")) == ["version_0"]


def test_wall_time_counts_every_attempt_of_a_resumed_run(tmp_path, capsys):
    data = make_cifar_npz(tmp_path / "cifar", per_class_train=4, per_class_test=2)
    spec_path = write_spec(tmp_path / "s.yaml", arms={"standard": "vit_tiny_patch4_32"}, epochs={0.5: 2}, seeds=[0])
    extra = ["--data.root", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0",
             "--data.batch_size", "10", "--trainer.precision", "32-true",
             "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 1}", *QUIET]
    root, run = tmp_path / "runs", tmp_path / "runs" / "standard_f050_s0"
    assert sweep.main([str(spec_path), "--root", str(root), "--gpus", "--time-limit", "3", "--", *extra]) == 0
    assert "1 stopped" in capsys.readouterr().out and not (run / "result.json").exists()
    (first,) = json.loads((run / "attempts.json").read_text())
    assert first["seen"] - first["start"] >= 2.5  # alive until the limit killed it
    assert sweep.main([str(spec_path), "--root", str(root), "--gpus", "--", *extra]) == 0
    attempts = json.loads((run / "attempts.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert attempts[0] == first and len(attempts) == result["attempts"] == 2
    assert result["wall_s"] == round(sum(a["seen"] - a["start"] for a in attempts), 1)
    assert result["wall_s"] > first["seen"] - first["start"]


def test_an_attempt_killed_with_the_sweep_counts_until_its_last_heartbeat(tmp_path):
    job = specs.Job("standard", "vit_tiny_patch4_32", {}, 1.0, 0, 1, 1, tmp_path, cost=1.0)
    job.dir.mkdir(parents=True)
    sweep.record_attempt(job, 100.0, new=True)
    sweep.record_attempt(job, 130.0)  # heartbeat; then the whole sweep is SIGKILLed: no final record
    sweep.record_attempt(job, 200.0, new=True)  # the next sweep resumes it
    attempts = sweep.record_attempt(job, 260.0)
    assert attempts == [{"start": 100.0, "seen": 130.0}, {"start": 200.0, "seen": 260.0}]
    assert sweep.attempts_wall_s(attempts) == 90.0


def test_fid_eval_of_a_checkpoint(tmp_path):
    """fid_eval (train/fid_eval.py): balanced classes from the EMA pipeline, FID against the reference split, a grid."""
    import lightning.pytorch as pl

    from diffvision.data import ImageDataModule
    from diffvision.experiments import fid_eval
    from diffvision.lightning import DiffusionModule

    data = make_cifar_npz(tmp_path / "cifar", per_class_train=2, per_class_test=1)
    dm = ImageDataModule("cifar10_npz", root=str(data), augment="diffusion", batch_size=10, num_workers=0,
                         cache_dir=str(tmp_path / "cache"))
    module = DiffusionModule(transformer_kwargs={"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                                 "patch_size": 8}, sample_steps=2, num_sample_images=0,
                             fid_num_samples=0)
    trainer = pl.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "fid.json"
    assert fid_eval.main([str(ckpt), "--num-samples", "20", "--steps", "2", "--batch-size", "10",
                          "--reference-limit", "12", "--out", str(out), "--data-root", str(data)]) == 0
    summary = json.loads(out.read_text())
    assert np.isfinite(summary["fid"]) and summary["fid"] > 0
    assert summary["fid_num_samples"] == 20 and summary["fid_reference"] == "cifar10_npz train (12 images)"
    from PIL import Image

    grid = Image.open(summary["grid"])  # one row per class, 2 samples of each (20 samples, 10 classes)
    assert grid.size == (2 * 33 + 1, 10 * 33 + 1)
    with pytest.raises(SystemExit):
        fid_eval.main([str(tmp_path / "missing.ckpt")])


PAUSE = (Path(__file__).parent / "_fault_callbacks.py").read_text()  # written as pause.py beside a run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_sweep_and_kills_its_fits(tmp_path):
    """A SIGTERM (a job scheduler's stop) used to kill the sweep alone: its fit, in a process group of its own,
    kept training, and a restarted sweep started a second fit into the same run directory."""
    data = make_cifar_npz(tmp_path / "cifar", per_class_train=4, per_class_test=2)
    spec_path = write_spec(tmp_path / "s.yaml", arms={"standard": "vit_tiny_patch4_32"}, epochs={1.0: 2}, seeds=[0])
    (tmp_path / "pause.py").write_text(PAUSE)
    flags = tmp_path / "flags"
    flags.mkdir()
    extra = ["--data.root", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0",
             "--data.batch_size", "10", "--trainer.precision", "32-true",
             "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 32, num_heads: 1}", *QUIET,
             "--trainer.callbacks+=pause.PauseAtStep", "--trainer.callbacks.step", "2",
             "--trainer.callbacks.flags", str(flags)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(specs.REPO), os.environ.get("PYTHONPATH", "")])}
    sweeper = subprocess.Popen([sys.executable, str(specs.REPO / "train" / "sweep.py"), str(spec_path), "--root",
                                str(tmp_path / "runs"), "--gpus", "--", *extra], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    fit_pid = None
    try:
        deadline = time.time() + 180
        while not (flags / "ready").exists():
            assert sweeper.poll() is None and time.time() < deadline, sweeper.communicate()[0][-3000:]
            time.sleep(0.1)
        fit_pid = int((flags / "ready").read_text())
        sweeper.send_signal(signal.SIGTERM)
        out, _ = sweeper.communicate(timeout=60)
        assert sweeper.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "stopped standard_f100_s0 (SIGTERM)" in out and "terminated by SIGTERM" in out
        assert not _alive(fit_pid)  # killed with the sweep, not left training
        assert lock_holder(tmp_path / "runs" / "standard_f100_s0" / "version_0") is None
    finally:
        (flags / "go").touch()
        if fit_pid is not None and _alive(fit_pid):
            os.kill(fit_pid, signal.SIGKILL)
        if sweeper.poll() is None:
            sweeper.kill()


def test_a_job_whose_run_directory_has_a_live_writer_is_skipped(tmp_path, capsys):
    """A fit still running from a SIGKILLed sweep holds its run directory: the restarted sweep must not
    start a second fit into it (before: 11 steps and a validation logged twice, and the job reported done)."""
    spec_path = write_spec(tmp_path / "s.yaml", arms={"standard": "vit_tiny_patch4_32"}, epochs={1.0: 1}, seeds=[0])
    root = tmp_path / "runs"
    run_dir = root / "standard_f100_s0" / "version_0"
    lock = RunDirLock(run_dir).acquire()  # the orphaned fit
    try:
        status = sweep.run_sweep(specs.load_spec(spec_path), specs.build_jobs(
            specs.load_spec(spec_path), root, None, None, None, []), [None], 1, None, None)
    finally:
        lock.release()
    assert status == {"standard_f100_s0": "running elsewhere"}
    assert f"skip standard_f100_s0: {run_dir} is being written by pid {os.getpid()}" in capsys.readouterr().out
    assert not (root / "standard_f100_s0" / "fit.log").exists() and not (root / "standard_f100_s0" / "attempts.json").exists()


def test_a_sweep_job_log_keeps_the_traceback_of_a_failure(tmp_path):
    # the diffvision command prints one line per error; an unattended job's log needs the whole traceback
    job = specs.Job(arm="a", model="m", model_kwargs={}, fraction=1.0, seed=0, epochs=1, val_every=1,
                    root=tmp_path, cost=1.0)
    command = [sys.executable, "-c", "import sys; from diffvision.cli import main; sys.exit(main(['fit', '--data.root', "
               "'/nonexistent', '--data.dataset', 'cifar10_npz', '--model', 'diffvision.lightning.ImageClassifier']))"]
    proc, log = sweep.launch(command, job, None, "fit")
    assert proc.wait(timeout=300) != 0
    log.close()
    text = (job.dir / "fit.log").read_text()
    assert "Traceback (most recent call last)" in text and "/nonexistent" in text
