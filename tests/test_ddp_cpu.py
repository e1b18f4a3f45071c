"""Data-parallel training (Lightning's ``ddp``, two CPU processes over gloo): the parts of issue 21 a CPU can check.

One subprocess (tests/_ddp_runs.py) makes four 2-process ``diffvision fit`` runs in the same two processes:
``straight`` (ViT, 2 epochs, half the data, no randomness in the step), ``first_half`` + ``resumed`` (the same,
stopped after epoch 1 and resumed with ``--ckpt_path last``) and ``dit`` (a tiny DiT with EMA and FID on 7
samples); its RecordRanks callback writes what each rank did. The tests compare that with the run's
subset_indices.json, a one-process run at the same global batch, and an FID computed here on all the images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _training_data import CONFIGS, QUIET, make_cifar_npz
from diffvision.cli import DiffvisionCLI
from diffvision.metrics import build_fid, fid_input

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    make_cifar_npz(base / "cifar10", per_class_train=10, per_class_test=4)  # 100 train, 40 test
    out = base / "out"
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1",
           "DDP_RUNS": f"{out}|{base / 'cifar10'}|{base / 'cache'}",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TESTS / "_ddp_runs.py")], capture_output=True, text=True, env=env,
                          cwd=base, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def record(name):
        return [json.loads((out / "record" / name / f"rank{r}.json").read_text()) for r in (0, 1)]

    return SimpleNamespace(base=base, out=out, record=record, cifar=base / "cifar10", cache=base / "cache")


def last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_ranks_train_on_disjoint_shards_covering_the_subset_every_epoch(runs):
    subset = json.loads((runs.out / "straight/version_0/subset_indices.json").read_text())
    assert subset["data_fraction"] == 0.5 and subset["num_samples"] == 50 == len(subset["indices"])
    labels = np.load(runs.cifar / "train.npz")["labels"]
    ranks = runs.record("straight")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    for epoch in ("0", "1"):
        shard0, shard1 = ranks[0]["indices"][epoch], ranks[1]["indices"][epoch]
        assert len(shard0) == len(shard1) == 25
        assert not set(shard0) & set(shard1), f"epoch {epoch}: both ranks load {sorted(set(shard0) & set(shard1))}"
        assert sorted(shard0 + shard1) == sorted(subset["indices"])
        for r, shard in ((0, shard0), (1, shard1)):  # the batches trained on are those images, in that order
            assert ranks[r]["labels"][epoch] == labels[shard].tolist()
    assert ranks[0]["indices"]["0"] != ranks[0]["indices"]["1"]  # reshuffled every epoch
    # the resumed run's second epoch draws the same shards, in the same order, as the uninterrupted run's
    resumed = runs.record("resumed")
    assert [r["indices"] for r in resumed] == [{"1": r["indices"]["1"]} for r in ranks]


def test_two_processes_train_as_one_process_at_the_same_global_batch(runs, tmp_path):
    """Nothing in the step is random (no drop-path, no augmentation), each rank's batch of 5 is half of the
    one-process batch of 10 (DistributedSampler deals rank r the positions r, r + 2, ... of one permutation),
    and DDP averages the gradients: the two runs take the same steps, up to float summation order."""
    cli = DiffvisionCLI(args=[
        "fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(runs.cifar),
        "--data.cache_dir", str(runs.cache), "--data.num_workers", "0", *QUIET, "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48, drop_path_rate: 0.0}",
        "--data.augment", "none", "--data.data_fraction", "0.5", "--data.batch_size", "10",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path), "--experiment", "one"])
    one, two = last_ckpt(tmp_path / "one/version_0"), last_ckpt(runs.out / "straight/version_0")
    assert one["global_step"] == two["global_step"] == 2 * 5
    assert one["state_dict"].keys() == two["state_dict"].keys()
    start = torch.load(runs.out / "record/straight/rank0.pt", weights_only=False)["start"]
    for key, w1 in one["state_dict"].items():
        w2, tol = two["state_dict"][key], torch.full_like(w1, 1e-6)
        if key.endswith("attn.qkv.bias"):
            # float32 sums in another order, magnified by Adam where the gradient is ~0: the key bias, to which
            # softmax is blind (its gradient is rounding noise)
            tol.view(3, -1)[1] = 5e-5
        assert ((w1 - w2).abs() <= tol).all(), f"{key}: max |diff| {(w1 - w2).abs().max():.2e}"
        assert (w1 - start[key]).abs().max() > 1e-3, f"{key} did not train"  # agreeing, but not untouched
    metrics = runs.record("straight")[0]["metrics"]
    final = cli.trainer.callback_metrics
    # validation over the 40 held-out images, split over the ranks (val/loss averaged across them)
    assert metrics["val/loss"] == pytest.approx(final["val/loss"].item(), rel=1e-4)
    assert metrics["val/acc1"] == pytest.approx(final["val/acc1"].item(), abs=1e-6)


def test_last_ckpt_resumes_a_two_process_run_as_if_uninterrupted(runs):
    """Stopped at the end of epoch 1 of 2 (StopAfterEpochs), resumed with --ckpt_path last, on the CPU: the same
    weights and optimizer state as the run that went straight through."""
    straight, resumed = last_ckpt(runs.out / "straight/version_0"), last_ckpt(runs.out / "resume/version_0")
    assert not (runs.out / "resume/version_1").exists()  # resumed in its own run directory
    assert resumed["global_step"] == straight["global_step"] == 10 and resumed["epoch"] == straight["epoch"]
    for key, w in straight["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][key], w, rtol=0, atol=1e-6), key
    adam_straight, adam_resumed = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for i, state in adam_straight.items():
        assert torch.allclose(adam_resumed[i]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_ema_and_fid_under_ddp(runs):
    ranks = [torch.load(runs.out / "record/dit" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # the EMA is updated from the same (all-reduced) weights on both ranks
    for key, w in ranks[0]["ema"].items():
        assert torch.equal(ranks[1]["ema"][key], w), key
    assert any(not torch.equal(ranks[0]["ema"][k], w) for k, w in ranks[0]["online"].items())  # an average, not a copy
    ckpt = last_ckpt(runs.out / "dit/version_0")
    for key, w in ranks[0]["ema"].items():
        assert torch.equal(ckpt["state_dict"][f"ema.module.{key}"], w), key
    # FID once, on all 7 samples: the ranks generate 3 + 4 (not 4 + 4) and take as many held-out images
    fakes = [torch.cat(r["fake"]) for r in ranks]
    assert [len(f) for f in fakes] == [3, 4]
    reals = [torch.cat(r["real"])[:len(f)] for r, f in zip(ranks, fakes)]
    metrics = [r["metrics"] for r in runs.record("dit")]
    assert metrics[0]["val/fid"] == metrics[1]["val/fid"]
    fid = build_fid()
    fid.update(fid_input(torch.cat(reals)), real=True)
    fid.update(fid_input(torch.cat(fakes)), real=False)
    assert fid.real_features_num_samples == fid.fake_features_num_samples == 7
    assert metrics[0]["val/fid"] == pytest.approx(fid.compute().item(), rel=1e-3)
