"""Python API over a sweep's results directory: tables, Pareto fronts, plots and sample grids.

Everything here is a plain function of a :class:`Sweep` (loaded once with :func:`load_sweep`)
that returns a ``pandas.DataFrame`` or a ``matplotlib.figure.Figure``. Figures are created
without ``pyplot`` (no global figure registry, no backend switch); save them with
``fig.savefig(...)`` or let Jupyter display them.

::

    from mmdsweep import analysis as A

    sweep = A.load_sweep("results/digits/sweep")
    A.leaderboard(sweep).head()
    A.best_per_t(sweep)
    A.pareto_front(sweep, x="seconds_per_image")
    A.plot_pareto(sweep).savefig("pareto.png")
    A.final_table(sweep)        # final protocol: fine-tuned vs the best training-free baseline
    A.baselines_table(sweep)

A results directory holds ``trials.parquet`` and ``metrics.parquet`` (``mmdsweep.results``),
optionally ``speed.parquet`` (``mmdsweep.results.speed``), ``evaluation.parquet`` (the final
protocol after the sweep, ``mmdsweep.results.evaluation``) and ``sweep.json`` (base model,
exports, sampler, Optuna storage). See ``docs/results.md``, "Analysing results".

Two protocols: the *selection* numbers (``best_fid`` etc. of the trials: the validation noise
and reference the sweep optimised against) pick the trials; the *final* numbers
(``final_fid_mean`` +- ``final_fid_std``, :func:`final_table`) rescore the chosen trials and
every training-free baseline on fresh noise seeds against a held-out reference, and are the
ones to report. ``final_fid`` of the trials is the selection FID of the last evaluation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mmdsweep.results import (
    META_PARAM_TYPES,
    METRICS_SCHEMA,
    PARAM_PREFIX,
    has_results,
    read_metrics,
    read_trials,
    table_metadata,
)
from mmdsweep.results.evaluation import (
    FINAL_COMPARISON_COLUMNS,
    empty_evaluation,
    final_comparison,
    read_evaluation,
    summarize,
)
from mmdsweep.results.layout import SWEEP_FILE, SweepLayout, export_name
from mmdsweep.results.reader import model_dirs, read_sweep_meta
from mmdsweep.results.speed import SPEED_FILE, read_speed_table  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import duckdb
    import torch

    from mmdsweep.assets.models import Denoiser

SCORE_COLUMNS = ("best_fid", "best_kid", "final_fid", "final_kid")


# --------------------------------------------------------------------------- loading


@dataclass
class Sweep:
    """One or several sweeps' results, concatenated.

    Attributes:
        dir: results directory of the (first) sweep.
        trials: ``trials.parquet`` rows (all sweeps; ``sweep_id`` tells them apart).
        metrics: ``metrics.parquet`` rows.
        speed: ``speed.parquet`` rows with a ``sweep_id`` column (empty when not measured).
        evaluation: ``evaluation.parquet`` rows (final protocol: one per model-or-baseline x chain x
            space x seed, :func:`mmdsweep.results.evaluation.evaluation_schema`) with a ``sweep_id``
            column; empty, with those columns, when the final protocol has not run (e.g. an
            interrupted sweep).
        meta: ``sweep.json`` of the (first) sweep, completed from the Parquet metadata.
        dirs: results directory per sweep id.
        metas: ``sweep.json`` per sweep id.
        param_types: searched parameters, dotted name -> ``"float"``/``"int"``/``"str"``.
    """

    dir: Path
    trials: pd.DataFrame
    metrics: pd.DataFrame
    speed: pd.DataFrame
    meta: dict[str, Any]
    dirs: dict[str, Path] = field(default_factory=dict)
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)
    param_types: dict[str, str] = field(default_factory=dict)
    evaluation: pd.DataFrame = field(default_factory=lambda: _empty_evaluation())

    @property
    def sweep_ids(self) -> list[str]:
        """Ids of the sweeps, in loading order."""
        return list(self.dirs)

    @property
    def param_columns(self) -> list[str]:
        """``param.<name>`` columns of :attr:`trials`, sorted."""
        return sorted(c for c in self.trials.columns if c.startswith(PARAM_PREFIX))

    def __repr__(self) -> str:
        status = self.trials["status"].value_counts().to_dict() if len(self.trials) else {}
        return (
            f"Sweep({', '.join(self.sweep_ids)}: {len(self.trials)} trials {status}, "
            f"{len(self.metrics)} reports, {len(self.speed)} speed rows, "
            f"{len(self.evaluation)} final-evaluation rows, dir={self.dir})"
        )


def _parquet_meta(path: Path) -> dict[bytes, bytes]:
    return dict(pq.read_schema(path).metadata or {})


def _param_types(results_dir: Path) -> dict[str, str]:
    raw = table_metadata(results_dir, "trials").get(META_PARAM_TYPES)
    return dict(json.loads(raw.decode())) if raw else {}


def _empty_metrics() -> pd.DataFrame:
    return METRICS_SCHEMA.empty_table().to_pandas()


def _empty_evaluation() -> pd.DataFrame:
    df = empty_evaluation()
    df.insert(0, "sweep_id", pd.Series(dtype=object))
    return df


def _read_evaluation(d: Path, sid: str) -> pd.DataFrame:
    if not SweepLayout(d).evaluation.is_file():
        return _empty_evaluation()
    df = read_evaluation(d)
    df.insert(0, "sweep_id", pd.Series([sid] * len(df), dtype=object))
    return df


def load_sweep(path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Sweep:
    """Load one results directory, or several (concatenated; ``sweep_id`` tells them apart).

    ``evaluation.parquet`` (the final protocol) is loaded too when present (:attr:`Sweep.evaluation`).

    Raises:
        FileNotFoundError: a directory has no ``trials.parquet``.
        ValueError: two directories hold the same sweep id, or an ``evaluation.parquet`` of an unknown
            schema version.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise ValueError("load_sweep: expected at least one results directory")
    trials, metrics, speeds, evaluations = [], [], [], []
    dirs: dict[str, Path] = {}
    metas: dict[str, dict[str, Any]] = {}
    param_types: dict[str, str] = {}
    for raw in paths:
        d = Path(raw)
        if not has_results(d):  # trials.parquet, or trials/part-*.parquet while the sweep runs
            raise FileNotFoundError(f"{d}: no trials.parquet; not a sweep results directory")
        meta = read_sweep_meta(d)
        sid = str(meta["sweep_id"])
        if sid in dirs:
            raise ValueError(f"sweep {sid!r} is loaded twice ({dirs[sid]} and {d})")
        dirs[sid], metas[sid] = d, meta
        param_types.update(_param_types(d))
        trials.append(read_trials(d))
        metrics.append(read_metrics(d) if has_results(d, "metrics") else _empty_metrics())
        speed = read_speed_table(d)
        speed.insert(0, "sweep_id", pd.Series([sid] * len(speed), dtype=object))
        speeds.append(speed)
        evaluations.append(_read_evaluation(d, sid))
    return Sweep(
        dir=next(iter(dirs.values())),
        trials=_concat(trials),
        metrics=_concat(metrics),
        speed=_concat(speeds),
        meta=next(iter(metas.values())),
        dirs=dirs,
        metas=metas,
        param_types=param_types,
        evaluation=_concat(evaluations),
    )


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        return frames[0].copy()
    return pd.concat(nonempty, ignore_index=True) if len(nonempty) > 1 else nonempty[0].reset_index(drop=True)


def summary(sweep: Sweep) -> pd.DataFrame:
    """One row per sweep: trial counts by status, best FID and its T, wall times."""
    rows = []
    for sid, meta in sweep.metas.items():
        t = sweep.trials[sweep.trials["sweep_id"] == sid]
        counts = t["status"].value_counts()
        scored = t.dropna(subset=["best_fid"])
        best = scored.loc[scored["best_fid"].idxmin()] if len(scored) else None
        span = (t["updated_at"].max() - t["started_at"].min()).total_seconds() if len(t) else math.nan
        rows.append(
            {
                "sweep_id": sid,
                "experiment_name": meta.get("experiment_name"),
                "trials": len(t),
                **{f"n_{s}": int(counts.get(s, 0)) for s in _statuses(t)},
                "evaluated": len(scored),
                "best_fid": float(best["best_fid"]) if best is not None else math.nan,
                "best_timesteps": best["timesteps"] if best is not None else pd.NA,
                "best_trial": best["trial_id"] if best is not None else None,
                "trial_wall_time_s": float(t["wall_time_s"].sum(min_count=1)) if len(t) else math.nan,
                "sweep_span_s": span,
                "reports": int((sweep.metrics["sweep_id"] == sid).sum()),
            }
        )
    return pd.DataFrame(rows)


def _statuses(trials: pd.DataFrame) -> list[str]:
    from mmdsweep.results import TRIAL_STATUSES

    present = set(trials["status"].dropna())
    return [s for s in TRIAL_STATUSES if s in present] + sorted(present - set(TRIAL_STATUSES))


# --------------------------------------------------------------------------- tables


def speed_per_t(sweep: Sweep) -> pd.DataFrame:
    """Seconds per image at each T: one row per ``(sweep_id, timesteps)``.

    Uses the rows of the sweep's sampler; for each T the export ``"T{T}"`` when measured,
    else the base model (same architecture), else the mean over what was measured. The latest
    measurement of a model wins.
    """
    cols = ["sweep_id", "timesteps", "seconds_per_image", "speed_model"]
    if sweep.speed.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for sid, group in sweep.speed.groupby("sweep_id", sort=False):
        sampler = sweep.metas.get(str(sid), {}).get("sampler")
        g = group[group["sampler"] == sampler] if sampler in set(group["sampler"]) else group
        g = g.sort_values("measured_at").drop_duplicates(["model", "timesteps"], keep="last")
        for T, at_t in g.groupby("timesteps"):
            by_model = dict(zip(at_t["model"], at_t["seconds_per_image"]))
            for name in (export_name(int(T)), "base"):
                if name in by_model:
                    out.append((sid, int(T), float(by_model[name]), name))
                    break
            else:
                out.append((sid, int(T), float(at_t["seconds_per_image"].mean()), "mean"))
    df = pd.DataFrame(out, columns=cols)
    df["timesteps"] = df["timesteps"].astype("Int64")
    return df


def trials_with_speed(sweep: Sweep) -> pd.DataFrame:
    """:attr:`Sweep.trials` with ``seconds_per_image`` joined on ``(sweep_id, timesteps)``."""
    speed = speed_per_t(sweep)[["sweep_id", "timesteps", "seconds_per_image"]]
    trials = sweep.trials.copy()
    if speed.empty:
        trials["seconds_per_image"] = np.nan
        return trials
    return trials.merge(speed, on=["sweep_id", "timesteps"], how="left")


def baseline_fid(sweep: Sweep) -> pd.DataFrame:
    """FID of the base model before fine-tuning, per ``(sweep_id, timesteps)``.

    Taken from, in this order: ``sweep.json``'s ``"baseline"`` mapping (``{"5": 41.2}`` or
    ``{"5": {"fid": 41.2}}``), a ``fid_before`` column of the metrics, or evaluations at
    step 0. ``source`` says which. Empty when none of them exists.
    """
    rows: list[tuple[str, int, float, str]] = []
    for sid, meta in sweep.metas.items():
        seen: set[int] = set()
        for key, value in dict(meta.get("baseline") or {}).items():
            fid = value.get("fid") if isinstance(value, dict) else value
            if fid is not None and math.isfinite(float(fid)):
                rows.append((sid, int(key), float(fid), SWEEP_FILE))
                seen.add(int(key))
        m = sweep.metrics[(sweep.metrics["sweep_id"] == sid) & sweep.metrics["timesteps"].notna()]
        for column, source, mask in (
            ("fid_before", "fid_before", m.get("fid_before", pd.Series(dtype=float)).notna()),
            ("fid", "step 0", (m["step"] == 0) & m["fid"].notna()),
        ):
            if column not in m.columns or not mask.any():
                continue
            for T, value in m[mask].groupby("timesteps")[column].median().items():
                if int(T) not in seen:
                    rows.append((sid, int(T), float(value), source))
                    seen.add(int(T))
    df = pd.DataFrame(rows, columns=["sweep_id", "timesteps", "base_fid", "source"])
    df["timesteps"] = df["timesteps"].astype("Int64")
    return df.sort_values(["sweep_id", "timesteps"]).reset_index(drop=True)


# --------------------------------------------------------------------------- final protocol


def _experiment_yaml(sweep: Sweep, sweep_id: str) -> dict[str, Any]:
    path = SweepLayout(sweep.dirs[sweep_id]).experiment
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _setting(sweep: Sweep, sweep_id: str, section: str, key: str, default: str) -> str:
    value = (_experiment_yaml(sweep, sweep_id).get(section) or {}).get(key)
    return str(value) if value is not None else default


def primary_space(sweep: Sweep, sweep_id: str | None = None) -> str:
    """The primary evaluation space of a sweep (``features.eval``): ``sweep.json``'s ``eval_space``, else
    the space of its first ``final`` entry, else ``experiment.yaml``, else the config default."""
    from mmdsweep.config import FeaturesConfig

    sid = sweep_id or sweep.sweep_ids[0]
    meta = sweep.metas.get(sid, {})
    if meta.get("eval_space"):
        return str(meta["eval_space"])
    final = meta.get("final") or []
    if final and isinstance(final[0], dict) and final[0].get("space"):
        return str(final[0]["space"])
    return _setting(sweep, sid, "features", "eval", FeaturesConfig().eval)


FINAL_TABLE_COLUMNS = [
    "sweep_id",
    "space",
    "primary",
    "timesteps",
    "trial_id",
    "train",
    "selection_fid",
    *[c for c in FINAL_COMPARISON_COLUMNS if c not in ("space", "primary", "timesteps", "trial_id")],
]


def final_table(sweep: Sweep, space: str | None = None) -> pd.DataFrame:
    """The final protocol's comparison: each final-scored fine-tuned model against the best training-free
    baseline at its T, per sweep and evaluation space (``space=None``: all spaces; the primary first).

    Rows: :func:`mmdsweep.results.evaluation.final_comparison` of :attr:`Sweep.evaluation`, one per
    (sweep, space, T, trial). Columns (:data:`FINAL_TABLE_COLUMNS`): ``sweep_id``, ``space``,
    ``primary`` (the sweep's ``features.eval``), ``timesteps`` (sampler steps T), ``trial_id``,
    ``train`` (the trial's ``finetune.train`` mode: searched value, else the experiment's),
    ``selection_fid`` (the trial's ``best_fid``: selection protocol, not comparable to the rest),
    ``fid_mean``/``fid_std`` (final FID, mean and std ddof=1 over ``k`` fresh noise seeds of
    ``num_samples`` images each, against ``reference``), ``kid_mean``/``kid_std``,
    ``best_baseline`` (``sampler/spacing``), ``baseline_fid_mean``/``baseline_fid_std``, ``gain``
    (baseline minus model FID: positive = fine-tuning helps), ``diff_std`` (std of the per-seed
    differences, paired by seed; sqrt(s_model^2 + s_baseline^2) when unpaired: ``paired``), ``beyond_2std`` (``|gain| > 2 diff_std``), ``verdict`` (``better``/``worse``/
    ``within noise``), ``preprocessing``, ``warnings``, ``model``, ``sampler``, ``spacing``,
    ``floor_fid_mean``/``floor_fid_std``/``floor_num_samples`` (real training images scored under the same
    protocol: the metric's floor; NaN/0 when the sweep did not measure it).
    Empty (same columns) when no ``evaluation.parquet`` was loaded.
    """
    frames = []
    for sid in sweep.sweep_ids:
        ev = sweep.evaluation[sweep.evaluation["sweep_id"] == sid].drop(columns="sweep_id")
        comp = final_comparison(ev, primary_space(sweep, sid))
        if comp.empty:
            continue
        comp.insert(0, "sweep_id", sid)
        t = sweep.trials[sweep.trials["sweep_id"] == sid].drop_duplicates("trial_id").set_index("trial_id")
        mode = _setting(sweep, sid, "finetune", "train", "weights")
        if "param.finetune.train" in t:
            modes = t["param.finetune.train"].astype(object).where(t["param.finetune.train"].notna(), mode)
            comp["train"] = comp["trial_id"].map(modes).fillna(mode)
        else:
            comp["train"] = mode
        comp["selection_fid"] = comp["trial_id"].map(t["best_fid"]).astype(float)
        frames.append(comp)
    if not frames:
        return pd.DataFrame(columns=FINAL_TABLE_COLUMNS)
    df = pd.concat(frames, ignore_index=True)[FINAL_TABLE_COLUMNS]
    if space is not None:
        df = df[df["space"] == space]
    return df.reset_index(drop=True)


BASELINES_COLUMNS = [
    "sweep_id",
    "space",
    "primary",
    "timesteps",
    "rank",
    "sampler",
    "spacing",
    "fid_mean",
    "fid_std",
    "kid_mean",
    "kid_std",
    "k",
    "num_samples",
    "reference",
    "warnings",
]


def baselines_table(sweep: Sweep, space: str | None = None) -> pd.DataFrame:
    """Every training-free baseline (base model, sampler x spacing) under the final protocol.

    One row per (sweep, space, T, sampler, spacing), sorted by sweep, space (primary first), T and mean
    FID; ``rank`` 1 is the best baseline at that T and space (the one :func:`final_table` compares
    with). Columns (:data:`BASELINES_COLUMNS`): ``fid_mean``/``fid_std`` and ``kid_mean``/``kid_std``
    (mean and std ddof=1 over ``k`` fresh seeds of ``num_samples`` images), ``reference``, ``warnings``.
    ``space=None``: all spaces.
    """
    frames = []
    for sid in sweep.sweep_ids:
        ev = sweep.evaluation[
            (sweep.evaluation["sweep_id"] == sid)
            & (sweep.evaluation["kind"] == "baseline")
            & (sweep.evaluation["protocol"] == "final")
        ]
        if ev.empty:
            continue
        summ = summarize(ev.drop(columns="sweep_id"))
        primary = primary_space(sweep, sid)
        summ["sweep_id"] = sid
        summ["primary"] = summ["space"] == primary
        summ["_order"] = ~summ["primary"]
        summ = summ.sort_values(["_order", "space", "timesteps", "fid_mean"], kind="stable")
        summ["rank"] = summ.groupby(["space", "timesteps"]).cumcount() + 1
        frames.append(summ)
    if not frames:
        return pd.DataFrame(columns=BASELINES_COLUMNS)
    df = pd.concat(frames, ignore_index=True)[BASELINES_COLUMNS]
    if space is not None:
        df = df[df["space"] == space]
    return df.reset_index(drop=True)


def _final_primary(sweep: Sweep) -> pd.DataFrame:
    """Primary-space rows of :func:`final_table`, one per (sweep_id, trial_id)."""
    ft = final_table(sweep)
    return ft[ft["primary"].astype(bool)].drop_duplicates(["sweep_id", "trial_id"])


def leaderboard(
    sweep: Sweep,
    by: str = "best_fid",
    per_t: bool = False,
    *,
    ascending: bool = True,
    top: int | None = None,
) -> pd.DataFrame:
    """Trials ranked by ``by`` (lowest first unless ``ascending=False``; missing values last).

    ``rank`` starts at 1 (per T with ``per_t``, sorted by T then rank). The table keeps the
    result columns (selection protocol: ``best_fid``/``best_kid`` the best evaluation,
    ``final_fid``/``final_kid`` the last one), the ``param.*`` columns, ``seconds_per_image``
    (from ``speed.parquet``) and ``final_fid_mean``/``final_fid_std``: the FID of the final
    protocol in the primary space (mean and std ddof=1 over fresh noise seeds, held-out
    reference; :func:`final_table`) for the trials it scored, NaN for the others.
    ``top`` keeps the first rows (per T with ``per_t``).
    """
    df = _with_final(trials_with_speed(sweep), sweep, ["fid_mean", "fid_std"])
    if by not in df.columns:
        raise KeyError(f"leaderboard: no column {by!r}; choose one of {sorted(df.columns)}")
    keys = ["timesteps"] if per_t else []
    df = df.sort_values(
        [*keys, by], ascending=[True] * len(keys) + [ascending], na_position="last", kind="stable"
    )
    if per_t:
        rank = df.groupby("timesteps", dropna=False)[by].rank(method="first", ascending=ascending)
    else:
        rank = df[by].rank(method="first", ascending=ascending)
    df.insert(0, "rank", rank.astype("Int64"))
    if top is not None:
        df = df.groupby("timesteps", dropna=False).head(top) if per_t else df.head(top)
    front = ["sweep_id"] if len(sweep.dirs) > 1 else []
    front += ["rank", "trial_id", "status", "timesteps", by]
    results = [
        "best_fid",
        "best_kid",
        "final_fid",
        "final_kid",
        "final_fid_mean",
        "final_fid_std",
        "best_step",
        "steps",
        "wall_time_s",
        "seconds_per_image",
    ]
    tail = ["best_checkpoint", "error"]
    ordered = front + [c for c in results if c not in front] + sweep.param_columns + tail
    return df[[c for c in ordered if c in df.columns]].reset_index(drop=True)


def _with_final(df: pd.DataFrame, sweep: Sweep, columns: list[str]) -> pd.DataFrame:
    """``df`` with the primary-space :func:`final_table` columns joined on (sweep_id, trial_id);
    ``fid_mean``/``fid_std`` become ``final_fid_mean``/``final_fid_std``."""
    names = {"fid_mean": "final_fid_mean", "fid_std": "final_fid_std"}
    final = _final_primary(sweep)[["sweep_id", "trial_id", *columns]].rename(columns=names)
    out = df.merge(final, on=["sweep_id", "trial_id"], how="left")
    for c in ("final_fid_mean", "final_fid_std", "baseline_fid_mean", "baseline_fid_std", "gain"):
        if c in out:
            out[c] = out[c].astype(float)
    return out


def best_per_t(sweep: Sweep) -> pd.DataFrame:
    """The best trial (lowest ``best_fid``) for each timestep budget T (and sweep).

    Columns: ``sweep_id``, ``timesteps``, the trial's id, status and scores, ``base_fid`` (the
    base model before fine-tuning, see :func:`baseline_fid`), ``fid_improvement``
    (``base_fid - best_fid``), ``seconds_per_image``, ``export_dir`` (the exported pipeline of
    that T in ``sweep.json``, if any), ``best_checkpoint`` and the ``param.*`` columns.

    From the final protocol (:func:`final_table`, primary space; NaN/None when the trial was not
    final-scored): ``final_fid_mean``/``final_fid_std`` (FID, mean and std ddof=1 over fresh noise
    seeds), ``best_baseline`` (``sampler/spacing`` of the best training-free baseline at T),
    ``baseline_fid_mean``/``baseline_fid_std``, ``gain`` (baseline minus fine-tuned final FID,
    positive = better) and ``beyond_2std`` (whether ``|gain|`` exceeds 2 std of the difference).
    ``base_fid`` and ``fid_improvement`` are selection-protocol numbers.
    """
    df = trials_with_speed(sweep).dropna(subset=["best_fid", "timesteps"])
    df = df.sort_values(["sweep_id", "timesteps", "best_fid"], kind="stable")
    best = df.groupby(["sweep_id", "timesteps"], sort=True).head(1)
    base = baseline_fid(sweep)[["sweep_id", "timesteps", "base_fid"]]
    best = best.merge(base, on=["sweep_id", "timesteps"], how="left")
    best["fid_improvement"] = best["base_fid"] - best["best_fid"]
    exports = []
    for sid, T in zip(best["sweep_id"], best["timesteps"]):
        dirs = model_dirs(sweep.dirs[sid], sweep.metas[sid])
        exports.append(dirs.get(export_name(int(T))))
    best["export_dir"] = exports
    best = _with_final(
        best,
        sweep,
        [
            "fid_mean",
            "fid_std",
            "best_baseline",
            "baseline_fid_mean",
            "baseline_fid_std",
            "gain",
            "beyond_2std",
        ],
    )
    cols = [
        "sweep_id",
        "timesteps",
        "trial_id",
        "status",
        "best_fid",
        "best_kid",
        "best_step",
        "base_fid",
        "fid_improvement",
        "final_fid_mean",
        "final_fid_std",
        "best_baseline",
        "baseline_fid_mean",
        "baseline_fid_std",
        "gain",
        "beyond_2std",
        "seconds_per_image",
        "export_dir",
        "best_checkpoint",
        *sweep.param_columns,
    ]
    return best[[c for c in cols if c in best.columns]].reset_index(drop=True)


def pareto_front(df: pd.DataFrame | Sweep, x: str = "timesteps", y: str = "best_fid") -> pd.DataFrame:
    """Rows of ``df`` not dominated when minimising both ``x`` and ``y``.

    A row is dominated when another row is at least as good in both columns and strictly
    better in one. Rows missing ``x`` or ``y`` are ignored; identical points are all kept.
    Given a :class:`Sweep`, its trials with ``seconds_per_image`` joined on T are used
    (:func:`trials_with_speed`). The result is sorted by ``x``, then ``y``.
    """
    table = trials_with_speed(df) if isinstance(df, Sweep) else df
    for col in (x, y):
        if col not in table.columns:
            raise KeyError(f"pareto_front: no column {col!r}")
    data = table.dropna(subset=[x, y])
    if data.empty:
        return data.copy()
    xs = data[x].to_numpy(dtype=float)
    ys = data[y].to_numpy(dtype=float)
    le = (xs[None, :] <= xs[:, None]) & (ys[None, :] <= ys[:, None])
    lt = (xs[None, :] < xs[:, None]) | (ys[None, :] < ys[:, None])
    dominated = (le & lt).any(axis=1)
    front = data[~dominated]
    return front.sort_values([x, y], kind="stable")


# --------------------------------------------------------------------------- plots


def _t_colors(values: Iterable[Any]) -> dict[int, str]:
    """One colour per T from matplotlib's qualitative ``tab10`` colormap (cycled beyond 10)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10"]
    ts = sorted({int(v) for v in values if not pd.isna(v)})
    return {t: to_hex(cmap(i % cmap.N)) for i, t in enumerate(ts)}


def _empty_figure(message: str, figsize: tuple[float, float] = (6.0, 3.0)) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def learning_curves(sweep: Sweep, metric: str = "fid", *, logy: bool = False) -> Figure:
    """``metric`` (FID by default) against fine-tuning step, one line per trial, coloured by T.

    A diverged or errored trial ends in a cross. The base model's FID before fine-tuning, when
    known (:func:`baseline_fid`), is drawn as a dotted horizontal line per T.
    """
    m = sweep.metrics.dropna(subset=[metric]) if metric in sweep.metrics.columns else sweep.metrics.iloc[:0]
    if m.empty:
        return _empty_figure(f"no {metric} evaluations yet")
    status = sweep.trials.set_index(["sweep_id", "trial_id"])["status"].to_dict()
    trial_t = sweep.trials.set_index(["sweep_id", "trial_id"])["timesteps"].to_dict()
    colors = _t_colors(list(m["timesteps"].dropna()) + list(sweep.trials["timesteps"].dropna()))
    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for (sid, tid), g in m.sort_values("step").groupby(["sweep_id", "trial_id"], sort=False):
        T = g["timesteps"].dropna().iloc[-1] if g["timesteps"].notna().any() else trial_t.get((sid, tid))
        color = colors.get(int(T), "black") if not pd.isna(T) else "black"
        ax.plot(g["step"], g[metric], color=color, alpha=0.75, lw=1.4, marker="o", ms=3)
        if status.get((sid, tid)) in ("diverged", "errored"):
            ax.plot(g["step"].iloc[-1], g[metric].iloc[-1], marker="x", color=color, ms=9, mew=2)
    base = baseline_fid(sweep) if metric == "fid" else pd.DataFrame()
    for row in base.itertuples():
        ax.axhline(float(row.base_fid), color=colors.get(int(row.timesteps), "grey"), ls=":", lw=1.2)  # type: ignore[arg-type]
    handles = [Line2D([], [], color=c, marker="o", ms=3, label=f"T={t}") for t, c in colors.items()]
    if len(base):
        handles.append(Line2D([], [], color="grey", ls=":", label="base model (before)"))
    ax.legend(handles=handles, title="timesteps", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} during fine-tuning ({m['trial_id'].nunique()} trials)")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return fig


_X_LABELS = {
    "timesteps": "sampler timesteps T",
    "seconds_per_image": "milliseconds per image (speed.parquet)",
}


def plot_pareto(sweep: Sweep, x: str = "timesteps", y: str = "best_fid") -> Figure:
    """All evaluated trials (coloured by T) with the Pareto front of ``y`` against ``x``.

    ``x`` is ``"timesteps"`` or ``"seconds_per_image"`` (needs ``speed.parquet``). The base
    model's FID before fine-tuning, when known, is shown as crosses.
    """
    data = trials_with_speed(sweep)
    if x == "seconds_per_image" and data["seconds_per_image"].isna().all():
        raise ValueError(
            "plot_pareto(x='seconds_per_image'): no speed.parquet rows for the sweep's T values; "
            "measure them with `python -m mmdsweep.speed RESULTS_DIR`"
        )
    data = data.dropna(subset=[x, y])
    if data.empty:
        return _empty_figure(f"no trials with {y} yet")
    front = pareto_front(data, x=x, y=y)
    colors = _t_colors(data["timesteps"].dropna())
    scale = 1000.0 if x == "seconds_per_image" else 1.0  # drawn in milliseconds

    def xs(values: pd.Series) -> np.ndarray:
        return values.to_numpy(dtype=float) * scale

    fig = Figure(figsize=(5.6, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for T, g in data.groupby("timesteps"):
        ax.scatter(xs(g[x]), g[y], color=colors[int(T)], alpha=0.55, s=28, label=f"T={int(T)}")
    ax.step(xs(front[x]), front[y], where="post", color="black", lw=1.2, alpha=0.8)
    ax.scatter(
        xs(front[x]), front[y], facecolors="none", edgecolors="black", s=90, lw=1.5, label="Pareto front"
    )
    for row in front.itertuples():
        label = f"{float(getattr(row, y)):.3g}"
        if x != "timesteps":
            label = f"T={row.timesteps}: {label}"
        point = (float(getattr(row, x)) * scale, float(getattr(row, y)))
        ax.annotate(label, point, textcoords="offset points", xytext=(6, 6), fontsize=8)
    if y == "best_fid":
        base = baseline_fid(sweep)
        if x == "seconds_per_image" and len(base):
            base = base.merge(speed_per_t(sweep), on=["sweep_id", "timesteps"], how="inner")
        if len(base):
            ax.scatter(
                xs(base[x]), base["base_fid"], marker="x", color="grey", s=50, label="base model (before)"
            )
    if x == "timesteps":
        ax.set_xticks(sorted({float(v) for v in data[x]}))
    else:
        values = xs(data[x])
        if values.min() > 0 and values.max() / values.min() > 10:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.set_xlabel(_X_LABELS.get(x, x))
    ax.set_ylabel(y.replace("_", " ").upper() if y.endswith("fid") else y)
    ax.set_title(f"{y} vs {x}: {len(front)} Pareto-optimal of {len(data)} trials")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- sensitivity

SENSITIVITY_COLUMNS = [
    "parameter",
    "method",
    "importance",
    "spearman",
    "category",
    "n",
    "mean_best_fid",
    "min_best_fid",
]


def _rank(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy(dtype=float)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (scipy; average ranks for ties); NaN if either side is constant."""
    from scipy.stats import spearmanr

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(xa) < 2 or np.ptp(xa) == 0 or np.ptp(xb) == 0:
        return math.nan
    return float(spearmanr(xa, xb).statistic)


def _correlation_ratio(categories: pd.Series, values: np.ndarray) -> float:
    """eta: sqrt(between-group / total sum of squares) of the ranks of ``values``."""
    ranks = _rank(values)
    total = float(((ranks - ranks.mean()) ** 2).sum())
    if total == 0:
        return math.nan
    frame = pd.DataFrame({"c": categories.to_numpy(), "r": ranks})
    between = float(frame.groupby("c")["r"].agg(lambda r: len(r) * (r.mean() - ranks.mean()) ** 2).sum())
    return math.sqrt(between / total)


def _summary_sensitivity(sweep: Sweep, y: str) -> pd.DataFrame:
    scored = sweep.trials.dropna(subset=[y])
    rows: list[dict[str, Any]] = []
    for col in sweep.param_columns:
        name = col[len(PARAM_PREFIX) :]
        sub = scored.dropna(subset=[col])
        if sub.empty:
            continue
        kind = sweep.param_types.get(name) or ("str" if sub[col].dtype == object else "float")
        values = sub[y].to_numpy(dtype=float)
        if kind == "str":
            eta = _correlation_ratio(sub[col].astype(str), values)
            for cat, g in sub.groupby(sub[col].astype(str)):
                rows.append(
                    {
                        "parameter": name,
                        "method": "category",
                        "importance": eta,
                        "spearman": math.nan,
                        "category": cat,
                        "n": len(g),
                        "mean_best_fid": float(g[y].mean()),
                        "min_best_fid": float(g[y].min()),
                    }
                )
        else:
            rho = spearman(sub[col].to_numpy(dtype=float), values)
            rows.append(
                {
                    "parameter": name,
                    "method": "spearman",
                    "importance": abs(rho) if not math.isnan(rho) else math.nan,
                    "spearman": rho,
                    "category": None,
                    "n": len(sub),
                    "mean_best_fid": float(sub[y].mean()),
                    "min_best_fid": float(sub[y].min()),
                }
            )
    df = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    if df.empty:
        return df
    order = df.groupby("parameter")["importance"].max().fillna(-1).sort_values(ascending=False, kind="stable")
    df["_order"] = df["parameter"].map({p: i for i, p in enumerate(order.index)})
    return (
        df.sort_values(["_order", "mean_best_fid"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def _sqlite_file(url: str) -> str | None:
    prefix = "sqlite:///"
    return url[len(prefix) :] if url.startswith(prefix) else None


def load_optuna_study(results_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Any:
    """The sweep's Optuna study from ``sweep.json``'s ``optuna_storage`` and ``study_name``.

    A relative SQLite path is tried as given, then relative to ``results_dir``; a missing
    SQLite file is never created. ``study_name`` may be omitted when the storage holds a
    single study. Raises ``FileNotFoundError``/``ValueError`` with the reason otherwise.
    """
    import optuna

    base = Path(results_dir)
    meta = meta if meta is not None else read_sweep_meta(base)
    url = meta.get("optuna_storage")
    if not url:
        raise ValueError("sweep.json records no optuna_storage")
    file = _sqlite_file(str(url))
    if file is not None and file not in ("", ":memory:"):
        candidates = [Path(file)] if Path(file).is_absolute() else [Path(file), base / file]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"Optuna storage {url} not found")
        url = f"sqlite:///{found}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = meta.get("study_name")
    if not name:
        names = optuna.study.get_all_study_names(storage=str(url))
        if len(names) != 1:
            raise ValueError(f"sweep.json has no study_name and {url} holds {len(names)} studies")
        name = names[0]
    return optuna.load_study(study_name=str(name), storage=str(url))


def _optuna_sensitivity(sweep: Sweep) -> pd.DataFrame:
    import optuna

    study = load_optuna_study(sweep.dir, sweep.meta)
    target = None
    if len(study.directions) > 1:

        def target(t: optuna.trial.FrozenTrial) -> float:
            return float(t.values[0])

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = [
        {
            "parameter": name,
            "method": "optuna-fanova",
            "importance": float(value),
            "spearman": math.nan,
            "category": None,
            "n": sum(1 for t in completed if name in t.params),
            "mean_best_fid": math.nan,
            "min_best_fid": math.nan,
        }
        for name, value in importances.items()
    ]
    return pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)


def sensitivity(sweep: Sweep, method: str = "auto", y: str = "best_fid") -> pd.DataFrame:
    """How much each searched parameter matters for ``y`` (``best_fid``).

    ``method="optuna"``: Optuna's fANOVA parameter importances
    (``optuna.importance.get_param_importances``) from the study recorded in ``sweep.json``
    (single sweeps only; importances sum to 1, conditional parameters keep Optuna's
    ``name[parent=value]`` names). ``method="summary"``: per numeric parameter the Spearman
    rank correlation with ``y`` (``importance`` = its absolute value); per categorical
    parameter one row per category with the mean and minimum of ``y`` (``importance`` = the
    correlation ratio of ``y``'s ranks over the categories, also in [0, 1]). ``"auto"`` uses
    Optuna when the study can be loaded and has enough completed trials, else the summary.

    Columns: :data:`SENSITIVITY_COLUMNS`; ``method`` names the method of each row.
    ``df.attrs["method"]`` and ``df.attrs["note"]`` say which was used and why.
    """
    if method not in ("auto", "optuna", "summary"):
        raise ValueError(f"method={method!r}: expected 'auto', 'optuna' or 'summary'")
    note = ""
    if method in ("auto", "optuna"):
        try:
            if len(sweep.dirs) > 1:
                raise ValueError("several sweeps loaded; Optuna importances are per study")
            df = _optuna_sensitivity(sweep)
            df.attrs.update(
                method="optuna-fanova", note=f"Optuna study {sweep.meta.get('study_name') or ''}".strip()
            )
            return df
        except Exception as exc:
            if method == "optuna":
                raise
            note = (
                f"Optuna importances unavailable ({type(exc).__name__}: {exc}); rank statistics used instead"
            )
    df = _summary_sensitivity(sweep, y)
    df.attrs.update(method="summary", note=note or "rank statistics over the trials' best FID")
    return df


def plot_sensitivity(sens: pd.DataFrame | Sweep) -> Figure:
    """Bar chart of parameter importances; with the summary method also the best FID per
    category of each categorical parameter."""
    df = sensitivity(sens) if isinstance(sens, Sweep) else sens
    if df.empty:
        return _empty_figure("no parameters with evaluated trials")
    imp = df.groupby("parameter", sort=False).agg(
        importance=("importance", "max"), method=("method", "first")
    )
    imp = imp.iloc[::-1]
    cats = df[df["method"] == "category"]
    ncols = 2 if len(cats) else 1
    fig = Figure(figsize=(5.5 * ncols, 0.45 * len(imp) + 1.8), layout="constrained")
    ax = fig.add_subplot(1, ncols, 1)
    tab10 = colormaps["tab10"]
    method_colors = {"optuna-fanova": tab10(0), "spearman": tab10(2), "category": tab10(1)}
    ax.barh(
        list(imp.index),
        imp["importance"].fillna(0.0),
        color=[method_colors.get(m, "grey") for m in imp["method"]],
    )
    ax.set_xlabel("importance")
    ax.set_xlim(0, max(1.0, float(imp["importance"].max(skipna=True) or 0.0)))
    for i, (name, row) in enumerate(imp.iterrows()):
        rho = df.loc[(df["parameter"] == name), "spearman"].iloc[0]
        text = f"rho={rho:+.2f}" if not pd.isna(rho) else row["method"]
        ax.text(
            float(0.0 if pd.isna(row["importance"]) else row["importance"]) + 0.01,
            i,
            text,
            va="center",
            fontsize=8,
        )
    ax.set_title(f"parameter importance ({df.attrs.get('method', df['method'].iloc[0])})")
    if len(cats):
        ax2 = fig.add_subplot(1, ncols, 2)
        labels = [f"{p} = {c}" for p, c in zip(cats["parameter"], cats["category"])]
        pos = np.arange(len(cats))[::-1]
        ax2.barh(pos, cats["mean_best_fid"], color="#ff7f0e", alpha=0.6, label="mean")
        ax2.scatter(cats["min_best_fid"], pos, color="black", marker="|", s=200, label="min")
        ax2.set_yticks(pos, labels)
        ax2.set_xlabel("best FID of trials")
        ax2.set_title("best FID per category")
        ax2.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- duckdb


def duckdb_paths(sweep: Sweep) -> dict[str, str]:
    """Parquet paths for DuckDB: ``duckdb.sql(f"select * from '{paths['metrics']}'")``.

    Keys ``trials``, ``metrics`` and (when written) ``speed`` and ``evaluation`` for the first sweep, and
    ``<sweep_id>/trials`` etc. for every sweep.
    """
    out: dict[str, str] = {}
    for i, (sid, d) in enumerate(sweep.dirs.items()):
        rp = SweepLayout(d)
        files = {"trials": rp.trials, "metrics": rp.metrics, "speed": rp.speed, "evaluation": rp.evaluation}
        for name, path in files.items():
            if path.exists():
                if i == 0:
                    out[name] = str(path.resolve())
                out[f"{sid}/{name}"] = str(path.resolve())
    return out


def duckdb_connect(sweep: Sweep) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``trials``, ``metrics`` and ``speed`` over all
    loaded sweeps: ``trials``/``metrics`` are the loaded (deduplicated, part-merged) tables, so a
    running sweep works too; ``speed`` reads the files (``read_parquet([...], union_by_name=true)``)."""
    import duckdb

    con = duckdb.connect()
    con.register("trials", sweep.trials)
    con.register("metrics", sweep.metrics)
    for name in ("speed",):
        files = [v for k, v in duckdb_paths(sweep).items() if k.endswith(f"/{name}")]
        if files:
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            con.execute(f"create view {name} as select * from read_parquet([{listing}], union_by_name=true)")
    return con


# --------------------------------------------------------------------------- sample grids


def sample_grid(
    model_dir: str | os.PathLike[str] | Denoiser,
    timesteps: int,
    *,
    num: int = 64,
    seed: int = 0,
    sampler: str = "ddim",
    spacing: str = "uniform",
    eta: float = 0.0,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """``num`` samples in [-1, 1], ``(num, C, H, W)``, from the evaluation noise of ``seed``.

    Sample ``i`` starts from ``mmdsweep.inference.evaluation.eval_noise(num, shape, seed)[i]``, so grids of
    different models (base vs fine-tuned) share identical noise, image by image.
    """
    from mmdsweep.inference.generate import generate_images

    images = generate_images(
        model_dir,
        timesteps,
        num=num,
        seed=seed,
        sampler=sampler,
        spacing=spacing,
        eta=eta,
        batch_size=batch_size,
        device=device,
    )
    assert images is not None
    return images


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Images in [-1, 1] ``(N, C, H, W)`` -> one uint8 ``(H', W', 3)`` grid, white padding."""
    from mmdsweep.utils import image_grid

    ncol = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = image_grid(images, nrow=ncol, pad=pad)
    return np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid


@dataclass
class GridPair:
    """Before/after samples at one T from identical noise."""

    timesteps: int
    tuned: torch.Tensor
    base: torch.Tensor | None
    tuned_fid: float | None
    base_fid: float | None
    trial_id: str | None
    sampler: str
    base_sampler: str
    tuned_dir: str
    base_dir: str | None


def before_after_grids(
    sweep: Sweep,
    *,
    num: int = 64,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 64,
    base_sampler: str = "ddim",
    timesteps: Sequence[int] | None = None,
    sweep_id: str | None = None,
) -> list[GridPair]:
    """For each exported T of ``sweep.json``: samples of the base model (``base_sampler``,
    DDIM by default) and of the fine-tuned export (the sweep's sampler), from identical noise.

    ``tuned_fid`` is the best FID of T's best trial; ``base_fid`` the base model's FID before
    fine-tuning when known (:func:`baseline_fid`). ``timesteps`` restricts the T values.
    """
    from mmdsweep.inference.generate import load_model

    sid = sweep_id or sweep.sweep_ids[0]
    meta = sweep.metas[sid]
    dirs = model_dirs(sweep.dirs[sid], meta)
    best = best_per_t(sweep)
    best = best[best["sweep_id"] == sid].set_index("timesteps")
    base_fids = baseline_fid(sweep)
    base_fids = base_fids[base_fids["sweep_id"] == sid].set_index("timesteps")["base_fid"]
    base_model = load_model(dirs["base"]) if "base" in dirs else None
    sampler, spacing = str(meta["sampler"]), str(meta["spacing"])
    pairs = []
    for name, path in dirs.items():
        if name == "base":
            continue
        T = int(name[1:])
        if timesteps is not None and T not in timesteps:
            continue
        kwargs: dict[str, Any] = dict(
            num=num, seed=seed, spacing=spacing, batch_size=batch_size, device=device
        )
        tuned = sample_grid(path, T, sampler=sampler, **kwargs)
        base = sample_grid(base_model, T, sampler=base_sampler, **kwargs) if base_model is not None else None
        pairs.append(
            GridPair(
                timesteps=T,
                tuned=tuned,
                base=base,
                tuned_fid=float(best.loc[T, "best_fid"]) if T in best.index else None,
                base_fid=float(base_fids.loc[T]) if T in base_fids.index else None,
                trial_id=str(best.loc[T, "trial_id"]) if T in best.index else None,
                sampler=sampler,
                base_sampler=base_sampler,
                tuned_dir=path,
                base_dir=dirs.get("base"),
            )
        )
    return pairs


def fid_label(fid: float | None) -> str:
    """``"FID 12.34"`` or ``"FID n/a"``."""
    return f"FID {fid:.2f}" if fid is not None and math.isfinite(fid) else "FID n/a"


def plot_sample_grids(
    pairs: Sequence[GridPair] | Sweep, *, num: int = 16, seed: int = 0, device: str = "cpu"
) -> Figure:
    """Base model vs fine-tuned export at each exported T, side by side, labelled with T and FID.

    Given a :class:`Sweep`, samples ``num`` images per model first (:func:`before_after_grids`).
    """
    if isinstance(pairs, Sweep):
        pairs = before_after_grids(pairs, num=num, seed=seed, device=device)
    if not pairs:
        return _empty_figure("no exported models in sweep.json")
    fig = Figure(figsize=(8.0, 4.2 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, pair in zip(axes, pairs):
        left, right = row
        if pair.base is not None:
            left.imshow(grid_array(pair.base), interpolation="nearest")
            left.set_title(
                f"base, {pair.base_sampler} T={pair.timesteps}\n{fid_label(pair.base_fid)}", fontsize=10
            )
        else:
            left.text(0.5, 0.5, "no base model in sweep.json", ha="center", va="center")
        trial = f", trial {pair.trial_id}" if pair.trial_id else ""
        right.imshow(grid_array(pair.tuned), interpolation="nearest")
        right.set_title(
            f"fine-tuned, {pair.sampler} T={pair.timesteps}\n{fid_label(pair.tuned_fid)}{trial}", fontsize=10
        )
        for ax in row:
            ax.set_axis_off()
    return fig
