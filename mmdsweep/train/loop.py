"""The MMD-DDM fine-tuning loop (Aiello, Valsesia, Magli 2023, arXiv 2301.07969).

One optimisation step:

1. draw the noise (initial and, for eta > 0, per-step; per sample, seeded by (seed, step,
   global sample index), so the batch is the same whatever the number of workers or micro-batches);
2. run the T-step sampler WITH gradients (exactly T denoiser calls, per-step activation
   checkpointing; the UNet under autocast for ``finetune.precision`` bf16/fp16) to get x0;
3. map x0 into the training feature space (frozen, float32) and gather the features of all
   workers, so the MMD is over the global batch;
4. unbiased MMD^2 against a real minibatch drawn from the real-feature bank;
5. backward (in one pass, or in two passes over micro-batches of ``finetune.micro_batch_size``
   with the exact full-batch gradient: :mod:`mmdsweep.train.microbatch`), average gradients
   across workers, clip, optimizer step, optional EMA.

The trained parameters are the UNet's, or only LoRA adapters (``finetune.adapter: lora``,
:mod:`mmdsweep.train.adapters`); ``finetune.compile`` runs the UNet through ``torch.compile``.

Every ``eval_every`` steps the model is scored (FID/KID at T in the evaluation space) and a
checkpoint is written and reported. The same function runs in one process
(``python -m mmdsweep.finetune``) and inside a Ray Train worker (``mmdsweep.tune``); only the
reporter differs. A non-finite loss or gradient stops the run with status ``diverged`` and
writes no weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmdsweep.assets import components as comp
from mmdsweep.assets.models import Denoiser, save_denoiser
from mmdsweep.config import (
    ConfigError,
    Experiment,
    FinetuneConfig,
    load_experiment,
    parse_override,
    write_resolved,
)
from mmdsweep.core import noise as noise_mod
from mmdsweep.core.mmd import KernelSpec, mmd2_unbiased
from mmdsweep.core.sampling import ChainSpec, run_chain, sample_continuous
from mmdsweep.core.timegrid import TimeGrid
from mmdsweep.inference.evaluation import EvalResult, EvalSpace, Evaluator
from mmdsweep.inference.generate import chain_from_experiment
from mmdsweep.train import adapters, pretrain
from mmdsweep.train import distributed as dist_utils
from mmdsweep.train.microbatch import mmd_backward
from mmdsweep.train.precision import LossScaler, check_supported, wrap_denoiser
from mmdsweep.train.reporting import LocalReporter, Reporter
from mmdsweep.utils import atomic_write_text, progress, resolve_device, set_threads

STATE_FILE = "state.json"


# ----------------------------------------------------------------------------- reporting


@contextlib.contextmanager
def _checkpoint_from(reporter: Reporter) -> Iterator[Path | None]:
    got = reporter.latest_checkpoint_dir()
    if got is None:
        yield None
    elif not isinstance(got, (str, os.PathLike)):
        with got as d:
            yield Path(d) if d is not None else None
    else:
        yield Path(got)


# ----------------------------------------------------------------------------- state


@dataclass
class RunState:
    step: int = 0
    best_fid: float = math.inf
    best_kid: float = math.inf
    best_step: int = -1
    fid_before: float = math.nan
    kid_before: float = math.nan
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    loss_scaler: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    status: str
    state: RunState
    before: EvalResult | None
    after: EvalResult | None
    run_dir: Path | None


def sample_noise(
    shape: tuple[int, ...], *, seed: int, step: int, start: int, count: int, device: torch.device
) -> torch.Tensor:
    """Initial noise for global samples ``start .. start+count`` of one step (role ``train``, key ``step``;
    :mod:`mmdsweep.core.noise` owns every seed)."""
    return noise_mod.initial_noise(shape, seed=seed, role="train", key=step, start=start, count=count).to(
        device
    )


def chain_of(exp: Experiment, den: Denoiser) -> ChainSpec:
    """The run's one chain (sampler, grid, clipping, final clamp), resolved against the model's config."""
    return chain_from_experiment(exp, den.scheduler_config)


def chain_noise(
    shape: tuple[int, ...],
    *,
    seed: int,
    step: int,
    start: int,
    count: int,
    num_steps: int,
    eta: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All the noise of global samples ``start .. start+count`` at one optimisation step.

    Returns ``(x_T, step_noise)``: the initial noise ``(count, *shape)`` and, for ``eta > 0``, the
    per-step noise ``(num_steps, count, *shape)`` (None for eta = 0). Each sample's noise depends
    only on (seed, step, its global index), so micro-batches, workers and batch sizes agree.
    This is the one place the fine-tuning loop draws noise (one call per micro-batch).
    """
    x_T = sample_noise(shape, seed=seed, step=step, start=start, count=count, device=device)
    if eta == 0.0:
        return x_T, None
    z = noise_mod.step_noise(shape, num_steps, seed=seed, role="train", key=step, start=start, count=count)
    return x_T, z.to(device)


def batch_index(ft: FinetuneConfig, step: int) -> int:
    """Which training batch (noise and real minibatch) optimisation step ``step`` uses.

    ``step`` itself (fresh noise every step, the MMD-DDM paper's setting), or ``step mod
    finetune.noise_batches``: a fixed set of batches cycled through (common random numbers). With
    a fixed set the objective is one deterministic function of the parameters, as in LD3 (Tong et
    al., ICLR 2025), which learns a timestep grid on a fixed set of noise samples; for a handful of grid
    parameters this removes the step-to-step noise that makes Adam's normalised steps wander.
    """
    k = ft.noise_batches
    return step if k is None else step % k


def kernel_spec(exp: Experiment) -> KernelSpec:
    """The experiment's MMD kernel (:meth:`KernelSpec.from_config`: the one conversion)."""
    return KernelSpec.from_config(exp.kernel)


def _effective_bandwidth(info: dict[str, Any]) -> float:
    bw = info.get("bandwidth")
    if bw is None:
        bws = info.get("bandwidths")
        if bws:
            return float(sum(bws) / len(bws))
        c = info.get("imq_c")
        return float(c) if c is not None else math.nan
    return float(bw)


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    raw: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler_config: dict[str, Any],
    state: RunState,
    exp: Experiment,
    *,
    base_model: str | None = None,
    grid: TimeGrid | None = None,
    grid_raw: TimeGrid | None = None,
) -> None:
    """A checkpoint directory: a diffusers model (``unet/``, ``scheduler/``) + training state.

    ``grid`` is the learned grid that is scored and exported (the averaged one with
    ``finetune.timestep_ema_decay``); ``grid_raw`` the optimiser's own grid when it differs (for resume).

    With a LoRA adapter (``model`` a peft model) it holds only the adapter (``adapter/``, peft's
    safetensors format), ``scheduler/`` and the training state; ``state.json`` names the
    ``base_model`` directory that :func:`mmdsweep.assets.adapters.merge_adapter_if_any` merges into.
    """
    chain = chain_from_experiment(exp, scheduler_config)
    if grid is not None:  # the rounded learned grid is the chain users get (scored, sampled, exported)
        chain = dataclasses.replace(chain, grid=tuple(grid.rounded()))
    # the saved scheduler config carries the chain's clipping, so every later reader sees the trained chain
    scheduler_config = {
        **scheduler_config,
        "clip_sample": chain.clip_sample,
        "clip_sample_range": chain.clip_sample_range,
    }
    lora = adapters.is_adapter(model)
    if lora:
        if base_model is None:
            raise ValueError("save_checkpoint: a LoRA checkpoint needs base_model")
        directory.mkdir(parents=True, exist_ok=True)
        adapters.save_adapter(directory, model)
        (directory / "scheduler").mkdir(exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    else:
        save_denoiser(directory, model, scheduler_config)
    ts = directory / "train_state"
    ts.mkdir(exist_ok=True)
    learned: dict[str, Any] = {}
    # issue 9: the learned grid, continuous (for resume) and rounded (what is scored and exported)
    if grid is not None:
        tensors = {"logits": grid.logits.detach().cpu().contiguous()}
        if grid_raw is not None:
            tensors["raw_logits"] = grid_raw.logits.detach().cpu().contiguous()
        save_file(tensors, ts / "timegrid.safetensors")
        learned = {"timestep_grid": grid.timesteps(), "timestep_grid_int": grid.rounded()}
    if raw is not None:
        raw_state = adapters.adapter_state(raw) if lora else raw.state_dict()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in raw_state.items()},
            ts / ("raw_adapter.safetensors" if lora else "raw_unet.safetensors"),
        )
    torch.save(optimizer.state_dict(), ts / "optimizer.pt")
    meta = {
        **asdict(state),
        **({adapters.BASE_MODEL_KEY: str(base_model)} if lora else {}),
        "timesteps": exp.sampler.timesteps,
        "sampler": exp.sampler.name,
        "spacing": chain.spacing,
        "eta": exp.sampler.eta,
        "chain": chain.to_dict(),
        "train": exp.finetune.train,
        **learned,
        "experiment": exp.to_dict(),
    }
    atomic_write_text(directory / STATE_FILE, json.dumps(meta, indent=2, default=float))


def load_training_state(
    directory: Path,
    model: torch.nn.Module,
    raw: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    grid: TimeGrid | None = None,
    grid_raw: TimeGrid | None = None,
) -> RunState:
    """Restore weights (or the LoRA adapter), optimizer state and counters from :func:`save_checkpoint`'s directory."""
    if grid is not None:
        saved = load_file(directory / "train_state" / "timegrid.safetensors")
        with torch.no_grad():
            grid.logits.copy_(saved["logits"])
            if grid_raw is not None:
                grid_raw.logits.copy_(saved.get("raw_logits", saved["logits"]))
    ts = directory / "train_state"
    if adapters.is_adapter(model):
        adapters.load_adapter(directory, model)
        if raw is not None:
            raw_path = ts / "raw_adapter.safetensors"
            if raw_path.is_file():
                adapters.set_adapter_state(raw, load_file(raw_path))
            else:
                adapters.load_adapter(directory, raw)
    else:
        weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
        model.load_state_dict(load_file(weights))
        if raw is not None:
            raw_path = ts / "raw_unet.safetensors"
            raw.load_state_dict(load_file(raw_path) if raw_path.is_file() else load_file(weights))
    optimizer.load_state_dict(torch.load(ts / "optimizer.pt", weights_only=True, map_location="cpu"))
    meta = json.loads((directory / STATE_FILE).read_text())
    fields = {k: meta[k] for k in RunState.__dataclass_fields__ if k in meta}
    return RunState(**fields)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Setup:
    """Everything a run needs, built once (and shared by all steps)."""

    exp: Experiment
    device: torch.device
    denoiser: Denoiser
    train_space: torch.nn.Module
    bank: Any
    evaluator: Evaluator | None
    src: comp.ModelSource
    # issue 9: the learned timestep grid of the current run (finetune.train: timesteps | both)
    grid: TimeGrid | None = None
    # the optimiser's own grid when the scored one is its moving average (finetune.timestep_ema_decay)
    grid_raw: TimeGrid | None = None


def build_setup(
    exp: Experiment, device: torch.device, *, evaluate: bool, allow_pretrain: bool = True
) -> Setup:
    src = pretrain.resolve_model_source(exp) if allow_pretrain else comp.resolve_model_source(exp)
    den = comp.load_model(exp, src, device)
    if den.resolution != exp.data.resolution:
        raise ConfigError(
            f"{exp.source}: data.resolution: the model generates {den.resolution}x{den.resolution} images, "
            f"got {exp.data.resolution}"
        )
    channels = den.channels
    train_space = comp.build_space(exp, exp.features.train, src, device, for_eval=False)
    train_key = comp.space_id(exp, exp.features.train, src, for_eval=False)
    bank = comp.build_bank(exp, train_space, train_key, channels, device).to(device)
    evaluator = build_evaluator(exp, src, channels, device) if evaluate else None
    return Setup(exp, device, den, train_space, bank, evaluator, src)


EVAL_PREPROCESSING_KEY = "evalspace-v1-uint8-pilbicubic"  # in every reference cache key (EvalSpace)


def build_evaluator(
    exp: Experiment,
    src: comp.ModelSource,
    channels: int,
    device: torch.device,
    protocol: str = "selection",
) -> Evaluator:
    """The evaluator of one protocol: ``selection`` (noise ``eval.seed``, the selection reference) or ``final``
    (the final reference; pass each of ``eval.final_seeds`` to ``evaluate(seed=...)``).  Spaces are wrapped
    in :class:`EvalSpace` so that real and generated images get the same preprocessing."""
    names = [exp.features.eval, *[n for n in exp.features.extra_eval if n != exp.features.eval]]
    spaces: dict[str, torch.nn.Module] = {}
    refs = {}
    for name in names:
        space = EvalSpace(comp.build_space(exp, name, src, device, for_eval=True))
        sid = f"{comp.space_id(exp, name, src, for_eval=True)}|{EVAL_PREPROCESSING_KEY}"
        spaces[name] = space
        refs[name] = comp.build_reference(exp, space, sid, channels, device, protocol=protocol)
    e = exp.eval
    role = comp.reference_role(exp, protocol)
    n = e.num_samples if protocol == "selection" else (e.final_num_samples or e.num_samples)
    return Evaluator(
        spaces,
        refs,
        primary=exp.features.eval,
        num_samples=n,
        batch_size=e.batch_size,
        seed=e.seed,
        kid_subsets=e.kid_subsets,
        kid_subset_size=e.kid_subset_size,
        device=device,
        reference_name=f"{exp.data.dataset}:{role}",
    )


def evaluate_model(setup: Setup, unet: torch.nn.Module) -> EvalResult:
    assert setup.evaluator is not None
    exp = setup.exp
    den = setup.denoiser
    chain = chain_of(exp, den)
    if setup.grid is not None:  # issue 9: score the rounded learned grid (what an export gives users)
        chain = dataclasses.replace(chain, grid=tuple(setup.grid.rounded()))
    was_training = unet.training
    unet.eval()
    try:
        return setup.evaluator.evaluate(
            den.eps_fn(unet),
            den.schedule,
            (den.channels, den.resolution, den.resolution),
            chain=chain,
            dtype=next(unet.parameters()).dtype,
        )
    finally:
        unet.train(was_training)


def _eval_on_main(setup: Setup, unet: torch.nn.Module) -> EvalResult | None:
    """Evaluate on rank 0 and share the result with every rank."""
    res = evaluate_model(setup, unet) if dist_utils.is_main() else None
    if dist_utils.get_world_size() > 1:
        res = dist_utils.broadcast_object(res, src=0)
    return res


def generate_features(
    setup: Setup,
    eps: Any,
    step: int,
    timesteps: list[int] | TimeGrid,
    start: int,
    count: int,
) -> torch.Tensor:
    """Training-space features of global samples ``start .. start+count`` at ``step`` (differentiable).

    ``eps`` is the denoiser function (``Denoiser.eps_fn``, possibly under autocast). The chain runs
    in the parameters' dtype (float32, or float64 in tests); the features come out in float32
    (float64 stays float64).
    """
    exp, den, ft, sc = setup.exp, setup.denoiser, setup.exp.finetune, setup.exp.sampler
    shape = (den.channels, den.resolution, den.resolution)
    x_T, z = chain_noise(
        shape,
        seed=ft.seed + exp.seed,
        step=batch_index(ft, step),
        start=start,
        count=count,
        num_steps=timesteps.T if isinstance(timesteps, TimeGrid) else len(timesteps),
        eta=sc.eta,
        device=setup.device,
    )
    dtype = next(den.unet.parameters()).dtype
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    if isinstance(timesteps, TimeGrid):  # issue 9: a learned, real-valued grid (differentiable in the grid)
        if z is not None:
            raise ConfigError(f"{exp.source}: finetune.train: a learned timestep grid needs sampler.eta 0")
        chain0 = chain_of(exp, den)
        x0 = sample_continuous(
            eps,
            x_T.to(dtype),
            chain0.schedule_for(den.schedule),  # the chain's clip_sample (sampler.clip_sample or the model's)
            timesteps.grid(),
            sampler=sc.name,
            checkpointing=sc.checkpointing,
        )
        if chain0.final_clamp:
            x0 = x0.clamp(-1.0, 1.0)
        feats_g: torch.Tensor = setup.train_space(x0 if x0.dtype == torch.float64 else x0.float())
        return feats_g if feats_g.dtype == torch.float64 else feats_g.float()
    chain = dataclasses.replace(chain_of(exp, den), timesteps=len(timesteps), grid=tuple(timesteps))
    x0 = run_chain(
        eps,
        x_T.to(dtype),
        den.schedule,
        chain,
        step_noise=None if z is None else z.to(dtype),
        checkpointing=sc.checkpointing,
    )
    feats: torch.Tensor = setup.train_space(x0 if x0.dtype == torch.float64 else x0.float())
    return feats if feats.dtype == torch.float64 else feats.float()


def make_loss_fn(setup: Setup, step: int, spec: KernelSpec, real_global: int) -> Any:
    """``loss_fn(global_fake_features) -> (MMD^2, info)`` against this step's real minibatch."""
    exp, ft = setup.exp, setup.exp.finetune
    real_gen = noise_mod.real_batch_generator(ft.seed + exp.seed, batch_index(ft, step))
    real = setup.bank.sample(real_global, real_gen).to(setup.device)

    def loss_fn(fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return mmd2_unbiased(fake, real.to(fake.dtype), spec, float64=exp.kernel.float64)

    return loss_fn


def mmd_loss(
    setup: Setup,
    unet: torch.nn.Module,
    step: int,
    timesteps: list[int] | TimeGrid,
    spec: KernelSpec,
    real_global: int,
    *,
    rank: int = 0,
    eps: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The MMD-DDM objective of one step: unbiased MMD^2 between the features of T-step samples
    (gathered over all workers, with gradients) and a real minibatch from the bank.

    Worker ``rank`` generates global samples ``rank*b .. (rank+1)*b``, so N workers with batch b
    compute the same loss as one process with batch N*b. (The loop itself uses
    :func:`mmd_step`, which can split the batch into micro-batches.)
    """
    b = setup.exp.finetune.batch_size
    eps = eps if eps is not None else setup.denoiser.eps_fn(unet)
    fake = dist_utils.all_gather_with_grad(generate_features(setup, eps, step, timesteps, rank * b, b))
    loss: tuple[torch.Tensor, dict[str, Any]] = make_loss_fn(setup, step, spec, real_global)(fake)
    return loss


def mmd_step(
    setup: Setup,
    eps: Any,
    step: int,
    timesteps: list[int] | TimeGrid,
    spec: KernelSpec,
    real_global: int,
    *,
    rank: int = 0,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss of one step and its gradient (times ``grad_scale``) accumulated into the parameters' ``.grad``.

    With ``finetune.micro_batch_size`` set, the batch is generated in micro-batches with the exact
    full-batch gradient (two passes, :func:`mmdsweep.train.microbatch.mmd_backward`).
    """
    ft = setup.exp.finetune
    b = ft.batch_size
    return mmd_backward(
        lambda start, count: generate_features(setup, eps, step, timesteps, start, count),
        make_loss_fn(setup, step, spec, real_global),
        start=rank * b,
        count=b,
        micro_batch_size=ft.micro_batch_size,
        grad_scale=grad_scale,
        device=setup.device,
    )


def prepare_model(setup: Setup, unet: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The trained module (the UNet, or a peft LoRA wrapper of it) and the chain's denoiser function.

    The denoiser function runs the (optionally ``torch.compile``d) trained module with the UNet's
    forward under autocast for ``finetune.precision``.
    """
    ft = setup.exp.finetune
    msg = check_supported(ft.precision, setup.device)
    if msg:
        raise ConfigError(f"{setup.exp.source}: {msg}")
    raw = adapters.apply_lora(unet, dataclasses.asdict(ft.lora)) if ft.adapter == "lora" else unet
    forward = compile_module(raw) if ft.compile else raw
    eps = wrap_denoiser(setup.denoiser.eps_fn(forward), ft.precision, setup.device)
    return raw, eps


def compile_module(module: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """``torch.compile(module)`` (parameters shared with ``module``), or ``module`` itself where
    ``torch.compile`` cannot be set up (a one-line note on stderr says so).

    ``backend`` defaults to ``$MMDSWEEP_COMPILE_BACKEND`` or inductor. Compilation happens lazily at
    the first call (inductor needs a C++ compiler on CPU and takes minutes there for a UNet: the
    option is meant for GPUs). The chain calls the UNet at T different timesteps with the same
    shapes, so one graph serves all steps (``dynamic=False``; the timestep is a tensor input).
    """
    chosen = backend or os.environ.get("MMDSWEEP_COMPILE_BACKEND") or "inductor"
    reason = compile_unavailable()
    if reason is not None:
        print(f"finetune.compile: {reason}; running the UNet eagerly", file=sys.stderr)
        return module
    compiled: torch.nn.Module = torch.compile(module, backend=chosen, dynamic=False)  # type: ignore[assignment]
    return compiled


def compile_unavailable() -> str | None:
    """None when ``torch.compile`` can run here; else why not (one line)."""
    if not hasattr(torch, "compile"):  # pragma: no cover - torch < 2.0
        return "torch.compile is not available in this torch"
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except ImportError as e:  # pragma: no cover - broken installation
        return f"torch._dynamo cannot be imported ({e})"
    try:
        if not dynamo.is_dynamo_supported():  # pragma: no cover
            return "torch.compile is not supported on this platform/Python"
    except RuntimeError as e:  # pragma: no cover
        return f"torch.compile is not supported here ({str(e).splitlines()[0]})"
    return None


def run_finetune(
    exp: Experiment,
    reporter: Reporter,
    *,
    setup: Setup | None = None,
    show_progress: bool = False,
    allow_pretrain: bool = True,
    device: torch.device | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> RunSummary:
    """Fine-tune ``exp``'s model with MMD-DDM; reports every ``eval_every`` steps. Resumes if possible."""
    t_begin = time.time()
    set_threads(exp.finetune.threads)
    device = device or resolve_device(exp.finetune.device)
    if setup is None:
        setup = build_setup(exp, device, evaluate=True, allow_pretrain=allow_pretrain)
    ft, sc = exp.finetune, exp.sampler
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    den = setup.denoiser
    unet = den.unet
    unet.train()
    raw, eps = prepare_model(setup, unet)
    scaler = LossScaler(ft.precision)
    ema: torch.nn.Module | None = None
    if ft.ema_decay is not None:
        ema = copy.deepcopy(unet).requires_grad_(False)
    model_for_eval = ema if ema is not None else raw
    # issue 9: finetune.train selects the weights, a learned timestep grid, or both (own lr, no weight decay)
    n_train = den.schedule.num_train_timesteps
    grid = None
    if ft.train != "weights":
        # initialised exactly at the chain's grid (its sampler's spacing), then learned
        grid = TimeGrid([float(t) for t in chain_of(exp, den).timestep_grid(n_train)], n_train).to(device)
    grid_avg = None
    if grid is not None and ft.timestep_ema_decay is not None:
        # Polyak averaging of the grid: the average is scored, checkpointed and exported; Adam trains `grid`
        grid_avg = copy.deepcopy(grid).requires_grad_(False)
    setup.grid, setup.grid_raw = (grid_avg, grid) if grid_avg is not None else (grid, None)
    if ft.train == "timesteps":
        raw.requires_grad_(False)  # the pretrained weights stay bit-identical
    params = [p for p in raw.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}] if params else []
    if grid is not None:
        groups.append({"params": list(grid.parameters()), "lr": ft.timestep_lr, "weight_decay": 0.0})
    opt_cls = torch.optim.AdamW if ft.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(groups, lr=ft.lr, betas=(ft.betas[0], ft.betas[1]), weight_decay=ft.weight_decay)
    spec = kernel_spec(exp)
    timesteps: list[int] | TimeGrid = (
        grid if grid is not None else chain_of(exp, den).timestep_grid(den.schedule.num_train_timesteps)
    )
    real_global = ft.real_batch_size or ft.batch_size * world
    ckpt_every = ft.checkpoint_every or ft.eval_every

    state = RunState()
    with _checkpoint_from(reporter) as ckpt:
        if ckpt is not None:
            state = load_training_state(
                ckpt, model_for_eval, raw if ema is not None else None, optimizer, setup.grid, setup.grid_raw
            )
            scaler.load_state_dict(state.loss_scaler)
    lr_schedule = make_lr_schedule(optimizer, ft.lr_scheduler, ft.lr_warmup_steps, ft.steps, state.step)
    if state.step >= ft.steps and state.last_metrics:
        # resumed from the final checkpoint (e.g. the driver died right after it was written):
        # repeat the final report so that the host records the run as completed
        reporter.report({**state.last_metrics, "status": "completed"}, None)
        return RunSummary("completed", state, None, None, _run_dir(reporter))
    if state.step > 0 and state.last_metrics and getattr(reporter, "resend_on_resume", False):
        # resumed mid-run under a sweep driver: the checkpoint's own report may have died with the
        # driver before the results callback stored it; report it again (one row per trial and step)
        reporter.report(dict(state.last_metrics), None)
    before: EvalResult | None = None
    if state.step == 0:
        before = _eval_on_main(setup, model_for_eval)
        assert before is not None
        state.fid_before, state.kid_before = before.fid, before.kid

    t_start = t_begin - state.elapsed_s
    bar = progress(
        range(state.step, ft.steps),
        desc=f"mmd-ddm T={sc.timesteps}",
        enabled=show_progress and rank == 0,
        total=ft.steps - state.step,
    )
    status = "running"
    last: EvalResult | None = None
    bandwidth = math.nan
    loss_val = math.nan
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss, info = mmd_step(
            setup, eps, step, timesteps, spec, real_global, rank=rank, grad_scale=scaler.scale
        )
        dist_utils.average_gradients(raw)
        # fp16: unscale; an overflow skips this step and lowers the scale (identical on every rank
        # because the gradients were averaged first)
        grads_ok = scaler.unscale_and_check(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, ft.grad_clip if ft.grad_clip else math.inf)
        if grid is not None:  # issue 9: the grid's gradient is averaged and clipped on its own
            dist_utils.average_gradients(grid)
            grad_norm = grad_norm + torch.nn.utils.clip_grad_norm_(
                grid.parameters(), ft.grad_clip if ft.grad_clip else math.inf
            ).to(grad_norm)
        loss_val = float(loss.detach())
        bandwidth = _effective_bandwidth(info)
        finite = math.isfinite(loss_val) and (not grads_ok or bool(torch.isfinite(grad_norm)))
        if not finite:
            status = "diverged"
            state.step = step
            break
        if grads_ok:
            optimizer.step()
        lr_schedule.step()  # a function of the step alone (a skipped fp16 step still advances it)
        state.loss_scaler = scaler.state_dict()
        if grid_avg is not None and grid is not None:
            with torch.no_grad():
                grid_avg.logits.lerp_(grid.logits, 1 - ft.timestep_ema_decay)  # type: ignore[operator]
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), raw.parameters(), strict=True):
                    pe.lerp_(p, 1 - ft.ema_decay)  # type: ignore[operator]
        state.step = step + 1
        if show_progress and rank == 0:
            bar.set_postfix(loss=f"{loss_val:.4g}")
        if state.step % ft.eval_every == 0 or state.step == ft.steps:
            last = _eval_on_main(setup, model_for_eval)
            assert last is not None
            state.elapsed_s = time.time() - t_start
            if last.fid < state.best_fid:
                state.best_fid, state.best_step = last.fid, state.step
            state.best_kid = min(state.best_kid, last.kid)
            done = state.step == ft.steps
            metrics = _metrics(exp, state, last, loss_val, bandwidth, "completed" if done else "running")
            metrics.update(extra_metrics or {})
            state.history.append({k: metrics[k] for k in ("step", "loss", "fid", "kid")})
            state.last_metrics = metrics
            write_ckpt = done or state.step % ckpt_every == 0
            _report(
                reporter,
                metrics,
                setup,
                model_for_eval,
                raw if ema is not None else None,
                optimizer,
                state,
                write_ckpt,
            )
    if hasattr(bar, "close"):
        bar.close()
    if status == "diverged":
        state.elapsed_s = time.time() - t_start
        metrics = _metrics(exp, state, None, loss_val, bandwidth, "diverged")
        metrics.update(extra_metrics or {})
        reporter.report(metrics, None)
        return RunSummary("diverged", state, before, None, _run_dir(reporter))
    return RunSummary("completed", state, before, last, _run_dir(reporter))


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``finetune.lr_scheduler`` for every parameter group (diffusers' ``get_scheduler``: ``constant``,
    ``constant_with_warmup``, ``linear`` or ``cosine`` decay to 0 at ``total_steps`` after a linear warm-up).

    ``step`` is the number of optimizer steps already taken (a resumed run): the schedule is a pure
    function of the step, so it is rebuilt at that step instead of being stored in the checkpoint.
    """
    from diffusers.optimization import get_scheduler

    for g in optimizer.param_groups:  # base rates; a restored optimizer already carries them
        g.setdefault("initial_lr", g["lr"])
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        last_epoch=step - 1,
    )


def _run_dir(reporter: Reporter) -> Path | None:
    d = getattr(reporter, "run_dir", None)
    return Path(d) if d is not None else None


def _metrics(
    exp: Experiment, state: RunState, res: EvalResult | None, loss: float, bandwidth: float, status: str
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "step": state.step,
        "loss": loss,
        "fid": res.fid if res else math.nan,
        "kid": res.kid if res else math.nan,
        "fid_best": state.best_fid if math.isfinite(state.best_fid) else math.nan,
        "kid_best": state.best_kid if math.isfinite(state.best_kid) else math.nan,
        "fid_before": state.fid_before,
        "kid_before": state.kid_before,
        "bandwidth": bandwidth,
        "lr": exp.finetune.lr,
        "elapsed_s": state.elapsed_s,
        "timesteps": exp.sampler.timesteps,
        "num_eval_samples": exp.eval.num_samples,
        "sample_time_per_image_s": res.sample_time_per_image_s if res else math.nan,
        "status": status,
    }
    if res is not None:
        for name, scores in res.per_space.items():
            if name != exp.features.eval:
                m[f"fid@{name}"] = scores["fid"]
                m[f"kid@{name}"] = scores["kid"]
    return m


def _report(
    reporter: Reporter,
    metrics: dict[str, Any],
    setup: Setup,
    model: torch.nn.Module,
    raw: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    write_ckpt: bool,
) -> None:
    if write_ckpt and dist_utils.is_main():
        with tempfile.TemporaryDirectory(prefix="mmdsweep-ckpt-") as tmp:
            d = Path(tmp) / "checkpoint"
            save_checkpoint(
                d,
                model,
                raw,
                optimizer,
                setup.denoiser.scheduler_config,
                state,
                setup.exp,
                base_model=setup.src.model_dir,
                grid=setup.grid,
                grid_raw=setup.grid_raw,
            )
            reporter.report(metrics, d)
    else:
        reporter.report(metrics, None)


# ----------------------------------------------------------------------------- CLI


def format_result(label: str, r: EvalResult | None) -> str:
    if r is None:
        return f"{label}: n/a"
    return f"{label}: FID {r.fid:.3f}  KID {r.kid:.5f}"


def main(argv: list[str] | None = None) -> int:
    from mmdsweep.cli_args import finetune_parser

    args = finetune_parser().parse_args(argv)
    try:
        exp = load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
        lines = comp.preflight(exp, collect=args.dry_run)
    except comp.PreflightError as e:
        return comp.report_missing(e)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path(exp.output.dir) / f"finetune-T{exp.sampler.timesteps}")
    if args.dry_run:
        from mmdsweep.train.memory import dry_run_lines

        for line in lines:
            print(line)
        for line in dry_run_lines(exp):
            print(line)
        print(f"{exp.source}: ok; run directory would be {run_dir}")
        return 0
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        print(
            f"error: {run_dir} exists and is not empty; pass --resume to continue it or --run-dir",
            file=sys.stderr,
        )
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(exp, run_dir)
    t0 = time.time()
    summary = run_finetune(exp, LocalReporter(run_dir), show_progress=not args.no_progress)
    T = exp.sampler.timesteps
    n = exp.eval.num_samples
    print(f"run directory: {run_dir}  ({time.time() - t0:.0f} s)")
    if summary.status == "diverged":
        print(
            f"status: diverged at step {summary.state.step} (non-finite loss or gradient); no weights written"
        )
        return 1
    before = (
        f"FID {summary.state.fid_before:.3f} KID {summary.state.kid_before:.5f}"
        if math.isfinite(summary.state.fid_before)
        else "n/a"
    )
    after = summary.after
    print(
        f"{exp.sampler.name} T={T} ({exp.features.eval} features, {n} samples): before {before} -> "
        f"after FID {after.fid:.3f} KID {after.kid:.5f}"
        if after
        else "after: n/a"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
