"""The variant study's report: paired gains and the decision rule against numpy on a synthetic run tree,
the attention settings read from the models themselves, the CSV's columns and λ per layer."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffvision.attention import VISION_OPTIONS
from diffvision.experiments import variant_study as vs
from diffvision.experiments.runs import discover

FRACTIONS = (0.01, 0.1)
SEEDS = (0, 1, 2)
ARMS = {  # arm -> (model name, model kwargs), as configs/sweeps/cifar10_variants.yaml has them
    "standard": ("vit_tiny_patch4_32", {}),
    "standard_6x32": ("vit_tiny_patch4_32", {"num_heads": 6}),
    "diff_schedule": ("diff_vit_tiny_patch4_32", {"lambda_init": "schedule"}),
    "diff_init08": ("diff_vit_tiny_patch4_32", {"lambda_init": 0.8}),
    "diff_init08_fixed": ("diff_vit_tiny_patch4_32", {"lambda_init": 0.8, "lambda_mode": "fixed"}),
    "diff_init08_no_norm": ("diff_vit_tiny_patch4_32", {"lambda_init": 0.8, "head_norm": False}),
    "gda_init08": ("gda_vit_tiny_patch4_32", {"lambda_init": 0.8}),
    "diffv2": ("diffv2_vit_tiny_patch4_32", {}),
}
# per-arm offsets over standard (points): diff_init08 is best by 0.2, a tie with no_norm, so no_norm wins
OFFSET = {"standard": 0.0, "standard_6x32": -0.5, "diff_schedule": -2.0, "diff_init08": 1.0,
          "diff_init08_fixed": 0.0, "diff_init08_no_norm": 0.8, "gda_init08": 0.5, "diffv2": -1.0}


def write_tree(root, offset=OFFSET, depth=6, recipe=None, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    acc = {}
    for f in FRACTIONS:
        for seed in SEEDS:
            base = rng.uniform(30, 60)
            for arm, (model, kwargs) in ARMS.items():
                acc[(arm, f, seed)] = a = base + offset[arm] + rng.normal(0, 0.3)
                d = root / f"{arm}_f{f}_s{seed}"
                (d / "version_0").mkdir(parents=True)
                lam = None if arm.startswith("standard") else [0.8 + 0.01 * i + seed for i in range(depth)]
                (d / "result.json").write_text(json.dumps({
                    "task": "classification", "kind": arm, "model_name": model,
                    "model_kwargs": {"depth": depth, "drop_path_rate": 0.1, **kwargs}, "params": 2693578,
                    "fraction": f, "seed": seed, "epochs": 3, "final": {"val/acc1": a / 100}, "wall_s": 60.0,
                    "device": "H200", "command": "diffvision fit", "lambda_per_layer": lam,
                    **({"recipe": recipe} if recipe else {})}))
                with open(d / "version_0" / "metrics.csv", "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["epoch", "step", "val/acc1"] + [f"lambda/layer_{i}" for i in range(depth)])
                    for e in range(3):
                        w.writerow([e, e, a / 100] + ([] if lam is None else [v - 0.1 * (2 - e) for v in lam]))
    return acc


def test_gains_and_rule_match_numpy(tmp_path):
    acc = write_tree(tmp_path / "runs")
    runs, problems = discover([tmp_path / "runs"])
    assert not problems and len(runs) == len(acc)
    gains = vs.paired_gains(runs, "standard")
    for arm in ARMS:
        for f in FRACTIONS:
            d = np.array([acc[(arm, f, s)] - acc[("standard", f, s)] for s in SEEDS])
            if arm == "standard":
                assert (arm, f) not in gains
                continue
            g = gains[(arm, f)]
            assert (g.mean, g.std, g.n, g.positive) == (pytest.approx(d.mean()), pytest.approx(d.std(ddof=1)), 3,
                                                        int((d > 0).sum()))
    winner, scores, tied = vs.apply_rule(gains, FRACTIONS)
    for c in vs.RULE.candidates:
        expected = np.mean([np.mean([acc[(c, f, s)] - acc[("standard", f, s)] for s in SEEDS]) for f in FRACTIONS])
        assert scores[c] == pytest.approx(expected)
    best = max(scores.values())
    assert tied == [c for c in vs.RULE.candidates if scores[c] >= best - 0.3]
    assert winner == tied[0]
    assert winner == "diff_init08_no_norm"   # within 0.3 of diff_init08's score, and simpler


def test_rule_names_no_winner_while_a_candidate_lacks_a_fraction(tmp_path):
    write_tree(tmp_path / "runs")
    runs, _ = discover([tmp_path / "runs"])
    runs = [r for r in runs if not (r.kind == "diff_schedule" and r.fraction == 0.1)]
    winner, scores, _ = vs.apply_rule(vs.paired_gains(runs, "standard"), FRACTIONS)
    assert winner is None and "diff_schedule" not in scores
    assert "Pick: none yet" in "\n".join(vs.study_markdown(runs))


def test_clear_winner_beats_simpler_candidates(tmp_path):
    write_tree(tmp_path / "runs", offset={**OFFSET, "diff_schedule": 3.0})
    runs, _ = discover([tmp_path / "runs"])
    assert vs.apply_rule(vs.paired_gains(runs, "standard"), FRACTIONS)[0] == "diff_schedule"


def test_attention_settings_come_from_the_built_models():
    depth6 = {"depth": 6}
    assert vs.attention_settings("vit_tiny_patch4_32", depth6)["attn_kind"] == "standard"
    assert vs.attention_settings("diff_vit_tiny_patch4_32", {**depth6, "lambda_init": "schedule",
                                                             "lambda_mode": "reparam"}) == {
        "attn_kind": "diff", "lambda_init": "schedule", "lambda_mode": "reparam", "head_norm": True}
    assert vs.attention_settings("gda_vit_tiny_patch4_32", depth6) == {"attn_kind": "gda", **VISION_OPTIONS}
    assert vs.attention_settings("diff_vit_tiny_patch4_32", {"depth": 6, "lambda_init": 0.8, "lambda_mode": "fixed",
                                                             "head_norm": False}) == {
        "attn_kind": "diff", "lambda_init": 0.8, "lambda_mode": "fixed", "head_norm": False}
    assert vs.attention_settings("diff_vit_tiny_patch4_32", {"depth": 1, "lambda_init": "schedule"})[
        "lambda_init"] == pytest.approx(0.8 - 0.6 * np.exp(-0.3 * 0))   # one block: the schedule is one number
    assert vs.attention_settings("diffv2_vit_tiny_patch4_32", depth6)["attn_kind"] == "diffv2"


def test_write_study_files(tmp_path):
    acc = write_tree(tmp_path / "runs")
    out = tmp_path / "out"
    assert vs.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "variant_study.csv")))
    assert len(rows) == len(acc)
    assert list(rows[0])[:13] == vs.STUDY_COLUMNS and list(rows[0])[13:] == [f"lambda_layer_{i}" for i in range(6)]
    assert {r["recipe"] for r in rows} == {"light"}  # runs that predate the recipe field trained with light
    row = next(r for r in rows if r["kind"] == "diff_init08_fixed" and r["seed"] == "2" and float(r["fraction"]) == 0.1)
    assert float(row["top1"]) == pytest.approx(acc[("diff_init08_fixed", 0.1, 2)], abs=0.005)
    assert float(row["gain_vs_standard"]) == pytest.approx(
        acc[("diff_init08_fixed", 0.1, 2)] - acc[("standard", 0.1, 2)], abs=0.01)
    assert (row["lambda_init"], row["lambda_mode"], row["head_norm"]) == ("0.8", "fixed", "True")
    assert float(row["lambda_layer_5"]) == pytest.approx(0.85 + 2)
    std_row = next(r for r in rows if r["kind"] == "standard")
    assert std_row["lambda_layer_0"] == "" and std_row["gain_vs_standard"] == ""
    md = (out / "variant_study.md").read_text()
    assert "Pick: **diff_init08_no_norm**" in md and "Paired gain over `standard_6x32`" in md
    for name in ("variant_study_gain.png", "variant_study_lambda.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipes_pair_within_themselves_and_compare_arm_by_arm(tmp_path):
    """Issue 24: the study under a second recipe. Gains pair only within a recipe; the recipe table is the
    per-seed change of each arm from light to deit."""
    light = write_tree(tmp_path / "light")
    deit = write_tree(tmp_path / "deit", offset={**OFFSET, "diffv2": 2.0}, recipe="deit", rng_seed=1)
    out = tmp_path / "out"
    assert vs.main([str(tmp_path / "light"), str(tmp_path / "deit"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "variant_study.csv")))
    assert [r["recipe"] for r in rows] == ["light"] * len(light) + ["deit"] * len(deit)
    row = next(r for r in rows if r["recipe"] == "deit" and r["kind"] == "diffv2" and r["seed"] == "1"
               and float(r["fraction"]) == 0.01)
    assert float(row["gain_vs_standard"]) == pytest.approx(deit[("diffv2", 0.01, 1)] - deit[("standard", 0.01, 1)],
                                                           abs=0.01)
    md = (out / "variant_study.md").read_text()
    assert "## Recipe `light`" in md and "## Recipe `deit`" in md
    change = md.split("### `deit` − `light`")[1]
    line = next(x for x in change.splitlines() if x.startswith("| diffv2 |"))
    d = np.array([deit[("diffv2", 0.1, s)] - light[("diffv2", 0.1, s)] for s in SEEDS])
    assert f"{d.mean():+.2f} ± {d.std(ddof=1):.2f} (3)" in line.split("|")[3]
    for name in ("variant_study_gain.png", "variant_study_gain_deit.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_recipe_is_its_own_grid_of_missing_runs(tmp_path):
    """A fraction only the deit sweep ran (standard at 100 %, seed 0) leaves holes in deit's grid only, named
    with the recipe; the light grid, complete, reports none."""
    write_tree(tmp_path / "light")
    write_tree(tmp_path / "deit", recipe="deit", rng_seed=1)
    extra = tmp_path / "deit" / "standard_f1.0_s0"
    (extra / "version_0").mkdir(parents=True)
    (extra / "result.json").write_text(json.dumps({
        "task": "classification", "kind": "standard", "model_name": "vit_tiny_patch4_32", "fraction": 1.0,
        "seed": 0, "final": {"val/acc1": 0.5}, "recipe": "deit"}))
    _, problems = discover([tmp_path / "light", tmp_path / "deit"])
    missing = {p.name for p in problems if p.status == "missing"}
    expected = {f"classification/deit/{arm}/100%/seed{s}" for arm in ARMS for s in SEEDS} - {
        "classification/deit/standard/100%/seed0"}
    assert missing == expected
