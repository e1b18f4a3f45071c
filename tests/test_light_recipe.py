"""The light recipe after issue 24 trains what the code before it trained: a short run of
configs/fashion_mnist_vit.yaml made by commit 454ae4f (tests/data/light_recipe/, see its script) is
trained again from scratch here (alone and with configs/recipes/light.yaml stacked on) and resumed from
that commit's mid-run checkpoint; each ends with that commit's final weights. Same transforms, parameter
groups, LR per step and per-step randomness, or the weights differ."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _training_data import CONFIGS, make_fashion_idx
from diffvision.cli import DiffvisionCLI

FIXTURES = Path(__file__).parent / "data" / "light_recipe"


def fixture_script():
    spec = importlib.util.spec_from_file_location("make_light_fixtures", FIXTURES / "make_light_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    make_fashion_idx(root, n_train=60, n_test=20)
    return root


@pytest.mark.parametrize("how", ["config", "config+light", "resumed", "warm-up a step longer"])
def test_todays_code_trains_the_weights_of_before(how, fashion, tmp_path):
    extra = {"config": [], "warm-up a step longer": ["--model.init_args.warmup_steps", "1"], "config+light": ["--config", str(CONFIGS / "recipes" / "light.yaml")],
             "resumed": ["--ckpt_path", str(FIXTURES / "epoch1.ckpt")]}[how]
    cli = DiffvisionCLI(args=fixture_script().fit_args(fashion, tmp_path, *extra))
    assert cli.trainer.global_step == 6
    expected = load_file(str(FIXTURES / "final.safetensors"))
    state = cli.model.state_dict()
    assert state.keys() == expected.keys()
    same = all(torch.allclose(state[k], v, rtol=1.3e-6, atol=1e-5) for k, v in expected.items())
    assert same == (how != "warm-up a step longer")  # the control: one LR step apart is seen
