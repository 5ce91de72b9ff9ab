"""Search spaces declared in the experiment YAML, turned into Optuna / Ray Tune searchers.

Format
------
``search.space`` maps a dotted config key to a distribution spec (one mapping),
or to a list of specs for a key that has a different distribution per branch::

    search:
      space:
        finetune.lr:        {loguniform: [1.0e-6, 1.0e-4]}
        finetune.ema_decay: {uniform: [0.9, 0.999]}
        finetune.batch_size: {int: [16, 64], log: true}
        sampler.timesteps:  {choice: [5, 10]}
        kernel.type:        {choice: [polynomial, rbf, imq]}
        kernel.bandwidth:                      # one spec per branch
          - {loguniform: [0.1, 10.0], when: {kernel.type: rbf}}
          - {uniform: [0.5, 2.0], when: {kernel.type: imq}}
        kernel.degree:      {int: [2, 4], when: {kernel.type: polynomial}}
        features.train:     {choice: [classifier, "torchvision:mobilenet_v2"]}

Distributions (exactly one per spec):

``uniform: [low, high]``
    float in [low, high]; optional ``step`` (quantisation). Needs low < high.
``loguniform: [low, high]``
    float, log-uniform. Needs 0 < low < high.
``int: [low, high]``
    integer in [low, high] inclusive; optional ``log: true`` (needs low >= 1) or
    ``step: k`` (an integer >= 1 dividing high - low). Needs low < high.
``choice: [v1, v2, ...]``
    categorical over non-empty, distinct scalars (str, int, float, bool).

``when`` makes a spec conditional: a mapping from another parameter's key to
a value or a list of allowed values; several entries must all hold. The parent
may be declared anywhere in the mapping (the order is a topological sort, so a
YAML file with sorted keys means the same); conditions forming a cycle are an
error. The parent
must be a ``choice`` or ``int`` parameter and the values must be possible for it.
A conditional parameter is absent from the trial config when its condition does
not hold (the experiment's default applies), and so is any parameter whose
parent is absent. Several specs for one key must each have a ``when``, and the
conditions must be provably exclusive (some shared parent with disjoint values).

Checked at load (:func:`mmdsweep.config.check_search_space`): the key must be
a config key and every value the parameter can take (each choice, both ends of
a range) must be valid for it, e.g. ``sampler.eta: {choice: [0, 2]}`` or
``finetune.lr: {uniform: [-1, 1]}`` are refused before anything starts.

Booleans: ``{choice: [true, false]}`` is an Optuna categorical of bools; the
trial config gets real bools, and the results column (whose kinds are float,
int and str) stores ``"True"``/``"False"`` (see :func:`param_types`).

Names: the trial config (and results columns) always use the dotted config
key. Optuna sees a distinct name per branch, ``key[parent=value]`` (values of a
list joined with ``|``), so branches with different distributions never clash
and the sampler models each branch separately.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna

# The specification (validation, SearchParam) is configuration and lives in mmdsweep.config;
# re-exported here, where the Optuna side of it is.
from mmdsweep.config import DISTRIBUTIONS, Scalar, SearchParam, points_to_optuna, validate_space

__all__ = [
    "DISTRIBUTIONS",
    "SAMPLERS",
    "Scalar",
    "SearchParam",
    "close_orphan_trials",
    "define_by_run",
    "make_sampler",
    "make_searcher",
    "open_storage",
    "param_types",
    "sample",
    "validate_space",
]

if TYPE_CHECKING:
    from ray.tune.search.optuna import OptunaSearch

SAMPLERS = ("tpe", "random", "cmaes", "nsga2")


def sample(params: Sequence[SearchParam], trial: optuna.Trial) -> dict[str, Any]:
    """Sample the active parameters from ``trial``; return ``{dotted key: value}``."""
    values: dict[str, Any] = {}
    for p in params:
        if p.key not in values and p.is_active(values):
            values[p.key] = p.suggest(trial)
    return values


class DefineByRun:
    """Picklable define-by-run space (Tune pickles the searcher into its experiment state)."""

    def __init__(self, params: Sequence[SearchParam]) -> None:
        self.params = tuple(params)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample on the underlying Optuna trial; return ``{dotted key: value}``."""
        return sample(self.params, getattr(trial, "ot_trial", trial))


def define_by_run(params: Sequence[SearchParam]) -> Callable[[optuna.Trial], dict[str, Any]]:
    """Define-by-run space for ``OptunaSearch(space=...)``.

    The returned callable samples with branch-specific Optuna names and returns
    ``{dotted key: value}``, which OptunaSearch puts in the trial config. It
    samples on the underlying Optuna trial (OptunaSearch's wrapper would also
    copy the Optuna names into the config), so the config holds dotted keys
    only. Works with a plain ``optuna.Trial`` too, and pickles.
    """
    return DefineByRun(params)


def _choice_type(choices: Sequence[Scalar]) -> str:
    if all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
        return "int"
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
        return "float"
    return "str"


def param_types(params: Sequence[SearchParam]) -> dict[str, str]:
    """Results-column kind per dotted key: ``"float"``, ``"int"`` or ``"str"``.

    These are the kinds ``mmdsweep.results`` stores. A ``choice`` of bools, or one mixing types,
    is ``"str"`` (the results writer stores ``str(value)``, e.g. ``"True"``; the trial config
    itself holds the real values). Branches of one key with different types widen int+float to
    ``"float"``, anything else to ``"str"``.
    """
    out: dict[str, str] = {}
    for p in params:
        t = _choice_type(p.choices) if p.kind == "choice" else ("int" if p.kind == "int" else "float")
        prev = out.get(p.key, t)
        out[p.key] = t if prev == t else ("float" if {prev, t} == {"int", "float"} else "str")
    return out


def make_sampler(name: str, seed: int | None, n_objectives: int) -> optuna.samplers.BaseSampler:
    """Build an Optuna sampler by name (``tpe``, ``random``, ``cmaes``, ``nsga2``)."""
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # multivariate + group model conditional (branch-specific) parameters jointly.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if n_objectives > 1:
            raise ValueError("sampler cmaes supports a single objective only; use tpe or nsga2")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL (e.g. ``sqlite:////abs/path/study.db``) as a picklable object."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        warnings.warn(
            f"optuna storage {url!r} is a relative sqlite path: it resolves against the "
            "current directory of whichever process opens it; prefer an absolute path",
            stacklevel=2,
        )
    return optuna.storages.RDBStorage(url)


def make_searcher(
    params: Sequence[SearchParam],
    metrics: Sequence[str],
    modes: Sequence[str],
    seed: int | None = None,
    sampler: str = "tpe",
    storage: str | None = None,
    study_name: str = "mmdsweep",
    load_if_exists: bool = False,
    points_to_evaluate: Sequence[Mapping[str, Any]] = (),
) -> OptunaSearch:
    """A configured ``OptunaSearch`` over ``params`` (single- or multi-objective).

    ``metrics``/``modes`` ("min"/"max") are set on the searcher (not on
    ``TuneConfig``). With one metric the searcher is single-objective and gets
    intermediate results (usable with ASHA); with several it is multi-objective
    and only sees each trial's final result.

    ``storage`` is an Optuna storage URL: the study then lives there (created on
    construction) and can be inspected with ``optuna.load_study`` or
    optuna-dashboard while and after the sweep runs. A study of the same name
    already in the storage is an error unless ``load_if_exists`` (its trials would
    otherwise silently join this sweep's model).

    ``points_to_evaluate`` (``{dotted key: value}`` each, :func:`mmdsweep.config.points_to_optuna` checks
    them) are enqueued in the new study and run first, in order; keys a point leaves out are sampled.
    """
    from ray.tune.search.optuna import OptunaSearch

    if not params:
        raise ValueError("make_searcher: empty search space")
    if not metrics or len(metrics) != len(modes):
        raise ValueError(f"make_searcher: need one mode per metric, got metrics={metrics} modes={modes}")
    bad = [m for m in modes if m not in ("min", "max")]
    if bad:
        raise ValueError(f"make_searcher: modes must be 'min' or 'max', got {bad}")
    ot_storage = open_storage(storage) if storage else None
    if ot_storage is not None and not load_if_exists:
        existing = {s.study_name for s in ot_storage.get_all_studies()}
        if study_name in existing:
            raise ValueError(
                f"optuna study {study_name!r} already exists in {storage}; choose another "
                "study name, delete it, or pass load_if_exists=True"
            )
    multi = len(metrics) > 1
    points = points_to_optuna(params, list(points_to_evaluate))
    return OptunaSearch(
        space=define_by_run(params),
        metric=list(metrics) if multi else metrics[0],
        mode=list(modes) if multi else modes[0],
        sampler=make_sampler(sampler, seed, len(metrics)),
        study_name=study_name,
        storage=ot_storage,
        points_to_evaluate=points or None,
    )


ORPHAN_ATTR = "mmdsweep_orphan"


def close_orphan_trials(storage: str, study_name: str, *, sweep_finished: bool = True) -> int:
    """Mark trials still RUNNING in a stored study as FAIL once the sweep has finished; return how many.

    Trials are left RUNNING when the driver was killed after Optuna handed out a suggestion but
    before Tune checkpointed the searcher; the resumed sweep never reports them, and samplers such
    as TPE would otherwise keep treating them as pending forever. Each closed trial gets the user
    attribute ``mmdsweep_orphan`` saying why.

    With ``sweep_finished=False`` (an interrupted sweep: SIGINT, SIGTERM, Tune stopping early)
    nothing is touched: the RUNNING trials are the ones ``--resume`` continues, and failing them
    would make the resumed reports hit ``UpdateFinishedTrialError``.
    """
    if not sweep_finished:
        return 0
    st = open_storage(storage)
    try:
        study_id = st.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    orphans = st.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in orphans:
        st.set_trial_user_attr(
            t._trial_id, ORPHAN_ATTR, "suggested but never run to the end (its driver was stopped)"
        )
        st.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)
