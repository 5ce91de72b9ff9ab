"""Typed, validated experiment configuration (pydantic v2).

An experiment YAML has one section per concern (``data``, ``model``, ``pretrain``, ``sampler``,
``features``, ``kernel``, ``finetune``, ``eval``, ``search``, ``resources``, ``output``). Each
section is a pydantic dataclass below (so ``dataclasses.asdict``/``replace``/``fields`` keep
working, and ``replace`` re-validates). Loading rejects unknown keys, wrong types, non-finite
numbers and impossible values before any work starts (and before torch or Ray are imported),
with one-line messages of the form::

    experiments/x.yaml: finetune.lr: must be > 0, got -1

The ``search.space`` specification (distributions, ``when`` conditions) is validated here too,
and every value a search parameter can take is checked against its config key, so a sweep
cannot fail later on a value the experiment could never accept.

Two checks need more than the file and live in their own functions, for the CLIs to call:
:func:`mmdsweep.assets.checks.check_feature_names` (imports torchvision) and :func:`check_timesteps_against`
(the loaded model's number of training timesteps).

The resolved configuration (defaults filled in) is written next to every run's outputs with
:func:`write_resolved`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import dataclasses as pdc
from pydantic_core import ErrorDetails, PydanticCustomError


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is the one-line message for the user."""


# ----------------------------------------------------------------------------- value types

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=False)


def _yaml_float(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string: accept it where a number is expected."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


Int = Annotated[int, Strict()]
"""An integer; ``true``, ``5.0`` and ``"5"`` are refused."""
Bool = Annotated[bool, Strict()]
"""``true`` or ``false``; ``yes``, ``1`` and ``"true"`` are refused."""
Str = Annotated[str, Strict()]
Float = Annotated[float, Strict(), BeforeValidator(_yaml_float)]
"""A finite number (ints accepted; nan and inf refused by ``allow_inf_nan=False``)."""
Seed = Annotated[int, Strict(), at.Ge(0), at.Le(2**32 - 1)]


def _err(msg: str, key: str | None = None) -> NoReturn:
    """Raise a validation error whose one-line message is ``msg`` (at ``key`` below the current one)."""
    raise PydanticCustomError("config", "{msg}", {"msg": msg, "key": key or ""})


def _show(value: Any, limit: int = 60) -> str:
    """``repr`` of a user's value, cut to one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- sections


@pdc.dataclass(config=_CONFIG)
class DataConfig:
    """Which real images the model is fine-tuned towards (and evaluated against)."""

    dataset: Literal["digits", "image_folder", "cifar10", "lsun", "celeba"] = Field(
        default="digits",
        description="dataset kind; every kind except `digits` (shipped with scikit-learn) needs `root`",
    )
    root: Str | None = Field(default=None, description="dataset directory (or LMDB for lsun)")
    resolution: Int = Field(default=16, ge=4, description="side of the square images the model sees, pixels")
    split: Str = Field(default="train", description="split that feeds the real-feature bank and training")
    max_images: Int | None = Field(default=None, ge=2, description="use at most this many images (null: all)")
    channels: Literal[1, 3] | None = Field(
        default=None, description="1 (grey) or 3 (RGB); null: the dataset's own number of channels"
    )
    num_workers: Int = Field(default=0, ge=0, description="DataLoader worker processes for reading images")

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.dataset != "digits" and self.root is None:
            _err(f"is required for dataset {self.dataset!r}; set it to the dataset's directory", "root")
        return self


@pdc.dataclass(config=_CONFIG)
class ModelConfig:
    """The pretrained denoiser.

    ``source: pretrain`` uses the project's own DDPM trained by ``mmdsweep.pretrain`` (the embedded
    default). ``source: diffusers`` loads a diffusers ``UNet2DModel`` + scheduler config from a local
    directory or from a repository id already in the Hugging Face cache (never downloaded).
    """

    source: Literal["pretrain", "diffusers"] = Field(
        default="pretrain", description="`pretrain`: the project's own DDPM; `diffusers`: a diffusers model"
    )
    path: Str | None = Field(
        default=None, description="diffusers model directory or cached repository id (source: diffusers)"
    )
    unet_subfolder: Str | None = Field(default=None, description="subfolder of `path` holding the UNet")
    scheduler_subfolder: Str | None = Field(
        default=None, description="subfolder of `path` holding the scheduler config"
    )
    revision: Str | None = Field(default=None, description="repository revision (cached repositories)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype the weights are loaded in"
    )

    @model_validator(mode="after")
    def _path_needed(self) -> ModelConfig:
        if self.source == "diffusers" and self.path is None:
            _err("is required when model.source is 'diffusers'; set a directory or a cached repo id", "path")
        return self


@pdc.dataclass(config=_CONFIG)
class PretrainConfig:
    """Training of the embedded default's DDPM and domain classifier (``source: pretrain``)."""

    steps: Int = Field(default=2000, ge=1, description="DDPM training steps")
    batch_size: Int = Field(default=64, ge=1, description="DDPM training batch size")
    lr: Float = Field(default=1e-3, gt=0, description="DDPM learning rate (AdamW)")
    lr_warmup: Int = Field(default=100, ge=0, description="linear learning-rate warm-up steps")
    ema_decay: Float = Field(
        default=0.995, ge=0, lt=1, description="EMA decay of the DDPM weights, in [0, 1)"
    )
    block_out_channels: list[Annotated[int, Strict(), at.Ge(4)]] = Field(
        default_factory=lambda: [32, 64, 64], min_length=1, description="UNet channels per resolution level"
    )
    layers_per_block: Int = Field(default=1, ge=1, description="UNet ResNet layers per block")
    attention: Bool = Field(default=False, description="add self-attention blocks to the UNet")
    num_train_timesteps: Int = Field(default=1000, ge=1, description="length of the training noise schedule")
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = Field(
        default="linear", description="diffusers beta schedule"
    )
    beta_start: Float = Field(
        default=0.0001, gt=0, lt=1, description="first beta (0 < beta_start < beta_end)"
    )
    beta_end: Float = Field(default=0.02, gt=0, lt=1, description="last beta (beta_start < beta_end < 1)")
    classifier_steps: Int = Field(default=600, ge=1, description="training steps of the domain classifier")
    classifier_width: Int = Field(default=32, ge=1, description="channel width of the domain classifier")
    seed: Seed = Field(default=0, description="seed of pretraining")
    threads: Int = Field(
        default=1,
        ge=1,
        description=(
            "torch intra-op threads while pretraining (the DDPM and the classifier): a fixed count makes"
            " the cached model the same on machines with different core counts, since the order of float"
            " reductions depends on it; restored afterwards"
        ),
    )
    cache_dir: Str = Field(default="~/.cache/mmdsweep", description="where pretrained models are cached")

    @model_validator(mode="after")
    def _betas(self) -> PretrainConfig:
        if not self.beta_start < self.beta_end:
            _err(f"needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}", "beta_start")
        return self


SPACINGS = ("leading", "trailing", "linspace", "quadratic")
_SPACING_ALIASES = {"uniform": "leading", "quadratic": "quadratic"}


@pdc.dataclass(config=_CONFIG)
class SamplerConfig:
    """The few-step sampler that is fine-tuned (and evaluated) at exactly ``timesteps`` steps.

    The old key ``spacing`` (``uniform``/``quadratic``) is still read for one release and
    rewritten to ``timestep_spacing`` (``leading``/``quadratic``) with a note on stderr.
    """

    name: Literal["ddim", "dpmpp_2m", "dpmpp_3m", "unipc"] = Field(
        default="ddim",
        description="sampler: DDIM, DPM-Solver++ 2M / 3M, or UniPC-bh2 (order 2, diffusers' default)",
    )
    timesteps: Int = Field(default=5, ge=1, description="number of denoiser calls T of the sampler")
    timestep_spacing: Literal["leading", "trailing", "linspace", "quadratic"] | None = Field(
        default=None,
        description="timestep grid; null: the sampler's standard grid (ddim: leading; dpmpp_*/unipc: linspace)",
    )
    eta: Float = Field(default=0.0, ge=0, le=1, description="DDIM stochasticity in [0, 1] (0: deterministic)")
    checkpointing: Bool = Field(default=True, description="activation checkpointing per sampler step")
    clip_sample: Bool | None = Field(
        default=None,
        description="clamp the predicted x0 at every step; null: take it from the model's scheduler config",
    )
    clip_sample_range: Float = Field(
        default=1.0, gt=0, description="clip_sample clamps x0 to [-range, range]"
    )
    final_clamp: Bool = Field(
        default=True, description="clamp the chain's output x0 to [-1, 1] (loss, eval, sample, export)"
    )

    @model_validator(mode="after")
    def _eta_only_for_ddim(self) -> SamplerConfig:
        if self.name != "ddim" and self.eta > 0:
            _err(f"must be 0 for sampler {self.name} (eta is DDIM's), got {self.eta}", "eta")
        return self

    @property
    def resolved_spacing(self) -> str:
        """The concrete grid: ``timestep_spacing``, or the sampler's standard grid when null."""
        if self.timestep_spacing is not None:
            return self.timestep_spacing
        return "leading" if self.name == "ddim" else "linspace"

    @property
    def spacing(self) -> str:
        """Deprecated old-style name, for code not yet reading ``timestep_spacing``.

        ``uniform`` for a null or ``leading`` grid, else the ``timestep_spacing`` value.
        """
        if self.timestep_spacing in (None, "leading"):
            return "uniform"
        return self.timestep_spacing


_FEATURE_KINDS = ("inception", "clip", "classifier")


def _feature_name(name: str) -> str:
    ok = name in _FEATURE_KINDS or (name.startswith("torchvision:") and len(name) > len("torchvision:"))
    if not ok:
        _err(f"must be one of inception, clip, classifier, torchvision:<arch>; got {_show(name)}")
    return name


FeatureName = Annotated[str, Strict(), AfterValidator(_feature_name)]


@pdc.dataclass(config=_CONFIG)
class FeaturesConfig:
    """Feature spaces: ``train`` for the MMD loss, ``eval`` (and ``extra_eval``) for FID/KID.

    Names: ``inception``, ``clip``, ``torchvision:<arch>`` (any name in
    ``torchvision.models.list_models()``; checked by :func:`mmdsweep.assets.checks.check_feature_names`), ``classifier``.
    """

    train: FeatureName = Field(
        default="torchvision:mobilenet_v2", description="feature space of the MMD loss"
    )
    eval: FeatureName = Field(default="classifier", description="primary FID/KID feature space")
    extra_eval: list[FeatureName] = Field(default_factory=list, description="further FID/KID feature spaces")
    train_resize: Int | None = Field(default=None, ge=16, description="resize before the train features")
    eval_resize: Int | dict[Str, Int] | None = Field(
        default=None,
        description="resize before the eval features (>= 16): one size for every eval space, or a size per space "
        "name (a space left out: its training size if it is the training space, else its native size)",
    )
    inception_path: Str | None = Field(default=None, description="local Inception weights file")
    clip_arch: Str = Field(default="ViT-B-32", description="open_clip architecture")
    clip_pretrained: Str | None = Field(default=None, description="local open_clip weights file")
    classifier_path: Str | None = Field(default=None, description="domain classifier checkpoint")
    torch_home: Str | None = Field(default=None, description="TORCH_HOME holding torchvision weights")

    @model_validator(mode="after")
    def _eval_resize_names_eval_spaces(self) -> FeaturesConfig:
        sizes = self.eval_resize if isinstance(self.eval_resize, dict) else {"": self.eval_resize}
        for name, size in sizes.items():
            if size is not None and size < 16:
                _err(f"must be >= 16, got {size}" + (f" for {name}" if name else ""), "eval_resize")
        if isinstance(self.eval_resize, dict):
            spaces = [self.eval, *self.extra_eval]
            for name in self.eval_resize:
                if name not in spaces:
                    _err(
                        f"names {_show(name)}, which is not an eval space (eval, extra_eval: {spaces})",
                        "eval_resize",
                    )
        return self


@pdc.dataclass(config=_CONFIG)
class KernelConfig:
    """MMD kernel. ``bandwidth_mode: median`` makes ``bandwidth`` a multiple of the median distance."""

    type: Literal["polynomial", "rbf", "rbf_mixture", "imq"] = Field(
        default="polynomial", description="kernel family"
    )
    degree: Int = Field(default=3, ge=1, description="polynomial degree")
    gamma: Float | None = Field(default=None, gt=0, description="polynomial scale (null: 1 / feature dim)")
    coef0: Float = Field(default=1.0, description="polynomial offset")
    bandwidth: Float = Field(default=1.0, gt=0, description="rbf/imq bandwidth (see bandwidth_mode)")
    bandwidth_mode: Literal["absolute", "median"] = Field(
        default="median", description="`median`: bandwidths are multiples of the median pairwise distance"
    )
    bandwidths: list[Annotated[float, Strict(), BeforeValidator(_yaml_float), at.Gt(0)]] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0], min_length=1, description="rbf_mixture bandwidths"
    )
    imq_c: Float = Field(default=1.0, gt=0, description="imq constant c")
    float64: Bool = Field(default=True, description="compute the MMD in float64")


@pdc.dataclass(config=_CONFIG)
class LoraConfig:
    """Low-rank adapters on the UNet (``finetune.adapter: lora``)."""

    rank: Int = Field(default=8, ge=1, description="LoRA rank r")
    alpha: Float = Field(
        default=8.0, gt=0, description="LoRA scale alpha (the update is scaled by alpha / r)"
    )
    dropout: Float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input, in [0, 1)")
    target_modules: list[Annotated[str, Strict(), at.MinLen(1)]] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        min_length=1,
        description="names of the UNet modules that get adapters",
    )


@pdc.dataclass(config=_CONFIG)
class FinetuneConfig:
    """The MMD-DDM fine-tuning loop (one per worker). Checkpoints are written with evaluations
    (every ``eval_every`` steps) whose step is a multiple of ``checkpoint_every`` (null: every one)."""

    steps: Int = Field(default=150, ge=1, description="optimizer steps")
    batch_size: Int = Field(default=64, ge=2, description="generated images per worker per step")
    real_batch_size: Int | None = Field(
        default=None, ge=2, description="real images per step (null: batch_size x workers)"
    )
    noise_batches: Int | None = Field(
        default=None,
        ge=1,
        description="distinct training batches (noise and real minibatch) cycled through: step s uses batch "
        "s mod noise_batches (null: fresh ones every step)",
    )
    lr: Float = Field(default=2e-5, gt=0, description="learning rate of the weights")
    optimizer: Literal["adam", "adamw"] = Field(default="adam", description="optimizer")
    weight_decay: Float = Field(default=0.0, ge=0, description="weight decay")
    betas: list[Annotated[float, Strict(), BeforeValidator(_yaml_float), at.Ge(0), at.Lt(1)]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2, description="Adam betas, in [0, 1)"
    )
    grad_clip: Float | None = Field(default=1.0, gt=0, description="gradient-norm clip (null: none)")
    ema_decay: Float | None = Field(default=None, gt=0, lt=1, description="EMA of the weights (null: none)")
    eval_every: Int = Field(default=50, ge=1, description="evaluate (and report) every this many steps")
    checkpoint_every: Int | None = Field(
        default=None, ge=1, description="checkpoint at evaluations whose step is a multiple (null: each)"
    )
    seed: Seed = Field(default=0, description="seed of fine-tuning")
    device: Str = Field(default="auto", description="auto, cpu or cuda[:N]")
    threads: Int | None = Field(default=None, ge=1, description="torch threads per worker (null: default)")
    train: Literal["weights", "timesteps", "both"] = Field(
        default="weights", description="what is learned: the UNet weights, the timestep grid, or both"
    )
    timestep_lr: Float = Field(default=1e-2, gt=0, description="learning rate of the learned timestep grid")
    timestep_ema_decay: Float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="exponential moving average of the learned grid's logits (null: none); the averaged grid "
        "is the one scored, checkpointed and exported",
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        default="constant",
        description="learning-rate schedule of every parameter group (diffusers.optimization.get_scheduler)",
    )
    lr_warmup_steps: Int = Field(default=0, ge=0, description="linear warm-up steps of lr_scheduler")
    micro_batch_size: Int | None = Field(
        default=None,
        ge=1,
        description="generate the batch in chunks of this size (null: whole batch); must divide batch_size",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast precision inside the network (schedules and losses stay fp32)"
    )
    adapter: Literal["none", "lora"] = Field(
        default="none", description="`lora`: train low-rank adapters only"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (adapter: lora)")
    compile: Bool = Field(default=False, description="torch.compile the UNet inside the chain")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            _err(f"must be auto, cpu or cuda[:N], got {_show(v)}")
        return v

    @model_validator(mode="after")
    def _micro_batch(self) -> FinetuneConfig:
        mb = self.micro_batch_size
        if mb is not None and self.batch_size % mb:
            _err(
                f"must divide finetune.batch_size ({self.batch_size}, per worker), got {mb}; "
                "pick a divisor or null",
                "micro_batch_size",
            )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            _err(
                f"is {self.lr_warmup_steps} but lr_scheduler 'constant' has no warm-up; use constant_with_warmup, "
                "linear or cosine, or 0",
                "lr_warmup_steps",
            )
        if self.lr_warmup_steps >= self.steps and self.lr_scheduler != "constant":
            _err(
                f"must be below finetune.steps ({self.steps}), got {self.lr_warmup_steps}", "lr_warmup_steps"
            )
        return self


@pdc.dataclass(config=_CONFIG)
class EvalConfig:
    """FID/KID at the run's T, in three roles.

    Selection (the sweep objective, ASHA, best checkpoint): ``num_samples`` images from validation
    noise ``seed`` against ``selection_reference``. Final (the report): ``final_num_samples`` images
    per seed in ``final_seeds`` against ``final_reference``.
    """

    num_samples: Int = Field(default=1000, ge=2, description="images per selection evaluation")
    batch_size: Int = Field(default=250, ge=1, description="generation batch size when evaluating")
    seed: Seed = Field(default=12345, description="seed of the selection (validation) noise")
    num_reference: Int | None = Field(default=None, ge=2, description="reference images (null: all)")
    kid_subsets: Int = Field(default=10, ge=1, description="KID subsets")
    kid_subset_size: Int = Field(default=500, ge=2, description="KID subset size")
    selection_reference: Literal["validation", "train"] = Field(
        default="validation",
        description="selection reference: a seeded held-out part of the training split, or the bank",
    )
    validation_fraction: Float = Field(
        default=0.1, gt=0, le=0.5, description="fraction of the training split kept out of the bank, (0, 0.5]"
    )
    final_seeds: list[Seed] = Field(
        default_factory=lambda: [1001, 1002, 1003],
        min_length=1,
        description="fresh noise seeds for the final report (distinct; fewer than 3 gives a warning)",
    )
    final_num_samples: Int | None = Field(
        default=None, ge=2, description="images per final seed (null: num_samples)"
    )
    final_reference: Literal["heldout", "train"] = Field(
        default="heldout",
        description="final reference: the dataset's test split (or heldout_fraction), or train",
    )
    heldout_fraction: Float = Field(
        default=0.1, gt=0, le=0.5, description="held-out fraction for datasets without a test split, (0, 0.5]"
    )
    baselines: Bool = Field(default=True, description="measure every training-free baseline per T (cached)")
    real_floor: Bool = Field(
        default=True,
        description="score real training images under the final protocol too: the metric's floor (cached)",
    )
    speed_timesteps: list[Annotated[int, Strict(), at.Ge(1)]] = Field(
        default_factory=lambda: [5, 10, 20, 50],
        description="T values at which the sweep times the base model's sampling (plus every trial's T)",
    )

    @model_validator(mode="after")
    def _distinct_seeds(self) -> EvalConfig:
        if len(set(self.final_seeds)) != len(self.final_seeds):
            _err(f"must be distinct seeds, got {_show(self.final_seeds)}", "final_seeds")
        if self.seed in self.final_seeds:
            _err(
                f"must be fresh noise seeds, but {self.seed} is also eval.seed (the selection noise), "
                f"got {_show(self.final_seeds)}",
                "final_seeds",
            )
        return self


Objective = Literal["fid", "kid", "timesteps", "sample_time"]


@pdc.dataclass(config=_CONFIG)
class SearchConfig:
    """Ray Tune + Optuna search. ``space`` maps dotted config keys to distributions (see search.py)."""

    space: dict[str, Any] = Field(
        default_factory=dict, description="dotted config key -> distribution spec (see mmdsweep/search.py)"
    )
    objectives: list[Objective] = Field(
        default_factory=lambda: list[Objective](["fid"]),
        min_length=1,
        description="objectives (several: multi-objective)",
    )
    num_samples: Int = Field(default=6, ge=1, description="number of trials")
    algorithm: Literal["tpe", "random", "cmaes"] = Field(default="tpe", description="Optuna sampler")
    scheduler: Literal["asha", "fifo"] = Field(default="asha", description="trial scheduler")
    grace_period: Int = Field(default=1, ge=1, description="ASHA grace period, in reports")
    reduction_factor: Int = Field(default=2, ge=2, description="ASHA reduction factor")
    seed: Seed = Field(default=0, description="seed of the searcher")
    storage: Str | None = Field(default=None, description="Optuna storage URL (null: in memory)")
    max_concurrent_trials: Int | None = Field(default=None, ge=1, description="null: as resources allow")
    max_failures: Int = Field(default=2, ge=0, description="retries of a failed trial")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="trials to run first ({searched key: value}; keys left out are sampled), e.g. a known-good setting",
    )

    @model_validator(mode="after")
    def _asha_single(self) -> SearchConfig:
        if self.scheduler == "asha" and len(self.objectives) > 1:
            _err("asha needs a single objective; use fifo for multi-objective searches", "scheduler")
        if len(self.points_to_evaluate) > self.num_samples:
            _err(
                f"has {len(self.points_to_evaluate)} points, more than num_samples ({self.num_samples}) trials",
                "points_to_evaluate",
            )
        return self


@pdc.dataclass(config=_CONFIG)
class ResourcesConfig:
    """Resources of one trial: ``num_workers`` Ray Train workers, each with these resources."""

    num_workers: Int = Field(default=1, ge=1, description="Ray Train workers per trial")
    use_gpu: Bool = Field(default=False, description="give each worker GPUs")
    cpus_per_worker: Float = Field(default=1.0, gt=0, description="CPUs per worker")
    gpus_per_worker: Float = Field(default=0.0, ge=0, description="GPUs per worker (> 0 with use_gpu)")
    trial_cpus: Float = Field(default=0.25, gt=0, description="CPUs of each trial's Tune driver function")
    address: Str | None = Field(default=None, description="Ray cluster address (null: start a local Ray)")
    num_cpus: Int | None = Field(default=None, ge=1, description="CPUs of a local Ray (null: all)")
    object_store_memory: Int | None = Field(default=None, ge=1, description="bytes of a local Ray's store")
    gpu_type: Literal["A10G", "A100-40GB", "A100-80GB", "H100", "H200"] | None = Field(
        default=None, description="GPU model, for the --dry-run memory estimate"
    )

    @model_validator(mode="after")
    def _gpus(self) -> ResourcesConfig:
        if self.use_gpu and not self.gpus_per_worker > 0:
            _err(f"must be > 0 when use_gpu is true, got {self.gpus_per_worker}", "gpus_per_worker")
        return self


@pdc.dataclass(config=_CONFIG)
class OutputConfig:
    """Where runs and sweeps write.

    ``dir``/``name`` is the sweep's results directory (Parquet files, exports, report). Ray Tune's
    own experiment state and checkpoints go to ``storage`` (a local path or a URI such as
    ``s3://bucket/prefix`` on a cluster), by default ``<dir>/<name>/ray``.
    ``checkpoints_to_keep`` bounds checkpoints per trial (null keeps all, so the best survives).
    """

    dir: Str = Field(default="results/default", min_length=1, description="results directory")
    name: Str = Field(default="sweep", description="sweep name: a plain directory name under dir")
    storage: Str | None = Field(default=None, description="Ray Tune storage path or URI")
    checkpoints_to_keep: Int | None = Field(default=None, ge=1, description="checkpoints per trial")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in (".", "..") or not v.isprintable():
            _err(f"must be a plain directory name, got {_show(v)}")
        return v


_SECTIONS = (
    "data",
    "model",
    "pretrain",
    "sampler",
    "features",
    "kernel",
    "finetune",
    "eval",
    "search",
    "resources",
    "output",
)


@pdc.dataclass(config=_CONFIG)
class Experiment:
    """A whole experiment: every section, plus a name and the file it came from."""

    name: Str = Field(default="default", description="experiment name")
    seed: Seed = Field(default=0, description="experiment seed")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    source: str = dataclasses.field(default="<dict>", metadata={"internal": True}, repr=False)

    @model_validator(mode="after")
    def _cross_section(self) -> Experiment:
        if self.model.source == "pretrain" and not (self.data.dataset == "digits" or self.data.root):
            _err("'pretrain' needs data to train on", "model.source")
        if self.model.source == "pretrain" and self.sampler.timesteps > self.pretrain.num_train_timesteps:
            _err(
                f"must be <= pretrain.num_train_timesteps ({self.pretrain.num_train_timesteps}), "
                f"got {self.sampler.timesteps}",
                "sampler.timesteps",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what :func:`write_resolved` stores)."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def with_overrides(self, overrides: Mapping[str, Any]) -> Experiment:
        """A new, re-validated experiment with dotted-key overrides applied."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key == "sampler.spacing":  # deprecated alias
                key, value = "sampler.timestep_spacing", _SPACING_ALIASES.get(value, value)
            set_dotted(d, key, value, where=self.source)
        return from_dict(d, source=self.source)


_ADAPTER: TypeAdapter[Experiment] = TypeAdapter(Experiment)


# ----------------------------------------------------------------------------- pydantic errors -> one line


def _one_line(text: str) -> str:
    """Escape anything that would break the message over several lines (or hide in a terminal)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _loc_text(loc: Sequence[Any]) -> str:
    """``('extra_eval', 1)`` -> ``extra_eval[1]``; odd key names are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (a key)"
        else:
            text = str(part)
            if not text or not text.isprintable() or len(text) > 60:
                text = _show(text)
            out += ("." if out else "") + text
    return out


def _section_class(loc: Sequence[Any]) -> Any:
    """The dataclass a location (without its last element) points into, or None."""
    cls: Any = Experiment
    for part in loc:
        fields = getattr(cls, "__pydantic_fields__", None)
        if fields is None or part not in fields:
            return None
        cls = fields[part].annotation
    return cls if hasattr(cls, "__pydantic_fields__") else None


def _unknown_key(loc: Sequence[Any]) -> str:
    cls = _section_class(loc[:-1])
    if cls is None:
        return "unknown key"
    valid = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    where = _loc_text(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (valid keys{' in ' + where if where else ''}: {', '.join(valid)})"


def _message(err: ErrorDetails) -> tuple[list[Any], str]:
    """Location and message (what was expected, what was given) of one pydantic error."""
    kind, ctx, loc = err["type"], err.get("ctx") or {}, list(err["loc"])
    got = f", got {_show(err.get('input'))}"
    if kind == "config":
        if ctx.get("key"):
            loc += str(ctx["key"]).split(".")
        return loc, str(ctx["msg"])
    if kind == "invalid_key":
        return loc[:-1], f"key {_show(err.get('input'))} is not a string; config keys are names such as lr"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return loc, _unknown_key(loc)
    simple = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a finite number",
        "float_parsing": "must be a finite number",
        "finite_number": "must be a finite number (not nan or inf)",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "dataclass_type": "must be a mapping",
        "dataclass_exact_type": "must be a mapping",
        "model_type": "must be a mapping",
    }
    if kind in simple:
        return loc, simple[kind] + got
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = ctx.get({">": "gt", ">=": "ge", "<": "lt", "<=": "le"}[bounds[kind]])
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # "must be > 0", not "> 0.0"
        return loc, f"must be {bounds[kind]} {limit}{got}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        return loc, f"must be one of {expected}{got}"
    if kind == "too_short":
        return loc, f"must have at least {ctx.get('min_length')} item(s){got}"
    if kind == "too_long":
        return loc, f"must have at most {ctx.get('max_length')} item(s){got}"
    if kind == "string_too_short":
        return loc, "must not be empty"
    if kind == "missing":
        return loc, "is required"
    return loc, str(err.get("msg", kind)).removeprefix("Value error, ") + got


def _first_error(exc: ValidationError) -> str:
    """The first (most relevant) error of a pydantic ``ValidationError`` as ``key: message``."""
    loc, msg = _message(exc.errors(include_url=False)[0])
    where = _loc_text(loc)
    return _one_line(f"{where}: {msg}" if where else msg)


# ----------------------------------------------------------------------------- generic loading


def set_dotted(d: dict[str, Any], key: str, value: Any, where: str = "<overrides>") -> None:
    """Set ``d['a']['b'] = value`` for ``key='a.b'``; unknown keys are a :class:`ConfigError`."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if p not in cur or not isinstance(cur[p], dict):
            raise ConfigError(_one_line(f"{where}: {key}: unknown config key"))
        cur = cur[p]
    if parts[-1] not in cur:
        raise ConfigError(_one_line(f"{where}: {key}: unknown config key"))
    cur[parts[-1]] = value


def get_dotted(d: Mapping[str, Any], key: str) -> Any:
    """``d['a']['b']`` for ``key='a.b'``."""
    cur: Any = d
    for p in key.split("."):
        cur = cur[p]
    return cur


def _normalize(raw: Mapping[Any, Any], source: str) -> dict[Any, Any]:
    """Shallow-copied raw config with null sections as ``{}`` and the deprecated key rewritten."""
    out = dict(raw)
    if "source" in out:  # an attribute of Experiment, not a config key
        raise ConfigError(f"{source}: source: {_unknown_key(['source'])}")
    for name in _SECTIONS:
        if name in out and out[name] is None:
            out[name] = {}
    sampler = out.get("sampler")
    if isinstance(sampler, Mapping) and "spacing" in sampler:
        sampler = dict(sampler)
        old = sampler.pop("spacing")
        if "timestep_spacing" in sampler:
            raise ConfigError(
                f"{source}: sampler.spacing: deprecated alias of sampler.timestep_spacing; "
                "remove it and keep timestep_spacing"
            )
        if not isinstance(old, str) or old not in _SPACING_ALIASES:
            raise ConfigError(
                _one_line(
                    f"{source}: sampler.spacing: must be one of 'uniform', 'quadratic', got {_show(old)} "
                    f"(deprecated; use sampler.timestep_spacing: {' | '.join(SPACINGS)})"
                )
            )
        new = _SPACING_ALIASES[old]
        sampler["timestep_spacing"] = new
        out["sampler"] = sampler
        print(
            _one_line(
                f"{source}: sampler.spacing is deprecated and will be removed; "
                f"write sampler.timestep_spacing: {new} (read spacing: {old} as timestep_spacing: {new})"
            ),
            file=sys.stderr,
        )
    return out


def from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Experiment:
    """Build and validate an :class:`Experiment`; errors are prefixed with ``source``.

    Also validates ``search.space`` and checks every value a search parameter can take against
    its config key (see :func:`check_search_space`).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            _one_line(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
        )
    data = _normalize(raw, source)
    try:
        exp = _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise ConfigError(_one_line(f"{source}: {_first_error(e)}")) from None
    except (RecursionError, OverflowError, MemoryError) as e:  # pathological inputs
        raise ConfigError(_one_line(f"{source}: cannot validate: {type(e).__name__}")) from None
    exp.source = source
    check_search_space(exp)
    return exp


def _read_yaml(p: Path) -> Any:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(_one_line(f"{p}: cannot read the experiment file: {e.strerror or e}")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save the file as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        problem = " ".join(str(e.problem or e).split())
        hint = "; use plain YAML (mappings, lists, strings, numbers, booleans, null) without tags"
        raise ConfigError(
            _one_line(
                f"{p}: not valid YAML: {problem}"
                + (f" (line {e.problem_mark.line + 1})" if e.problem_mark else "")
                + (hint if "tag" in problem else "")
            )
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0] if str(e) else "invalid YAML"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            _one_line(f"{p}: not valid YAML: {' '.join(str(problem).split())}{where}")
        ) from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None


def load_experiment(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Load an experiment YAML (``yaml.safe_load``), apply dotted overrides, validate.

    Every problem (missing or unreadable file, non-UTF-8 bytes, invalid YAML, YAML tags, wrong
    shapes, unknown keys, bad values) is a :class:`ConfigError` with a one-line message that
    starts with the file's path. Notes (deprecated keys, few final seeds) go to stderr.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(_one_line(f"{p}: experiment file not found"))
    raw = _read_yaml(p)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        for key, value in overrides.items():
            _set_raw(raw, key, value)
    try:
        exp = from_dict(raw, source=str(p))
    except ConfigError as e:
        raise _blame_override(e, str(p), overrides or {}) from e
    if len(exp.eval.final_seeds) < 3:
        print(
            f"{p}: eval.final_seeds: only {len(exp.eval.final_seeds)} seed(s); "
            "final figures are mean +- std over seeds, use at least 3",
            file=sys.stderr,
        )
    return exp


def _blame_override(err: ConfigError, source: str, overrides: Mapping[str, Any]) -> ConfigError:
    """``err`` naming the ``--set`` override it comes from, when its key is one (``FILE (--set KEY): ...``):
    the value was not in the file."""
    text = str(err)
    head = f"{source}: "
    if not text.startswith(head):
        return err
    loc = text[len(head) :].split(": ", 1)[0]
    for key in overrides:
        if loc == key or loc.startswith((f"{key}.", f"{key}[")):
            return ConfigError(f"{source} (--set {key}): {text[len(head) :]}")
    return err


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
        raise ConfigError(_one_line(f"--set {text}: expected key=value"))
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        raise ConfigError(_one_line(f"--set {text}: the value is not valid YAML")) from None
    if isinstance(parsed, str) and any(c in parsed for c in "eE."):
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return key.strip(), parsed


def cli_parser(prog: str, description: str) -> Any:
    """An ``argparse`` parser with the arguments every experiment CLI shares (file, ``--set``)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("experiment", help="experiment YAML, e.g. experiments/digits.yaml")
    add_set_argument(ap)
    return ap


def add_set_argument(ap: Any) -> None:
    """The repeatable ``--set KEY=VALUE`` override of every experiment CLI (parsed by :func:`parse_override`)."""
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. finetune.lr=1e-5; VALUE is read as YAML, "
        "e.g. '{torchvision:mobilenet_v2: 32}'; repeatable)",
    )


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


# ----------------------------------------------------------------------------- checks needing more than the file


def check_timesteps_against(exp: Experiment, num_train_timesteps: int) -> None:
    """Raise a one-line :class:`ConfigError` if ``sampler.timesteps`` (or a searched value of it)
    exceeds the loaded model's ``num_train_timesteps``. Call it once the model's scheduler config
    is known (``model.source: diffusers``; ``pretrain`` is checked at load)."""
    values = [("sampler.timesteps", exp.sampler.timesteps)]
    for p in validate_space(exp.search.space) if exp.search.space else []:
        if p.key == "sampler.timesteps":
            values += [(f"search.space.{p.key}", v) for v in _probe_values(p)]
    for where, t in values:
        if isinstance(t, int | float) and t > num_train_timesteps:
            raise ConfigError(
                f"{exp.source}: {where}: must be <= the model's num_train_timesteps ({num_train_timesteps}), "
                f"got {t}; use fewer sampler steps"
            )


# ----------------------------------------------------------------------------- search.space specification
#
# The format is documented in mmdsweep/search.py (which turns it into Optuna searchers). The
# specification itself is configuration, so it is validated here, at load, with the rest.

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_OPTIONS = {"uniform": {"step"}, "loguniform": set(), "int": {"log", "step"}, "choice": set()}

Scalar = str | int | float | bool


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One validated search-space entry (one branch of a dotted config key)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Scalar, ...] = ()
    log: bool = False
    step: float | int | None = None
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = dataclasses.field(default=())

    @property
    def optuna_name(self) -> str:
        """Name of this branch in the Optuna study (the key itself when unconditional)."""
        if not self.when:
            return self.key
        conds = ",".join(f"{k}={'|'.join(str(v) for v in vals)}" for k, vals in self.when)
        return f"{self.key}[{conds}]"

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """True when every ``when`` condition holds for the values sampled so far."""
        return all(k in values and _value_in(values[k], vals) for k, vals in self.when)

    def suggest(self, trial: Any) -> Any:
        """Sample this parameter from an Optuna trial under its Optuna name."""
        name = self.optuna_name
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            assert isinstance(self.low, int) and isinstance(self.high, int)
            return trial.suggest_int(name, self.low, self.high, step=int(self.step or 1), log=self.log)
        assert self.low is not None and self.high is not None
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


def _value_in(value: Any, allowed: Sequence[Scalar]) -> bool:
    """Equality that keeps bool and int apart (``True`` does not match ``1``)."""
    return any(type(value) is type(a) and value == a for a in allowed) or any(
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and isinstance(a, int | float)
        and not isinstance(a, bool)
        and value == a
        for a in allowed
    )


def _is_number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _fmt(x: Any) -> str:
    """Render a spec fragment the way it was written (lists without quotes on numbers)."""
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return _show(x) if not isinstance(x, str) else (x if len(x) < 60 else _show(x))


def _bounds(where: str, kind: str, value: Any) -> tuple[Any, Any]:
    """Check a ``[low, high]`` pair for a numeric distribution."""
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"{where}: {kind} needs a list [low, high] of two finite numbers, got {_fmt(value)}")
    low, high = value
    if kind == "loguniform" and not 0 < low < high:
        raise ValueError(f"{where}: loguniform needs 0 < low < high, got {_fmt(value)}")
    if kind == "int":
        if not all(isinstance(v, int) for v in value):
            raise ValueError(f"{where}: int needs integer bounds, got {_fmt(value)}")
        if not low < high:
            raise ValueError(f"{where}: int needs low < high, got {_fmt(value)}")
    if kind == "uniform" and not low < high:
        raise ValueError(f"{where}: uniform needs low < high, got {_fmt(value)}")
    return low, high


def _choices(where: str, value: Any) -> tuple[Scalar, ...]:
    """Check the option list of a ``choice`` distribution."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{where}: choice needs a non-empty list of options, got {_fmt(value)}")
    for v in value:
        if not isinstance(v, str | int | float | bool):
            raise ValueError(f"{where}: choice options must be str, int, float or bool, got {_show(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: choice options must be finite, got {v!r}")
    if len({(type(v), v) for v in value}) != len(value):
        raise ValueError(f"{where}: choice options must be distinct, got {_fmt(value)}")
    return tuple(value)


def _step_and_log(where: str, kind: str, spec: Mapping[str, Any], low: Any, high: Any) -> tuple[Any, bool]:
    """Validate the optional ``step`` and ``log`` options."""
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {_show(log)}")
    step = spec.get("step")
    if log and step not in (None, 1):
        raise ValueError(f"{where}: {kind} cannot combine log: true with step")
    if log and low < 1:
        raise ValueError(f"{where}: int with log: true needs low >= 1, got {_fmt([low, high])}")
    if step is None:
        return None, log
    if kind == "int":
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
            raise ValueError(f"{where}: int step must be an integer >= 1, got {_show(step)}")
        if (high - low) % step:
            raise ValueError(f"{where}: int step {step} does not divide high - low = {high - low}")
    elif not (_is_number(step) and 0 < step <= high - low):
        raise ValueError(f"{where}: uniform step must be a number in (0, high - low], got {_show(step)}")
    return step, log


def _when(
    where: str, raw: Any, parsed: Mapping[str, list[SearchParam]]
) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    """Validate a ``when`` mapping against its (already parsed) parent parameters."""
    out = []
    for parent, allowed in raw.items():
        values = tuple(allowed) if isinstance(allowed, list | tuple) else (allowed,)
        if not values:
            raise ValueError(f"{where}: when {parent!r} needs at least one value")
        for branch in parsed[parent]:
            _check_parent_values(where, parent, branch, values)
        out.append((str(parent), values))
    return tuple(out)


def _check_parent_values(where: str, parent: str, branch: SearchParam, values: tuple[Any, ...]) -> None:
    """Values in ``when`` must be ones the parent can take."""
    if branch.kind == "choice":
        bad = [v for v in values if not _value_in(v, branch.choices)]
        if bad:
            raise ValueError(
                f"{where}: when {parent} = {_fmt(bad)}: not among its choices {_fmt(branch.choices)}"
            )
    elif branch.kind == "int":
        assert branch.low is not None and branch.high is not None
        bad = [v for v in values if not (isinstance(v, int) and branch.low <= v <= branch.high)]
        if bad:
            raise ValueError(f"{where}: when {parent} = {_fmt(bad)}: outside its int range")
    else:
        raise ValueError(
            f"{where}: when can only refer to choice or int parameters; {parent} is {branch.kind}"
        )


def _parse_spec(where: str, key: str, spec: Any, parsed: Mapping[str, list[SearchParam]]) -> SearchParam:
    """Validate one distribution spec into a :class:`SearchParam` (its parents already parsed)."""
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    others = [str(k) for k in spec if k not in DISTRIBUTIONS and k not in ("when", "log", "step")]
    if not kinds and others:
        raise ValueError(
            f"{where}: unknown distribution {_show(others[0])}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: needs exactly one distribution out of {', '.join(DISTRIBUTIONS)}; "
            f"got keys {_show(sorted(map(str, spec)))}"
        )
    kind = kinds[0]
    unknown = set(spec) - {kind, "when"} - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {_show(sorted(map(str, unknown)))} for {kind}")
    when = _when(where, spec["when"], parsed) if "when" in spec else ()
    if kind == "choice":
        return SearchParam(key=key, kind=kind, choices=_choices(where, spec[kind]), when=when)
    low, high = _bounds(where, kind, spec[kind])
    step, log = _step_and_log(where, kind, spec, low, high)
    return SearchParam(
        key=key, kind=kind, low=low, high=high, log=log or kind == "loguniform", step=step, when=when
    )


def _exclusive(a: SearchParam, b: SearchParam) -> bool:
    """True when the two branches' conditions can never hold together."""
    bw = dict(b.when)
    return any(k in bw and not any(_value_in(v, bw[k]) for v in vals) for k, vals in a.when)


def _parents(where: str, spec: Any, keys: Sequence[str]) -> list[str]:
    """Shape-check one spec and return the parameters its ``when`` refers to."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}: a distribution spec must be a mapping like {{uniform: [0, 1]}}, got {_show(spec)}"
        )
    if "when" not in spec:
        return []
    raw = spec["when"]
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{where}: when needs a non-empty mapping {{parameter: value(s)}}, got {_show(raw)}")
    for parent in raw:
        if parent not in keys:
            known = [k for k in keys if k != where]
            raise ValueError(
                f"{where}: when refers to unknown parameter {_show(parent)} (known: {_show(known, 200)})"
            )
    return [str(p) for p in raw]


def _topological(where: str, deps: Mapping[str, set[str]]) -> list[str]:
    """Keys ordered so that every ``when`` parent comes before its children (declaration order
    otherwise); a cycle is an error naming its keys."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(key: str, path: list[str]) -> None:
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            cycle = path[path.index(key) :] + [key]
            raise ValueError(f"{where}: when conditions form a cycle: {' -> '.join(cycle)}")
        state[key] = 1
        for parent in sorted(deps[key], key=list(deps).index):
            visit(parent, [*path, key])
        state[key] = 2
        order.append(key)

    for key in deps:
        visit(key, [])
    return order


def validate_space(space: Any, where: str = "search.space") -> list[SearchParam]:
    """Validate a ``search.space`` mapping; return its parameters, parents before children.

    A ``when`` may refer to a parameter declared later (YAML mapping order does not matter; the
    order is a topological sort, declaration order among independent keys); a cycle is an error.
    Raises ``ValueError`` naming the offending entry, e.g.
    ``search.space.finetune.lr: loguniform needs 0 < low < high, got [0, 1]``.
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"{where}: must be a non-empty mapping of config key -> distribution")
    keys: list[str] = []
    specs_of: dict[str, list[tuple[str, Any]]] = {}
    deps: dict[str, set[str]] = {}
    for key in space:
        if not isinstance(key, str) or not key or any(c in key for c in "[]/= ") or not key.isprintable():
            raise ValueError(
                f"{where}: invalid parameter key {_show(key)} (dotted config key without []/= or spaces)"
            )
        keys.append(key)
    for key in keys:
        raw = space[key]
        specs = raw if isinstance(raw, list) else [raw]
        if not specs:
            raise ValueError(f"{where}.{key}: empty list of branches")
        specs_of[key] = [
            (f"{where}.{key}" + (f"[{i}]" if isinstance(raw, list) else ""), s) for i, s in enumerate(specs)
        ]
        deps[key] = set()
        for w, s in specs_of[key]:
            deps[key].update(_parents(w, s, keys))
    parsed: dict[str, list[SearchParam]] = {}
    params: list[SearchParam] = []
    for key in _topological(where, deps):
        branches = [_parse_spec(w, key, s, parsed) for w, s in specs_of[key]]
        _check_branches(f"{where}.{key}", branches)
        parsed[key] = branches
        params.extend(branches)
    return params


def _check_branches(where: str, branches: list[SearchParam]) -> None:
    """Several specs for one key need a ``when`` each, pairwise exclusive."""
    if len(branches) == 1:
        return
    if any(not b.when for b in branches):
        raise ValueError(f"{where}: with several specs, every spec needs a when condition")
    for i, a in enumerate(branches):
        for b in branches[i + 1 :]:
            if not _exclusive(a, b):
                raise ValueError(f"{where}: branches {a.optuna_name} and {b.optuna_name} may both apply")


def points_to_optuna(
    params: Sequence[SearchParam], points: Sequence[Any], where: str = "search.points_to_evaluate"
) -> list[dict[str, Any]]:
    """Translate warm-start points to the Optuna parameter names of their active branches.

    Each point maps searched dotted keys to values (``{finetune.train: timesteps, kernel.type: polynomial}``);
    keys left out are sampled as usual (Optuna's ``Study.enqueue_trial`` with a partial point). A value must
    lie in its distribution (a listed choice; ``low <= v <= high`` on the ``step`` grid for ranges), and a
    conditional key is allowed only where its ``when`` holds for the values the same point gives.

    Returns one ``{optuna name: value}`` per point (the form ``OptunaSearch(points_to_evaluate=...)`` enqueues).
    Raises ``ValueError`` naming the point and key, e.g.
    ``search.points_to_evaluate[0].kernel.bandwidth: only searched when kernel.type in ['rbf']; give that in the same
    point too``.
    """
    keys = {p.key for p in params}
    out: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        w = f"{where}[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise ValueError(f"{w}: must be a non-empty mapping of searched key -> value, got {_show(point)}")
        for key in point:
            if key not in keys:
                raise ValueError(
                    f"{w}.{key}: not a key of search.space (searched: {', '.join(sorted(keys))})"
                )
        values: dict[str, Any] = {}
        named: dict[str, Any] = {}
        for p in params:  # parents before children (validate_space's order)
            if p.key not in point or p.key in values or not p.is_active(values):
                continue
            value = point[p.key]
            _check_point_value(f"{w}.{p.key}", p, value)
            values[p.key] = value
            named[p.optuna_name] = float(value) if p.kind in ("uniform", "loguniform") else value
        for key in point:
            if key not in values:
                conds = [
                    " and ".join(f"{k} in {list(v)}" for k, v in b.when)
                    for b in params
                    if b.key == key and b.when
                ]
                raise ValueError(
                    f"{w}.{key}: only searched when {' or '.join(conds)}; give that in the same point too"
                )
        out.append(named)
    return out


def _check_point_value(where: str, p: SearchParam, value: Any) -> None:
    if p.kind == "choice":
        if not _value_in(value, p.choices):
            raise ValueError(f"{where}: must be one of {list(p.choices)}, got {_show(value)}")
        return
    assert p.low is not None and p.high is not None
    ok = _is_number(value) and p.low <= value <= p.high
    if ok and p.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and p.step:
        k = (value - p.low) / p.step
        ok = abs(k - round(k)) < 1e-9
    if not ok:
        grid = f" on the step-{p.step:g} grid" if p.step else ""
        kind = "an integer" if p.kind == "int" else "a number"
        raise ValueError(f"{where}: must be {kind} in [{p.low:g}, {p.high:g}]{grid}, got {_show(value)}")


def _probe_values(p: SearchParam) -> list[Any]:
    """Values that stand for everything ``p`` can suggest: every choice, or both ends of a range
    (as floats for ``uniform``/``loguniform``, since Optuna suggests floats there)."""
    if p.kind == "choice":
        return list(p.choices)
    if p.kind == "int":
        return [p.low, p.high]
    assert p.low is not None and p.high is not None
    return [float(p.low), float(p.high)]


def check_search_space(exp: Experiment) -> list[SearchParam]:
    """Validate ``exp.search.space`` and every value each parameter can take.

    Each value is checked by building the experiment with it (and with the values of its
    ``when`` parents), so the key must exist and the value must be valid for its field and the
    cross-field rules: ``finetune.lr: {uniform: [-1, 1]}``, ``sampler.eta: {choice: [0, 2]}`` or
    ``sampler.timesteps: {uniform: [5, 10]}`` (an int key) are refused with a one-line
    :class:`ConfigError`. Returns the parameters (empty when there is no search space).
    """
    space = exp.search.space
    if not space:
        if exp.search.points_to_evaluate:
            raise ConfigError(
                f"{exp.source}: search.points_to_evaluate: needs a search.space to take its keys from"
            )
        return []
    try:
        params = validate_space(space, where="search.space")
        points_to_optuna(params, exp.search.points_to_evaluate)
    except ValueError as e:
        raise ConfigError(_one_line(f"{exp.source}: {e}")) from None
    base = exp.to_dict()
    base["search"]["space"] = {}
    base["search"]["points_to_evaluate"] = []
    by_key = {p.key: p for p in params}
    for p in params:
        parents = {k: vals[0] for k, vals in p.when if k in by_key}
        for value in _probe_values(p):
            d = json.loads(json.dumps(base))
            try:
                for k, v in [*parents.items(), (p.key, value)]:
                    set_dotted(d, k, v, where=exp.source)
            except ConfigError:
                raise ConfigError(
                    _one_line(
                        f"{exp.source}: search.space.{p.key}: not a config key; use a dotted key such as finetune.lr"
                    )
                ) from None
            try:
                _ADAPTER.validate_python(d)
            except ValidationError as e:
                raise ConfigError(
                    _one_line(
                        f"{exp.source}: search.space.{p.key}: value {_show(value)} is invalid: {_first_error(e)}"
                    )
                ) from None
    return params


# ----------------------------------------------------------------------------- reference docs


def _constraint(m: Any) -> str | None:
    for cls, op, attr in ((at.Gt, ">", "gt"), (at.Ge, ">=", "ge"), (at.Lt, "<", "lt"), (at.Le, "<=", "le")):
        if isinstance(m, cls):
            return f"{op} {getattr(m, attr)}"
    if isinstance(m, at.MinLen):
        return f"at least {m.min_length} item(s)" if m.min_length > 1 else "non-empty"
    if isinstance(m, at.MaxLen):
        return f"at most {m.max_length} items"
    return None


def _type_name(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """Human-readable type of an annotation, with its constraints."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        return _type_name(base, [*meta, *metadata])
    cons = [c for c in map(_constraint, metadata) if c]
    suffix = f" ({', '.join(cons)})" if cons else ""
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp)) + suffix
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner}{suffix} or null" if type(None) in get_args(tp) else inner + suffix
    if origin is list:
        return f"a list of [{_type_name(get_args(tp)[0])}]{suffix}"
    if origin is dict:
        return "a mapping"
    if hasattr(tp, "__pydantic_fields__"):
        return "a mapping (see below)"
    name = {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}.get(tp, str(tp))
    return name + suffix


def _section_lines(title: str, cls: Any) -> list[str]:
    doc = " ".join((cls.__doc__ or "").split())
    lines = [f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, Any]] = []
    instance = cls()
    for name, fi in cls.__pydantic_fields__.items():
        default = getattr(instance, name)
        if dataclasses.is_dataclass(default):
            nested.append((f"{title}.{name}", type(default)))
            shown = "see below"
        else:
            shown = json.dumps(default) if not isinstance(default, str) else default
            shown = f"`{shown}`"
        desc = (fi.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(fi.annotation, fi.metadata)} | {shown} | {desc} |")
    lines.append("")
    for sub_title, sub_cls in nested:
        lines += _section_lines(sub_title, sub_cls)
    return lines


def reference_markdown() -> str:
    """Markdown reference of every section and key with its type, default and meaning
    (docs/configuration.md)."""
    lines = [
        "# Experiment configuration reference",
        "",
        "Generated from `mmdsweep/config.py` by `python -m mmdsweep.config > docs/configuration.md`;",
        "a test checks that this file is current. Unknown keys, wrong types, non-finite numbers",
        "(`.nan`, `.inf`) and impossible values are rejected at load time with one line,",
        "`FILE: section.key: message`; so is every value a `search.space` parameter could take",
        "that its key does not accept.",
        "",
        "Top level: `name` (string, default `default`), `seed` (integer, default `0`), and the sections below.",
        "",
        "Deprecated: `sampler.spacing` (`uniform` -> `timestep_spacing: leading`, `quadratic` ->",
        "`timestep_spacing: quadratic`) is still read, with a note on stderr; it goes in the next release.",
        "",
    ]
    for name in _SECTIONS:
        fields: dict[str, Any] = getattr(Experiment, "__pydantic_fields__")  # noqa: B009 (mypy)
        lines += _section_lines(name, fields[name].annotation)
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
