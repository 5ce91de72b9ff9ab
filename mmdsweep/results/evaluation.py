"""``evaluation.parquet``: the final-protocol scores of a sweep, and the tables built from them (no torch).

The final protocol (:mod:`mmdsweep.train.protocol` runs it) scores a chain for each fresh noise seed in
``eval.final_seeds`` against the final reference in every evaluation space; one row per
model-or-baseline x chain x space x seed (:func:`evaluation_schema`). This module owns the file (schema,
writer, reader with a version check) and the pure table logic on its rows: mean +- std over seeds
(:func:`summarize`), the best training-free baseline per T (:func:`best_baselines`), the gain of a model
against it and whether it exceeds 2 std of the difference (:func:`gain_vs_best_baseline`), and the
per-(T, model, space) comparison the sweep prints and the report shows (:func:`final_comparison`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmdsweep.results.layout import EVALUATION_FILE, SweepLayout

__all__ = [
    "EVALUATION_FILE",
    "EVALUATION_SCHEMA_VERSION",
    "FINAL_COMPARISON_COLUMNS",
    "KNOWN_EVALUATION_VERSIONS",
    "best_baselines",
    "evaluation_schema",
    "final_comparison",
    "gain_vs_best_baseline",
    "paired_gain",
    "read_evaluation",
    "summarize",
    "write_evaluation",
]

EVALUATION_SCHEMA_VERSION = "1"
KNOWN_EVALUATION_VERSIONS = ("1",)
_VERSION_KEY = b"mmdsweep.evaluation_schema_version"


def evaluation_schema() -> Any:
    """THE schema of ``evaluation.parquet`` (one row per model-or-baseline x chain x space x seed)."""
    import pyarrow as pa

    fields = [
        pa.field("kind", pa.string(), nullable=False),  # "model" | "baseline" | "real" (the data's own floor)
        pa.field("model", pa.string(), nullable=False),  # checkpoint path, or the base model for baselines
        pa.field("trial_id", pa.string()),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("spacing", pa.string(), nullable=False),
        pa.field("timesteps", pa.int64(), nullable=False),
        pa.field("eta", pa.float64()),
        pa.field("clip_sample", pa.bool_()),
        pa.field("final_clamp", pa.bool_()),
        pa.field("grid", pa.string()),  # JSON list of the timesteps
        pa.field("space", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),  # "final" | "selection"
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("fid", pa.float64()),
        pa.field("kid", pa.float64()),
        pa.field("preprocessing", pa.string()),
        pa.field("warnings", pa.string()),  # "; "-joined metric warnings ("" when none), never silenced
        pa.field("sec_per_image", pa.float64()),
        pa.field("created_unix", pa.float64()),
    ]
    return pa.schema(fields, metadata={_VERSION_KEY: EVALUATION_SCHEMA_VERSION.encode()})


def write_evaluation(rows: Sequence[dict[str, Any]], path: str | Path, *, append: bool = True) -> Path:
    """Write rows (plus, with ``append``, the rows already in ``path``) atomically with the results writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdsweep.results.files import atomic_write_table

    schema = evaluation_schema()
    out = Path(path)
    old: list[dict[str, Any]] = []
    if append and out.is_file():
        old = pq.read_table(out).to_pylist()
    table = pa.Table.from_pylist([*old, *[{k: r.get(k) for k in schema.names} for r in rows]], schema=schema)
    atomic_write_table(table, out)
    return out


def read_evaluation(path_or_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The rows of ``evaluation.parquet`` (a file, or a sweep directory holding one) as a DataFrame.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's schema version (metadata ``mmdsweep.evaluation_schema_version``) is missing
            or not one this version of mmdsweep reads; the message names the file and the versions.
    """
    import pyarrow.parquet as pq

    p = Path(path_or_dir)
    path = SweepLayout(p).evaluation if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_VERSION_KEY)
    version = raw.decode() if raw is not None else None
    if version not in KNOWN_EVALUATION_VERSIONS:
        raise ValueError(
            f"{path}: evaluation schema version {version or '(none recorded)'} is unknown; this mmdsweep reads "
            f"version(s) {', '.join(KNOWN_EVALUATION_VERSIONS)}"
        )
    return pq.read_table(path).to_pandas()


def empty_evaluation() -> pd.DataFrame:
    """An empty DataFrame with the columns (and dtypes) of ``evaluation.parquet``."""
    return evaluation_schema().empty_table().to_pandas()


def _frame(rows_or_df: Sequence[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    return rows_or_df.copy() if isinstance(rows_or_df, pd.DataFrame) else pd.DataFrame(list(rows_or_df))


def _std(s: pd.Series) -> float:
    return float(s.std(ddof=1)) if len(s) > 1 else math.nan


def _join_unique(s: pd.Series) -> str:
    return "; ".join(sorted({str(w) for w in s if isinstance(w, str) and w}))


SUMMARY_KEYS = (
    "kind",
    "model",
    "trial_id",
    "sampler",
    "spacing",
    "timesteps",
    "space",
    "reference",
    "num_samples",
)
"""What identifies one scored chain in ``evaluation.parquet``: its rows differ only by ``seed``."""


def summarize(rows: Sequence[dict[str, Any]] | pd.DataFrame) -> Any:
    """Mean +- std (ddof=1; NaN with one seed) over seeds per (kind, model, trial, sampler, spacing, T, space,
    reference, N).

    Columns: the keys, ``fid_mean``, ``fid_std``, ``kid_mean``, ``kid_std``, ``k`` (distinct seeds),
    ``warnings`` (the distinct metric warnings, "; "-joined) and ``preprocessing`` (when the rows have it).
    ``trial_id`` is "" for rows without one (baselines).
    """
    df = _frame(rows)
    if df.empty:
        return df
    keys = list(SUMMARY_KEYS)
    if "trial_id" not in df:
        df["trial_id"] = ""
    if "warnings" not in df:
        df["warnings"] = ""
    df["trial_id"] = df["trial_id"].fillna("")
    aggs: dict[str, Any] = dict(
        fid_mean=("fid", "mean"),
        fid_std=("fid", _std),
        kid_mean=("kid", "mean"),
        kid_std=("kid", _std),
        k=("seed", "nunique"),
        warnings=("warnings", _join_unique),
    )
    if "preprocessing" in df:
        aggs["preprocessing"] = ("preprocessing", _join_unique)
    return df.groupby(keys, dropna=False).agg(**aggs).reset_index()


def best_baselines(summary: Any, space: str) -> Any:
    """Per T, the baseline with the lowest mean final FID in ``space`` (columns as :func:`summarize`)."""
    if summary is None or len(summary) == 0:
        return pd.DataFrame()
    b = summary[(summary["kind"] == "baseline") & (summary["space"] == space)]
    if b.empty:
        return b
    return b.sort_values("fid_mean", kind="stable").groupby("timesteps", as_index=False).first()


def gain_vs_best_baseline(
    model_mean: float, model_std: float, base_mean: float, base_std: float
) -> dict[str, Any]:
    """Gain (baseline - model, positive = better) and whether it exceeds 2 std of the difference
    (std of a difference of two independent means over seeds: sqrt(s1^2 + s2^2); a NaN std counts as 0,
    and a difference whose std is 0 is never called beyond 2 std)."""
    gain = base_mean - model_mean
    s = math.sqrt(
        (model_std if math.isfinite(model_std) else 0.0) ** 2
        + (base_std if math.isfinite(base_std) else 0.0) ** 2
    )
    return {"gain": gain, "diff_std": s, "beyond_2std": bool(s > 0 and abs(gain) > 2 * s)}


def paired_gain(model_fid: dict[int, float], base_fid: dict[int, float]) -> dict[str, Any] | None:
    """The gain over the seeds both were scored with: per seed d_s = FID_baseline(s) - FID_model(s), ``gain`` =
    mean d_s, ``diff_std`` = std(d_s) (ddof=1), ``beyond_2std`` = ``|gain| > 2 diff_std`` (a non-zero gain with
    identical differences on every seed counts); None with fewer than 2 common seeds.

    Why paired: the final protocol draws the same initial noise x_T for a seed whatever the chain
    (:mod:`mmdsweep.core.noise`), so a model and a baseline scored with the same seeds share most of the
    seed-to-seed variation of the FID (which images, how many of each class); measured on the digits default
    at T=5, N=300: per-seed FIDs of UniPC vs DPM-Solver++(2M) moved together (2.20/1.08/1.05 vs
    2.65/1.36/1.32), the std of their differences was 0.10 against 1.00 for sqrt(s1^2 + s2^2). The unpaired
    figure treats that shared variation as noise of the difference."""
    common = sorted(set(model_fid) & set(base_fid))
    if len(common) < 2:
        return None
    d = [float(base_fid[s]) - float(model_fid[s]) for s in common]
    mean = sum(d) / len(d)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return {
        "gain": mean,
        "diff_std": std,
        "beyond_2std": bool(abs(mean) > 2 * std),
        "paired_k": len(d),
    }


def verdict(gain: float, beyond_2std: bool) -> str:
    """``"better"`` / ``"worse"`` when the gain exceeds 2 std of the difference, else ``"within noise"``
    (``""`` when there is no baseline to compare with)."""
    if gain is None or not math.isfinite(float(gain)):
        return ""
    if not beyond_2std:
        return "within noise"
    return "better" if gain > 0 else "worse"


FINAL_COMPARISON_COLUMNS = [
    "space",
    "primary",
    "timesteps",
    "trial_id",
    "model",
    "sampler",
    "spacing",
    "fid_mean",
    "fid_std",
    "kid_mean",
    "kid_std",
    "k",
    "num_samples",
    "reference",
    "preprocessing",
    "best_baseline",
    "baseline_fid_mean",
    "baseline_fid_std",
    "gain",
    "diff_std",
    "paired",
    "diff_std_unpaired",
    "beyond_2std",
    "verdict",
    "warnings",
    "floor_fid_mean",
    "floor_fid_std",
    "floor_num_samples",
]


def final_comparison(
    rows_or_df: Sequence[dict[str, Any]] | pd.DataFrame, primary_space: str | None
) -> pd.DataFrame:
    """Each fine-tuned model against the best training-free baseline at its T, in every space present.

    ``rows_or_df``: rows of ``evaluation.parquet`` (dicts or its DataFrame; rows of another protocol than
    ``"final"`` are ignored). One output row per (space, T, model/trial), the ``primary_space`` first, then
    the other spaces by name; within a space by T, then the model's mean FID.

    Columns (:data:`FINAL_COMPARISON_COLUMNS`): ``space``, ``primary`` (bool), ``timesteps`` (T, sampler
    steps), ``trial_id`` ("" when the model has none), ``model`` (its directory), ``sampler``, ``spacing``,
    ``fid_mean``/``fid_std`` and ``kid_mean``/``kid_std`` of the model (FID/KID in the space's units; mean and
    std ddof=1 over the ``k`` seeds, NaN std with one seed), ``num_samples`` (N images per seed),
    ``reference``, ``preprocessing``, ``best_baseline`` (``"sampler/spacing"`` with the lowest mean FID at that
    T and space; None without baselines), ``baseline_fid_mean``/``baseline_fid_std``, ``gain`` (baseline mean
    - model mean, FID units, positive = the model is better), ``diff_std`` (sqrt(s_model^2 + s_baseline^2)),
    ``beyond_2std`` (``|gain| > 2 diff_std``), ``verdict`` (``"better"``, ``"worse"``, ``"within noise"``, or
    ``""`` without baseline), ``warnings`` (the model's and the baseline's metric warnings) and
    ``floor_fid_mean``/``floor_fid_std``/``floor_num_samples``: the FID of real training images scored under the
    same protocol (``kind="real"`` rows of that space and reference, :func:`mmdsweep.train.protocol.
    real_floor_rows`; NaN/0 without them): the level a sampler that drew exactly from the training data would
    reach, below which no gain can be expected.
    """
    df = _frame(rows_or_df)
    if df.empty or "kind" not in df:
        return pd.DataFrame(columns=FINAL_COMPARISON_COLUMNS)
    if "protocol" in df:
        df = df[df["protocol"] == "final"]
    summary = summarize(df)
    if len(summary) == 0:
        return pd.DataFrame(columns=FINAL_COMPARISON_COLUMNS)
    spaces = sorted(set(summary["space"]), key=lambda s: (s != primary_space, str(s)))
    per_seed: dict[tuple[Any, ...], dict[int, float]] = {}
    ident = list(SUMMARY_KEYS)
    flat = df.assign(trial_id=df["trial_id"].fillna("") if "trial_id" in df else "")
    for key, grp in flat.groupby(ident, dropna=False):
        per_seed[tuple(key)] = {int(sd): float(f) for sd, f in zip(grp["seed"], grp["fid"])}

    def seeds_of(r: Any) -> dict[int, float]:
        return per_seed.get(tuple(r[c] for c in ident), {})

    real = summary[summary["kind"] == "real"]
    out: list[dict[str, Any]] = []
    for space in spaces:
        best = best_baselines(summary, space)
        by_t = {int(r["timesteps"]): r for _, r in best.iterrows()} if len(best) else {}
        models = summary[(summary["kind"] == "model") & (summary["space"] == space)]
        for _, m in models.sort_values(["timesteps", "fid_mean"], kind="stable").iterrows():
            row: dict[str, Any] = {
                "space": space,
                "primary": space == primary_space,
                "timesteps": int(m["timesteps"]),
                "trial_id": str(m["trial_id"]),
                "model": m["model"],
                "sampler": m["sampler"],
                "spacing": m["spacing"],
                "fid_mean": float(m["fid_mean"]),
                "fid_std": float(m["fid_std"]),
                "kid_mean": float(m["kid_mean"]),
                "kid_std": float(m["kid_std"]),
                "k": int(m["k"]),
                "num_samples": int(m["num_samples"]),
                "reference": m["reference"],
                "preprocessing": m.get("preprocessing", ""),
                "best_baseline": None,
                "baseline_fid_mean": math.nan,
                "baseline_fid_std": math.nan,
                "gain": math.nan,
                "diff_std": math.nan,
                "paired": False,
                "diff_std_unpaired": math.nan,
                "beyond_2std": False,
                "verdict": "",
                "warnings": str(m["warnings"]),
                "floor_fid_mean": math.nan,
                "floor_fid_std": math.nan,
                "floor_num_samples": 0,
            }
            floor = real[(real["space"] == space) & (real["reference"] == m["reference"])]
            if len(floor):
                # the floor drawn with the model's N when there is one (FID's bias depends on N)
                same_n = floor[floor["num_samples"] == m["num_samples"]]
                f = (same_n if len(same_n) else floor.sort_values("num_samples", ascending=False)).iloc[0]
                row.update(
                    floor_fid_mean=float(f["fid_mean"]),
                    floor_fid_std=float(f["fid_std"]),
                    floor_num_samples=int(f["num_samples"]),
                )
            b = by_t.get(int(m["timesteps"]))
            if b is not None:
                unpaired = gain_vs_best_baseline(
                    row["fid_mean"], row["fid_std"], float(b["fid_mean"]), float(b["fid_std"])
                )
                pg = paired_gain(seeds_of(m), seeds_of(b))
                g = {
                    "gain": unpaired["gain"] if pg is None else pg["gain"],
                    "diff_std": unpaired["diff_std"] if pg is None else pg["diff_std"],
                    "beyond_2std": unpaired["beyond_2std"] if pg is None else pg["beyond_2std"],
                    "paired": pg is not None,
                    "diff_std_unpaired": unpaired["diff_std"],
                }
                warns = {w for w in (*row["warnings"].split("; "), *str(b["warnings"]).split("; ")) if w}
                row.update(
                    best_baseline=f"{b['sampler']}/{b['spacing']}",
                    baseline_fid_mean=float(b["fid_mean"]),
                    baseline_fid_std=float(b["fid_std"]),
                    verdict=verdict(g["gain"], g["beyond_2std"]),
                    warnings="; ".join(sorted(warns)),
                    **g,
                )
            out.append(row)
    return pd.DataFrame(out, columns=FINAL_COMPARISON_COLUMNS)
