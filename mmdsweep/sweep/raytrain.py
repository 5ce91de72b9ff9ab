"""Ray plumbing: a Tune sweep whose trials each run data-parallel Ray Train (V2).

Layout (Ray 2.60, Train V2 is the default)::

    run_sweep ── ray.tune.Tuner(function trainable, OptunaSearch, ASHA/FIFO)
                    └─ trial = make_trial_trainable(...)(config)   [Tune actor, trial_cpus]
                          └─ TorchTrainer(train_loop_per_worker).fit()
                                └─ N workers (gloo/nccl process group), each
                                   train_loop_per_worker(loop_config) with a
                                   RayTrainReporter

``Tuner(TorchTrainer(...))`` is not supported under Train V2; the function
trainable + ``TuneReportCallback`` pattern is. See docs/ray.md for the verified
pitfalls (dashboard needed for ASHA, resources, resume).

Per-worker loop contract
------------------------
``train_loop_per_worker(config: dict) -> None`` receives::

    {**base_loop_config,
     "params": {dotted config key: sampled value},   # the Tune trial config
     "trial_id": str}                                # Tune trial id ("local" in-process)

and must, on every rank:

1. ``reporter = get_reporter(config)`` — a :class:`RayTrainReporter` in a Ray Train
   worker, a :class:`LocalReporter` under :func:`run_local` — and use
   ``reporter.device``, ``.rank``, ``.world_size``;
2. resume: ``with reporter.latest_checkpoint_dir() as d:`` load state when ``d`` is
   not None (continue from the step stored there);
3. call ``reporter.report(metrics, checkpoint_dir)`` the same number of times on
   all ranks (it is a collective). ``metrics`` must already be identical on all
   ranks — use :func:`mmdsweep.train.distributed.all_reduce_metrics` — since only rank
   0's reach Tune. Only rank 0's ``checkpoint_dir`` is used; the directory is
   copied before ``report`` returns, so a temporary directory is fine. Each
   report is one Tune iteration (ASHA's ``training_iteration``);
4. if it resumes from a checkpoint that is already final, report the final
   metrics once more (else a trial restarted after a driver crash ends with no
   result in Tune).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmdsweep.sweep.search import SearchParam, close_orphan_trials, make_searcher
from mmdsweep.train.reporting import LocalReporter, Reporter

if TYPE_CHECKING:
    from ray.tune import Callback, ResultGrid, Tuner
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

logger = logging.getLogger(__name__)

TRIAL_TRAINABLE_NAME = "mmdsweep_trial"


# --------------------------------------------------------------------------- ray init


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    *,
    verbose: bool = False,
) -> None:
    """Connect to Ray once per process.

    Unless ``verbose``, Ray's own chatter is hidden (:func:`quiet_ray`): the driver's ``ray``
    loggers at ERROR, worker and raylet output not forwarded to the driver's console (raylet
    worker-count warnings, actor-restart notes, placement-group cleanup lines; they stay in
    Ray's session logs), and repeated log lines deduplicated. Tune's progress table is printed
    by the driver and is not affected.

    With ``address`` (a ``ray://``/``host:port`` address or ``"auto"``) or the
    ``RAY_ADDRESS`` environment variable, connect to that existing cluster (its
    head must run the dashboard for the State API; a warning is logged if it
    does not). Otherwise (or with ``"local"``) start a local single-node Ray with the dashboard on:
    Train V2 only removes the worker placement group of a trial stopped early by
    ASHA when the State API is reachable, without it the next trial deadlocks.
    ``num_cpus``/``object_store_memory`` only apply to a local start. No-op when
    Ray is already initialised.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose else quiet_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, **quiet)
        _warn_without_state_api()
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=True,
        **quiet,
    )


def cluster_resources(address: str) -> dict[str, float]:
    """What the Ray cluster at ``address`` offers (``ray.cluster_resources()``), connecting briefly.

    Raises:
        ContentError: the cluster cannot be reached (one line, with the remedy).
    """
    import ray

    from mmdsweep.assets.checks import ContentError

    started = not ray.is_initialized()
    try:
        if started:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ContentError(
            f"resources.address: cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {first}); "
            "start it (`ray up cluster.yaml` or `ray start --head`) or remove resources.address to run on "
            "this machine"
        ) from None
    finally:
        if started and ray.is_initialized():
            ray.shutdown()  # the sweep connects with its own settings later


def quiet_ray() -> dict[str, Any]:
    """Hide Ray's internal console output in this driver; returns the matching ``ray.init`` kwargs."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.tune", "ray.train", "ray.data", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _filter_raylet_notes()
    return {"log_to_driver": False, "logging_level": logging.ERROR}


# raylet notes that say nothing about the sweep (Ray 2.60 prints them through the driver's error
# listener, which log_to_driver does not cover); other raylet messages (OOM kills...) still show
_RAYLET_NOISE = (
    "worker processes have been started",
    "placement group",
    "restart",
)


def _filter_raylet_notes() -> None:
    """Drop the raylet's routine notes from the driver's console (private Ray API; best effort)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "_mmdsweep_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(n in str(line) for line in lines for n in _RAYLET_NOISE):
            return
        original(data, ignore_prefix)

    filtered._mmdsweep_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


def progress_reporter(param_keys: Sequence[str], metrics: Sequence[str], modes: Sequence[str]) -> Any:
    """Tune's console table with the searched parameters and the objective metric(s) as columns.

    Uses Tune's classic table (``RAY_AIR_NEW_OUTPUT=0``): the newer output only shows parameters
    declared as a Tune ``param_space``, while ours come from the Optuna searcher.
    """
    from ray.tune import CLIReporter

    class _Reporter(CLIReporter):  # type: ignore[misc]
        """CLIReporter without its "Current best trial: ... parameters={...}" line: Ray 2.60 looks every
        parameter column up in the best trial's config without a default, so a conditional parameter the
        best trial does not have (``kernel.bandwidth`` of a polynomial-kernel trial, ``finetune.lr`` of a
        timesteps-only trial) raised KeyError and ended the sweep. The table (sorted by the objective, the
        best first) shows the same, with an empty cell for a parameter a trial does not have."""

        def _current_best_trial(self, trials: Any) -> tuple[None, None]:
            return None, None

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    columns = {"training_iteration": "evals"} | {m: m for m in metrics if m != "timesteps"}
    return _Reporter(
        parameter_columns=list(dict.fromkeys(param_keys)),
        metric_columns=columns,
        max_report_frequency=30,
        print_intermediate_tables=True,  # not left to the global verbosity at construction time
        sort_by_metric=True,
        metric=metrics[0] if len(metrics) == 1 else None,
        mode=modes[0] if len(metrics) == 1 else None,
    )


def _warn_without_state_api() -> None:
    """Log a warning when the cluster's State API (dashboard) cannot be reached."""
    try:
        from ray.util.state import list_nodes

        list_nodes(limit=1, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        logger.warning(
            "Ray State API unavailable (%s): start the head with the dashboard, otherwise "
            "trials stopped early by ASHA leave their placement group behind and the next "
            "trial times out with WorkerGroupStartupTimeoutError",
            exc,
        )


# --------------------------------------------------------------------------- the driver's Ray, across a crash

RAY_SESSION_FILE = "ray_session.json"


def _proc_identity(pid: int) -> dict[str, Any] | None:
    import psutil

    try:
        p = psutil.Process(pid)
        return {"pid": pid, "create_time": p.create_time(), "name": p.name()}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_process(ident: Mapping[str, Any]) -> Any:
    """The live process ``ident`` recorded (same pid AND start time: pids are reused), else None."""
    import psutil

    try:
        p = psutil.Process(int(ident["pid"]))
        if abs(p.create_time() - float(ident["create_time"])) < 1e-3:
            return p
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        pass
    return None


def record_ray_session(sweep_dir: str | Path) -> dict[str, Any] | None:
    """Write ``ray_session.json`` into the sweep directory: this driver and the local Ray it started.

    Holds the driver's pid, the Ray session directory and the pids (with start times) of the
    Ray processes started for this driver, so that a later ``--resume`` after the driver was
    killed can stop exactly those (:func:`release_stale_ray`) and nothing else. Nothing is
    recorded for a Ray cluster this driver only connected to (``resources.address``).
    """
    import json

    import psutil
    import ray

    from mmdsweep.utils import atomic_write_text

    node = getattr(ray._private.worker, "_global_node", None)  # set only when this driver started Ray
    session_dir = node.get_session_dir_path() if node is not None and node.head else None
    me = _proc_identity(os.getpid())
    info: dict[str, Any] = {"driver": me, "session_dir": session_dir, "processes": []}
    if session_dir:
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            children = []
        info["processes"] = [i for c in children if (i := _proc_identity(c.pid)) is not None]
    atomic_write_text(Path(sweep_dir) / RAY_SESSION_FILE, json.dumps(info, indent=2))
    return info


def release_stale_ray(sweep_dir: str | Path, *, timeout: float = 10.0) -> int:
    """Stop the Ray processes a killed driver of this sweep left behind; return how many.

    Reads ``ray_session.json`` (:func:`record_ray_session`). When the recorded driver is still
    alive a :class:`RuntimeError` is raised (two drivers must not run one sweep). Otherwise the
    processes recorded there (matched by pid and start time) and every process whose command
    line names the recorded Ray session directory (workers started later) are terminated, then
    killed after ``timeout``. Unrelated Ray instances are never touched: this is a
    ``ray stop`` for one session only.
    """
    import json

    import psutil

    path = Path(sweep_dir) / RAY_SESSION_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    driver = info.get("driver") or {}
    if driver and _same_process(driver) is not None and int(driver["pid"]) != os.getpid():
        raise RuntimeError(
            f"{sweep_dir}: the driver that runs this sweep is still alive (pid {driver['pid']}); "
            "stop it first (or wait for it to finish) before resuming"
        )
    victims: dict[int, Any] = {}
    for ident in info.get("processes") or []:
        p = _same_process(ident)
        if p is not None:
            victims[p.pid] = p
    session = info.get("session_dir")
    if session:
        name = Path(session).name
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info.get("cmdline") or [])
            except (psutil.Error, TypeError):
                continue
            if name in cmd and p.pid != os.getpid():
                victims[p.pid] = p
    procs = list(victims.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    path.unlink(missing_ok=True)
    if procs:
        logger.info("stopped %d Ray process(es) left by the killed driver (session %s)", len(procs), session)
    return len(procs)


# --------------------------------------------------------------------------- reporters


class RayTrainReporter:
    """Reporter for a Ray Train worker: wraps ``ray.train.report``/``get_checkpoint``."""

    resend_on_resume = True
    """A run resumed mid-way re-reports its checkpoint's metrics: that report may have been lost
    with a killed driver (the results keep one row per trial and step, so nothing doubles)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world_size: int = ctx.get_world_size()
        self.local_rank: int = ctx.get_local_rank()
        self.device: torch.device = ray.train.torch.get_device()

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """``ray.train.report`` on this rank; a collective, so every rank must call it.

        Rank 0's ``checkpoint_dir`` (if any) is persisted as the run's next
        checkpoint; other ranks' directories are ignored.
        """
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(dict(metrics), checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint_dir(self) -> Iterator[Path | None]:
        """Yield the directory of the run's latest checkpoint (None on a fresh start).

        Treat it as read-only: on local storage it is the persisted checkpoint itself.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)


LOCAL_RUN_DIR_KEY = "local_run_dir"


def get_reporter(config: Mapping[str, Any]) -> Reporter:
    """The reporter for this process: local when ``config`` comes from :func:`run_local`."""
    if config.get(LOCAL_RUN_DIR_KEY):
        return LocalReporter(config[LOCAL_RUN_DIR_KEY])
    return RayTrainReporter()


def run_local(
    train_loop_per_worker: Callable[[dict], None],
    *,
    base_loop_config: Mapping[str, Any],
    params: Mapping[str, Any],
    run_dir: str | Path,
    trial_id: str = "local",
) -> Path:
    """Run the per-worker loop in this process (no Ray), with the same config layout.

    The loop sees ``{**base_loop_config, "params": params, "trial_id": trial_id,
    "local_run_dir": run_dir}``; :func:`get_reporter` then returns a
    :class:`LocalReporter` writing to ``run_dir``. Calling it again with the same
    ``run_dir`` resumes from the latest checkpoint. Returns ``run_dir``.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        **base_loop_config,
        "params": dict(params),
        "trial_id": trial_id,
        LOCAL_RUN_DIR_KEY: str(run_dir),
    }
    train_loop_per_worker(config)
    return run_dir


# --------------------------------------------------------------------------- trial trainable


def make_trial_trainable(
    train_loop_per_worker: Callable[[dict], None],
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
    storage_path: str,
    base_loop_config: Mapping[str, Any],
    trial_cpus: float = 0.5,
    placement_strategy: str = "PACK",
    checkpoints_to_keep: int | None = 2,
) -> Callable[[dict], None]:
    """A Tune function trainable that runs one data-parallel Ray Train run per trial.

    The returned function (already wrapped with ``tune.with_resources`` for its
    own ``trial_cpus``; the workers get their own placement group from Train)
    merges the trial config into ``base_loop_config`` under ``"params"``, runs a
    ``TorchTrainer`` (gloo on CPU, nccl on GPU) named ``train_<trial_id>`` under
    ``storage_path`` — so a restarted trial finds and resumes its checkpoints —
    and re-raises a failed run so that Tune marks the trial ERROR. Worker
    failures are retried ``max_failures`` times by Train, from the latest
    checkpoint. ``storage_path`` must be absolute (or a URI).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if trial_cpus <= 0:
        raise ValueError("trial_cpus must be > 0 (Tune rejects CPU-less function trials)")
    base = dict(base_loop_config)
    storage_path = _absolute(storage_path)
    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(gpus_per_worker)

    def mmdsweep_trial(config: dict) -> None:
        import ray.train
        from ray import tune
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = tune.get_context().get_trial_id()
        loop_config = {**base, "params": dict(config), "trial_id": trial_id}
        # Typed loosely: type checkers see the V1 RunConfig behind ray.train's switch.
        train_callbacks: list[Any] = [TuneReportCallback()]
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
                placement_strategy=placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=f"train_{trial_id}",
                storage_path=storage_path,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
                callbacks=train_callbacks,
            ),
        )
        trainer.fit()  # raises ray.train.TrainingFailedError once retries are exhausted

    mmdsweep_trial.__name__ = mmdsweep_trial.__qualname__ = TRIAL_TRAINABLE_NAME
    from ray import tune

    return tune.with_resources(mmdsweep_trial, {"CPU": float(trial_cpus)})


def max_concurrent_from_resources(
    total_cpus: float,
    total_gpus: float,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    trial_cpus: float,
) -> int:
    """How many trials fit at once: each needs ``trial_cpus`` + its workers' resources.

    Capping Tune's concurrency at this keeps a started trial from waiting for
    worker resources held by other trials (Train gives up after 60 s with
    WorkerGroupStartupTimeoutError). Computed on cluster totals; on several
    nodes a trial's workers must also fit each node's free share. Raises
    ``ValueError`` when not even one trial fits.
    """
    eps = 1e-9
    per_trial_cpus = trial_cpus + num_workers * cpus_per_worker
    by_cpu = math.floor(total_cpus / per_trial_cpus + eps) if per_trial_cpus > 0 else math.inf
    per_trial_gpus = num_workers * gpus_per_worker
    by_gpu = math.floor(total_gpus / per_trial_gpus + eps) if per_trial_gpus > 0 else math.inf
    n = min(by_cpu, by_gpu)
    if n < 1:
        raise ValueError(
            f"one trial needs {per_trial_cpus:g} CPU and {per_trial_gpus:g} GPU but the cluster "
            f"has {total_cpus:g} CPU and {total_gpus:g} GPU"
        )
    return int(n) if n != math.inf else 1_000_000


# --------------------------------------------------------------------------- sweep


def make_scheduler(
    scheduler: Mapping[str, Any] | None, metrics: Sequence[str], modes: Sequence[str]
) -> TrialScheduler:
    """Build a Tune scheduler from ``{"type": "asha", grace_period, reduction_factor, max_t}``.

    ``None`` or ``{"type": "fifo"}`` gives FIFO (run every trial to the end).
    ASHA counts ``time_attr`` (default ``training_iteration``, i.e. reports) and
    needs a single objective.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = dict(scheduler or {"type": "fifo"})
    kind = spec.pop("type", "asha")
    if kind == "fifo":
        if spec:
            raise ValueError(f"scheduler fifo takes no options, got {sorted(spec)}")
        return FIFOScheduler()
    if kind != "asha":
        raise ValueError(f"unknown scheduler type {kind!r}; expected 'asha' or 'fifo'")
    if len(metrics) != 1:
        raise ValueError(
            "ASHA needs a single objective; use scheduler None (FIFO) for multi-objective sweeps"
        )
    allowed = {"grace_period", "reduction_factor", "max_t", "time_attr", "brackets"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"unknown ASHA option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    spec.setdefault("time_attr", "training_iteration")
    return ASHAScheduler(metric=metrics[0], mode=modes[0], **spec)


def experiment_dir(storage_path: str | Path, name: str) -> Path:
    """Where Tune keeps the sweep's experiment state."""
    return Path(storage_path) / name


def run_sweep(
    trainable: Callable[[dict], None],
    *,
    params: Sequence[SearchParam],
    metrics: Sequence[str],
    modes: Sequence[str],
    num_samples: int,
    max_concurrent_trials: int,
    scheduler: Mapping[str, Any] | None,
    storage_path: str | Path,
    name: str,
    callbacks: Sequence[Callback] | None = None,
    resume: bool = False,
    searcher_seed: int | None = None,
    optuna_storage: str | None = None,
    sampler: str = "tpe",
    trial_max_failures: int = 0,
    experiment_checkpoint_s: float | None = None,
    verbose: int | None = None,
    study_name: str | None = None,
    points_to_evaluate: Sequence[Mapping[str, Any]] = (),
) -> ResultGrid:
    """Run (or resume) a sweep of ``num_samples`` trials; return Tune's ``ResultGrid``.

    A fresh sweep refuses an existing experiment directory (pass ``resume=True``);
    ``resume=True`` restores it with ``Tuner.restore(resume_unfinished=True)`` —
    finished trials are kept, interrupted ones restart and their Train runs
    resume from their latest checkpoints, errored ones stay errored, and the
    searcher/remaining samples continue from Tune's last experiment snapshot.
    ``callbacks`` given on resume replace the pickled ones. ``trial_max_failures``
    retries a whole errored trial (it too resumes from the Train checkpoint).
    ``experiment_checkpoint_s`` sets how often Tune snapshots the experiment
    (``TUNE_GLOBAL_CHECKPOINT_S``; Tune's default adapts, at least 10 s).
    ``verbose`` is Tune's console verbosity (0 silent .. 2 default). ``study_name`` names the
    Optuna study (default ``name``). ``points_to_evaluate`` ({dotted key: value}) run first on a fresh
    sweep (a resumed one continues its restored searcher). RUNNING Optuna trials are closed (FAIL) only when the sweep
    really finished (:func:`sweep_finished`); an interrupted sweep keeps them for ``--resume``.
    """
    storage_path = _absolute(storage_path)
    exp_dir = experiment_dir(storage_path, name)
    if experiment_checkpoint_s is not None:
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(experiment_checkpoint_s)
    study = study_name or name
    if resume:
        tuner = _restore_tuner(exp_dir, trainable, callbacks)
        _check_restored_searcher(tuner, study if optuna_storage else None)
    else:
        if exp_dir.exists() and any(exp_dir.iterdir()):
            raise FileExistsError(
                f"sweep directory {exp_dir} already exists; pass resume=True or choose another name"
            )
        if optuna_storage:
            _ensure_sqlite_parent(optuna_storage)
        searcher = make_searcher(
            params,
            metrics,
            modes,
            seed=searcher_seed,
            sampler=sampler,
            storage=optuna_storage,
            study_name=study,
            points_to_evaluate=points_to_evaluate,
        )
        _guard(searcher)
        tuner = _new_tuner(
            trainable,
            searcher,
            make_scheduler(scheduler, metrics, modes),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
            run_kwargs={
                "name": name,
                "storage_path": str(storage_path),
                "callbacks": list(callbacks) if callbacks else None,
                "max_failures": trial_max_failures,
                "verbose": verbose,
                "progress_reporter": (
                    progress_reporter([p.key for p in params], metrics, modes) if verbose != 0 else None
                ),
            },
        )
    results = tuner.fit()
    if optuna_storage:
        closed = close_orphan_trials(
            optuna_storage, study, sweep_finished=sweep_finished(results, num_samples)
        )
        if closed:
            logger.info("marked %d orphaned RUNNING Optuna trial(s) FAIL", closed)
    return results


def trial_statuses(results: ResultGrid) -> list[str]:
    """Tune's status of every trial of a finished ``fit()`` (TERMINATED, ERROR, PENDING, ...)."""
    return [str(t.status) for t in results._experiment_analysis.trials]


def sweep_finished(results: ResultGrid, num_samples: int) -> bool:
    """True when every one of the ``num_samples`` trials ended (TERMINATED or ERROR).

    False after SIGINT/SIGTERM or when Tune stopped early: Tune then returns from ``fit()``
    with trials PENDING/RUNNING/PAUSED, or fewer trials than asked for.
    """
    statuses = trial_statuses(results)
    return len(statuses) >= num_samples and all(s in ("TERMINATED", "ERROR") for s in statuses)


def _unwrap_searcher(alg: Any) -> Any:
    seen = 0
    while alg is not None and not _is_optuna(alg) and hasattr(alg, "searcher") and seen < 5:
        alg, seen = alg.searcher, seen + 1
    return alg


def _is_optuna(alg: Any) -> bool:
    from ray.tune.search.optuna import OptunaSearch

    return isinstance(alg, OptunaSearch)


def _guard(searcher: Any) -> None:
    """Make an ``OptunaSearch`` a :class:`GuardedOptunaSearch` (same state, pickled by our module path)."""
    base = _unwrap_searcher(searcher)
    if base is not None and _is_optuna(base) and not isinstance(base, _guarded_class()):
        base.__class__ = _guarded_class()


def _check_restored_searcher(tuner: Tuner, study_name: str | None) -> None:
    """Ray issue 30861: after ``Tuner.restore`` the searcher must be the OptunaSearch we started with."""
    local = tuner._local_tuner
    alg = _unwrap_searcher(local._tune_config.search_alg if local is not None else None)
    if alg is None or not _is_optuna(alg):
        raise RuntimeError(
            f"resume: Tune restored the searcher {type(alg).__name__}, not the OptunaSearch this sweep "
            "started with (ray issue 30861); the sweep cannot continue its study"
        )
    if study_name is not None and getattr(alg, "_study_name", study_name) != study_name:
        raise RuntimeError(
            f"resume: the restored searcher drives Optuna study {alg._study_name!r}, expected {study_name!r}"
        )
    _guard(alg)


_GUARDED: type | None = None


def _guarded_class() -> type:
    global _GUARDED
    if _GUARDED is None:
        _GUARDED = _make_guarded()
    return _GUARDED


def _make_guarded() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class GuardedOptunaSearch(OptunaSearch):  # type: ignore[misc]
        """``OptunaSearch`` that never writes to a trial its storage already holds as finished.

        After a driver crash Tune may restart a trial whose result Optuna already recorded
        (the study was told before Tune's last snapshot): reporting to or telling that trial
        again raises ``UpdateFinishedTrialError``. The stored state wins; nothing is lost.
        """

        def _finished_in_storage(self, trial_id: str) -> bool:
            ot = self._ot_trials.get(trial_id)
            if ot is None:
                return False
            try:
                study: Any = self._ot_study
                return bool(study._storage.get_trial(ot._trial_id).state.is_finished())
            except Exception:  # noqa: BLE001 - an unreadable storage: let Optuna decide
                return False

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self._completed_trials and self._finished_in_storage(trial_id):
                return
            super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self._completed_trials and self._finished_in_storage(trial_id):
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    GuardedOptunaSearch.__module__ = __name__
    GuardedOptunaSearch.__qualname__ = "GuardedOptunaSearch"
    return GuardedOptunaSearch


def __getattr__(name: str) -> Any:  # pickles of a sweep's searcher name the guarded class by module path
    if name == "GuardedOptunaSearch":
        return _guarded_class()
    raise AttributeError(name)


def _restore_tuner(
    exp_dir: Path, trainable: Callable[[dict], None], callbacks: Sequence[Callback] | None
) -> Tuner:
    """``Tuner.restore`` an interrupted sweep: unfinished trials resume, errored stay errored."""
    from ray import tune

    if not tune.Tuner.can_restore(str(exp_dir)):
        raise FileNotFoundError(f"cannot resume sweep: no Tune experiment state in {exp_dir}")
    tuner = tune.Tuner.restore(
        str(exp_dir), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
    )
    if callbacks is not None and tuner._local_tuner is not None:
        # Tuner.restore has no run_config argument; the pickled callbacks are replaced here.
        tuner._local_tuner.get_run_config().callbacks = list(callbacks)
    return tuner


def _new_tuner(
    trainable: Callable[[dict], None],
    searcher: Searcher,
    scheduler: TrialScheduler,
    *,
    num_samples: int,
    max_concurrent_trials: int,
    run_kwargs: Mapping[str, Any],
) -> Tuner:
    """A fresh Tuner; metric/mode live on the searcher and scheduler, not on TuneConfig."""
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=run_kwargs["name"],
            storage_path=run_kwargs["storage_path"],
            callbacks=run_kwargs["callbacks"],
            failure_config=tune.FailureConfig(max_failures=run_kwargs["max_failures"]),
            verbose=run_kwargs["verbose"],
            progress_reporter=run_kwargs.get("progress_reporter"),
        ),
    )


def _absolute(path: str | Path) -> str:
    """Local paths made absolute (Train workers run in another working directory); URIs kept."""
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def _ensure_sqlite_parent(url: str) -> None:
    """Create the directory of a ``sqlite:///`` storage file (sqlite will not)."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        Path(url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
