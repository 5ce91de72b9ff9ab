"""The sweep: ``python -m mmdsweep.tune experiments/<name>.yaml``.

Each Tune trial samples the experiment's search space (Optuna, define-by-run) and runs the
MMD-DDM fine-tuning loop data-parallel in a Ray Train ``TorchTrainer``; ASHA stops poor trials
early. Results stream into Parquet (``trials.parquet``, ``metrics.parquet``) under the sweep's
results directory; afterwards the best checkpoint for each T is exported as a diffusers
``DDIMPipeline``, sampling speed is measured for the Pareto front, and a leaderboard is printed.

Connects to a running Ray cluster when ``resources.address`` / ``RAY_ADDRESS`` is set (for
example on a cluster started with ``ray up cluster.yaml``) and starts a local Ray otherwise.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdsweep.config import (
    ConfigError,
    Experiment,
    cli_parser,
    expand,
    from_dict,
    load_experiment,
    parse_override,
    write_resolved,
)

# ----------------------------------------------------------------------------- worker side


def worker_loop(config: dict[str, Any]) -> None:
    """The Ray Train per-worker loop: the engine's fine-tuning loop with the trial's parameters."""
    import torch

    from mmdsweep.sweep import raytrain
    from mmdsweep.train.loop import run_finetune

    exp = from_dict(config["experiment"], source=config.get("source", "<sweep>"))
    exp = exp.with_overrides(config.get("params", {}))
    reporter = raytrain.get_reporter(config)
    if exp.resources.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(exp.resources.cpus_per_worker)))
    run_finetune(exp, reporter, allow_pretrain=False, device=device, extra_metrics=_placement())


def _placement() -> dict[str, Any]:
    """How many workers and distinct Ray nodes this trial runs on (reported with every result)."""
    import ray

    from mmdsweep.train import distributed as du

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    nodes = [node]
    if du.get_world_size() > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * du.get_world_size()
        dist.all_gather_object(gathered, node)
        nodes = gathered
    return {"world_size": du.get_world_size(), "num_nodes": len(set(nodes))}


# ----------------------------------------------------------------------------- driver side


def sweep_dir(exp: Experiment) -> Path:
    return (expand(exp.output.dir) / exp.output.name).resolve()


def storage_path(exp: Experiment) -> str:
    if exp.output.storage:
        s = exp.output.storage
        return s if "://" in s else str(expand(s).resolve())
    return str(sweep_dir(exp) / "ray")


def objectives(exp: Experiment) -> tuple[list[str], list[str]]:
    """The reported metrics and modes of the experiment's objectives (``mmdsweep.results.objectives``)."""
    from mmdsweep.results.objectives import objective_metrics

    return objective_metrics(exp.search.objectives)


def validate_sweep(exp: Experiment) -> list[Any]:
    """Check the search space against the experiment: every key exists and every value validates."""
    from mmdsweep.sweep import search

    try:
        params = search.validate_space(exp.search.space, where="search.space")
    except ValueError as e:
        raise ConfigError(f"{exp.source}: {e}") from None
    if not params:
        raise ConfigError(f"{exp.source}: search.space: is empty; name at least one parameter to search")
    reports = max(1, math.ceil(exp.finetune.steps / exp.finetune.eval_every))
    if exp.search.scheduler == "asha" and exp.search.grace_period > reports:
        # ASHA's max_t is the number of reports a trial makes; Ray asserts grace_period <= max_t
        raise ConfigError(
            f"{exp.source}: search.grace_period: must be <= the number of evaluations per trial "
            f"(finetune.steps / finetune.eval_every = {reports}), got {exp.search.grace_period}"
        )
    # each value a parameter can take must give a valid experiment (e.g. a choice of an unknown feature space)
    for p in params:
        for value in _probe_values(p):
            try:
                exp.with_overrides({p.key: value})
            except ConfigError as e:
                msg = str(e).split(": ", 1)[-1]
                raise ConfigError(
                    f"{exp.source}: search.space.{p.key}: value {value!r} is invalid: {msg}"
                ) from None
    return params


def _probe_values(p: Any) -> list[Any]:
    if p.kind == "choice":
        return list(p.choices)
    return [p.low, p.high]


def prepare_caches(exp: Experiment, params: list[Any]) -> None:
    """Pretrain (if needed) and compute feature banks / reference statistics once, before the trials."""
    import torch

    from mmdsweep.assets import components as comp
    from mmdsweep.train import pretrain
    from mmdsweep.train.loop import build_evaluator

    device = torch.device("cpu")
    src = pretrain.resolve_model_source(exp)
    den = comp.load_model(exp, src, device)
    del params  # the searched training spaces come from the experiment (comp.train_space_names)
    for name in comp.train_space_names(exp):
        space = comp.build_space(exp, name, src, device, for_eval=False)
        comp.build_bank(exp, space, comp.space_id(exp, name, src, for_eval=False), den.channels, device)
    build_evaluator(exp, src, den.channels, device)


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (SIGINT/SIGTERM, Tune stopping early)."""


# keys that may differ when a sweep is resumed (where and how it runs, not what it computes)
RESUME_FREE_KEYS = (
    "resources.",
    "output.",
    "search.num_samples",
    "search.max_concurrent_trials",
    "search.max_failures",
    "data.num_workers",
    "finetune.threads",
    "finetune.device",
    "pretrain.cache_dir",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "search." and k == "space"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_fingerprint(exp: Experiment, params: list[Any]) -> tuple[str, dict[str, Any]]:
    """A hash of the keys that decide what a sweep computes (searched and resume-free keys left out)."""
    import hashlib

    searched = {p.key for p in params}
    flat = {
        k: v
        for k, v in _flatten(exp.to_dict()).items()
        if k not in searched and not k.startswith(RESUME_FREE_KEYS)
    }
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], flat


def _check_same_experiment(exp: Experiment, sdir: Path, meta: dict[str, Any], params: list[Any]) -> None:
    """Refuse a sweep directory written by another experiment, before anything is written."""
    stored_name = meta.get("experiment_name")
    if stored_name is not None and stored_name != exp.name:
        raise ConfigError(
            f"{exp.source}: output: {sdir} holds a sweep of experiment {stored_name!r}, not {exp.name!r}; "
            "set output.dir/output.name to a directory of its own (nothing was written)"
        )
    fp, flat = config_fingerprint(exp, params)
    if meta.get("config_fingerprint") == fp:
        return
    stored_flat: dict[str, Any] | None = None
    try:
        import yaml

        raw = yaml.safe_load((sdir / "experiment.yaml").read_text())
        with contextlib.suppress(ConfigError):  # resolve defaults the same way as the current config
            raw = from_dict(raw, source=str(sdir / "experiment.yaml")).to_dict()
        stored_flat = {
            k: v
            for k, v in _flatten(raw).items()
            if k not in {p.key for p in params} and not k.startswith(RESUME_FREE_KEYS)
        }
    except (OSError, ValueError, AttributeError, TypeError):
        stored_flat = None
    if stored_flat is None:
        return  # an old sweep without a readable resolved config: the name check is all we have
    diff = [k for k in sorted(set(flat) | set(stored_flat)) if flat.get(k) != stored_flat.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {stored_flat.get(k)!r} -> {flat.get(k)!r}" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(
            f"{exp.source}: output: {sdir} holds a sweep of experiment {stored_name or exp.name!r} with other "
            f"settings ({shown}{more}); resume it with its own settings or set output.name to start a new "
            "sweep (nothing was written)"
        )


def _tune_state_exists(exp: Experiment) -> bool:
    """Whether Tune saved an experiment state the sweep can be restored from."""
    sp = storage_path(exp)
    if "://" in sp:
        return True  # remote storage: let Tuner.restore decide
    return any((Path(sp) / exp.output.name).glob("experiment_state-*.json"))


def _set_aside(exp: Experiment, sdir: Path) -> Path | None:
    """Move a dead first start's Tune directory and results files under ``sdir/.stale-<time>``."""
    stale = sdir / f".stale-{time.strftime('%Y%m%d-%H%M%S')}"
    moved = False
    candidates = [sdir / "trials.parquet", sdir / "metrics.parquet"]
    sp = storage_path(exp)
    if "://" not in sp:
        candidates.append(Path(sp) / exp.output.name)
    for c in candidates:
        if c.exists():
            stale.mkdir(parents=True, exist_ok=True)
            c.replace(stale / c.name)
            moved = True
    return stale if moved else None


def _sweep_meta(
    exp: Experiment, sdir: Path, resume: bool, params: list[Any] | None = None
) -> tuple[dict[str, Any], bool]:
    """The sweep's metadata and whether Tune restores it; nothing is written here.

    Rules: a directory holding another experiment's sweep is refused (name and the fingerprint
    of the non-searched keys); a sweep with Tune state needs ``--resume``; a sweep whose first
    start died before Tune saved any state (``sweep.json`` but no ``experiment_state``) starts
    afresh, with or without ``--resume``, keeping every cache.
    """
    params = params or []
    from mmdsweep.results.layout import LAYOUT_VERSION, SweepLayout, layout_version

    path = SweepLayout(sdir).sweep_json
    fresh = {
        "layout_version": LAYOUT_VERSION,
        "sweep_id": f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "experiment_name": exp.name,
        "experiment_file": str(Path(exp.source).resolve()),
        "config_fingerprint": config_fingerprint(exp, params)[0],
        "sampler": exp.sampler.name,
        "spacing": exp.sampler.timestep_spacing,
        "objectives": list(exp.search.objectives),
        "eval_space": exp.features.eval,
        "optuna_storage": exp.search.storage,
        "study_name": exp.output.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if path.is_file():
        try:
            meta = dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); move the sweep directory aside") from None
        if layout_version(meta) < LAYOUT_VERSION:
            # Tune's saved state pickles the trainable and callbacks by module path
            # (mmdsweep.tune.worker_loop, mmdsweep.results.ParquetResultsCallback of the flat package)
            raise ConfigError(
                f"{exp.source}: output: {sdir} was written by an older mmdsweep (results layout "
                f"{layout_version(meta)}, this version writes {LAYOUT_VERSION}) and cannot be resumed; "
                "its results stay readable; set output.name to start a new sweep"
            )
        _check_same_experiment(exp, sdir, meta, params)
        if _tune_state_exists(exp):
            if not resume:
                raise ConfigError(
                    f"{exp.source}: output: sweep directory {sdir} already holds a sweep ({meta.get('sweep_id')}); "
                    "pass --resume to continue it or set output.name to start a new one"
                )
            return meta, True
        fresh["restarted_from"] = meta.get("sweep_id")
        fresh["stale_study_name"] = meta.get("study_name")
        return fresh, False
    if resume and (sdir / "experiment.yaml").is_file():
        return fresh, False  # died before sweep.json was written: nothing to resume, start afresh
    if resume:
        raise ConfigError(f"{exp.source}: --resume: no sweep to resume in {sdir}")
    return fresh, False


def _fresh_study_name(exp: Experiment, meta: dict[str, Any]) -> str:
    """A study name not yet in the Optuna storage (a dead first start may have created one)."""
    name = str(meta["study_name"])
    if not exp.search.storage:
        return name
    import optuna

    from mmdsweep.sweep.search import close_orphan_trials

    try:
        existing = {s.study_name for s in optuna.get_all_study_summaries(exp.search.storage)}
    except Exception:  # noqa: BLE001 - no database yet
        return name
    if name not in existing:
        return name
    close_orphan_trials(exp.search.storage, name)  # the dead start's suggestions never ran
    k = 2
    while f"{name}-{k}" in existing:
        k += 1
    return f"{name}-{k}"


def _write_meta(sdir: Path, meta: dict[str, Any]) -> None:
    from mmdsweep.fsio import atomic_write_text
    from mmdsweep.results.layout import SweepLayout

    atomic_write_text(SweepLayout(sdir).sweep_json, json.dumps(meta, indent=2, default=str))


def _cluster(exp: Experiment) -> dict[str, float] | None:
    """The resources of the Ray cluster at ``resources.address`` (None: this machine is checked)."""
    address = exp.resources.address
    if not address or address == "local":
        return None
    from mmdsweep.sweep import raytrain

    try:
        return raytrain.cluster_resources(address)
    except ConfigError as e:
        raise ConfigError(f"{exp.source}: {e}") from None


def run(
    exp: Experiment, *, resume: bool = False, verbose: int = 1, ray_verbose: bool = False
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``exp``; returns the sweep metadata (also in ``sweep.json``).

    Every check (search space, files, their content, resources, output directories, the sweep
    directory's owner) runs before anything is written. Raises :class:`SweepInterrupted` when the
    sweep stopped before every trial ended (then nothing is exported; ``--resume`` continues).
    """
    from mmdsweep.assets import checks
    from mmdsweep.assets import components as comp
    from mmdsweep.results.layout import SweepLayout
    from mmdsweep.sweep import raytrain, search
    from mmdsweep.sweep.callback import ParquetResultsCallback

    params = validate_sweep(exp)
    comp.preflight(exp)
    checks.check_resources(exp, cluster=_cluster(exp))
    checks.check_content(exp, params, progress=verbose > 0)
    sdir = sweep_dir(exp)
    meta, resume = _sweep_meta(exp, sdir, resume, params)
    try:
        raytrain.release_stale_ray(sdir)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if not resume:
        stale = _set_aside(exp, sdir) if sdir.is_dir() else None
        if stale is not None:
            print(
                f"note: {sdir}: the previous start stopped before Tune saved any state; starting afresh "
                f"(caches kept, its files moved to {stale.name})",
                file=sys.stderr,
            )
        meta["study_name"] = _fresh_study_name(exp, meta)
    sdir.mkdir(parents=True, exist_ok=True)
    write_resolved(exp, sdir)
    (sdir / "config.yaml").replace(SweepLayout(sdir).experiment)
    (sdir / "config.json").unlink(missing_ok=True)
    meta["status"] = "running"
    _write_meta(sdir, meta)
    t0 = time.time()
    prepare_caches(exp, params)
    src = comp.resolve_model_source(exp)
    meta["base_model_dir"] = _base_model_dir(exp, src.model_dir)
    _write_meta(sdir, meta)
    prep_s = time.time() - t0

    r = exp.resources
    raytrain.init_ray(r.address, r.num_cpus, r.object_store_memory, verbose=ray_verbose)
    raytrain.record_ray_session(sdir)
    import ray

    total = ray.cluster_resources()
    max_conc = exp.search.max_concurrent_trials or raytrain.max_concurrent_from_resources(
        total.get("CPU", 0.0),
        total.get("GPU", 0.0),
        r.num_workers,
        r.cpus_per_worker,
        r.gpus_per_worker if r.use_gpu else 0.0,
        r.trial_cpus,
    )
    trainable = raytrain.make_trial_trainable(
        worker_loop,
        num_workers=r.num_workers,
        use_gpu=r.use_gpu,
        cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker,
        max_failures=exp.search.max_failures,
        storage_path=storage_path(exp),
        base_loop_config={"experiment": exp.to_dict(), "source": exp.source},
        trial_cpus=r.trial_cpus,
        checkpoints_to_keep=exp.output.checkpoints_to_keep,
    )
    metrics, modes = objectives(exp)
    callback = ParquetResultsCallback(sdir, meta["sweep_id"], search.param_types(params), exp.name)
    scheduler = (
        {
            "type": "asha",
            "grace_period": exp.search.grace_period,
            "reduction_factor": exp.search.reduction_factor,
            "max_t": max(1, math.ceil(exp.finetune.steps / exp.finetune.eval_every)),
        }
        if exp.search.scheduler == "asha"
        else None
    )
    t1 = time.time()
    grid = raytrain.run_sweep(
        trainable,
        params=params,
        metrics=metrics,
        modes=modes,
        num_samples=exp.search.num_samples,
        max_concurrent_trials=max_conc,
        scheduler=scheduler,
        storage_path=storage_path(exp),
        name=exp.output.name,
        callbacks=[callback],
        resume=resume,
        searcher_seed=exp.search.seed,
        optuna_storage=exp.search.storage,
        sampler=exp.search.algorithm,
        verbose=verbose,
        study_name=str(meta.get("study_name") or exp.output.name),
        points_to_evaluate=exp.search.points_to_evaluate,
    )
    meta["sweep_seconds"] = round(meta.get("sweep_seconds", 0.0) + time.time() - t1, 1)
    meta["prepare_seconds"] = round(prep_s, 1)
    meta["max_concurrent_trials"] = max_conc
    meta["baseline"] = {**meta.get("baseline", {}), **_baseline(grid)}
    statuses = raytrain.trial_statuses(grid)
    if not raytrain.sweep_finished(grid, exp.search.num_samples):
        meta["status"] = "interrupted"
        _write_meta(sdir, meta)
        raise SweepInterrupted(
            f"sweep interrupted before all {exp.search.num_samples} trials ended "
            f"(Tune returned {len(statuses)} trial(s), states {sorted(set(statuses))}); nothing exported; "
            f"continue with `python -m mmdsweep.tune {exp.source} --resume`"
        )
    meta["status"] = "finished"
    _write_meta(sdir, meta)
    t2 = time.time()
    meta.update(finalize(exp, sdir, meta))
    meta["final_seconds"] = round(time.time() - t2, 1)
    _write_meta(sdir, meta)
    return meta


def _base_model_dir(exp: Experiment, model_dir: str) -> str:
    """The base model's directory for sweep.json: a hub repository id resolves to its cached snapshot."""
    if "://" in model_dir:
        return model_dir
    from mmdsweep.assets.models import resolve_model_dir

    revision = exp.model.revision if exp.model.source == "diffusers" else None
    return str(resolve_model_dir(model_dir, revision).resolve())


def _baseline(grid: Any) -> dict[str, dict[str, Any]]:
    """Selection-protocol FID/KID of the pretrained model's own chain at each T (the trials' "before"
    evaluations).  The final comparison uses :func:`mmdsweep.evaluate.baseline_rows` instead (every
    training-free sampler x spacing, final protocol)."""
    out: dict[str, dict[str, Any]] = {}
    for result in grid:
        m = result.metrics or {}
        T, fid = m.get("timesteps"), m.get("fid_before")
        if T is None or fid is None or not math.isfinite(float(fid)):
            continue
        out[str(int(T))] = {
            "fid": float(fid),
            "kid": float(m.get("kid_before", math.nan)),
            "protocol": "selection",
        }
    return out


TRAIN_PARAM = "param.finetune.train"
"""The trials column of the searched ``finetune.train`` mode (absent when it is not searched)."""


@dataclass(frozen=True)
class FinalCandidate:
    """A trial scored under the final protocol after the sweep: the best one of its (T, ``finetune.train``
    mode); ``exported`` when it is also the best of its T (the exported model)."""

    timesteps: int
    train: str
    trial_id: str
    selection_fid: float
    checkpoint: str  # best_checkpoint of trials.parquet (a local path or a URI) or, once fetched, a local dir
    exported: bool


def final_candidates(trials: Any, default_mode: str) -> list[FinalCandidate]:
    """The lowest-``best_fid`` trial with a checkpoint per (T, ``finetune.train`` mode), sorted by T then mode.

    The mode is the trial's ``param.finetune.train`` when that parameter is searched, else ``default_mode``
    (the experiment's ``finetune.train``). ``exported`` marks the best trial of each T over all modes, the
    one :func:`finalize` exports.
    """
    ok = trials[trials["best_checkpoint"].notna() & trials["best_fid"].notna()].copy()
    if ok.empty:
        return []
    ok["_mode"] = ok[TRAIN_PARAM].fillna(default_mode).astype(str) if TRAIN_PARAM in ok else default_mode
    ok = ok.sort_values("best_fid", kind="stable")
    best_t = set(ok.groupby("timesteps").head(1)["trial_id"])
    out = []
    for (T, mode), group in ok.groupby(["timesteps", "_mode"], sort=True):
        r = group.iloc[0]
        out.append(
            FinalCandidate(
                timesteps=int(T),
                train=str(mode),
                trial_id=str(r["trial_id"]),
                selection_fid=float(r["best_fid"]),
                checkpoint=str(r["best_checkpoint"]),
                exported=r["trial_id"] in best_t,
            )
        )
    return out


def finalize(exp: Experiment, sdir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Export the best checkpoint per T (or say why not), score it, the best trial of every other searched
    ``finetune.train`` mode at that T and every training-free baseline under the final protocol (fresh seeds,
    held-out reference; ``evaluation.parquet``), and measure sampling speed."""
    import dataclasses

    from mmdsweep.inference.export import export_pipeline
    from mmdsweep.results import read_trials
    from mmdsweep.results.layout import SweepLayout
    from mmdsweep.train import protocol as ev

    layout = SweepLayout(sdir)
    trials = read_trials(sdir)
    exports: dict[str, str] = {}
    refused: dict[str, str] = {}
    best_ckpts: dict[int, tuple[Path, str, float]] = {}
    ok = trials[trials["best_checkpoint"].notna() & trials["best_fid"].notna()]
    for T, group in ok.groupby("timesteps"):
        best = group.sort_values("best_fid").iloc[0]
        ckpt = _fetch_checkpoint(str(best["best_checkpoint"]), layout.checkpoint(int(T)))
        if ckpt is None or not (ckpt / "unet").is_dir():
            print(
                f"warning: best checkpoint for T={T} is not readable ({best['best_checkpoint']})",
                file=sys.stderr,
            )
            continue
        best_ckpts[int(T)] = (ckpt, str(best["trial_id"]), float(best["best_fid"]))
        out = layout.exported(int(T))
        try:
            export_pipeline(ckpt, out, timesteps=int(T))
            exports[str(int(T))] = str(out.relative_to(sdir))
        except ValueError as e:  # the chain cannot be reproduced by diffusers: say so, keep the checkpoint
            refused[str(int(T))] = str(e)
            print(f"warning: T={int(T)} not exported: {e}", file=sys.stderr)
    result: dict[str, Any] = {"exports": exports, "export_refused": refused}
    _write_meta(sdir, {**meta, **result})
    # the exported model per T, and beside it the best trial of each other finetune.train mode at that T
    candidates: list[FinalCandidate] = []
    for c in final_candidates(trials, exp.finetune.train):
        if c.exported:
            if c.timesteps in best_ckpts:  # fetched above (an unreadable one was reported there)
                candidates.append(dataclasses.replace(c, checkpoint=str(best_ckpts[c.timesteps][0])))
            continue
        ckpt = _fetch_checkpoint(c.checkpoint, layout.candidate_checkpoint(c.timesteps, c.train))
        if ckpt is None or not (ckpt / "unet").is_dir():
            print(
                f"warning: best checkpoint for T={c.timesteps}, finetune.train={c.train} is not readable "
                f"({c.checkpoint}); not final-scored",
                file=sys.stderr,
            )
            continue
        candidates.append(dataclasses.replace(c, checkpoint=str(ckpt)))
    result["final"] = final_evaluation(exp, sdir, meta, candidates, ev)
    _write_meta(sdir, {**meta, **result})
    from mmdsweep.inference import speed

    ts = sorted(set(exp.eval.speed_timesteps) | {int(t) for t in trials["timesteps"].dropna().unique()})
    df = speed.measure_sweep_speed(
        sdir,
        timesteps=ts,
        batch_size=min(64, exp.eval.batch_size),
        num_images=min(64, exp.eval.num_samples),
        device=exp.finetune.device,
    )
    speed.write_speed_table(sdir, df, sweep_id=meta["sweep_id"])
    return result


def final_evaluation(
    exp: Experiment, sdir: Path, meta: dict[str, Any], candidates: list[FinalCandidate], ev: Any
) -> list[dict[str, Any]]:
    """Final-protocol rows of each candidate (local checkpoint directories) and of every baseline at their
    T -> ``evaluation.parquet``; returns the comparison (:func:`mmdsweep.results.evaluation.final_comparison`)
    as ``sweep.json``'s ``final`` entries: one per (space, T, mode), the primary space first.

    Each entry: ``T``, ``train`` (the ``finetune.train`` mode), ``exported``, ``trial_id``, ``selection_fid``,
    ``fid_mean``/``fid_std`` (final protocol), ``k``, ``num_samples``, ``reference``, ``space``, ``primary``,
    ``warnings`` and, with baselines, ``best_baseline``, ``baseline_fid_mean``/``baseline_fid_std``, ``gain``,
    ``diff_std``, ``beyond_2std``; with ``eval.real_floor``, ``floor_fid_mean``/``floor_fid_std``/
    ``floor_num_samples`` (real training images under the same protocol: the metric's floor)."""
    import pandas as pd

    from mmdsweep.inference.generate import prepare_model
    from mmdsweep.results.evaluation import final_comparison
    from mmdsweep.results.layout import SweepLayout
    from mmdsweep.utils import resolve_device

    if not candidates:
        return []
    device = resolve_device(exp.finetune.device)
    base_dir = meta.get("base_model_dir") or str(candidates[0].checkpoint)
    den, _, _, _ = prepare_model(base_dir, device)
    evaluator = ev.build_final_evaluator(exp, den.channels, device)
    rows: list[dict[str, Any]] = []
    for c in candidates:
        rows += ev.final_rows_for_model(
            exp, Path(c.checkpoint), evaluator, trial_id=c.trial_id, device=device
        )
    if exp.eval.baselines:
        rows += ev.baseline_rows(exp, base_dir, sorted({c.timesteps for c in candidates}), evaluator)
    if exp.eval.real_floor:
        rows += ev.real_floor_rows(exp, evaluator, den.channels)
    ev.write_evaluation(rows, SweepLayout(sdir).evaluation, append=False)
    comparison = final_comparison(rows, exp.features.eval)
    by_trial = {c.trial_id: c for c in candidates}
    spaces = list(dict.fromkeys(comparison["space"]))
    table: list[dict[str, Any]] = []
    for _, r in comparison.iterrows():
        cand = by_trial.get(str(r["trial_id"]))
        if cand is None:
            continue
        entry: dict[str, Any] = {
            "T": cand.timesteps,
            "train": cand.train,
            "exported": cand.exported,
            "trial_id": cand.trial_id,
            "selection_fid": cand.selection_fid,
            "fid_mean": float(r["fid_mean"]),
            "fid_std": float(r["fid_std"]),
            "k": int(r["k"]),
            "num_samples": int(r["num_samples"]),
            "reference": str(r["reference"]),
            "space": str(r["space"]),
            "primary": bool(r["primary"]),
            "warnings": str(r["warnings"]),
        }
        if int(r["floor_num_samples"]) > 0:
            entry.update(
                floor_fid_mean=float(r["floor_fid_mean"]),
                floor_fid_std=float(r["floor_fid_std"]),
                floor_num_samples=int(r["floor_num_samples"]),
            )
        if pd.notna(r["best_baseline"]):
            entry.update(
                best_baseline=str(r["best_baseline"]),
                baseline_fid_mean=float(r["baseline_fid_mean"]),
                baseline_fid_std=float(r["baseline_fid_std"]),
                gain=float(r["gain"]),
                diff_std=float(r["diff_std"]),
                paired=bool(r["paired"]),
                beyond_2std=bool(r["beyond_2std"]),
            )
        table.append(entry)
    table.sort(key=lambda e: (spaces.index(e["space"]), e["T"], not e["exported"], e["train"]))
    return table


def _verdict(e: dict[str, Any]) -> str:
    if "best_baseline" not in e:
        return "(no baselines: eval.baselines false)"
    std = f"2 x {e['diff_std']:.3f}"
    if not e["beyond_2std"]:
        return f"within noise (gain {e['gain']:+.3f}, not > {std})"
    return f"{'better' if e['gain'] > 0 else 'worse'} by {abs(e['gain']):.3f} (> {std})"


def format_final_table(final: list[dict[str, Any]]) -> str:
    """The sweep's final table, per evaluation space (in the order of ``final``: the primary space first):
    per (T, ``finetune.train`` mode) candidate the selection FID, the final FID +- std of the fine-tuned model
    and of the best training-free baseline at that T, and whether the difference exceeds 2 std; then the
    protocol (k seeds x N, reference) and the metric warnings of that space. ``*`` marks the exported model.
    With ``floor_fid_mean`` in the entries, a ``real data`` line gives the FID of real training images under the
    same protocol (the metric's floor at that N)."""
    if not final:
        return "(no final evaluation)"
    spaces = list(dict.fromkeys(str(e.get("space", "")) for e in final))
    lines: list[str] = []
    for space in spaces:
        entries = [e for e in final if str(e.get("space", "")) == space]
        primary = bool(entries[0].get("primary", space == spaces[0]))
        if lines:
            lines.append("")
        lines.append(f"space {space}" + (" (primary: the evaluation space of the sweep)" if primary else ""))
        lines.append(
            f"{'T':>4}  {'train':<10} {'selection FID':>13}  {'final FID (tuned)':>18}  {'best baseline':<22} "
            f"{'final FID (baseline)':>20}  verdict"
        )
        for e in entries:
            tuned = f"{e['fid_mean']:.3f} +- {e['fid_std']:.3f}"
            if "best_baseline" in e:
                base = f"{e['baseline_fid_mean']:.3f} +- {e['baseline_fid_std']:.3f}"
                name = str(e["best_baseline"])
            else:
                base, name = "-", "-"
            mode = f"{e.get('train', '-')}{'*' if e.get('exported', True) else ''}"
            lines.append(
                f"{e['T']:>4}  {mode:<10} {e['selection_fid']:>13.3f}  {tuned:>18}  {name:<22} {base:>20}  "
                f"{_verdict(e)}"
            )
        e0 = entries[0]
        if "floor_fid_mean" in e0:
            n_floor = (
                "" if e0["floor_num_samples"] == e0["num_samples"] else f" (N={e0['floor_num_samples']})"
            )
            floor = f"{e0['floor_fid_mean']:.3f} +- {e0['floor_fid_std']:.3f}"
            lines.append(
                f"{'':>4}  {'real data':<10} {'':>13}  {floor:>18}  training images scored the same way{n_floor}: "
                "the metric's floor at this N (a sampler is not expected below it)"
            )
        lines.append(
            f"final protocol: {e0['k']} fresh noise seeds x N={e0['num_samples']}, reference {e0['reference']}, "
            f"space {space}; mean +- std (ddof=1) over seeds; "
            "gain = baseline - tuned FID, against 2 std of its per-seed (paired: same noise) differences; "
            "* = exported (best trial of its T)"
        )
        warns = sorted({w for e in entries for w in str(e.get("warnings", "")).split("; ") if w})
        for w in warns:
            lines.append(f"metric warning ({space}): {w}")
    return "\n".join(lines)


def _fetch_checkpoint(uri: str, dest: Path) -> Path | None:
    """A local directory holding the checkpoint: the path itself, or a copy of a remote (s3://...) one."""
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        pyarrow.fs.copy_files(
            path, str(dest), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
        )
    except (OSError, pyarrow.lib.ArrowException) as e:
        print(f"warning: could not fetch {uri}: {e}", file=sys.stderr)
        return None
    return dest


def print_summary(exp: Experiment, sdir: Path, meta: dict[str, Any]) -> None:
    import pandas as pd

    from mmdsweep.results import read_trials, results_paths

    trials = read_trials(sdir)
    pcols = [c for c in trials.columns if c.startswith("param.")]
    cols = ["trial_id", "status", *pcols, "best_fid", "best_kid", "steps", "wall_time_s"]
    board = trials.sort_values("best_fid", na_position="last")[[c for c in cols if c in trials.columns]]
    board = board.rename(columns={c: c.removeprefix("param.") for c in pcols})
    with pd.option_context(
        "display.max_columns", 50, "display.width", 200, "display.float_format", "{:.4g}".format
    ):
        print(
            f"\nLeaderboard (selection protocol: evaluation space {exp.features.eval}, {exp.eval.num_samples} "
            f"samples of noise seed {exp.eval.seed}, reference {exp.data.dataset}:{exp.eval.selection_reference}):"
        )
        print(board.to_string(index=False))
        front = pareto_front(trials)
        print("\nPareto front (timesteps vs best FID):")
        print(front.to_string(index=False) if len(front) else "(no finished trials)")
        print(
            "\nFinal table (best trial per T and finetune.train mode vs the best training-free sampler at that T; "
            "selection FID is on the validation noise/reference and is not comparable to the final columns):"
        )
        print(format_final_table(meta.get("final", [])))
    for T, why in sorted(meta.get("export_refused", {}).items(), key=lambda kv: int(kv[0])):
        print(f"not exported T={T}: {why}")
    paths = results_paths(sdir)
    print(f"\ntrials:  {paths.trials}\nmetrics: {paths.metrics}\nevaluation: {sdir / 'evaluation.parquet'}")
    for T, d in sorted(meta.get("exports", {}).items(), key=lambda kv: int(kv[0])):
        print(f"exported T={T}: {sdir / d}")
    final = f", +{meta['final_seconds']} s final protocol and export" if "final_seconds" in meta else ""
    print(f"sweep: {meta.get('sweep_seconds')} s (+{meta.get('prepare_seconds')} s preparation{final})")


def pareto_front(trials: Any) -> Any:
    """Non-dominated (timesteps, best_fid) trials: :func:`mmdsweep.analysis.pareto_front` (the one
    definition), restricted to the columns printed after a sweep."""
    from mmdsweep.analysis import pareto_front as front

    return front(trials, x="timesteps", y="best_fid")[["timesteps", "best_fid", "trial_id"]]


def main(argv: list[str] | None = None) -> int:
    ap = cli_parser(
        "python -m mmdsweep.tune",
        "Sweep MMD-DDM fine-tuning hyper-parameters with Ray Tune + Optuna (trials run in Ray Train).",
    )
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    ap.add_argument(
        "--dry-run", action="store_true", help="validate the experiment, search space and files, then stop"
    )
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    ap.add_argument("--quiet", action="store_true", help="no Tune progress table")
    ap.add_argument(
        "--verbose", action="store_true", help="show Ray's internal log lines and the workers' output"
    )
    args = ap.parse_args(argv)
    # the configuration is checked before torch, Ray or Optuna are imported: errors come back at once
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.address:
            overrides["resources.address"] = args.address
        exp = load_experiment(args.experiment, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mmdsweep.assets import components as comp

    try:
        params = validate_sweep(exp)
        lines = comp.preflight(exp, collect=args.dry_run)
    except comp.PreflightError as e:
        return comp.report_missing(e)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from mmdsweep.assets import checks

        try:
            lines.append(checks.check_resources(exp, cluster=_cluster(exp)))
            lines += checks.check_content(exp, params)
            sdir = sweep_dir(exp)
            if (sdir / "sweep.json").is_file():
                _sweep_meta(exp, sdir, True, params)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            return 2
        for line in lines:
            print(line)
        r = exp.resources
        print(
            f"search: {len(params)} parameters ({', '.join(p.key for p in params)}), {exp.search.num_samples} trials"
            + (
                f" (the first {n} set by points_to_evaluate)"
                if (n := len(exp.search.points_to_evaluate))
                else ""
            )
            + f", objectives {exp.search.objectives}, scheduler {exp.search.scheduler}"
        )
        print(
            f"resources: {r.num_workers} worker(s) x {r.cpus_per_worker} CPU"
            + (f" + {r.gpus_per_worker} GPU" if r.use_gpu else "")
            + f" per trial; address {r.address or os.environ.get('RAY_ADDRESS') or 'local'}"
        )
        from mmdsweep.train.memory import dry_run_lines

        for line in dry_run_lines(
            exp
        ):  # per-worker memory estimate (base config, largest searched T: see docs/scale.md)
            print(line)
        print(f"{exp.source}: ok; results would go to {sweep_dir(exp)}")
        return 0
    previous = signal.getsignal(signal.SIGTERM)
    # SIGTERM (a scheduler, `kill`) stops the sweep the way Ctrl-C does: Tune saves its state
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        meta = run(exp, resume=args.resume, verbose=0 if args.quiet else 1, ray_verbose=args.verbose)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            f"error: interrupted before the sweep started; run `python -m mmdsweep.tune {args.experiment}` again",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(exp, sweep_dir(exp), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
