"""Typed, validated experiment configuration.

An experiment YAML has one section per concern (``data``, ``model``, ``pretrain``, ``sampler``,
``features``, ``kernel``, ``finetune``, ``eval``, ``search``, ``resources``, ``output``). Each
section maps onto a dataclass below. Loading rejects unknown keys, wrong types and impossible
values before any work starts, with one-line messages of the form::

    experiments/x.yaml: finetune.lr: must be > 0, got -1

The resolved configuration (defaults filled in) is written next to every run's outputs with
:func:`write_resolved`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is the one-line message for the user."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Which real images the model is fine-tuned towards (and evaluated against)."""

    dataset: Literal["digits", "image_folder", "cifar10", "lsun", "celeba"] = "digits"
    root: str | None = None
    resolution: int = 16
    split: str = "train"
    max_images: int | None = None
    channels: int | None = None
    num_workers: int = 0

    def validate(self, where: str) -> None:
        _check(self.resolution >= 4, f"{where}.resolution", f"must be >= 4, got {self.resolution}")
        _check(
            self.max_images is None or self.max_images >= 2,
            f"{where}.max_images",
            f"must be >= 2 or null, got {self.max_images}",
        )
        _check(
            self.channels in (None, 1, 3), f"{where}.channels", f"must be 1, 3 or null, got {self.channels}"
        )
        _check(self.num_workers >= 0, f"{where}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.dataset != "digits":
            _check(self.root is not None, f"{where}.root", f"is required for dataset {self.dataset!r}")


@dataclass
class ModelConfig:
    """The pretrained denoiser.

    ``source: pretrain`` uses the project's own DDPM trained by ``mmdsweep.pretrain`` (the embedded
    default). ``source: diffusers`` loads a diffusers ``UNet2DModel`` + scheduler config from a local
    directory or from a repository id already in the Hugging Face cache (never downloaded).
    """

    source: Literal["pretrain", "diffusers"] = "pretrain"
    path: str | None = None
    unet_subfolder: str | None = None
    scheduler_subfolder: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self, where: str) -> None:
        if self.source == "diffusers":
            _check(self.path is not None, f"{where}.path", "is required when model.source is 'diffusers'")


@dataclass
class PretrainConfig:
    """Training of the embedded default's DDPM and domain classifier (``source: pretrain``)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    lr_warmup: int = 100
    ema_decay: float = 0.995
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    classifier_steps: int = 600
    classifier_width: int = 32
    seed: int = 0
    cache_dir: str = "~/.cache/mmdsweep"

    def validate(self, where: str) -> None:
        for name in ("steps", "batch_size", "num_train_timesteps", "layers_per_block", "classifier_steps"):
            v = getattr(self, name)
            _check(v >= 1, f"{where}.{name}", f"must be >= 1, got {v}")
        _check(self.lr > 0, f"{where}.lr", f"must be > 0, got {self.lr}")
        _check(self.lr_warmup >= 0, f"{where}.lr_warmup", f"must be >= 0, got {self.lr_warmup}")
        _check(0 <= self.ema_decay < 1, f"{where}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(
            len(self.block_out_channels) >= 1 and all(c >= 4 for c in self.block_out_channels),
            f"{where}.block_out_channels",
            f"must be a non-empty list of ints >= 4, got {self.block_out_channels}",
        )
        _check(
            0 < self.beta_start < self.beta_end < 1,
            f"{where}.beta_start",
            f"needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}",
        )


@dataclass
class SamplerConfig:
    """The few-step sampler that is fine-tuned (and evaluated) at exactly ``timesteps`` steps."""

    name: Literal["ddim", "dpmpp_2m"] = "ddim"
    timesteps: int = 5
    spacing: Literal["uniform", "quadratic"] = "uniform"
    eta: float = 0.0
    checkpointing: bool = True
    clip_sample: bool = False
    # issue 9 (learned grids): the initial spacing of a learned grid; null: the old `spacing` key
    timestep_spacing: Literal["leading", "trailing", "linspace", "quadratic"] | None = None

    def validate(self, where: str) -> None:
        _check(self.timesteps >= 1, f"{where}.timesteps", f"must be >= 1, got {self.timesteps}")
        _check(self.eta >= 0, f"{where}.eta", f"must be >= 0, got {self.eta}")
        _check(
            not (self.name == "dpmpp_2m" and self.eta > 0),
            f"{where}.eta",
            f"must be 0 for sampler dpmpp_2m, got {self.eta}",
        )


@dataclass
class FeaturesConfig:
    """Feature spaces: ``train`` for the MMD loss, ``eval`` (and ``extra_eval``) for FID/KID.

    Names: ``inception``, ``clip``, ``torchvision:<arch>``, ``classifier``.
    """

    train: str = "torchvision:mobilenet_v2"
    eval: str = "classifier"
    extra_eval: list[str] = field(default_factory=list)
    train_resize: int | None = None
    eval_resize: int | None = None
    inception_path: str | None = None
    clip_arch: str = "ViT-B-32"
    clip_pretrained: str | None = None
    classifier_path: str | None = None
    torch_home: str | None = None

    def validate(self, where: str) -> None:
        for key in ("train", "eval"):
            _check_feature_name(getattr(self, key), f"{where}.{key}")
        for i, n in enumerate(self.extra_eval):
            _check_feature_name(n, f"{where}.extra_eval[{i}]")
        for key in ("train_resize", "eval_resize"):
            v = getattr(self, key)
            _check(v is None or v >= 16, f"{where}.{key}", f"must be >= 16 or null, got {v}")


_FEATURE_KINDS = ("inception", "clip", "classifier")


def _check_feature_name(name: str, where: str) -> None:
    ok = name in _FEATURE_KINDS or (name.startswith("torchvision:") and len(name) > len("torchvision:"))
    _check(ok, where, f"must be one of inception, clip, classifier, torchvision:<arch>; got {name!r}")


@dataclass
class KernelConfig:
    """MMD kernel. ``bandwidth_mode: median`` makes ``bandwidth`` a multiple of the median distance."""

    type: Literal["polynomial", "rbf", "rbf_mixture", "imq"] = "polynomial"
    degree: int = 3
    gamma: float | None = None
    coef0: float = 1.0
    bandwidth: float = 1.0
    bandwidth_mode: Literal["absolute", "median"] = "median"
    bandwidths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    imq_c: float = 1.0
    float64: bool = True

    def validate(self, where: str) -> None:
        _check(self.degree >= 1, f"{where}.degree", f"must be >= 1, got {self.degree}")
        _check(
            self.gamma is None or self.gamma > 0, f"{where}.gamma", f"must be > 0 or null, got {self.gamma}"
        )
        _check(self.bandwidth > 0, f"{where}.bandwidth", f"must be > 0, got {self.bandwidth}")
        _check(
            len(self.bandwidths) >= 1 and all(b > 0 for b in self.bandwidths),
            f"{where}.bandwidths",
            f"must be a non-empty list of values > 0, got {self.bandwidths}",
        )
        _check(self.imq_c > 0, f"{where}.imq_c", f"must be > 0, got {self.imq_c}")


@dataclass
class FinetuneConfig:
    """The MMD-DDM fine-tuning loop (one per worker). Checkpoints are written with evaluations
    (every ``eval_every`` steps) whose step is a multiple of ``checkpoint_every`` (null: every one)."""

    steps: int = 150
    batch_size: int = 64
    real_batch_size: int | None = None
    lr: float = 2e-5
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    eval_every: int = 50
    checkpoint_every: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    # issue 9: what the MMD gradient trains (the UNet weights, the timestep grid, or both)
    train: Literal["weights", "timesteps", "both"] = "weights"
    timestep_lr: float = 1.0e-2

    def validate(self, where: str) -> None:
        _check(self.steps >= 1, f"{where}.steps", f"must be >= 1, got {self.steps}")
        _check(
            math.isfinite(self.timestep_lr) and self.timestep_lr > 0,
            f"{where}.timestep_lr",
            f"must be a finite number > 0, got {self.timestep_lr}",
        )
        _check(self.batch_size >= 2, f"{where}.batch_size", f"must be >= 2, got {self.batch_size}")
        _check(
            self.real_batch_size is None or self.real_batch_size >= 2,
            f"{where}.real_batch_size",
            f"must be >= 2 or null, got {self.real_batch_size}",
        )
        _check(self.lr > 0, f"{where}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{where}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{where}.betas",
            f"must be two values in [0, 1), got {self.betas}",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"{where}.grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )
        _check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"{where}.ema_decay",
            f"must be in (0, 1) or null, got {self.ema_decay}",
        )
        _check(self.eval_every >= 1, f"{where}.eval_every", f"must be >= 1, got {self.eval_every}")
        _check(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            f"{where}.checkpoint_every",
            f"must be >= 1 or null, got {self.checkpoint_every}",
        )
        _check(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"{where}.device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )
        _check(
            self.threads is None or self.threads >= 1, f"{where}.threads", f"must be >= 1, got {self.threads}"
        )


@dataclass
class EvalConfig:
    """FID/KID at the run's T in the evaluation feature space(s)."""

    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 12345
    num_reference: int | None = None
    kid_subsets: int = 10
    kid_subset_size: int = 500

    def validate(self, where: str) -> None:
        _check(self.num_samples >= 2, f"{where}.num_samples", f"must be >= 2, got {self.num_samples}")
        _check(self.batch_size >= 1, f"{where}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            self.num_reference is None or self.num_reference >= 2,
            f"{where}.num_reference",
            f"must be >= 2 or null, got {self.num_reference}",
        )
        _check(self.kid_subsets >= 1, f"{where}.kid_subsets", f"must be >= 1, got {self.kid_subsets}")
        _check(
            self.kid_subset_size >= 2, f"{where}.kid_subset_size", f"must be >= 2, got {self.kid_subset_size}"
        )


@dataclass
class SearchConfig:
    """Ray Tune + Optuna search. ``space`` maps dotted config keys to distributions (see search.py)."""

    space: dict[str, Any] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["fid"])
    num_samples: int = 6
    algorithm: Literal["tpe", "random", "cmaes"] = "tpe"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    storage: str | None = None
    max_concurrent_trials: int | None = None
    max_failures: int = 2

    def validate(self, where: str) -> None:
        _check(self.num_samples >= 1, f"{where}.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(len(self.objectives) >= 1, f"{where}.objectives", "must name at least one objective")
        for i, o in enumerate(self.objectives):
            _check(
                o in ("fid", "kid", "timesteps", "sample_time"),
                f"{where}.objectives[{i}]",
                f"must be one of fid, kid, timesteps, sample_time; got {o!r}",
            )
        _check(
            not (self.scheduler == "asha" and len(self.objectives) > 1),
            f"{where}.scheduler",
            "asha needs a single objective; use fifo for multi-objective searches",
        )
        _check(self.grace_period >= 1, f"{where}.grace_period", f"must be >= 1, got {self.grace_period}")
        _check(
            self.reduction_factor >= 2,
            f"{where}.reduction_factor",
            f"must be >= 2, got {self.reduction_factor}",
        )
        _check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            f"{where}.max_concurrent_trials",
            f"must be >= 1 or null, got {self.max_concurrent_trials}",
        )
        _check(self.max_failures >= 0, f"{where}.max_failures", f"must be >= 0, got {self.max_failures}")


@dataclass
class ResourcesConfig:
    """Resources of one trial: ``num_workers`` Ray Train workers, each with these resources."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    trial_cpus: float = 0.25
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def validate(self, where: str) -> None:
        _check(self.num_workers >= 1, f"{where}.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(
            self.cpus_per_worker > 0, f"{where}.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}"
        )
        _check(
            self.gpus_per_worker >= 0, f"{where}.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}"
        )
        _check(
            not self.use_gpu or self.gpus_per_worker > 0,
            f"{where}.gpus_per_worker",
            f"must be > 0 when use_gpu is true, got {self.gpus_per_worker}",
        )
        _check(self.trial_cpus > 0, f"{where}.trial_cpus", f"must be > 0, got {self.trial_cpus}")
        _check(
            self.num_cpus is None or self.num_cpus >= 1,
            f"{where}.num_cpus",
            f"must be >= 1, got {self.num_cpus}",
        )


@dataclass
class OutputConfig:
    """Where runs and sweeps write.

    ``dir``/``name`` is the sweep's results directory (Parquet files, exports, report). Ray Tune's
    own experiment state and checkpoints go to ``storage`` (a local path or a URI such as
    ``s3://bucket/prefix`` on a cluster), by default ``<dir>/<name>/ray``.
    ``checkpoints_to_keep`` bounds checkpoints per trial (null keeps all, so the best survives).
    """

    dir: str = "results/default"
    name: str = "sweep"
    storage: str | None = None
    checkpoints_to_keep: int | None = None

    def validate(self, where: str) -> None:
        _check(bool(self.dir), f"{where}.dir", "must not be empty")
        _check(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            f"{where}.name",
            f"must be a plain directory name, got {self.name!r}",
        )
        _check(
            self.checkpoints_to_keep is None or self.checkpoints_to_keep >= 1,
            f"{where}.checkpoints_to_keep",
            f"must be >= 1 or null, got {self.checkpoints_to_keep}",
        )


@dataclass
class Experiment:
    """A whole experiment: every section, plus a name and the file it came from."""

    name: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = field(default="<dict>", metadata={"internal": True})

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)  # type: ignore[union-attr]
        if self.model.source == "pretrain":
            _check(
                self.data.dataset == "digits" or self.data.root is not None,
                "model.source",
                "'pretrain' needs data to train on",
            )
        if self.sampler.timesteps > self.pretrain.num_train_timesteps and self.model.source == "pretrain":
            raise ConfigError(
                f"sampler.timesteps: must be <= pretrain.num_train_timesteps "
                f"({self.pretrain.num_train_timesteps}), got {self.sampler.timesteps}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def with_overrides(self, overrides: Mapping[str, Any]) -> Experiment:
        """A new, re-validated experiment with dotted-key overrides applied."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value, where=self.source)
        return from_dict(d, source=self.source)


# ----------------------------------------------------------------------------- generic loading


def set_dotted(d: dict[str, Any], key: str, value: Any, where: str = "<overrides>") -> None:
    """Set ``d['a']['b'] = value`` for ``key='a.b'``; unknown sections are a :class:`ConfigError`."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if p not in cur or not isinstance(cur[p], dict):
            raise ConfigError(f"{where}: {key}: unknown config key")
        cur = cur[p]
    if parts[-1] not in cur:
        raise ConfigError(f"{where}: {key}: unknown config key")
    cur[parts[-1]] = value


def get_dotted(d: Mapping[str, Any], key: str) -> Any:
    cur: Any = d
    for p in key.split("."):
        cur = cur[p]
    return cur


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int, so messages echo what the user wrote ("got -1")
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'top level'}: must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (valid keys{' in ' + where if where else ''}: {', '.join(fields)})"
        )
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in raw:
            continue
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(raw[name], tp, key)
    return cls(**kwargs)


def from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Experiment:
    """Build and validate an :class:`Experiment`; errors are prefixed with ``source``."""
    try:
        exp: Experiment = _build(Experiment, raw, "")
        exp.source = source
        exp.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return exp


def load_experiment(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Load an experiment YAML (``yaml.safe_load``), apply dotted overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: experiment file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{p}: not valid YAML: {first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        for key, value in overrides.items():
            _set_raw(raw, key, value)
    return from_dict(raw, source=str(p))


def _set_raw(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = raw
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a ``--set key=value`` override; the value is read as YAML (so ``1e-4`` is a float)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value) if value else None
    if isinstance(parsed, str) and any(c in parsed for c in "eE."):
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return key.strip(), parsed


def cli_parser(prog: str, description: str) -> Any:
    """An ``argparse`` parser with the arguments every experiment CLI shares (file, ``--set``)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("experiment", help="experiment YAML, e.g. experiments/digits.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return ap


def write_resolved(exp: Experiment, directory: str | os.PathLike[str]) -> Path:
    """Write the resolved config (all defaults filled in) as ``config.yaml`` and ``config.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = exp.to_dict()
    (d / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    out = d / "config.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def expand(path: str) -> Path:
    """Expand ``~`` and environment variables in a configured path."""
    return Path(os.path.expandvars(os.path.expanduser(path)))


# ----------------------------------------------------------------------------- reference docs


def reference_markdown() -> str:
    """Markdown reference of every section and key with its type and default (docs/configuration.md)."""
    lines = [
        "# Experiment configuration reference",
        "",
        "Generated from `mmdsweep/config.py` by `python -m mmdsweep.config > docs/configuration.md`;",
        "a test checks that this file is current. Unknown keys, wrong types and impossible values are",
        "rejected at load time with `FILE: section.key: message`.",
        "",
        "Top level: `name` (string, default `default`), `seed` (integer, default `0`), and the sections below.",
        "",
    ]
    hints = typing.get_type_hints(Experiment)
    for f in dataclasses.fields(Experiment):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            continue
        doc = " ".join((tp.__doc__ or "").split())
        lines += [f"## `{f.name}`", "", doc, "", "| key | type | default |", "|---|---|---|"]
        sub_hints = typing.get_type_hints(tp)
        instance = tp()  # type: ignore[operator]
        for sf in dataclasses.fields(tp):
            default = getattr(instance, sf.name)
            shown = json.dumps(default) if not isinstance(default, str) else default
            lines.append(f"| `{sf.name}` | {_type_name(sub_hints[sf.name])} | `{shown}` |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
