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

import json
import math
import os
import sys
import time
import uuid
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

OBJECTIVE_METRICS = {
    "fid": ("fid", "min"),
    "kid": ("kid", "min"),
    "timesteps": ("timesteps", "min"),
    "sample_time": ("sample_time_per_image_s", "min"),
}


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
    pairs = [OBJECTIVE_METRICS[o] for o in exp.search.objectives]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def validate_sweep(exp: Experiment) -> list[Any]:
    """Check the search space against the experiment: every key exists and every value validates."""
    from mmdsweep.sweep import search

    try:
        params = search.validate_space(exp.search.space, where="search.space")
    except ValueError as e:
        raise ConfigError(f"{exp.source}: {e}") from None
    if not params:
        raise ConfigError(f"{exp.source}: search.space: is empty; name at least one parameter to search")
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
    from mmdsweep.train.loop import build_evaluator

    device = torch.device("cpu")
    src = comp.resolve_model_source(exp, allow_pretrain=True)
    den = comp.load_model(exp, src, device)
    train_names = {exp.features.train}
    for p in params:
        if p.key == "features.train" and p.kind == "choice":
            train_names.update(str(c) for c in p.choices)
    for name in sorted(train_names):
        space = comp.build_space(exp, name, src, device, for_eval=False)
        comp.build_bank(exp, space, comp.space_id(exp, name, src, for_eval=False), den.channels, device)
    build_evaluator(exp, src, den.channels, device)


def _sweep_meta(exp: Experiment, sdir: Path, resume: bool) -> dict[str, Any]:
    path = sdir / "sweep.json"
    if path.is_file():
        meta = json.loads(path.read_text())
        if not resume:
            raise ConfigError(
                f"{exp.source}: output: sweep directory {sdir} already holds a sweep ({meta.get('sweep_id')}); "
                "pass --resume to continue it or set output.name to start a new one"
            )
        return dict(meta)
    if resume:
        raise ConfigError(f"{exp.source}: --resume: no sweep to resume in {sdir}")
    return {
        "sweep_id": f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "experiment_name": exp.name,
        "experiment_file": str(Path(exp.source).resolve()),
        "sampler": exp.sampler.name,
        "spacing": exp.sampler.spacing,
        "objectives": list(exp.search.objectives),
        "optuna_storage": exp.search.storage,
        "study_name": exp.output.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _write_meta(sdir: Path, meta: dict[str, Any]) -> None:
    from mmdsweep.utils import atomic_write_text

    atomic_write_text(sdir / "sweep.json", json.dumps(meta, indent=2, default=str))


def run(exp: Experiment, *, resume: bool = False, verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) the sweep of ``exp``; returns the sweep metadata (also in ``sweep.json``)."""
    from mmdsweep.assets import components as comp
    from mmdsweep.results import ParquetResultsCallback
    from mmdsweep.sweep import raytrain, search

    params = validate_sweep(exp)
    comp.preflight(exp)
    sdir = sweep_dir(exp)
    meta = _sweep_meta(exp, sdir, resume)
    sdir.mkdir(parents=True, exist_ok=True)
    write_resolved(exp, sdir)
    (sdir / "config.yaml").replace(sdir / "experiment.yaml")
    (sdir / "config.json").unlink(missing_ok=True)
    t0 = time.time()
    prepare_caches(exp, params)
    src = comp.resolve_model_source(exp, allow_pretrain=False)
    meta["base_model_dir"] = (
        str(Path(src.model_dir).resolve()) if "://" not in src.model_dir else src.model_dir
    )
    _write_meta(sdir, meta)
    prep_s = time.time() - t0

    r = exp.resources
    raytrain.init_ray(r.address, r.num_cpus, r.object_store_memory)
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
    )
    meta["sweep_seconds"] = round(time.time() - t1, 1)
    meta["prepare_seconds"] = round(prep_s, 1)
    meta["max_concurrent_trials"] = max_conc
    meta["baseline"] = {**meta.get("baseline", {}), **_baseline(grid)}
    _write_meta(sdir, meta)
    meta.update(finalize(exp, sdir, meta))
    _write_meta(sdir, meta)
    return meta


def _baseline(grid: Any) -> dict[str, dict[str, float]]:
    """FID/KID of the pretrained model at each T (the trials' "before" evaluations)."""
    out: dict[str, dict[str, float]] = {}
    for result in grid:
        m = result.metrics or {}
        T, fid = m.get("timesteps"), m.get("fid_before")
        if T is None or fid is None or not math.isfinite(float(fid)):
            continue
        out[str(int(T))] = {"fid": float(fid), "kid": float(m.get("kid_before", math.nan))}
    return out


def finalize(exp: Experiment, sdir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Export the best checkpoint per T and measure sampling speed for the Pareto front."""
    from mmdsweep.inference.export import export_pipeline
    from mmdsweep.results import read_trials

    trials = read_trials(sdir)
    exports: dict[str, str] = {}
    ok = trials[trials["best_checkpoint"].notna() & trials["best_fid"].notna()]
    for T, group in ok.groupby("timesteps"):
        best = group.sort_values("best_fid").iloc[0]
        ckpt = _fetch_checkpoint(str(best["best_checkpoint"]), sdir / "checkpoints" / f"T{int(T)}")
        if ckpt is None or not (ckpt / "unet").is_dir():
            print(
                f"warning: best checkpoint for T={T} is not readable ({best['best_checkpoint']})",
                file=sys.stderr,
            )
            continue
        out = sdir / "exported" / f"T{int(T)}"
        if exp.sampler.spacing == "uniform":
            export_pipeline(ckpt, out, timesteps=int(T))
            exports[str(int(T))] = str(out.relative_to(sdir))
    result: dict[str, Any] = {"exports": exports}
    _write_meta(sdir, {**meta, **result})
    from mmdsweep.inference import speed

    ts = sorted({5, 10, 20, 50} | {int(t) for t in trials["timesteps"].dropna().unique()})
    df = speed.measure_sweep_speed(
        sdir,
        timesteps=ts,
        batch_size=min(64, exp.eval.batch_size),
        num_images=min(64, exp.eval.num_samples),
        device=exp.finetune.device,
    )
    speed.write_speed_table(sdir, df, sweep_id=meta["sweep_id"])
    return result


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
        print(f"\nLeaderboard (evaluation space: {exp.features.eval}, {exp.eval.num_samples} samples):")
        print(board.to_string(index=False))
        front = pareto_front(trials)
        print("\nPareto front (timesteps vs best FID):")
        print(front.to_string(index=False) if len(front) else "(no finished trials)")
    paths = results_paths(sdir)
    print(f"\ntrials:  {paths.trials}\nmetrics: {paths.metrics}")
    for T, d in sorted(meta.get("exports", {}).items(), key=lambda kv: int(kv[0])):
        print(f"exported T={T}: {sdir / d}")
    print(f"sweep: {meta.get('sweep_seconds')} s (+{meta.get('prepare_seconds')} s preparation)")


def pareto_front(trials: Any) -> Any:
    """Non-dominated (timesteps, best_fid) pairs: for each T the best FID, kept if no smaller T beats it."""
    done = trials.dropna(subset=["best_fid", "timesteps"])
    if done.empty:
        return done[["timesteps", "best_fid", "trial_id"]]
    best = done.sort_values("best_fid").groupby("timesteps", as_index=False).first().sort_values("timesteps")
    keep, best_so_far = [], math.inf
    for _, row in best.iterrows():
        if row["best_fid"] < best_so_far:
            keep.append(row)
            best_so_far = row["best_fid"]
    import pandas as pd

    return pd.DataFrame(keep)[["timesteps", "best_fid", "trial_id"]]


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
    args = ap.parse_args(argv)
    from mmdsweep.assets import components as comp

    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.address:
            overrides["resources.address"] = args.address
        exp = load_experiment(args.experiment, overrides)
        params = validate_sweep(exp)
        lines = comp.preflight(exp, collect=args.dry_run)
    except comp.PreflightError as e:
        return comp.report_missing(e)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for line in lines:
            print(line)
        r = exp.resources
        print(
            f"search: {len(params)} parameters ({', '.join(p.key for p in params)}), {exp.search.num_samples} trials, "
            f"objectives {exp.search.objectives}, scheduler {exp.search.scheduler}"
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
    try:
        meta = run(exp, resume=args.resume, verbose=0 if args.quiet else 1)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(exp, sweep_dir(exp), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
