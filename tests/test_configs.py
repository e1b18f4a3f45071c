"""Configs: one recipe per dataset and task, the attention kind layered on (``configs/kinds/`` or
``--attn_kind``); and every ``diffvision`` command the documentation shows still parses."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import timm
import yaml

from _configs import config_args
from _training_data import CONFIGS, QUIET, REPO, make_cifar_npz
from diffvision.attention import ATTN_KINDS, VISION_OPTIONS
from diffvision.cli import DiffvisionCLI
from diffvision.models import twin_model

TINY_VIT = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}"]
TINY_DIT = ["--model.init_args.transformer_kwargs",
            "{num_layers: 1, num_attention_heads: 6, attention_head_dim: 8, patch_size: 4}",
            "--model.init_args.num_sample_images", "0", "--model.init_args.fid_num_samples", "0"]


class Parsed(Exception):
    """Raised by ParseOnlyCLI once the command line is parsed (and the kind applied): nothing is built."""

    def __init__(self, config):
        super().__init__("parsed")
        self.config = config


class ParseOnlyCLI(DiffvisionCLI):
    def before_instantiate_classes(self) -> None:
        raise Parsed(self.config[self.subcommand] if self.subcommand else self.config)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_cifar_npz(tmp_path_factory.mktemp("cifar10"), per_class_train=2, per_class_test=1)


def build(spec_args, cifar, root, *extra):
    return DiffvisionCLI(args=[*spec_args, "--data.root", str(cifar), "--data.cache_dir", str(root / "cache"),
                               "--data.num_workers", "0", "--trainer.default_root_dir", str(root), *QUIET, *extra],
                         run=False)


# ---------------------------------------------------------------------------------------------
# Recipes and kind overlays
# ---------------------------------------------------------------------------------------------

def test_each_kind_has_an_overlay_that_sets_only_it():
    overlays = {p.stem: yaml.safe_load(p.read_text()) for p in (CONFIGS / "kinds").glob("*.yaml")}
    assert overlays == {kind: {"attn_kind": kind} for kind in ATTN_KINDS}


@pytest.mark.parametrize("kind", list(ATTN_KINDS))
def test_overlay_and_flag_build_the_kinds_twin_classifier(kind, cifar, tmp_path):
    by_overlay = build(config_args(f"cifar10_vit+{kind}"), cifar, tmp_path / "a", *TINY_VIT)
    by_flag = build([*config_args("cifar10_vit"), "--attn_kind", kind], cifar, tmp_path / "b", *TINY_VIT)
    expected = "vit_tiny_patch4_32" if kind == "standard" else f"{kind}_vit_tiny_patch4_32"
    for cli in (by_overlay, by_flag):
        assert cli.model.hparams.model_name == expected
        assert cli.model.model.default_cfg["architecture"] == expected  # timm built that entrypoint
    # the twin rule: the projections of every kind have the standard model's parameter count (+ λ / norm)
    standard = build(config_args("cifar10_vit"), cifar, tmp_path / "c", *TINY_VIT).model.model
    qkv = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".qkv." in n or ".q_proj." in n
                        or ".k_proj." in n or ".v_proj." in n or ".attn.proj." in n)
    assert qkv(by_flag.model.model) == qkv(standard)
    assert by_flag.trainer.logger.log_dir.endswith(f"cifar10_vit_{kind}/version_0")  # named by recipe + kind
    assert by_overlay.trainer.logger.log_dir.endswith(f"cifar10_vit_{kind}/version_0")  # the overlay does not name it


@pytest.mark.parametrize("kind", ["diff", "gda", "diffv2"])
def test_kind_overlay_sets_the_diffusion_models_attn_kind(kind, cifar, tmp_path):
    cli = build(config_args(f"cifar10_dit+{kind}"), cifar, tmp_path, *TINY_DIT)
    assert cli.model.hparams.attn_kind == kind and cli.model.transformer.config.attn_kind == kind
    assert build(config_args("cifar10_dit"), cifar, tmp_path, *TINY_DIT).model.transformer.config.attn_kind == "standard"


def test_head_counts_of_the_recipe_become_the_kinds(cifar, tmp_path):
    heads = ["--model.init_args.model_kwargs", "{depth: 1, embed_dim: 96, num_heads: 6}"]
    cli = build([*config_args("cifar10_vit"), "--attn_kind", "gda"], cifar, tmp_path, *heads)
    # the heads translated, and the model's λ / head-norm choices recorded (VISION_OPTIONS)
    assert cli.model.hparams.model_kwargs == {"depth": 1, "embed_dim": 96, "num_heads": 4, "noise_heads": 2,
                                              **VISION_OPTIONS}
    layout = cli.model.model.attn_layout
    assert (layout["attn_kind"], layout["signal_heads"], layout["noise_heads"]) == ("gda", 4, 2)


def test_saved_run_config_records_the_built_model_and_reloads(cifar, tmp_path):
    cli = DiffvisionCLI(args=["fit", *config_args("cifar10_vit+diff"), "--data.root", str(cifar),
                              "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0",
                              "--data.batch_size", "10", "--trainer.default_root_dir", str(tmp_path),
                              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", *QUIET, *TINY_VIT])
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["attn_kind"] == "diff" and cfg["model"]["init_args"]["model_name"] == "diff_vit_tiny_patch4_32"
    with pytest.raises(Parsed) as again:  # applying the kind twice is a no-op
        ParseOnlyCLI(args=["fit", "--config", str(saved)])
    assert again.value.config["model"]["init_args"]["model_name"] == "diff_vit_tiny_patch4_32"
    assert again.value.config["model"]["init_args"]["model_kwargs"] == cfg["model"]["init_args"]["model_kwargs"]


def test_bad_kinds_are_named(cifar, tmp_path):
    with pytest.raises(ValueError, match=r"unknown attn_kind 'dif' \(did you mean 'diff'"):
        build([*config_args("cifar10_vit"), "--attn_kind", "dif"], cifar, tmp_path, *TINY_VIT)
    with pytest.raises(ValueError, match=r"no timm model 'gda_vit_large_patch16_224'.*registered 'gda' ViTs"):
        twin_model("vit_large_patch16_224", "gda")
    with pytest.raises(ValueError, match=r"are 'diff' head counts.*start from 'vit_small_patch16_224'"):
        twin_model("diff_vit_small_patch16_224", "gda", {"embed_dim": 128, "num_heads": 4})
    with pytest.raises(ValueError, match=r"'resnet18' is not a ViT"):
        build([*config_args("cifar10_vit"), "--attn_kind", "diff", "--model.init_args.model_name", "resnet18"],
              cifar, tmp_path)


def test_twin_model_names_exist_for_every_registered_kind_and_size():
    for name in timm.list_models("vit_*_patch4_32") + ["vit_tiny_patch16_224", "vit_small_patch16_224",
                                                          "vit_base_patch16_224"]:
        for kind in ATTN_KINDS:
            twin, _ = twin_model(name, kind)
            assert timm.is_model(twin) and twin_model(twin, "standard")[0] == name


# ---------------------------------------------------------------------------------------------
# Every documented command parses
# ---------------------------------------------------------------------------------------------

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(CONFIGS.rglob("*.yaml")),
             REPO / "diffvision" / "cli.py", *sorted((REPO / "train").glob("*.py"))]
COMMAND = re.compile(r"diffvision (fit|validate|test|predict)\b([^`\n\\]*(?:\\\n[^`\n\\]*)*)")


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in COMMAND.finditer(text):
            line = match.group(0).replace("\\\n", " ")
            line = re.split(r"\s#|\s\[", line)[0]  # drop comments and [optional parts]
            if "--config configs/" in line:  # a runnable command, not prose naming the subcommands
                args = shlex.split(line)[1:]
                found.append((f"{path.relative_to(REPO)}: {line.strip()}", args))
    return found


COMMANDS = documented_commands()


def test_the_documentation_shows_commands():
    assert len(COMMANDS) >= 15, [c for c, _ in COMMANDS]


@pytest.mark.parametrize("command,args", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_parses(command, args, tmp_path, capsys):
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    missing = [c for c in configs if not (REPO / c).is_file()]
    assert not missing, f"{command}: no such config {missing}"
    args = [str(REPO / a) if a in configs else a for a in args]
    if args[0] != "fit" and "--ckpt_path" in args:  # no run to evaluate here: the resume lookup is tested elsewhere
        i = args.index("--ckpt_path")
        del args[i:i + 2]
    try:
        ParseOnlyCLI(args=[*args, "--trainer.default_root_dir", str(tmp_path)])
    except Parsed as parsed:
        cfg = parsed.config
        model = cfg["model"]["init_args"]
        if cfg.get("attn_kind") and "model_name" in model:
            assert timm.is_model(model["model_name"])
    except SystemExit as stop:  # --print_config prints and exits 0
        assert stop.code in (0, None) and "--print_config" in args, capsys.readouterr().err
    else:
        pytest.fail(f"{command}: neither parsed nor printed")
