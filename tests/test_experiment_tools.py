"""The experiment tools: attention maps (modules' ``attention_maps``, diffvision.experiments.attention_*,
train/attention_maps.py) and the run report (diffvision.experiments.report, train/report.py), against
float64 forwards, closed forms and numpy; and the thin train/ scripts' command lines."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from _training_data import REPO, make_cifar_npz
from diffvision.attention import create_attention
from diffvision.experiments import attention_maps, attention_report, report, results, tables
from diffvision.experiments.runs import discover


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.3 if p.dim() > 1 else 0.5)
                    + (p.dim() == 1) * 0.2)
    return module


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()


# ---------------------------------------------------------------------------------------------
# attention_maps on the modules: the maps reproduce forward
# ---------------------------------------------------------------------------------------------

MODULES = {"standard": dict(num_heads=4), "diff": dict(num_heads=2), "gda": dict(signal_heads=4, noise_heads=2),
           "diffv2": dict(num_heads=4)}


@pytest.mark.parametrize("masking", ["none", "bool", "additive", "causal", "per_head"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_attention_maps_reproduce_the_module_forward_in_float64(kind, masking):
    torch.manual_seed(0)
    B, N, C = 2, 9, 48
    m = randomise(create_attention(kind, C, qkv_bias=True, qk_norm=True, **MODULES[kind]).double()).eval()
    x = torch.randn(B, N, C, dtype=torch.float64)
    mask, causal = None, masking == "causal"
    if masking == "bool":
        mask = torch.rand(B, 1, N, N) > 0.3
        mask[..., 0] = True  # every query keeps a key
    elif masking == "additive":
        mask = torch.randn(B, 1, N, N, dtype=torch.float64)
    elif masking == "per_head":  # a mask per (signal / query) head: GDA's shared noise maps differ per head then
        heads = {"standard": getattr(m, "num_heads", 0), "diffv2": 2 * getattr(m, "num_heads", 0)}.get(
            kind, getattr(m, "signal_heads", 0))
        mask = torch.rand(B, heads, N, N) > 0.3
        mask[..., 0] = True
    with torch.no_grad():
        expected = m(x, attn_mask=mask, is_causal=causal)
        maps = m.attention_maps(x, attn_mask=mask, is_causal=causal)
        if kind == "standard":
            assert set(maps) == {"attention"}
            v = m.qkv(x).view(B, N, 3, m.num_heads, m.head_dim)[:, :, 2].transpose(1, 2)
            heads = maps["attention"] @ v
        elif kind == "diffv2":
            assert set(maps) == {"signal", "noise", "difference", "lambda"}
            *_, v = m.split_qkv(x)  # (B, h_kv, N, d): output head i reads value head i // (h / h_kv)
            heads = maps["difference"] @ v.repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)
            torch.testing.assert_close(maps["lambda"], torch.sigmoid(x @ m.lambda_proj.weight.T).transpose(1, 2))
            torch.testing.assert_close(maps["difference"], maps["signal"] - maps["lambda"][..., None] * maps["noise"])
        else:
            assert set(maps) == {"signal", "noise", "difference", "lambda"}
            *_, v = m.split_qkv(x)
            heads = m.head_norm(maps["difference"] @ v)
            H = m.signal_heads
            torch.testing.assert_close(maps["lambda"], m.lam().expand(H), rtol=0, atol=0)
            torch.testing.assert_close(maps["difference"], maps["signal"] - maps["lambda"].view(1, H, 1, 1) * maps["noise"])
            for i in range(H):  # signal head i subtracts noise head i // group
                if masking != "per_head":
                    torch.testing.assert_close(maps["noise"][:, i], maps["noise"][:, (i // m.group) * m.group])
        got = m.proj(m.norm(heads.transpose(1, 2).reshape(B, N, C)))
    assert all(t.dtype == torch.float64 for t in maps.values())
    assert (got - expected).abs().max().item() < 1e-10
    for name in ("attention", "signal", "noise"):
        if name in maps:
            torch.testing.assert_close(maps[name].sum(-1), torch.ones(B, maps[name].shape[1], N, dtype=torch.float64))
            if causal:
                assert maps[name].triu(1).abs().max() == 0


@pytest.mark.parametrize("kind", list(MODULES))
def test_attention_maps_are_float32_for_low_precision_modules(kind):
    m = create_attention(kind, 48, **MODULES[kind]).to(torch.bfloat16).eval()
    with torch.no_grad():
        maps = m.attention_maps(torch.randn(1, 5, 48, dtype=torch.bfloat16))
    assert all(t.dtype == torch.float32 for t in maps.values())
    assert all(t.shape == (1, 4 if kind == "gda" else MODULES[kind].get("num_heads"), 5, 5)
               for k, t in maps.items() if k != "lambda")
    if kind == "diffv2":
        assert maps["lambda"].shape == (1, 4, 5)  # per output head and token


def test_timm_attention_map_reproduces_its_forward_in_float64():
    from timm.layers import Attention
    torch.manual_seed(0)
    m = randomise(Attention(48, num_heads=3, qkv_bias=True).double()).eval()
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    with torch.no_grad():
        a = attention_maps.attention_maps_of(m, x)["attention"]
        v = m.qkv(x).view(2, 7, 3, 3, 16)[:, :, 2].transpose(1, 2)
        got = m.proj((a @ v).transpose(1, 2).reshape(2, 7, 48))
        assert (got - m(x)).abs().max().item() < 1e-10


# ---------------------------------------------------------------------------------------------
# Summary measures against closed forms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [4, 64, 196])
def test_entropy_and_top_k_mass_closed_forms(P):
    uniform = torch.full((2, 3, P), 1.0 / P)
    one_hot = torch.zeros(2, 3, P)
    one_hot[..., P // 3] = 1.0
    k = attention_maps.num_top_k(P)
    assert k == max(1, round(0.05 * P))
    torch.testing.assert_close(attention_maps.entropy(uniform), torch.full((2, 3), math.log(P), dtype=torch.float64))
    assert attention_maps.entropy(one_hot).abs().max() == 0
    torch.testing.assert_close(attention_maps.top_k_mass(uniform, k), torch.full((2, 3), k / P, dtype=torch.float64))
    torch.testing.assert_close(attention_maps.top_k_mass(one_hot, k), torch.ones(2, 3, dtype=torch.float64))
    p = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert attention_maps.entropy(p).item() == pytest.approx(-(0.3 * math.log(0.3) + 0.7 * math.log(0.7)), rel=1e-12)


def test_distributions_of_difference_rows():
    d = torch.tensor([[0.5, -0.2, 0.3, 0.0]])
    torch.testing.assert_close(attention_maps.to_distribution(d, "positive"),
                               torch.tensor([[0.625, 0.0, 0.375, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(attention_maps.to_distribution(d, "abs"),
                               torch.tensor([[0.5, 0.2, 0.3, 0.0]], dtype=torch.float64))
    assert torch.isnan(attention_maps.to_distribution(-d.abs(), "positive")).all()
    with pytest.raises(ValueError, match="non-negative"):
        attention_maps.to_distribution(d, "renormalize")


def test_measure_rows_drops_prefix_tokens_and_renormalises():
    P, prefix, c = 16, 1, 0.2
    row = torch.cat([torch.tensor([c]), torch.full((P,), (1 - c) / P)])  # CLS row: c on itself, rest uniform
    full = torch.eye(P + prefix).expand(1, 2, P + prefix, P + prefix).clone()
    full[:, :, 0] = row
    stats = attention_maps.measure_rows({"attention": full}, prefix, "cls", k=2)["attention"]
    torch.testing.assert_close(stats["entropy"], torch.full((1, 2), math.log(P), dtype=torch.float64))
    torch.testing.assert_close(stats["prefix_mass"], torch.full((1, 2), c, dtype=torch.float64))
    torch.testing.assert_close(stats["top_k_mass"], torch.full((1, 2), 2 / P, dtype=torch.float64))
    mean_query = attention_maps.measure_rows({"attention": full}, prefix, "mean", k=2)["attention"]
    torch.testing.assert_close(mean_query["entropy"], torch.full((1, 2), math.log(P), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# train/attention_maps.py end to end on a tiny pair
# ---------------------------------------------------------------------------------------------

TINY = dict(depth=2, embed_dim=48)


def test_attention_maps_script_end_to_end(tmp_path):
    data = make_cifar_npz(tmp_path / "cifar10", per_class_train=1, per_class_test=2)  # 20 val images
    torch.manual_seed(0)
    import diffvision.models  # noqa: F401  (registers the timm models)
    standard = timm.create_model("vit_tiny_patch4_32", num_classes=10, **TINY).eval()
    diff = timm.create_model("diff_vit_tiny_patch4_32", num_classes=10, **TINY).eval()
    torch.save(standard.state_dict(), tmp_path / "standard.pth")
    # what a `diffvision fit` checkpoint holds for the classifier (weights under `model.`, data settings)
    torch.save({"state_dict": {f"model.{k}": v for k, v in diff.state_dict().items()},
                "hyper_parameters": {"model_name": "diff_vit_tiny_patch4_32", "model_kwargs": TINY, "num_classes": 10,
                                     "img_size": 32, "in_chans": 3},
                "datamodule_hyper_parameters": {"dataset": "cifar10_npz", "root": str(data)}}, tmp_path / "diff.ckpt")
    out = tmp_path / "out"
    argv = ["vit_tiny_patch4_32", str(tmp_path / "diff.ckpt"), "--standard-weights", str(tmp_path / "standard.pth"),
            "--standard-kwargs", json.dumps(TINY), "--cache-dir", str(tmp_path / "cache"), "--indices", "0", "13",
            "--layer", "all", "--num-summary", "6", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    assert attention_report.main(argv) == 0
    for idx in (0, 13):
        assert_png(out / f"image{idx:05d}_layer1.png")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    means = {(int(r["layer"]), r["model"], r["map"]): r for r in rows if r["head"] == "mean"}
    assert set(means) == {(layer, "standard", "attention") for layer in (0, 1)} | {
        (layer, "diff", name) for layer in (0, 1) for name in ("signal", "noise", "difference")}
    assert len(rows) == 8 * (1 + 3)  # 8 (layer, model, map) x (mean + 3 heads)
    assert all(int(r["num_images"]) == 6 and int(r["k"]) == 3 and int(r["num_patches"]) == 64 for r in rows)
    assert "normalised positive part" in (out / "summary.md").read_text()

    # independent reference for the standard model: timm's own softmax probabilities (unfused path,
    # captured at attn_drop) on the same 6 images, CLS row over the 64 patches renormalised
    from diffvision.data import ImageDataModule
    dm = ImageDataModule("cifar10_npz", root=str(data), augment="none", num_workers=0, cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    chosen = np.unique(np.linspace(0, len(dm.val_dataset) - 1, 6).round().astype(int))
    images = torch.stack([dm.val_dataset[int(i)][0] for i in chosen])
    probs = {}
    for layer in (0, 1):
        attn = standard.blocks[layer].attn
        attn.fused_attn = False
        attn.attn_drop.register_forward_hook(lambda mod, inp, outp, layer=layer: probs.__setitem__(layer, outp))
    with torch.no_grad():
        standard(images)
    for layer in (0, 1):
        cls = probs[layer][:, :, 0, 1:].double()
        p = cls / cls.sum(-1, keepdim=True)
        entropy = -(p * p.log()).sum(-1)
        top3 = p.topk(3, dim=-1).values.sum(-1)
        row = means[(layer, "standard", "attention")]
        assert float(row["entropy_mean"]) == pytest.approx(entropy.mean().item(), rel=1e-5)
        assert float(row["top_k_mass_mean"]) == pytest.approx(top3.mean().item(), rel=1e-5)
        assert float(row["prefix_mass_mean"]) == pytest.approx(probs[layer][:, :, 0, 0].double().mean().item(), rel=1e-4)
    lam = [float(means[(layer, "diff", "difference")]["lambda"]) for layer in (0, 1)]
    assert lam == pytest.approx([diff.blocks[i].attn.lam().item() for i in (0, 1)], rel=1e-6)

    with pytest.raises(SystemExit):  # an index past the split: a clear argparse error
        attention_report.main([*argv[:8], "--indices", "20", "--num-summary", "0", "--out", str(out)])


def test_attention_maps_script_reads_diffv2_models(tmp_path):
    data = make_cifar_npz(tmp_path / "cifar10", per_class_train=1, per_class_test=1)
    torch.manual_seed(0)
    import diffvision.models  # noqa: F401  (registers the timm models)
    files = {}
    for name in ("vit_tiny_patch4_32", "diffv2_vit_tiny_patch4_32"):
        model = timm.create_model(name, num_classes=10, **TINY).eval()
        files[name] = tmp_path / f"{name}.pth"
        torch.save(model.state_dict(), files[name])
    out = tmp_path / "out"
    assert attention_report.main([
        "vit_tiny_patch4_32", "diffv2_vit_tiny_patch4_32", "--standard-weights", str(files["vit_tiny_patch4_32"]),
        "--diff-weights", str(files["diffv2_vit_tiny_patch4_32"]), "--standard-kwargs", json.dumps(TINY),
        "--diff-kwargs", json.dumps(TINY), "--dataset", "cifar10_npz", "--root", str(data), "--cache-dir",
        str(tmp_path / "cache"), "--indices", "3", "--layer", "-1", "--num-summary", "4", "--batch-size", "4",
        "--device", "cpu", "--out", str(out)]) == 0
    assert_png(out / "image00003_layer1.png")
    rows = [r for r in csv.DictReader(open(out / "summary.csv")) if r["model"] == "diff"]
    assert {r["kind"] for r in rows} == {"diffv2"} and {r["map"] for r in rows} == {"signal", "noise", "difference"}
    assert len({r["head"] for r in rows}) == 1 + 4  # mean + DIFF V2-Ti's 4 output heads
    lam = float(next(r for r in rows if r["map"] == "difference")["lambda"])
    assert 0 < lam < 1  # σ(W_λ x), averaged


# ---------------------------------------------------------------------------------------------
# train/report.py on a synthetic run tree
# ---------------------------------------------------------------------------------------------

FRACTIONS = (0.01, 0.1, 0.25, 1.0)


def write_run(root, name, result, epochs_acc=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    if epochs_acc is not None:
        write_metrics(d, epochs_acc)
    return d


def write_metrics(d, epochs_acc):
    (d / "version_0").mkdir(parents=True, exist_ok=True)
    with open(d / "version_0" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss_step", "val/acc1", "val/loss"])
        for e, acc in enumerate(epochs_acc):  # sparse rows, as Lightning's CSV logger writes them
            w.writerow([e, 10 * e + 5, 1.5, "", ""])
            w.writerow([e, 10 * e + 9, "", acc, 1.0])


@pytest.fixture()
def run_tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    acc = {}
    for f in FRACTIONS:
        for kind in ("standard", "diff", "gda"):
            for seed in (0, 1, 2):
                if (kind, f, seed) == ("gda", 0.25, 2):
                    continue  # never run: reported missing
                a = float(rng.uniform(0.3, 0.9))
                acc[(kind, f, seed)] = a
                write_run(root, f"cls_{kind}_f{f}_s{seed}", {
                    "task": "classification", "kind": kind, "model_name": f"{kind}_vit", "model_kwargs": {"depth": 2},
                    "params": 1000, "fraction": f, "seed": seed, "epochs": 3,
                    "final": {"val/acc1": a, "val/loss": 1.0}, "best": {"val/acc1": a + 0.01}, "wall_s": 100.0,
                    "device": "H100", "command": f"diffvision fit --seed {seed}"}, epochs_acc=[a / 3, a / 2, a])
    fid = {}
    for f in (0.1, 1.0):
        for kind in ("standard", "diff"):
            for seed in (0, 1):
                v = float(rng.uniform(20, 60))
                fid[(kind, f, seed)] = v
                write_run(root, f"gen_{kind}_f{f}_s{seed}", {
                    "task": "generation", "kind": kind, "preset": "tiny", "params": 2000, "fraction": f, "seed": seed,
                    "epochs": 1, "steps": 200, "fid": v, "fid_num_samples": 10000, "fid_reference": "train",
                    "scheduler": "DDIM", "num_inference_steps": 50, "guidance_scale": 1.5, "wall_s": 50.0,
                    "device": "H100", "command": "diffvision fit", "fid_vs_step": [[100, v + 10], [200, v]]})
    write_metrics(root / "cls_diff_unfinished", [0.2, 0.25])  # logs, no result.json
    (root / "cls_broken").mkdir()
    (root / "cls_broken" / "result.json").write_text("{not json")
    write_run(root, "cls_nofinal", {"task": "classification", "kind": "diff", "fraction": 0.1, "seed": 5, "final": {}})
    return root, acc, fid


def test_report_numbers_match_numpy(run_tree, tmp_path):
    root, acc, fid = run_tree
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    everything, problems = discover([root])
    assert len(everything) == len(acc) + len(fid)
    runs = [r for r in everything if r.task == "classification"]
    cells = tables.classification_cells(runs)
    for (f, kind), (mean, std, n) in cells.items():
        values = 100 * np.array([a for (k, ff, s), a in acc.items() if k == kind and ff == f])
        assert n == len(values) and mean == pytest.approx(values.mean(), abs=1e-9)
        assert std == pytest.approx(values.std(ddof=1), abs=1e-9)
    md = (out / "classification.md").read_text()
    values = 100 * np.array([acc[("gda", 0.25, s)] for s in (0, 1)])
    assert f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (2)" in md
    for f in FRACTIONS:  # DIFF − standard, paired by seed
        d = 100 * np.array([acc[("diff", f, s)] - acc[("standard", f, s)] for s in (0, 1, 2)])
        mean, std, n = tables.paired_delta(runs, f, "diff")
        assert (mean, std, n) == (pytest.approx(d.mean(), abs=1e-9), pytest.approx(d.std(ddof=1), abs=1e-9), 3)
        assert f"{d.mean():+.2f} ± {d.std(ddof=1):.2f} (3)" in md
    assert tables.paired_delta(runs, 0.25, "gda")[2] == 2  # seed 2 has no GDA run
    assert "| 1% |" in md and "49.71" in md and "78.85" in md  # reference table beside ours
    with pytest.raises(ValueError, match="one task"):
        tables.paired_delta(everything, 0.1, "diff")
    gen = tables.generation_cells([r for r in everything if r.task == "generation"])
    v = np.array([fid[("diff", 0.1, s)] for s in (0, 1)])
    assert gen[(0.1, "diff")] == (pytest.approx(v.mean()), pytest.approx(v.std(ddof=1)), 2)
    assert f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (2)" in (out / "generation.md").read_text()

    cls_rows = list(csv.DictReader(open(out / "classification.csv")))
    assert len(cls_rows) == len(acc)
    row = next(r for r in cls_rows if r["kind"] == "diff" and float(r["fraction"]) == 0.1 and r["seed"] == "1")
    assert float(row["final_acc1"]) == acc[("diff", 0.1, 1)]
    assert len(list(csv.DictReader(open(out / "generation.csv")))) == len(fid)
    for name in ("accuracy_vs_fraction.png", "learning_curves.png", "fid_vs_step.png"):
        assert_png(out / name)

    status = {(p.status, p.name) for p in problems}
    assert ("partial", "cls_diff_unfinished") in status and ("broken", "cls_broken") in status
    assert ("broken", "cls_nofinal") in status
    assert ("missing", "classification/gda/25%/seed2") in status
    summary = (out / "summary.md").read_text()
    total = 100.0 * len(acc) + 50.0 * len(fid)
    assert f"{total:,.0f} s" in summary and "cls_diff_unfinished" in summary and "missing" in summary
    assert results.metric_by_epoch(root / "cls_diff_f0.1_s1") == {0: acc[("diff", 0.1, 1)] / 3,
                                                              1: acc[("diff", 0.1, 1)] / 2, 2: acc[("diff", 0.1, 1)]}


def test_report_survives_a_tree_without_finished_runs(tmp_path):
    root = tmp_path / "runs"
    write_metrics(root / "only_partial", [0.1])
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    assert "no finished classification runs" in (out / "summary.md").read_text()
    assert "only_partial" in (out / "summary.md").read_text()
    assert not (out / "accuracy_vs_fraction.png").exists()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "absent"), "--out", str(out)])


def test_a_one_task_report_leaves_the_other_tasks_files_alone(run_tree, tmp_path):
    """A DiT-only root reported into a folder that holds a classification report (docs/results/) must not
    overwrite that report's files with empty tables, nor print empty classification sections."""
    root, _, fid = run_tree
    gen_root = tmp_path / "gen_only"
    gen_root.mkdir()
    for run in [r for r in root.iterdir() if r.name.startswith("gen_")]:
        run.rename(gen_root / run.name)
    out = tmp_path / "report"
    out.mkdir()
    (out / "classification.md").write_text("an earlier classification report\n")
    assert report.main([str(gen_root), "--out", str(out)]) == 0
    assert (out / "classification.md").read_text() == "an earlier classification report\n"
    assert not (out / "classification.csv").exists()
    assert len(list(csv.DictReader(open(out / "generation.csv")))) == len(fid)
    summary = (out / "summary.md").read_text()
    assert "## Generation" in summary and "## Classification" not in summary


# ---------------------------------------------------------------------------------------------
# the thin scripts of train/ keep their command lines
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, usage", [("sweep.py", "usage: sweep.py [-h]"),
                                           ("report.py", "usage: python train/report.py [-h]"),
                                           ("attention_maps.py", "usage: python train/attention_maps.py [-h]"),
                                           ("variant_study.py", "usage: python train/variant_study.py [-h]")])
def test_train_scripts_answer_help(script, usage):
    done = subprocess.run([sys.executable, str(REPO / "train" / script), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)
