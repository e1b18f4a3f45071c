"""The runs of issue 17 (configs/sweeps/espformer_catdog*.yaml): the jobs, the arms' parameters, ESPFormer's
LR schedule, and the report that turns their result.json files into the reference table."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _training_data import REPO
from diffvision.experiments import report, specs, tables
from diffvision.lightning import ImageClassifier
from diffvision.lightning.optim import build_lr_scheduler, lr_factor

SPEC = REPO / "configs" / "sweeps" / "espformer_catdog.yaml"
TUNED = REPO / "configs" / "sweeps" / "espformer_catdog_tuned.yaml"


def test_every_seed_trains_on_the_same_subset_for_300_epochs(tmp_path):
    spec = specs.load_spec(SPEC)
    jobs = specs.build_jobs(spec, tmp_path, None, None, None, [])
    assert len(jobs) == 7 * 4 * 3
    for job in jobs:
        command = specs.fit_command(spec, job)
        assert command[command.index("--data.fraction_seed") + 1] == "0"
        assert command[command.index("--seed_everything") + 1] == str(job.seed)
        assert job.epochs == 300 and job.val_every == 10
    tuned = specs.load_spec(TUNED)
    assert set(tuned["arms"]) == {"standard", "diff"} and tuned["fraction_seed"] == 0
    # without the key, the seed picks the subset (every other spec)
    plain = dict(spec)
    del plain["fraction_seed"]
    job = jobs[0]
    assert specs.fit_command(plain, job)[specs.fit_command(plain, job).index("--data.fraction_seed") + 1] == str(job.seed)


def test_a_bad_fraction_seed_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("fraction_seed: 0 ", "fraction_seed: -1 "))
    with pytest.raises(ValueError, match="fraction_seed must be a non-negative int"):
        specs.load_spec(bad)


def test_the_arms_have_the_parameters_the_comparison_needs():
    spec = specs.load_spec(SPEC)
    params = {}
    for arm, entry in spec["arms"].items():
        model = ImageClassifier(model_name=entry["model"], model_kwargs=entry["model_kwargs"], num_classes=2,
                                img_size=32).model
        params[arm] = sum(p.numel() for p in model.parameters())
    base, replica = params["standard"], params["replica"]
    assert params["replica_split_fixed"] == params["replica_no_dropout"] == replica  # the switches add nothing
    assert round(replica / base, 2) == 2.77
    for arm in ("replica_matched", "diff"):  # the baseline's projections (+ biases, λ, norms: < 0.6 %)
        assert abs(params[arm] / base - 1) < 0.006, arm
    assert abs(params["standard_wide"] / replica - 1) < 0.01  # ESPFormer's budget


def test_the_lr_drops_tenfold_at_epoch_250_as_multisteplr():
    """Per-step LambdaLR against torch's MultiStepLR stepped once per epoch (ESPFormer's `lr /= 10` at epoch 250)."""
    steps_per_epoch, epochs = 3, 300
    trainer = SimpleNamespace(estimated_stepping_batches=steps_per_epoch * epochs, num_training_batches=steps_per_epoch,
                              accumulate_grad_batches=1)
    ours = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    scheduler = build_lr_scheduler(ours, trainer, 0, 0, "constant", 0.0, [250], 0.1)["scheduler"]
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    reference = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[250], gamma=0.1)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12), epoch
            ours.step()
            scheduler.step()
        theirs.step()
        reference.step()
    assert lr_factor(10, 0, 100, "cosine", decay_steps=(5, 8), gamma=0.5) == pytest.approx(
        0.25 * 0.5 * (1 + np.cos(np.pi * 0.1)))
    for milestones, gamma, message in (([250, 100], 0.1, "increasing"), ([0], 0.1, "positive"),
                                       ([250], 0.0, "lr_gamma must be")):
        with pytest.raises(ValueError, match=message):
            ImageClassifier(model_name="espformer_vit_patch4_32", num_classes=2, img_size=32,
                            lr_milestones=milestones, lr_gamma=gamma)


def test_the_report_gives_each_arm_and_its_paired_gain_over_the_baseline(tmp_path):
    """train/report.py over result.json files named as the sweep names them: the reference table's rows."""
    spec = specs.load_spec(SPEC)
    rng = np.random.default_rng(0)
    acc = {}
    for job in specs.build_jobs(spec, tmp_path / "runs", None, None, None, []):
        acc[(job.arm, job.fraction, job.seed)] = a = float(rng.uniform(0.5, 0.8))
        job.dir.mkdir(parents=True)
        (job.dir / "result.json").write_text(json.dumps({
            "task": "classification", "kind": job.arm, "model_name": job.model, "model_kwargs": job.model_kwargs,
            "params": 1, "fraction": job.fraction, "seed": job.seed, "epochs": job.epochs,
            "final": {"val/acc1": a}, "wall_s": 1.0, "device": "H200", "command": "fit"}))
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = (out / "classification.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 10% |"))
    gain = 100 * np.array([acc[("replica", 0.1, s)] - acc[("standard", 0.1, s)] for s in (0, 1, 2)])
    assert f"{gain.mean():+.2f} ± {gain.std(ddof=1):.2f} (3)" in row
    assert "| 57.25 | 67.34 |" in row  # the reference table beside it
    header = next(line for line in table.splitlines() if line.startswith("| fraction |"))
    assert all(f" {tables.kind_label(arm)} |" in header for arm in spec["arms"])
    # --baseline replica: what removing each confound of the replica changes, paired by seed
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--baseline", "replica"]) == 0
    table = (out / "classification.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1% |"))
    change = 100 * np.array([acc[("replica_matched", 0.01, s)] - acc[("replica", 0.01, s)] for s in (0, 1, 2)])
    assert f"{change.mean():+.2f} ± {change.std(ddof=1):.2f} (3)" in row
    assert "replica_matched − replica (paired)" in table and "− standard (paired)" not in table
