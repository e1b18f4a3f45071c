"""Safe loading (issue 8): a pickle with code in it is refused by every public loading path, and never runs;
our own checkpoints and exports load with ``weights_only=True`` or are safetensors.

The payload is a pickled object whose ``__reduce__`` calls ``exec`` to create a marker file: each test
asserts a clear refusal *and* that the marker was never created. test_payload_files_are_armed proves
the files really would run the code under a plain (unsafe) unpickle.
"""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import diffvision  # noqa: F401  (registers the timm models)
from _training_data import CONFIGS, QUIET, make_cifar_npz
from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel
from diffvision.lightning import DiffusionModule, ImageClassifier
from diffvision.models import UnsafeCheckpointError, load_checkpoint_file, load_standard_vit_weights

PACKAGE = Path(diffvision.__file__).parent
VIT_KW = dict(depth=1, embed_dim=48, img_size=16, num_classes=10)
DIT_KW = dict(num_attention_heads=2, attention_head_dim=16, in_channels=3, num_layers=1, sample_size=8,
              patch_size=2, num_classes=10)
DIFFUSION_KW = dict(preset="DiT-S/2", img_size=8, num_classes=4, num_sample_images=0, fid_num_samples=0,
                    transformer_kwargs=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, patch_size=4))
QUIET_TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", num_sanity_val_steps=0)


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def armed_checkpoint(marker: Path) -> dict:
    """A checkpoint that looks real (tensors, Lightning keys) with the payload among its values."""
    return {"state_dict": {"model.head.weight": torch.zeros(2, 2)}, "pytorch-lightning_version": pl.__version__,
            "hyper_parameters": {"model_name": "diff_vit_tiny_patch4_32", "note": Payload(marker)}}


def write_armed(path: Path, marker: Path, fmt: str = "zip") -> Path:
    """``zip``: torch.save's format; ``legacy``: torch's old format; ``pickle``: a bare pickle."""
    obj = armed_checkpoint(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_payload_files_are_armed(tmp_path, fmt):
    marker = tmp_path / "ran"
    path = write_armed(tmp_path / "evil.pth", marker, fmt)
    if fmt == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()  # an unsafe load really runs the code


# ------------------------------------------------------------------------------------------------
# Every public loading path refuses it
# ------------------------------------------------------------------------------------------------

def _vit():
    return timm.create_model("diff_vit_tiny_patch4_32", **VIT_KW)


def _timm_file(path, mp):
    return timm.create_model("diff_vit_tiny_patch4_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **VIT_KW)


def _prepare_timm_dir(folder):
    timm.models.save_for_hf(_vit(), folder)
    (folder / "model.safetensors").unlink(missing_ok=True)  # the armed pytorch_model.bin: the only weights


def _prepare_pipeline(root):
    from diffusers import DDIMScheduler

    pipe = DiffDiTPipeline(transformer=DiffDiTTransformer2DModel(**DIT_KW), scheduler=DDIMScheduler())
    pipe.save_pretrained(root, safe_serialization=False)


def _trainer_resume(path, mp):
    module = ImageClassifier(model_name="diff_vit_tiny_patch4_32", model_kwargs=dict(depth=1, embed_dim=48),
                             img_size=16)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))), batch_size=4)
    pl.Trainer(max_steps=1, default_root_dir=path.parent, **QUIET_TRAINER).fit(module, data, ckpt_path=str(path))


def _fid(path, mp):
    from diffvision.metrics import fid

    mp.setenv("DIFFVISION_CACHE", str(path.parent))
    return fid.fid_weights_path(None if path.name == fid.CONVERTED_NAME else path)


UNSAFE = r"refused to load .*unpickling it would import or call (builtins\.)?exec\b"
TORCH_REFUSAL = r"Weights only load failed[\s\S]*Unsupported global: GLOBAL (builtins\.)?exec\b"
# name: (file to arm, prepare(folder) or None, load(path, monkeypatch), exception, match)
PATHS = {
    "timm.create_model pretrained file": ("evil.pth", None, _timm_file, UnsafeCheckpointError, UNSAFE),
    "timm.create_model pretrained file, bare pickle": ("evil.bin", None, _timm_file, UnsafeCheckpointError, UNSAFE),
    "timm.create_model local-dir": (
        "vit/pytorch_model.bin", _prepare_timm_dir,
        lambda p, mp: timm.create_model(f"local-dir:{p.parent}", pretrained=True), UnsafeCheckpointError, UNSAFE),
    "load_standard_vit_weights": (
        "evil.pth", None, lambda p, mp: load_standard_vit_weights(_vit(), p), UnsafeCheckpointError, UNSAFE),
    "load_standard_vit_weights, legacy torch format": (
        "legacy.pth", None, lambda p, mp: load_standard_vit_weights(_vit(), p), UnsafeCheckpointError, UNSAFE),
    "load_checkpoint_file": ("evil.ckpt", None, lambda p, mp: load_checkpoint_file(p), UnsafeCheckpointError,
                             rf"{UNSAFE}.*never runs code"),
    "DiffDiTTransformer2DModel.from_pretrained": (
        "dit/diffusion_pytorch_model.bin", lambda d: DiffDiTTransformer2DModel(**DIT_KW).save_pretrained(
            d, safe_serialization=False),
        lambda p, mp: DiffDiTTransformer2DModel.from_pretrained(p.parent), UnsafeCheckpointError, UNSAFE),
    "DiffDiTPipeline.from_pretrained": (
        "pipe/transformer/diffusion_pytorch_model.bin", lambda d: _prepare_pipeline(d.parent),
        lambda p, mp: DiffDiTPipeline.from_pretrained(p.parent.parent), UnsafeCheckpointError, UNSAFE),
    "ImageClassifier.load_from_checkpoint": (
        "evil.ckpt", None, lambda p, mp: ImageClassifier.load_from_checkpoint(p), UnsafeCheckpointError, UNSAFE),
    "DiffusionModule.load_from_checkpoint": (
        "evil.ckpt", None, lambda p, mp: DiffusionModule.load_from_checkpoint(p), UnsafeCheckpointError, UNSAFE),
    "Trainer.fit(ckpt_path=...)": ("evil.ckpt", None, _trainer_resume, pickle.UnpicklingError, TORCH_REFUSAL),
    "FID weights_path": ("evil.pth", None, _fid, UnsafeCheckpointError, UNSAFE),
    "FID cached weights": ("cache/pt_inception-2015-12-05-from-fid-helper-default_1.pth", None, _fid,
                           UnsafeCheckpointError, UNSAFE),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_every_loading_path_refuses_a_pickle_with_code(name, tmp_path, monkeypatch):
    target, prepare, load, exc, match = PATHS[name]
    path = tmp_path / target
    path.parent.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(path.parent)
    marker = tmp_path / "ran"
    write_armed(path, marker, "pickle" if "bare" in name else "legacy" if "legacy" in name else "zip")
    with pytest.raises(exc, match=match):
        load(path, monkeypatch)
    assert not marker.exists()


class _FakeHub:
    """``torch.hub.load_state_dict_from_url`` serving a local file, honouring ``weights_only``."""

    def __init__(self, path: Path) -> None:
        self.path, self.weights_only = path, "not called"

    def __call__(self, url, map_location=None, weights_only=False, **kwargs):
        self.weights_only = weights_only
        return torch.load(self.path, map_location=map_location, weights_only=weights_only)


@pytest.mark.parametrize("module", [DiffusionModule, ImageClassifier])
def test_checkpoint_from_a_url_is_loaded_weights_only(module, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    hub = _FakeHub(write_armed(tmp_path / "evil.ckpt", marker))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hub)
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: GLOBAL (builtins\.)?exec"):
        module.load_from_checkpoint("https://example.invalid/evil.ckpt")
    assert hub.weights_only is True and not marker.exists()


def test_cli_ckpt_path_refuses_a_pickle_with_code(tmp_path):
    """``diffvision fit --ckpt_path``: LightningCLI reads the file's hparams with weights_only=True before
    anything else (and DiffvisionCLI.before_fit must not read it unsafely after that)."""
    from diffvision.cli import DiffvisionCLI

    marker = tmp_path / "ran"
    ckpt = write_armed(tmp_path / "evil.ckpt", marker)
    make_cifar_npz(tmp_path / "cifar", per_class_train=2, per_class_test=1)
    args = ["fit", "--config", str(CONFIGS / "cifar10_vit.yaml"), "--attn_kind", "diff", "--data.root", str(tmp_path / "cifar"),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0", "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}", "--ckpt_path",
            str(ckpt), *QUIET]
    with pytest.raises(pickle.UnpicklingError, match=rf"(?s){UNSAFE}|{TORCH_REFUSAL}"):
        DiffvisionCLI(args=args)
    assert not marker.exists()


HELPER = """
open({marker!r}, "w").close()  # importing this module is running code
from diffvision.lightning import ImageClassifier
Optimizer = None
"""
# where a checkpoint's hyper_parameters name a class, and what the CLI must then do
NAMED_CLASSES = {
    "_class_path: a module beside the checkpoint": ("_class_path", "helpers_for_model.ImageClassifier", True),
    "_class_path: an installed module (this.Zen)": ("_class_path", "this.Zen", True),
    "optimizer class_path: a module beside the checkpoint": ("optimizer", "helpers_for_model.Optimizer", False),
}


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A real `diffvision fit` checkpoint (one step of a tiny ViT) and the CLI arguments that made it."""
    from diffvision.cli import DiffvisionCLI

    d = tmp_path_factory.mktemp("cli_ckpt")
    make_cifar_npz(d / "cifar", per_class_train=2, per_class_test=1)
    args = ["--config", str(CONFIGS / "cifar10_vit.yaml"), "--data.root", str(d / "cifar"), "--data.cache_dir",
            str(d / "cache"), "--data.num_workers", "0", "--trainer.default_root_dir", str(d / "runs"),
            "--model.init_args.model_kwargs", "{depth: 1, embed_dim: 48}", "--trainer.limit_val_batches", "1", *QUIET]
    cli = DiffvisionCLI(args=["fit", *args, "--trainer.max_steps", "1"])
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", args


@pytest.mark.parametrize("case", list(NAMED_CLASSES))
def test_cli_never_imports_a_class_a_checkpoint_names(case, cli_checkpoint, tmp_path, monkeypatch):
    """LightningCLI resolves a checkpoint's hyper_parameters by importing the classes they name; a checkpoint that
    passes weights_only=True could so run `helpers_for_model.py` from the current directory (issue 20, item 1).
    diffvision's CLI refuses a foreign ``_class_path`` and never takes a class from a checkpoint at all."""
    import sys

    from diffvision.cli import DiffvisionCLI
    from diffvision.models import UnsafeCheckpointError

    key, class_path, refused = NAMED_CLASSES[case]
    source, args = cli_checkpoint
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["_class_path"] == "diffvision.lightning.ImageClassifier"  # what LightningCLI saves
    hparams[key] = class_path if key == "_class_path" else {"class_path": class_path, "init_args": {}}
    ckpt = tmp_path / "model.ckpt"
    torch.save(checkpoint, ckpt)
    marker = tmp_path / "ran"
    (tmp_path / "helpers_for_model.py").write_text(HELPER.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    imported_before = set(sys.modules)
    if refused:
        with pytest.raises(UnsafeCheckpointError, match=rf"refused --ckpt_path {ckpt}: its hyper_parameters name "
                                                        rf"the class '{class_path}'"):
            DiffvisionCLI(args=["validate", *args, "--ckpt_path", str(ckpt)])
    else:  # the config's optimizer, not the checkpoint's: validates as usual
        cli = DiffvisionCLI(args=["validate", *args, "--ckpt_path", str(ckpt)])
        assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert not marker.exists()
    assert {"helpers_for_model", "this"}.isdisjoint(set(sys.modules) - imported_before)


# ------------------------------------------------------------------------------------------------
# Our own checkpoints load weights-only; exports are safetensors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["classifier", "diffusion"])
def test_checkpoints_of_modules_built_in_python_load_weights_only_and_resume(kind, tmp_path):
    """Built in Python (not by the CLI), a module keeps its default optimizer *function* in hparams;
    that function is allowlisted, so load_from_checkpoint and resume work with weights_only=True."""
    if kind == "classifier":
        make = lambda: ImageClassifier(model_name="diff_vit_tiny_patch4_32",  # noqa: E731
                                       model_kwargs=dict(depth=1, embed_dim=48), img_size=16)
        data = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))), batch_size=4)
    else:
        make = lambda: DiffusionModule(**DIFFUSION_KW)  # noqa: E731
        data = DataLoader(TensorDataset(torch.rand(4, 3, 8, 8) * 2 - 1, torch.randint(0, 4, (4,))), batch_size=4)
    module = make()
    trainer = pl.Trainer(max_steps=1, default_root_dir=tmp_path, limit_val_batches=0, **QUIET_TRAINER)
    trainer.fit(module, data)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert callable(raw["hyper_parameters"]["optimizer"])  # the function, by name, not run
    loaded = type(module).load_from_checkpoint(ckpt)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    resumed = pl.Trainer(max_steps=2, default_root_dir=tmp_path, limit_val_batches=0, **QUIET_TRAINER)
    resumed.fit(make(), data, ckpt_path=str(ckpt))
    assert resumed.global_step == 2


def test_exports_are_safetensors_only(tmp_path):
    classifier = ImageClassifier(model_name="diff_vit_tiny_patch4_32", model_kwargs=dict(depth=1, embed_dim=48),
                                 img_size=16)
    classifier.export(tmp_path / "timm")
    assert {p.name for p in (tmp_path / "timm").iterdir()} == {"config.json", "model.safetensors"}
    assert timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).num_classes == 10

    DiffusionModule(**DIFFUSION_KW).export_pipeline(tmp_path / "pipe")
    weights = sorted(p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*")
                     if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    assert weights == ["transformer/diffusion_pytorch_model.safetensors"]
    DiffDiTPipeline.from_pretrained(tmp_path / "pipe")


# ------------------------------------------------------------------------------------------------
# The source never loads unsafely or runs downloaded code
# ------------------------------------------------------------------------------------------------

def _unsafe_calls(source: str) -> list[str]:
    """torch.load without weights_only=True, any weights_only=False, trust_remote_code, torch.hub.load,
    pickle.load(s), allow_pickle=True, torch.jit.load (other than the sha1-pinned FID file)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        const = lambda key: getattr(kw.get(key), "value", None)  # noqa: E731
        if name == "torch.load" and const("weights_only") is not True:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if const("weights_only") is False:
            found.append(f"line {node.lineno}: {name}(weights_only=False)")
        if "trust_remote_code" in kw:
            found.append(f"line {node.lineno}: {name}(trust_remote_code=...)")
        if const("allow_pickle") is True:
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        if name in ("torch.hub.load", "pickle.load", "pickle.loads", "torch.jit.load"):
            found.append(f"line {node.lineno}: {name}")
    return found


_ALLOWED = {"metrics/fid.py": ["torch.jit.load"]}  # fid-helper's own TorchScript file, checked by sha1 first


@pytest.mark.parametrize("relpath", [
    p for p in sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py"))])
def test_source_loads_weights_only_and_runs_no_downloaded_code(relpath):
    found = _unsafe_calls((PACKAGE / relpath).read_text())
    found = [f for f in found if not any(f.endswith(a) for a in _ALLOWED.get(relpath, []))]
    assert not found, f"{relpath}: {found}"


def test_the_source_scan_finds_what_it_looks_for():
    code = ("torch.load(p)\ntorch.load(p, weights_only=False)\nx.from_pretrained(p, trust_remote_code=True)\n"
            "np.load(p, allow_pickle=True)\ntorch.hub.load('a/b', 'm')\npickle.loads(b)\ntorch.load(p, weights_only=True)\n")
    assert len(_unsafe_calls(code)) == 7  # the 2nd torch.load counts twice; the last is fine
