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

``when`` makes a spec conditional: a mapping from an *earlier* parameter's key to
a value or a list of allowed values; several entries must all hold. The parent
must be a ``choice`` or ``int`` parameter and the values must be possible for it.
A conditional parameter is absent from the trial config when its condition does
not hold (the experiment's default applies), and so is any parameter whose
parent is absent. Several specs for one key must each have a ``when``, and the
conditions must be provably exclusive (some shared parent with disjoint values).

Names: the trial config (and results columns) always use the dotted config
key. Optuna sees a distinct name per branch, ``key[parent=value]`` (values of a
list joined with ``|``), so branches with different distributions never clash
and the sampler models each branch separately.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    from ray.tune.search.optuna import OptunaSearch

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_OPTIONS = {"uniform": {"step"}, "loguniform": set(), "int": {"log", "step"}, "choice": set()}
SAMPLERS = ("tpe", "random", "cmaes", "nsga2")

Scalar = str | int | float | bool


@dataclass(frozen=True)
class SearchParam:
    """One validated search-space entry (one branch of a dotted config key)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Scalar, ...] = ()
    log: bool = False
    step: float | int | None = None
    when: tuple[tuple[str, tuple[Scalar, ...]], ...] = field(default=())

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

    def suggest(self, trial: optuna.Trial) -> Any:
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
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any) -> str:
    """Render a spec fragment the way it was written (lists without quotes on numbers)."""
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


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
            raise ValueError(f"{where}: choice options must be str, int, float or bool, got {v!r}")
    if len({(type(v), v) for v in value}) != len(value):
        raise ValueError(f"{where}: choice options must be distinct, got {_fmt(value)}")
    return tuple(value)


def _step_and_log(where: str, kind: str, spec: Mapping[str, Any], low: Any, high: Any) -> tuple[Any, bool]:
    """Validate the optional ``step`` and ``log`` options."""
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {log!r}")
    step = spec.get("step")
    if log and step not in (None, 1):
        raise ValueError(f"{where}: {kind} cannot combine log: true with step")
    if log and low < 1:
        raise ValueError(f"{where}: int with log: true needs low >= 1, got {_fmt([low, high])}")
    if step is None:
        return None, log
    if kind == "int":
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
            raise ValueError(f"{where}: int step must be an integer >= 1, got {step!r}")
        if (high - low) % step:
            raise ValueError(f"{where}: int step {step} does not divide high - low = {high - low}")
    elif not (_is_number(step) and 0 < step <= high - low):
        raise ValueError(f"{where}: uniform step must be a number in (0, high - low], got {step!r}")
    return step, log


def _when(
    where: str, raw: Any, earlier: Mapping[str, list[SearchParam]], all_keys: set[str]
) -> tuple[tuple[str, tuple[Scalar, ...]], ...]:
    """Validate a ``when`` mapping against the parameters declared before this one."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{where}: when needs a non-empty mapping {{parameter: value(s)}}, got {raw!r}")
    out = []
    for parent, allowed in raw.items():
        if parent in all_keys and parent not in earlier:
            raise ValueError(
                f"{where}: when refers to {parent!r}, which is declared later (or is this key); "
                "a condition may only use parameters declared before it"
            )
        if parent not in earlier:
            raise ValueError(
                f"{where}: when refers to unknown parameter {parent!r} (known: {sorted(earlier)})"
            )
        values = tuple(allowed) if isinstance(allowed, list | tuple) else (allowed,)
        if not values:
            raise ValueError(f"{where}: when {parent!r} needs at least one value")
        for branch in earlier[parent]:
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


def _parse_spec(
    where: str, key: str, spec: Any, earlier: Mapping[str, list[SearchParam]], all_keys: set[str]
) -> SearchParam:
    """Validate one distribution spec into a :class:`SearchParam`."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where}: a distribution spec must be a mapping like {{uniform: [0, 1]}}, got {spec!r}"
        )
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    others = [str(k) for k in spec if k not in DISTRIBUTIONS and k not in ("when", "log", "step")]
    if not kinds and others:
        raise ValueError(
            f"{where}: unknown distribution {others[0]!r}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: needs exactly one distribution out of {', '.join(DISTRIBUTIONS)}; "
            f"got keys {sorted(map(str, spec))}"
        )
    kind = kinds[0]
    unknown = set(spec) - {kind, "when"} - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(map(str, unknown))} for {kind}")
    when = _when(where, spec["when"], earlier, all_keys) if "when" in spec else ()
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


def validate_space(space: Any, where: str = "search.space") -> list[SearchParam]:
    """Validate a ``search.space`` mapping; return its parameters in declaration order.

    Raises ``ValueError`` naming the offending entry, e.g.
    ``search.space.finetune.lr: loguniform needs 0 < low < high, got [0, 1]``.
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"{where}: must be a non-empty mapping of config key -> distribution")
    params: list[SearchParam] = []
    by_key: dict[str, list[SearchParam]] = {}
    for key, raw in space.items():
        if not isinstance(key, str) or not key or any(c in key for c in "[]/= "):
            raise ValueError(
                f"{where}: invalid parameter key {key!r} (dotted config key without []/= or spaces)"
            )
        specs = raw if isinstance(raw, list) else [raw]
        if not specs:
            raise ValueError(f"{where}.{key}: empty list of branches")
        branches = [
            _parse_spec(
                f"{where}.{key}" + (f"[{i}]" if isinstance(raw, list) else ""), key, s, by_key, set(space)
            )
            for i, s in enumerate(specs)
        ]
        _check_branches(f"{where}.{key}", branches)
        by_key[key] = branches
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
    if all(isinstance(c, bool) for c in choices):
        return "bool"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
        return "int"
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
        return "float"
    return "str"


def param_types(params: Sequence[SearchParam]) -> dict[str, str]:
    """Value type per dotted key: ``"float"``, ``"int"``, ``"str"`` or ``"bool"``.

    A ``choice`` mixing types is ``"str"`` (writers should store ``str(value)``).
    Branches of one key with different types widen int+float to ``"float"``,
    anything else to ``"str"``.
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
    return OptunaSearch(
        space=define_by_run(params),
        metric=list(metrics) if multi else metrics[0],
        mode=list(modes) if multi else modes[0],
        sampler=make_sampler(sampler, seed, len(metrics)),
        study_name=study_name,
        storage=ot_storage,
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
