"""The MMD-DDM fine-tuning loop (Aiello, Valsesia, Magli 2023, arXiv 2301.07969).

One optimisation step:

1. draw initial noise z (per sample, seeded by (seed, step, global sample index), so the batch
   is the same whatever the number of workers);
2. run the T-step sampler WITH gradients (exactly T denoiser calls, per-step activation
   checkpointing) to get x0;
3. map x0 into the training feature space (frozen) and gather the features of all workers
   keeping gradients, so the MMD is over the global batch;
4. unbiased MMD^2 against a real minibatch drawn from the real-feature bank;
5. backward, average gradients across workers, clip, optimizer step, optional EMA.

Every ``eval_every`` steps the model is scored (FID/KID at T in the evaluation space) and a
checkpoint is written and reported. The same function runs in one process
(``python -m mmdsweep.finetune``) and inside a Ray Train worker (``mmdsweep.tune``); only the
reporter differs. A non-finite loss or gradient stops the run with status ``diverged`` and
writes no weights.
"""

from __future__ import annotations

import contextlib
import copy
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
    cli_parser,
    load_experiment,
    parse_override,
    write_resolved,
)
from mmdsweep.core.mmd import KernelSpec, mmd2_unbiased
from mmdsweep.core.sampling import sample, sample_continuous, select_timesteps
from mmdsweep.core.timegrid import TimeGrid, legacy_spacing
from mmdsweep.inference.evaluation import EvalResult, Evaluator
from mmdsweep.train import distributed as dist_utils
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
    """Initial noise for global samples ``start .. start+count`` of one step (EDM2-style per-sample seeds)."""
    out = torch.empty((count, *shape))
    for j in range(count):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + start + j)
        out[j] = torch.randn(shape, generator=g)
    return out.to(device)


def kernel_spec(exp: Experiment) -> KernelSpec:
    k = exp.kernel
    return KernelSpec(
        type=k.type,
        degree=k.degree,
        gamma=k.gamma,
        coef0=k.coef0,
        bandwidth=k.bandwidth,
        bandwidth_mode=k.bandwidth_mode,
        bandwidths=list(k.bandwidths),
        imq_c=k.imq_c,
    )


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
    grid: TimeGrid | None = None,
) -> None:
    """A checkpoint directory: a diffusers model (``unet/``, ``scheduler/``) + training state."""
    save_denoiser(directory, model, scheduler_config)
    ts = directory / "train_state"
    ts.mkdir(exist_ok=True)
    learned: dict[str, Any] = {}
    # issue 9: the learned grid, continuous (for resume) and rounded (what is scored and exported)
    if grid is not None:
        save_file({"logits": grid.logits.detach().cpu().contiguous()}, ts / "timegrid.safetensors")
        learned = {"timestep_grid": grid.timesteps(), "timestep_grid_int": grid.rounded()}
    if raw is not None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in raw.state_dict().items()},
            ts / "raw_unet.safetensors",
        )
    torch.save(optimizer.state_dict(), ts / "optimizer.pt")
    meta = {
        **asdict(state),
        "timesteps": exp.sampler.timesteps,
        "sampler": exp.sampler.name,
        "spacing": exp.sampler.spacing,
        "eta": exp.sampler.eta,
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
) -> RunState:
    """Restore weights, optimizer state and counters from :func:`save_checkpoint`'s directory."""
    if grid is not None:
        with torch.no_grad():
            grid.logits.copy_(load_file(directory / "train_state" / "timegrid.safetensors")["logits"])
    weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
    model.load_state_dict(load_file(weights))
    ts = directory / "train_state"
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


def build_setup(
    exp: Experiment, device: torch.device, *, evaluate: bool, allow_pretrain: bool = True
) -> Setup:
    src = comp.resolve_model_source(exp, allow_pretrain=allow_pretrain)
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


def build_evaluator(exp: Experiment, src: comp.ModelSource, channels: int, device: torch.device) -> Evaluator:
    names = [exp.features.eval, *[n for n in exp.features.extra_eval if n != exp.features.eval]]
    spaces: dict[str, torch.nn.Module] = {}
    refs = {}
    for name in names:
        space = comp.build_space(exp, name, src, device, for_eval=True)
        sid = comp.space_id(exp, name, src, for_eval=True)
        spaces[name] = space
        refs[name] = comp.build_reference(exp, space, sid, channels, device)
    e = exp.eval
    return Evaluator(
        spaces,
        refs,
        primary=exp.features.eval,
        num_samples=e.num_samples,
        batch_size=e.batch_size,
        seed=e.seed,
        kid_subsets=e.kid_subsets,
        kid_subset_size=e.kid_subset_size,
        device=device,
    )


def evaluate_model(setup: Setup, unet: torch.nn.Module) -> EvalResult:
    assert setup.evaluator is not None
    exp = setup.exp
    den = setup.denoiser
    was_training = unet.training
    unet.eval()
    try:
        return setup.evaluator.evaluate(
            den.eps_fn(unet),
            den.schedule,
            (den.channels, den.resolution, den.resolution),
            timesteps=exp.sampler.timesteps,
            sampler=exp.sampler.name,
            spacing=exp.sampler.spacing,
            eta=exp.sampler.eta,
            dtype=next(unet.parameters()).dtype,
            grid=setup.grid.rounded() if setup.grid is not None else None,
        )
    finally:
        unet.train(was_training)


def _eval_on_main(setup: Setup, unet: torch.nn.Module) -> EvalResult | None:
    """Evaluate on rank 0 and share the result with every rank."""
    res = evaluate_model(setup, unet) if dist_utils.is_main() else None
    if dist_utils.get_world_size() > 1:
        res = dist_utils.broadcast_object(res, src=0)
    return res


def mmd_loss(
    setup: Setup,
    unet: torch.nn.Module,
    step: int,
    timesteps: list[int] | TimeGrid,
    spec: KernelSpec,
    real_global: int,
    *,
    rank: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The MMD-DDM objective of one step: unbiased MMD^2 between the features of T-step samples
    (gathered over all workers, with gradients) and a real minibatch from the bank.

    Worker ``rank`` generates global samples ``rank*b .. (rank+1)*b``, so N workers with batch b
    compute the same loss as one process with batch N*b.
    """
    exp, den, ft, sc = setup.exp, setup.denoiser, setup.exp.finetune, setup.exp.sampler
    shape = (den.channels, den.resolution, den.resolution)
    noise = sample_noise(
        shape,
        seed=ft.seed + exp.seed,
        step=step,
        start=rank * ft.batch_size,
        count=ft.batch_size,
        device=setup.device,
    )
    gen = torch.Generator().manual_seed(ft.seed * 7919 + step * 4099 + rank)
    chain = sample_continuous if isinstance(timesteps, TimeGrid) else sample  # issue 9: learned grid
    x0 = chain(
        den.eps_fn(unet),
        noise.to(next(unet.parameters()).dtype),
        den.schedule,
        timesteps.grid() if isinstance(timesteps, TimeGrid) else timesteps,  # type: ignore[arg-type]
        sampler=sc.name,
        eta=sc.eta,
        generator=gen,
        checkpointing=sc.checkpointing,
    )
    fake = dist_utils.all_gather_with_grad(setup.train_space(x0.float()))
    real_gen = torch.Generator().manual_seed(ft.seed * 104_729 + step)
    real = setup.bank.sample(real_global, real_gen).to(setup.device)
    return mmd2_unbiased(fake, real, spec, float64=exp.kernel.float64)


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
    raw = unet
    ema: torch.nn.Module | None = None
    if ft.ema_decay is not None:
        ema = copy.deepcopy(unet).requires_grad_(False)
    model_for_eval = ema if ema is not None else raw
    # issue 9: finetune.train selects the weights, a learned timestep grid, or both (own lr, no decay)
    n_train = den.schedule.num_train_timesteps
    grid = None
    if ft.train != "weights":
        spacing0 = legacy_spacing(sc.timestep_spacing, sc.spacing, sc.name)
        grid = TimeGrid.from_spacing(sc.timesteps, n_train, spacing0).to(device)
    setup.grid = grid
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
        grid if grid is not None else select_timesteps(sc.timesteps, n_train, sc.spacing)
    )
    real_global = ft.real_batch_size or ft.batch_size * world
    ckpt_every = ft.checkpoint_every or ft.eval_every

    state = RunState()
    with _checkpoint_from(reporter) as ckpt:
        if ckpt is not None:
            state = load_training_state(
                ckpt, model_for_eval, raw if ema is not None else None, optimizer, grid
            )
    if state.step >= ft.steps and state.last_metrics:
        # resumed from the final checkpoint (e.g. the driver died right after it was written):
        # repeat the final report so that the host records the run as completed
        reporter.report({**state.last_metrics, "status": "completed"}, None)
        return RunSummary("completed", state, None, None, _run_dir(reporter))
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
        loss, info = mmd_loss(setup, raw, step, timesteps, spec, real_global, rank=rank)
        loss.backward()
        dist_utils.average_gradients(raw)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, ft.grad_clip if ft.grad_clip else math.inf)
        if grid is not None:  # issue 9: the grid's gradient is averaged and clipped on its own
            dist_utils.average_gradients(grid)
            grad_norm = grad_norm + torch.nn.utils.clip_grad_norm_(
                grid.parameters(), ft.grad_clip if ft.grad_clip else math.inf
            ).to(grad_norm)
        loss_val = float(loss.detach())
        bandwidth = _effective_bandwidth(info)
        finite = math.isfinite(loss_val) and bool(torch.isfinite(grad_norm))
        if not finite:
            status = "diverged"
            state.step = step
            break
        optimizer.step()
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
                d, model, raw, optimizer, setup.denoiser.scheduler_config, state, setup.exp, setup.grid
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
    ap = cli_parser(
        "python -m mmdsweep.finetune",
        "Run one MMD-DDM fine-tuning run in this process (the loop that Ray Train runs per worker).",
    )
    ap.add_argument("--run-dir", help="output directory (default: <output.dir>/finetune-T<T>)")
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="validate the experiment and its files, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
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
        for line in lines:
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
